"""The docs' generated tables (report.blocks), the per-seed tables with paired differences (report.seeds) and the
published figures beside ours (report.reference)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from backdoorbench.report import write_report
from backdoorbench.report.blocks import process_page, unmarked_tables, update_docs
from backdoorbench.report.reference import reference_table
from backdoorbench.report.seeds import defended_by_seed
from backdoorbench.report_groups import collect_runs


def _repair_run(root: Path, name: str, seed: int, ba: float, ba_after: float, asr_after: float = 0.1,
                defense: str = "anp", data: str = "mnist5k", rate: float | None = None) -> None:
    d = root / name
    d.mkdir(parents=True)
    kind = "none" if defense == "none" else "repair"
    run = {"attack": "badnets", "defense": defense, "defense_kind": kind, "data": data, "model": "wrn16_1",
           "seed": seed}
    metrics = {"ba": ba, "asr": 1.0, "ba_after": ba_after, "asr_after": asr_after, "r_acc_after": 0.5}
    (d / "results.json").write_text(json.dumps({"run": run, "metrics": metrics}))
    if rate is not None:  # the poison rate the reference table compares
        (d / "config.yaml").write_text(f"attack:\n  poison_rate: {rate}\n")


def test_every_docs_block_equals_what_report_prints_from_its_records_and_no_table_is_unmarked() -> None:
    assert update_docs(REPO_ROOT, check=True) == []


def test_a_block_is_rewritten_from_its_records_and_a_changed_figure_is_caught(tmp_path: Path) -> None:
    _repair_run(tmp_path / "runs", "0", 0, 0.98, 0.61)
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "results.md"
    page.write_text("# r\n\n  <!-- report:begin runs=runs table=defended_by_seed -->\n  stale\n  <!-- report:end -->\n")
    assert update_docs(tmp_path, check=True)  # the stale block differs from its records
    assert update_docs(tmp_path) == []
    text = page.read_text()
    assert "  | badnets | 0 | 98.0 / 100.0 | 61.0 / 10.0 |" in text  # indented like its begin line
    assert update_docs(tmp_path, check=True) == []
    page.write_text(text.replace("61.0 / 10.0", "61.1 / 10.0"))  # a figure typed over the generated one
    assert update_docs(tmp_path, check=True)


def test_a_table_must_be_generated_or_marked(tmp_path: Path) -> None:
    table = "| a | b |\n|---|---|\n| 1 | 2 |\n"
    assert unmarked_tables("text\n\n" + table) == [3]
    assert unmarked_tables("```\n" + table + "```\n") == []  # a table in a code fence is not counted
    assert unmarked_tables("<!-- report:not-a-result settings -->\n\n" + table) == []
    assert unmarked_tables("<!-- report:not-a-result settings -->\n\n" + table + "\n" + table) == [7]  # one each
    marked = '<!-- report:none reason="records lost" regenerate="bash scripts/tables.sh x" cpu="5 min" -->\n\n' + table
    assert unmarked_tables(marked) == []
    note = process_page(marked, tmp_path)  # the marker gets a visible note for the reader
    assert "> **Not regenerated from kept records.** Records lost." in note
    assert "`bash scripts/tables.sh x` (CPU time: 5 min)" in note
    assert process_page(note, tmp_path) == note  # the note is replaced, not repeated
    example = "```text\n<!-- report:begin runs=nowhere table=defended -->\n<!-- report:end -->\n```\n"
    assert process_page(example, tmp_path) == example  # a marker in a code fence is an example, not a block


def test_a_block_with_missing_records_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        process_page("<!-- report:begin runs=nowhere table=defended -->\n<!-- report:end -->\n", tmp_path)
    with pytest.raises(ValueError, match="table="):
        process_page("<!-- report:begin runs=nowhere table=bogus -->\n<!-- report:end -->\n", tmp_path)


def test_paired_differences_come_from_unrounded_values(tmp_path: Path) -> None:
    # seed 0: 80.049 -> 80.151 is +0.102 points (rounded cells would say 80.0 -> 80.2, +0.2); seed 1: +0.102 too
    _repair_run(tmp_path, "0", 0, 0.80049, 0.80151)
    _repair_run(tmp_path, "1", 1, 0.80049, 0.80151)
    md = defended_by_seed(collect_runs([tmp_path]).runs)
    assert "| badnets | 0 | 80.0 / 100.0 | 80.2 / 10.0 |" in md
    assert "| **badnets, change (paired)** | n = 2 |  | +0.1 ± 0.0 / −90.0 ± 0.0 |" in md
    assert "| **badnets, mean ± std** | n = 2 | 80.0 ± 0.0 / 100.0 ± 0.0 | 80.2 ± 0.0 / 10.0 ± 0.0 |" in md


def test_reference_puts_the_published_figure_beside_ours_with_a_scale_note(tmp_path: Path) -> None:
    _repair_run(tmp_path / "runs", "0", 0, 0.98, 0.61, rate=0.1)
    runs = collect_runs([tmp_path / "runs"]).runs
    md = reference_table(runs)  # the package's published.csv: BackdoorBench's ANP row for BadNets
    assert "| badnets | anp | ba_after | 61.0 | 84.17 | BackdoorBench leaderboard |" in md
    assert "**different scale**: data mnist5k vs cifar10; model wrn16_1 vs preact_resnet18" in md
    csv = tmp_path / "mine.csv"
    csv.write_text("source,attack,defense,data,model,poison_rate,config,metric,value\n"
                   "paper A,badnets,anp,mnist5k,wrn16_1,0.1,,ba_after,60.5\n"
                   "paper A,badnets,anp,mnist5k,wrn16_1,0.1,eps=0.2,ba_after,99.9\n"  # a variant: not our cell
                   "paper B,badnets,anp,mnist5k,wrn16_1,0.05,,asr_after,3.0\n")
    md = reference_table(runs, csv)
    assert "| 61.0 | 60.5 | paper A | mnist5k / wrn16_1 / 0.1: same scale |" in md
    assert "99.9" not in md
    assert "| 10.0 | 3.0 | paper B | mnist5k / wrn16_1 / 0.1: **different scale**: poison rate 10% vs 5% |" in md
    _repair_run(tmp_path / "none", "0", 0, 0.97, 0.0, defense="none", rate=0.1)  # a victim without a defense
    md = reference_table(collect_runs([tmp_path / "none"]).runs)
    assert "| badnets | none (victim) | ba | 97.0 | 91.32 | BackdoorBench leaderboard |" in md and "ba_after" not in md


def test_report_reference_writes_the_comparison(tmp_path: Path) -> None:
    from backdoorbench.report.reference import DEFAULT_CSV

    _repair_run(tmp_path, "0", 0, 0.98, 0.61)
    _repair_run(tmp_path, "1", 1, 0.97, 0.63)
    md = write_report(tmp_path, reference=DEFAULT_CSV)
    assert "## Published figures" in md and "84.17" in md
    assert "| 62.0 (n=2) | 84.17 |" in (tmp_path / "reference.md").read_text()
    assert "change (paired)" in (tmp_path / "by_seed.md").read_text()


def test_report_warns_when_a_table_mixes_environments(tmp_path: Path) -> None:
    from backdoorbench.engine.determinism import environment
    from backdoorbench.report_groups import reproducibility_warnings

    env = environment("cpu")
    assert {"threads", "cpu", "device", "torch", "numpy"} <= set(env)
    other_cpu = {**env, "cpu": "another CPU"}
    for name, run_env, victim_env in (("0", env, env), ("1", other_cpu, {**env, "threads": env["threads"] + 1})):
        _repair_run(tmp_path, name, int(name), 0.98, 0.61)
        versions = {"torch": "2", "environment": run_env, "victim_environment": victim_env}
        (tmp_path / name / "versions.json").write_text(json.dumps(versions))
    runs = collect_runs([tmp_path]).runs
    warnings = reproducibility_warnings(runs)
    assert any(w.startswith("the runs ran in different environments: cpu: ") and "another CPU" in w for w in warnings)
    assert any(w.startswith("their victims were trained in different environments: threads: ") for w in warnings)
    md = write_report(tmp_path)
    assert "the table mixes runs: the runs ran in different environments" in md
    assert "library versions" not in md  # the environments are not read as a library-version difference
    (tmp_path / "1" / "versions.json").write_text(json.dumps({"torch": "2"}))  # a run from before environments
    assert "1 of 2 run(s) without a recorded environment (environment)" in reproducibility_warnings(
        collect_runs([tmp_path]).runs)
