"""One device per run (issue 14): ``trainer.accelerator`` resolves once (auto → the CPU on this machine, CUDA /
MPS where visible), the victim lives on the run's device after a cache miss and after a cache hit (a non-CPU
device simulated with ``meta``, to which a CPU model can be moved), ``fit_module`` brings a module back to the
device it trained on after Lightning's teardown moved it to the CPU, and batched inference runs under autocast
only when ``trainer.inference_precision`` asks for it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from backdoorbench.attacks.base import AttackResult
from backdoorbench.cli import config_dir
from backdoorbench.data.base import Samples
from backdoorbench.engine.spec import validate
from backdoorbench.engine.victim import obtain_victim
from backdoorbench.modality.vision import ImageSpec, VisionClassifier
from backdoorbench.runtime import Runtime, current, run_scope
from backdoorbench.trainer.lit import (
    ClassifierModule,
    TrainConfig,
    fit_module,
    lightning_device,
    make_loader,
    resolve_device,
    runtime_for,
)

SPEC = ImageSpec(channels=1, height=8, width=8, mean=(0.5,), std=(0.5,), flip=False)


def tiny_classifier() -> VisionClassifier:
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("body", nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1)))
    net.add_module("head", nn.Sequential(nn.Flatten(), nn.Linear(4, 3)))
    return VisionClassifier(net, 3, SPEC, ["body"], augment=False)


def tiny_images(n: int = 24) -> Samples:
    g = torch.Generator().manual_seed(0)
    return Samples(torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8), np.arange(n) % 3, "vision")


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=list(overrides))


# -- resolving the accelerator -----------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="needs a CPU-only host")
def test_auto_is_the_cpu_here_and_the_run_spec_carries_it() -> None:
    assert resolve_device(TrainConfig()) == torch.device("cpu")
    assert validate(compose_cfg()).device == torch.device("cpu")
    assert runtime_for(TrainConfig()).device == torch.device("cpu")
    with pytest.raises(ValueError, match="no GPU visible"):
        TrainConfig(accelerator="gpu")


def test_auto_prefers_cuda_then_mps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device(TrainConfig(accelerator="gpu", devices=[2])) == torch.device("cuda", 2)
    assert resolve_device(TrainConfig(accelerator="cpu")) == torch.device("cpu")


def test_lightning_gets_the_resolved_device() -> None:
    assert lightning_device(torch.device("cuda", 1)) == ("gpu", [1])
    assert lightning_device(torch.device("cuda", 0), 2) == ("gpu", 2)  # ddp over two GPUs
    assert lightning_device(torch.device("cpu"), 4) == ("cpu", 1)
    assert lightning_device(torch.device("mps")) == ("mps", 1)


def test_the_run_scope_is_restored_after_the_run() -> None:
    assert current().device is None
    with run_scope(Runtime(device=torch.device("cpu"))):
        assert current().device == torch.device("cpu")
    assert current().device is None


# -- where the model is after a fit and after the cache ----------------------------------------------------
def test_fit_module_moves_the_module_back_after_lightnings_teardown(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.strategies import Strategy

    events: list[object] = []
    original = Strategy.teardown

    def teardown(self):  # Lightning moves the module to the CPU here
        original(self)
        events.append("teardown")

    monkeypatch.setattr(Strategy, "teardown", teardown)
    model = tiny_classifier()
    module = ClassifierModule(model, TrainConfig(max_epochs=1, batch_size=8, accelerator="cpu"))
    to = module.to

    def spy_to(*args, **kwargs):
        events.append(("to", torch.device(args[0]) if args else kwargs))
        return to(*args, **kwargs)

    module.to = spy_to  # type: ignore[method-assign]
    fit_module(module, make_loader(model, tiny_images(), 8, True), module.cfg, seed=0)
    assert "teardown" in events
    assert events[-1] == ("to", torch.device("cpu")), events  # after the teardown: back to the training device
    assert model.device == torch.device("cpu") and not module.training


def test_the_victim_is_on_the_run_device_after_a_miss_and_after_a_hit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = validate(compose_cfg("attack=badnets", "defense=none", f"cache.dir={tmp_path}"))
    meta = Runtime(device=torch.device("meta"), cache_dir=tmp_path)  # stands for an accelerator's run
    attack = spec.attack.obj(spec.attack_cfg, spec.seed)
    trained = tiny_classifier()
    monkeypatch.setattr(type(attack), "run", lambda self, ctx: AttackResult(trained, info={}))
    splits = SimpleNamespace(train=None, proxy=None)
    bundle = SimpleNamespace(num_classes=3, unlabeled=None)

    with run_scope(meta):  # the device and the cache come with the run's context
        miss = obtain_victim(spec, attack, splits, bundle, tiny_classifier)  # type: ignore[arg-type]
    assert miss.cache["hit"] is False and miss.model.device == torch.device("meta")

    with run_scope(meta):
        hit = obtain_victim(spec, attack, splits, bundle, tiny_classifier)  # type: ignore[arg-type]
    assert hit.cache["hit"] is True
    assert {p.device for p in hit.model.parameters()} == {torch.device("meta")}


def test_a_cpu_run_keeps_the_victim_on_the_cpu(tmp_path: Path) -> None:
    spec = validate(compose_cfg("attack=badnets", "defense=none", f"cache.dir={tmp_path}", "trainer.accelerator=cpu"))
    assert spec.device == torch.device("cpu")


# -- inference precision -----------------------------------------------------------------------------------
def test_inference_autocast_only_when_asked() -> None:
    model = tiny_classifier().eval()
    images = tiny_images(10).inputs
    seen = [torch.is_autocast_enabled("cpu") for _ in model.iter_batches(images, 4)]
    assert seen == [False, False, False]
    with run_scope(Runtime(inference_precision="bf16")):
        states = [(torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
                  for _ in model.iter_batches(images, 4)]
        logits = model.predict_logits(images, 4)
    assert states == [(True, torch.bfloat16)] * 3
    assert not torch.is_autocast_enabled("cpu")
    assert logits.dtype == torch.float32 and logits.shape == (10, 3)
    with pytest.raises(ValueError, match="inference_precision"):
        TrainConfig(inference_precision="8")
