"""`report`: per-run table, the attacks × detectors comparison and ROC figures from run directories."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from backdoorbench.report import write_report


def _run(
    root: Path, name: str, attack: str, defense: str, far5: float, kind: str = "detector", cost: dict | None = None
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
            "seed": 0,
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


def test_comparison_table_and_roc(tmp_path: Path) -> None:
    _run(tmp_path, "0", "badnet_rw", "dan", 0.10)
    _run(tmp_path, "1", "badnet_rw", "strip", 0.50)
    _run(tmp_path, "2", "ripples", "dan", 0.30)
    _run(tmp_path, "3", "ripples", "none", 0.0, kind="none")
    md = write_report(tmp_path)
    assert (tmp_path / "report.csv").read_text().count("\n") == 5  # header + 4 runs
    comp = (tmp_path / "comparison.md").read_text()
    assert "| attack | BA | ASR | dan | strip |" in comp
    assert "**10.0** (90.0, 5.0)" in comp and "**50.0**" in comp
    assert "| **average** | | | **20.0** | **50.0** |" in comp  # dan: mean of 10 and 30
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
                "seed": 0,
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
    assert "| badnets | 98.0 / 100.0 | 97.0 / 0.6 | 90.0 / 2.0 | 95.0 / 50.0 |" in table
    assert "| wanet | 98.0 / 100.0 | — | 70.0 / 10.0 | — |" in table
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
