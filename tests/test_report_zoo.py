"""The model-level table of model-inspection runs over a zoo of clean and backdoored victims (report.zoo): AUROC,
TPR / FPR at the method's flag and the target-class accuracy checked by hand on planted zoos, the clean/backdoored
rule, mean ± std for a zoo repeated per seed, the docs block and the ``report`` command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO_ROOT

from backdoorbench.report.blocks import process_page, update_docs
from backdoorbench.report.zoo import repeated_seeds, zoo_label, zoo_models, zoo_numbers, zoo_table
from backdoorbench.report_groups import collect_runs

CONFIGS = REPO_ROOT / "configs"


def _run(root: Path, name: str, *, attack: str = "badnets", seed: int = 0, score: float | None = 1.0,
         suspected: tuple[int, ...] = (), top: int = 0, target: int | None = 0, config: dict[str, Any] | None = None,
         defense: str = "neural_cleanse", data: str = "mnist5k", model: str = "wrn16_1", write_config: bool = True,
         victim: str | None = None) -> Path:
    """A model-inspection run folder as the pipeline writes it (results.json of the real record's shape, and
    config.yaml with the attack's YAML defaults plus ``config``)."""
    d = root / name
    d.mkdir(parents=True)
    true_target = target if attack != "external" else None
    run = {"attack": attack, "defense": defense, "defense_kind": "inspection", "modality": "vision", "data": data,
           "model": model, "seed": seed, "setting": None, "target": target, "triggered_test": "trigger"}
    metrics = {"ba": 0.9, "asr": 0.5, "verdict_score": score, "flagged": bool(suspected),
               "suspected_targets": list(suspected), "top_class": top, "true_target": true_target,
               "top_class_correct": None if true_target is None else top == true_target,
               "target_flagged": None if true_target is None else true_target in suspected, "clean_size": 200}
    res = {"run": run, "metrics": metrics, "timing": {"attack": 2.0, "defense": 10.0, "total": 12.5}, "cost": {},
           "cache": {"key": victim or f"k{name}", "hit": False}, "inspection": {"classes": list(range(10))}}
    (d / "results.json").write_text(json.dumps(res))
    if write_config:
        node = yaml.safe_load((CONFIGS / "attack" / f"{attack}.yaml").read_text())
        node.pop("defaults", None)
        node.update(config or {})
        (d / "config.yaml").write_text(yaml.safe_dump({"attack": node, "seed": seed}))
    return d


def _planted(root: Path) -> None:
    """3 clean + 3 backdoored victims, by hand: clean scores 0.5, 1.0, 2.5 (the last flagged: a false positive);
    backdoored 3.0 (flagged at its target 0), 2.2 (flagged at class 7, top class 7: wrong), 0.8 (not flagged, top
    class 0 = its target). AUROC: 3 + 2 + 1 of 9 pairs = 6/9; TPR 2/3, FPR 1/3; target as top class 2/3, among
    the flagged 1/3."""
    clean = {"poison_rate": 0}
    _run(root, "c0", seed=0, score=0.5, top=3, config=clean)
    _run(root, "c1", seed=1, score=1.0, top=4, config=clean)
    _run(root, "c2", seed=2, score=2.5, suspected=(1,), top=1, config=clean)
    _run(root, "b0", attack="badnets", seed=0, score=3.0, suspected=(0,), top=0)
    _run(root, "b1", attack="blended", seed=1, score=2.2, suspected=(7,), top=7)
    _run(root, "b2", attack="wanet", seed=2, score=0.8, top=0)


def test_the_model_level_numbers_of_a_planted_zoo_are_the_hand_computed_ones(tmp_path: Path) -> None:
    _planted(tmp_path)
    models, left_out = zoo_models(collect_runs([tmp_path], CONFIGS).runs)
    assert left_out == [] and len(models) == 6
    rec = zoo_numbers(models)
    assert (rec["n_clean"], rec["n_backdoored"], rec["n_targeted"]) == (3, 3, 3)
    assert rec["auroc"] == pytest.approx(6 / 9)
    assert (rec["tpr"], rec["fpr"]) == (pytest.approx(2 / 3), pytest.approx(1 / 3))
    assert rec["target_top_class"] == pytest.approx(2 / 3) and rec["target_flagged"] == pytest.approx(1 / 3)
    # a clean victim's recorded true_target (the attack's target, unused at poison rate 0) is never counted
    assert all(m["true_target"] is None for m in models if not m["backdoored"])
    md = zoo_table(collect_runs([tmp_path], CONFIGS).runs)
    row = next(line for line in md.splitlines() if line.startswith("| neural_cleanse | mnist5k / wrn16_1 | 3 | 3"))
    assert "| pooled | 66.7 | 66.7 (2/3) | 33.3 (1/3) | 66.7 (2/3) | 33.3 (1/3) | 60 | 75 |" in row
    assert "| neural_cleanse | mnist5k / wrn16_1 | blended | backdoored | 0 | 1 | 1 | 2.2 | 1/1 | 0/1 | 0/1 |" in md


def test_an_infinite_score_ranks_first_a_null_one_is_left_out_a_repeat_is_noted(tmp_path: Path) -> None:
    _run(tmp_path, "c0", score=5.0, config={"poison_rate": 0})
    _run(tmp_path, "c1", seed=1, score=None, config={"poison_rate": 0})  # NaN written as null
    _run(tmp_path, "b0", score=float("inf"), suspected=(0,))
    models, _ = zoo_models(collect_runs([tmp_path], CONFIGS).runs)
    assert zoo_numbers(models)["auroc"] == 1.0
    md = zoo_table(collect_runs([tmp_path], CONFIGS).runs)
    assert "left out of the AUROC" in md and "inspected a victim" not in md
    _run(tmp_path, "b0_again", score=4.0, suspected=(0,), victim="kb0")  # the same victim inspected twice
    assert "1 run(s) inspected a victim (cache key)" in zoo_table(collect_runs([tmp_path], CONFIGS).runs)


@pytest.mark.parametrize(("attack", "config", "expected"), [
    ("badnets", {"poison_rate": 0}, False),
    ("badnets", {"poison_rate": 0.0}, False),
    ("badnets", {"poison_rate": 0.1}, True),
    ("badnet_rw", {"poison_rate": 0}, False),
    ("dfep", {}, True),  # weight poisoning: no poison_rate, always backdoored
    ("neuba", {}, True),
    ("external", {}, None),  # a user's checkpoint: no ground truth
])
def test_a_victim_is_backdoored_iff_its_poison_rate_is_positive(
    tmp_path: Path, attack: str, config: dict[str, Any], expected: bool | None,
) -> None:
    _run(tmp_path, "r", attack=attack, config=config)
    (res,) = collect_runs([tmp_path], CONFIGS).runs
    assert zoo_label(res)[0] is expected


def test_external_and_unlabelled_runs_are_left_out_with_a_note(tmp_path: Path) -> None:
    zoo = tmp_path / "zoo"
    _planted(zoo)
    _run(zoo, "ext", attack="external", score=9.0, suspected=(2,), top=2, target=None)
    _run(zoo, "bare", score=9.0, write_config=False)
    runs = collect_runs([zoo], CONFIGS).runs
    models, left_out = zoo_models(runs)
    assert len(models) == 6 and zoo_numbers(models)["auroc"] == pytest.approx(6 / 9)  # as without them
    reasons = {Path(x["dir"]).name: x["reason"] for x in left_out}
    assert reasons["ext"].startswith("attack=external") and "config.yaml" in reasons["bare"]
    md = zoo_table(runs)
    assert "Left out (2 run(s))" in md  # named from the zoo's folder, not the machine's absolute path
    assert "- `zoo/ext`: attack=external: a model with no ground truth" in md and str(tmp_path) not in md


def test_a_zoo_repeated_per_seed_gives_mean_and_std_over_its_seeds(tmp_path: Path) -> None:
    # per seed: one clean victim and two backdoored (badnets, blended). Seed 0 ranks every backdoored one above the
    # clean one (AUROC 1); seed 1 ranks the clean one between them (0.5): 75.0 ± 35.4 (ddof=1) over n = 2 seeds
    for seed, (clean, bad, blend) in enumerate([(1.0, 3.0, 2.0), (2.0, 3.0, 1.0)]):
        _run(tmp_path, f"c{seed}", seed=seed, score=clean, config={"poison_rate": 0})
        _run(tmp_path, f"b{seed}", seed=seed, score=bad, suspected=(0,), top=0)
        _run(tmp_path, f"l{seed}", attack="blended", seed=seed, score=blend, top=0 if seed == 0 else 3)
    runs = collect_runs([tmp_path], CONFIGS).runs
    models, _ = zoo_models(runs)
    assert repeated_seeds(models) == [0, 1]
    md = zoo_table(runs)
    assert "| 2 (repeated) | 75.0 ± 35.4 | 50.0 ± 0.0 | 0.0 ± 0.0 | 75.0 ± 35.4 | 50.0 ± 0.0 |" in md
    _run(tmp_path, "extra", attack="wanet", seed=1, score=0.1)  # seed 1 now differs from seed 0: pooled
    assert repeated_seeds(zoo_models(collect_runs([tmp_path], CONFIGS).runs)[0]) == []


def test_a_zoo_block_renders_from_records_and_says_so_before_they_exist(tmp_path: Path) -> None:
    _planted(tmp_path / "runs" / "zoo")
    (tmp_path / "configs").symlink_to(CONFIGS)
    page = "# zoo\n\n<!-- report:begin runs=runs/zoo table=zoo legend=1 -->\n<!-- report:end -->\n"
    text = process_page(page, tmp_path)
    assert "| pooled | 66.7 | 66.7 (2/3) |" in text and "from the 6 run records in `runs/zoo`" in text
    assert "- `badnets#" in text and "poison_rate=0" in text  # the clean victims' config in the legend
    missing = process_page(page.replace("runs/zoo", "runs/not_yet"), tmp_path)
    assert "No record of this zoo is kept yet (`runs/not_yet`)" in missing
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "zoo.md").write_text(text)
    assert update_docs(tmp_path, check=True) == []  # the rendered block equals its records


def test_report_cli_writes_the_zoo_table_figure_and_csvs(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import csv

    from backdoorbench.cli import main

    monkeypatch.setenv("BACKDOORBENCH_CONFIG_DIR", str(CONFIGS))
    _planted(tmp_path / "zoo")
    assert main(["report", str(tmp_path / "zoo"), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "## Model inspection over the zoo" in out and "| pooled | 66.7 | 66.7 (2/3) | 33.3 (1/3) |" in out
    rep = tmp_path / "rep"
    (row,) = csv.DictReader((rep / "zoo.csv").open())
    assert float(row["auroc"]) == pytest.approx(6 / 9) and row["n_clean"] == "3"
    assert len(list(csv.DictReader((rep / "zoo_models.csv").open()))) == 6
    assert (rep / "zoo.md").is_file() and (rep / "roc_zoo_neural_cleanse_mnist5k_wrn16_1.png").stat().st_size > 0
