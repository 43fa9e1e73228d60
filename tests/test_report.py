"""`report`: per-run table, the attacks × detectors comparison and ROC figures from run directories."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from backdoorbench.report import write_report


def _run(
    root: Path,
    name: str,
    attack: str,
    defense: str,
    far5: float,
    kind: str = "detector",
    cost: dict | None = None,
    seed: int = 0,
) -> None:
    d = root / name
    d.mkdir(parents=True)
    metrics = {"ba": 0.8, "asr": 1.0}
    if kind == "detector":
        metrics.update(far=far5, frr=0.05, auroc=0.9, far_at_frr={"0.05": far5, "0.1": far5 / 2})
    res = {
        "run": {
            "attack": attack,
            "setting": "afm",
            "defense": defense,
            "defense_kind": kind,
            "data": "rt",
            "model": "m",
            "seed": seed,
        },
        "metrics": metrics,
        "cost": cost or {"forward_passes_per_input": 2.0, "seconds_per_100_inputs": 1.5},
    }
    (d / "results.json").write_text(json.dumps(res))
    with (d / "scores.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["split", "index", "label", "pred", "score", "rejected", "attack_success"])
        for i in range(10):
            w.writerow(["clean", i, 0, 0, i / 10, 0, ""])
        for i in range(10):
            w.writerow(["poisoned", i, 0, 1, 0.5 + i / 10, 0, 1])


def test_comparison_average_over_complete_table_bolds_lowest(tmp_path: Path) -> None:
    _run(tmp_path, "0", "badnet_rw", "dan", 0.10)
    _run(tmp_path, "1", "badnet_rw", "rap", 0.40)
    _run(tmp_path, "2", "ripples", "dan", 0.50)
    _run(tmp_path, "3", "ripples", "rap", 0.20)
    write_report(tmp_path)
    comp = (tmp_path / "comparison.md").read_text()
    assert "| **10.0** (90.0, 5.0) | 40.0 (90.0, 5.0) |" in comp
    assert "| 50.0 (90.0, 5.0) | **20.0** (90.0, 5.0) |" in comp
    assert "| **average** | | | 30.0 | **30.0** |" not in comp
    assert "| **average** | | | **30.0** | **30.0** |" in comp  # a tie (as printed) is bold on both sides


def test_cells_averaging_different_seed_counts_show_their_n(tmp_path: Path) -> None:
    for seed, far in ((0, 0.10), (1, 0.30), (2, 0.20)):
        _run(tmp_path, f"dan{seed}", "badnet_rw", "dan", far, seed=seed)
    _run(tmp_path, "rap0", "badnet_rw", "rap", 0.40)
    write_report(tmp_path)
    comp = (tmp_path / "comparison.md").read_text()
    assert "which differ between cells" in comp
    assert "| **20.0** (90.0, 5.0; n=3) | 40.0 (90.0, 5.0; n=1) |" in comp
    rows = {r["detector"]: r for r in csv.DictReader((tmp_path / "comparison.csv").open())}
    assert (rows["dan"]["n"], rows["rap"]["n"]) == ("3", "1")


def test_cells_with_one_seed_count_say_it_once(tmp_path: Path) -> None:
    for seed in (0, 1):
        _run(tmp_path, f"dan{seed}", "badnet_rw", "dan", 0.1, seed=seed)
        _run(tmp_path, f"rap{seed}", "badnet_rw", "rap", 0.4, seed=seed)
    write_report(tmp_path)
    comp = (tmp_path / "comparison.md").read_text()
    assert "each cell is the mean of 2 runs (seeds)." in comp and "n=" not in comp
    assert "| **10.0** (90.0, 5.0) | 40.0 (90.0, 5.0) |" in comp


def test_comparison_table_and_roc(tmp_path: Path) -> None:
    _run(tmp_path, "0", "badnet_rw", "dan", 0.10)
    _run(tmp_path, "1", "badnet_rw", "strip", 0.50)
    _run(tmp_path, "2", "ripples", "dan", 0.30)
    _run(tmp_path, "3", "ripples", "none", 0.0, kind="none")
    md = write_report(tmp_path)
    assert (tmp_path / "report.csv").read_text().count("\n") == 5  # header + 4 runs
    comp = (tmp_path / "comparison.md").read_text()
    assert "| attack | BA | ASR | dan | strip |" in comp
    assert "| **10.0** (90.0, 5.0) | 50.0 (90.0, 5.0) |" in comp  # only the row's lowest FAR in bold
    # ripples has no STRIP run, so the average is over badnet_rw alone, and says so
    assert "| **average** (1 of 2 attacks: those every detector has) | | | **10.0** | 50.0 |" in comp
    rows = list(csv.DictReader((tmp_path / "comparison.csv").open()))
    assert {(r["attack"], r["detector"]) for r in rows} == {
        ("badnet_rw (afm)", "dan"),
        ("badnet_rw (afm)", "strip"),
        ("ripples (afm)", "dan"),
    }
    assert (tmp_path / "roc_badnet_rw__afm.png").stat().st_size > 0
    assert (tmp_path / "roc_ripples__afm.png").stat().st_size > 0
    assert "FAR (%) at 5% FRR" in md


def test_report_without_results_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no results.json"):
        write_report(tmp_path)


def test_cost_comes_from_runs_that_scored_every_input(tmp_path: Path) -> None:
    full = {"forward_passes_per_input": 1.0, "lm_passes_per_input": 20.0, "seconds_per_100_inputs": 50.0}
    cached = {"forward_passes_per_input": 1.0, "lm_passes_per_input": 5.0, "seconds_per_100_inputs": 10.0}
    _run(tmp_path, "0", "badnet_rw", "onion", 0.2, cost={**full, "cached_inputs": 0})
    _run(tmp_path, "1", "ripples", "onion", 0.4, cost={**cached, "cached_inputs": 900})
    _run(tmp_path, "2", "ripples", "dan", 0.1, cost={**cached, "cached_inputs": 900})
    comp = write_report(tmp_path) and (tmp_path / "comparison.md").read_text()
    assert "| onion | 1.0 | 20.0 | 50.00 |" in comp  # the cached run's cheaper figures are left out
    assert "| dan † | 1.0 | 5.0 | 10.00 |" in comp and "cost understated" in comp


def test_repair_and_training_runs_get_their_own_table(tmp_path: Path) -> None:
    for i, (attack, defense, kind, after) in enumerate(
        [
            ("badnets", "nad", "repair", (0.9, 0.02)),
            ("badnets", "rnp", "repair", (0.95, 0.5)),
            ("wanet", "nad", "repair", (0.7, 0.1)),
            ("badnets", "dbd", "training", (0.97, 0.006)),
            ("badnets", "dbd", "training", (0.95, 0.004)),  # a second seed of one cell
        ]
    ):
        d = tmp_path / f"{i}"
        d.mkdir()
        res = {
            "run": {
                "attack": attack,
                "setting": None,
                "defense": defense,
                "defense_kind": kind,
                "data": "mnist5k",
                "model": "wrn16_1",
                "seed": 1 if i == 4 else 0,
            },
            "metrics": {
                "ba": 0.98,
                "asr": 1.0,
                "ba_after": after[0],
                "asr_after": after[1],
                "r_acc_after": 0.5,
                "der": 0.9,
            },
        }
        (d / "results.json").write_text(json.dumps(res))
    md = write_report(tmp_path)
    table = (tmp_path / "defended.md").read_text()
    assert table in md and "| attack | victim BA / ASR | dbd | nad | rnp |" in table
    assert "| badnets | 98.0 / 100.0 | 96.0 / 0.5 (n=2) | 90.0 / 2.0 (n=1) | 95.0 / 50.0 (n=1) |" in table
    assert "| wanet | 98.0 / 100.0 | — | 70.0 / 10.0 (n=1) | — |" in table
    assert "comparison.md" not in {p.name for p in tmp_path.iterdir()}  # no detector runs, no detector table


def test_unreadable_results_are_skipped_with_a_warning_naming_them(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    _run(tmp_path, "0", "badnet_rw", "dan", 0.10)
    _run(tmp_path, "1", "ripples", "dan", 0.30)
    truncated = tmp_path / "1" / "results.json"
    truncated.write_text(truncated.read_text()[:40])  # a run killed while writing its results
    _run(tmp_path, "2", "ripples", "strip", 0.50)
    not_a_run = tmp_path / "2" / "results.json"
    not_a_run.write_text("[]")
    with caplog.at_level("WARNING", logger="backdoorbench.report"):
        md = write_report(tmp_path)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2
    assert str(truncated) in warned[0] and str(not_a_run) in warned[1]
    assert (tmp_path / "report.csv").read_text().count("\n") == 2  # header + the one readable run
    assert "badnet_rw" in md and "ripples" not in md
    truncated.write_text("")
    (tmp_path / "0" / "results.json").write_text("{")
    with pytest.raises(FileNotFoundError, match="no readable results.json"):
        write_report(tmp_path)


# -- groups, mean ± std and n, merged sweeps, failed jobs, mixing (issue 15) ---------------------------------
VERSIONS = {"backdoorbench": "0.9.0", "python": "3.11.9", "platform": "Linux-a", "torch": "2.13.0", "cuda": "none"}
TRAINER = {"max_epochs": 2, "batch_size": 16, "lr": 0.01}


def _defaults(root: Path) -> Path:
    """A config folder with the components' defaults (what ``attack=badnets`` / ``defense=dan`` give)."""
    cdir = root / "configs"
    (cdir / "attack").mkdir(parents=True)
    (cdir / "defense").mkdir()
    (cdir / "attack" / "badnets.yaml").write_text(
        "defaults:\n  - override /data@_global_.data: mnist5k\nname: badnets\ntarget: 0\npoison_rate: 0.1\n"
    )
    (cdir / "defense" / "dan.yaml").write_text("name: dan\nfrr: 0.05\npooling: cls\n")
    (cdir / "config.yaml").write_text("seed: 0\n")
    return cdir


def _full_run(root: Path, name: str, seed: int, ba: float, far: float | None = 0.1, data: str = "mnist5k",
              model: str = "wrn16_1", defense_cfg: dict | None = None, attack_cfg: dict | None = None,
              trainer: dict | None = None, versions: dict | None = None) -> Path:
    """A run folder as the pipeline writes it: results.json, config.yaml (resolved) and versions.json."""
    import yaml

    d = root / name
    d.mkdir(parents=True)
    attack = {"name": "badnets", "target": 0, "poison_rate": 0.1, **(attack_cfg or {})}
    defense = {"name": "dan", "frr": 0.05, "pooling": "cls", **(defense_cfg or {})}
    config = {"seed": seed, "attack": attack, "defense": defense, "data": {"name": data, "max_train": 100},
              "model": {"name": model}, "trainer": {**TRAINER, **(trainer or {})}}
    metrics = {"ba": ba, "asr": 1.0, "frr": 0.05, "auroc": 0.9}
    if far is not None:
        metrics.update(far=far, far_at_frr={"0.05": far})
    res = {"run": {"attack": "badnets", "setting": None, "defense": "dan", "defense_kind": "detector", "data": data,
                   "model": model, "seed": seed}, "metrics": metrics, "cost": {"forward_passes_per_input": 1.0,
                                                                              "seconds_per_100_inputs": 1.0}}
    (d / "results.json").write_text(json.dumps(res))
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    (d / "versions.json").write_text(json.dumps({**VERSIONS, **(versions or {})}))
    return d


def _summary(out: Path) -> dict[tuple[str, str, str, str], dict[str, str]]:
    return {(r["data"], r["model"], r["attack"], r["defense"]): r for r in csv.DictReader((out / "summary.csv").open())}


def test_runs_are_grouped_by_data_model_and_configs_with_mean_std_and_n(tmp_path: Path) -> None:
    from backdoorbench.report_groups import short_hash

    cdir, runs = _defaults(tmp_path), tmp_path / "sweep"
    for seed, ba, far in ((0, 0.80, 0.1), (1, 0.90, 0.2), (2, 0.85, 0.3)):
        _full_run(runs, f"{seed}_default", seed, ba, far)
    for seed, ba in ((0, 0.70), (1, 0.60)):
        _full_run(runs, f"{seed}_frr", seed, ba, defense_cfg={"frr": 0.01})
    _full_run(runs, "0_resnet", 0, 0.5, model="resnet18")
    _full_run(runs, "0_cifar", 0, 0.4, data="cifar10", attack_cfg={"poison_rate": 0.2})
    md = write_report(runs, config_dir=cdir)
    dan_frr, badnets_rate = f"dan#{short_hash({'frr': 0.01})}", f"badnets#{short_hash({'poison_rate': 0.2})}"
    groups = _summary(runs)
    assert set(groups) == {
        ("mnist5k", "wrn16_1", "badnets", "dan"),
        ("mnist5k", "wrn16_1", "badnets", dan_frr),
        ("mnist5k", "resnet18", "badnets", "dan"),
        ("cifar10", "wrn16_1", badnets_rate, "dan"),
    }
    g = groups["mnist5k", "wrn16_1", "badnets", "dan"]
    assert (g["n"], g["seeds"], g["ba_n"], g["warnings"]) == ("3", "0 1 2", "3", "")
    assert float(g["ba_mean"]) == pytest.approx(0.85) and float(g["ba_std"]) == pytest.approx(0.05)  # ddof=1
    assert float(g["far_mean"]) == pytest.approx(0.2) and float(g["far_std"]) == pytest.approx(0.1)
    g = groups["mnist5k", "wrn16_1", "badnets", dan_frr]
    assert g["n"] == "2" and float(g["ba_mean"]) == pytest.approx(0.65)
    assert float(g["ba_std"]) == pytest.approx(0.0707107, abs=1e-6)
    single = groups["mnist5k", "resnet18", "badnets", "dan"]
    assert single["n"] == "1" and single["ba_std"] == "nan"
    assert "| mnist5k | wrn16_1 | badnets | dan | 3 | 0 1 2 | 85.0 ± 5.0 |" in md
    assert "| mnist5k | resnet18 | badnets | dan | 1 | 0 | 50.0 |" in md  # one sample: no spread shown
    assert f"- `{dan_frr}`: frr=0.01" in md and f"- `{badnets_rate}`: poison_rate=0.2" in md
    assert "mix runs" not in md
    # the detector table no longer averages over datasets and models either
    comp = (runs / "comparison.md").read_text()
    assert "| mnist5k / wrn16_1: badnets |" in comp and "| cifar10 / wrn16_1: badnets#" in comp
    assert "| attack | BA | ASR | dan | " + dan_frr + " |" in comp


def test_a_key_the_component_does_not_declare_is_not_a_config_difference(tmp_path: Path) -> None:
    # ++defense.lm_dtype=bfloat16 in a sweep over defense=dan,onion: DAN's run ignored the key (config.py drops
    # it with a warning) but its config.yaml still holds it; its label must not suggest DAN ran in bf16
    cdir, runs = _defaults(tmp_path), tmp_path / "sweep"
    _full_run(runs, "0_plain", 0, 0.8)
    _full_run(runs, "1_forced", 1, 0.9, defense_cfg={"lm_dtype": "bfloat16"})
    _full_run(runs, "2_frr", 2, 0.7, defense_cfg={"lm_dtype": "bfloat16", "frr": 0.01})
    md = write_report(runs, config_dir=cdir)
    groups = _summary(runs)
    assert groups["mnist5k", "wrn16_1", "badnets", "dan"]["n"] == "2"
    assert "lm_dtype" not in md and "frr=0.01" in md


def test_several_sweep_folders_are_merged(tmp_path: Path, capsys: pytest.CaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from backdoorbench.cli import main

    monkeypatch.setenv("BACKDOORBENCH_CONFIG_DIR", str(_defaults(tmp_path)))
    monkeypatch.chdir(tmp_path)
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "merged"
    _full_run(a, "0", 0, 0.8)
    _full_run(a, "1", 1, 0.9)
    _full_run(b, "0", 2, 1.0)
    assert main(["report", str(a), str(b), "--out", str(out)]) == 0
    (g,) = _summary(out).values()
    assert (g["n"], g["seeds"]) == ("3", "0 1 2") and float(g["ba_mean"]) == pytest.approx(0.9)
    assert float(g["ba_std"]) == pytest.approx(0.1)
    assert (out / "report.csv").read_text().count("\n") == 4 and f"written to {out}/" in capsys.readouterr().out
    assert main(["report", str(a), str(a / "0")]) == 0  # a folder reached twice is one run
    assert _summary(Path("report"))["mnist5k", "wrn16_1", "badnets", "dan"]["n"] == "2"


def test_failed_jobs_and_unreadable_files_are_listed(tmp_path: Path) -> None:
    runs = tmp_path / "sweep"
    _full_run(runs, "0", 0, 0.8)
    for name, text in (
        ("1_badnets_onion", json.dumps({"error": "ConfigError: defense onion supports text, not vision\ntrace",
                                        "overrides": ["attack=badnets", "defense=onion"], "type": "ConfigError"})),
        ("2_list", "[1, 2]"),
        ("3_truncated", '{"error": "x'),
        ("4_no_error", json.dumps({"overrides": "attack=wanet defense=dan"})),
    ):
        (runs / name).mkdir()
        (runs / name / "failed.json").write_text(text)
    (runs / "0" / "failed.json").write_text(json.dumps({"error": "an earlier attempt"}))  # then it succeeded
    (runs / "5").mkdir()
    (runs / "5" / "results.json").write_text('{"run": ')  # killed while writing
    (runs / "0" / "versions.json").write_text("{")
    md = write_report(runs, config_dir=_defaults(tmp_path))
    assert "## Failed jobs (4)" in md
    assert f"| {runs / '1_badnets_onion'} | ConfigError: defense onion supports text, not vision | " \
           "attack=badnets defense=onion |" in md
    assert f"| {runs / '2_list'} | failed.json is not a JSON object |" in md
    assert f"| {runs / '3_truncated'} | unreadable failed.json (" in md
    assert f"| {runs / '4_no_error'} | no reason recorded | attack=wanet defense=dan |" in md
    assert "an earlier attempt" not in md
    assert "## Skipped files (2)" in md and str(runs / "5" / "results.json") in md
    assert f"| {runs / '0' / 'versions.json'} | unreadable (" in md

    only_failed = tmp_path / "only_failed"
    (only_failed / "0").mkdir(parents=True)
    (only_failed / "0" / "failed.json").write_text(json.dumps({"error": "boom", "overrides": []}))
    assert "## Failed jobs (1)" in write_report(only_failed)  # a sweep where every job failed still reports


def test_a_group_that_mixes_runs_says_so(tmp_path: Path) -> None:
    runs = tmp_path / "sweep"
    _full_run(runs, "a", 0, 0.8)
    _full_run(runs, "b", 0, 0.8)  # the same seed twice: not two samples
    _full_run(runs, "c", 1, 0.9, versions={"torch": "2.4.0", "backdoorbench": "0.8.0", "platform": "Linux-b"})
    _full_run(runs, "d", 2, 0.7, trainer={"max_epochs": 5})
    _full_run(runs, "e", 0, 0.8, model="resnet18")  # alone in its group: nothing to warn about
    md = write_report(runs, config_dir=_defaults(tmp_path))
    (mixed,) = [g for g in _summary(runs).values() if g["warnings"]]
    warnings = mixed["warnings"]
    assert f"duplicate: seed 0 in 2 runs ({runs / 'a'}, {runs / 'b'})" in warnings
    assert 'different code version: backdoorbench: "0.8.0" | "0.9.0"' in warnings
    assert 'different library versions: torch: "2.13.0" | "2.4.0"' in warnings and "platform" not in warnings
    assert "different trainer configs: max_epochs: 2 | 5" in warnings
    assert "## Groups that mix runs they should not" in md and "| dan ⚠2 | 4 | 0 0 1 2 |" in md  # ⚠<row number>
    assert "0.9.0" in md and "different" in md and "without versions.json" not in md


def test_mean_std_uses_finite_values_and_ddof_1() -> None:
    from backdoorbench.report_groups import mean_std

    assert mean_std([0.2, 0.4, None, float("nan")]) == pytest.approx((0.3, 0.1414213562, 2))
    mean, std, n = mean_std([0.5])
    assert (mean, n) == (0.5, 1) and std != std
    assert mean_std([])[2] == 0


def test_report_shows_the_reason_the_sweep_wrote(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Round trip: a failed.json written by the sweep's own writer is read back by report with its reason."""
    from omegaconf import OmegaConf

    from backdoorbench.cli import failure_line, main
    from backdoorbench.config import ConfigError
    from backdoorbench.engine.sweep import write_failed

    runs = tmp_path / "sweep"
    _full_run(runs, "0", 0, 0.8)
    exc = ConfigError("attack.size=100 does not fit 28x28 images")
    cfg = OmegaConf.create({"attack": {"name": "badnets", "size": 100}})
    assert write_failed(runs / "1", exc, failure_line(exc), True, ["attack.size=100"], cfg) is not None
    md = write_report(runs, config_dir=_defaults(tmp_path))
    assert f"| {runs / '1'} | {failure_line(exc)} | attack.size=100 |" in md
    assert "no reason recorded" not in md
    assert main(["report", str(runs), "--out", str(tmp_path / "rep")]) == 0
    summary = (tmp_path / "rep" / "summary.md").read_text()
    assert failure_line(exc) in summary and "no reason recorded" not in summary
