"""The training input path (issue 33, item 2): batches fetched whole equal the per-sample batches of before and
train to the very same weights; images reach the model as uint8 and become floats there; no host sync per step
(the loss and the accuracy are read once per epoch); one logging callback; ``num_workers`` / ``pin_memory``
``auto`` resolve to workers and pinning on CUDA only; ``trainer.deterministic`` switches cuDNN benchmark."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_device import tiny_images
from torch import nn
from torch.utils.data import DataLoader, Dataset

from backdoorbench.data.base import Samples
from backdoorbench.modality.vision import ImageSpec, VisionClassifier, to_float
from backdoorbench.runtime import Runtime, run_scope
from backdoorbench.trainer import lit
from backdoorbench.trainer.config import AUTO_WORKERS_MAX, cpu_count, resolve_loading
from backdoorbench.trainer.lit import ClassifierModule, TrainConfig, fit, fit_module, make_loader, make_trainer
from backdoorbench.trainer.logs import EpochReport

SPEC = ImageSpec(channels=3, height=8, width=8, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), flip=True)


def augmented_classifier() -> VisionClassifier:
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("body", nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                         nn.Dropout(0.2), nn.AdaptiveAvgPool2d(1)))
    net.add_module("head", nn.Sequential(nn.Flatten(), nn.Linear(6, 3)))
    return VisionClassifier(net, 3, SPEC, ["body"], augment=True)


def colour_images(n: int = 45) -> Samples:
    g = torch.Generator().manual_seed(1)
    return Samples(torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8), np.arange(n) % 3, "vision")


class PerSample(Dataset):
    """The loader of before issue 33: one ``(input, label, index)`` per ``__getitem__``, stacked by the collate."""

    def __init__(self, samples: Samples) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        return self.samples.inputs[i], int(self.samples.labels[i]), i


def per_sample_loader(model, samples: Samples, batch_size: int, seed: int) -> DataLoader:
    def collate(items):
        inputs = [it[0] for it in items]
        batch = model.collate(torch.stack(inputs)) if isinstance(samples.inputs, torch.Tensor) else model.collate(
            inputs)
        return {"inputs": batch, "labels": torch.tensor([it[1] for it in items]),
                "index": torch.tensor([it[2] for it in items])}

    return DataLoader(PerSample(samples), batch_size=batch_size, shuffle=True, collate_fn=collate,
                      generator=torch.Generator().manual_seed(seed))


def test_whole_batches_equal_the_per_sample_batches(tiny_text_model) -> None:
    model, data = augmented_classifier(), colour_images()
    new, old = list(make_loader(model, data, 8, True, seed=4)), list(per_sample_loader(model, data, 8, seed=4))
    assert len(new) == len(old) == 6
    for a, b in zip(new, old, strict=True):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["labels"], b["labels"])
        assert a["inputs"]["pixels"].dtype == torch.uint8  # crosses to the device as bytes
        assert torch.equal(model.finish_batch(a["inputs"])["pixels"], b["inputs"]["pixels"])
        assert torch.equal(to_float(a["inputs"]["pixels"]), b["inputs"]["pixels"])
    texts = [" ".join(["word"] * (i % 13 + 1)) + f" film {i}" for i in range(30)] + ["long " * 60]
    tdata = Samples(texts, np.arange(len(texts)) % 2)
    for left in (False, True):
        tiny_text_model.tokenizer.padding_side = "left" if left else "right"
        new = list(make_loader(tiny_text_model, tdata, 7, True, seed=2))
        old = list(per_sample_loader(tiny_text_model, tdata, 7, seed=2))
        for a, b in zip(new, old, strict=True):
            assert torch.equal(a["index"], b["index"]) and list(a["inputs"]) == list(b["inputs"])
            for key in b["inputs"]:
                assert torch.equal(a["inputs"][key], b["inputs"][key]), (left, key)
    tiny_text_model.tokenizer.padding_side = "right"


def test_training_is_bit_identical_to_the_per_sample_float_path() -> None:
    """Same batches, same order, same random draws (augmentation, dropout): the same weights to the bit as the
    loader that stacked float images on the host."""
    cfg = TrainConfig(max_epochs=2, batch_size=8, lr=0.05, optimizer="sgd", warmup_ratio=0.1, accelerator="cpu")
    data = colour_images()
    new = fit(augmented_classifier(), data, cfg, seed=3)
    lit.L.seed_everything(3, workers=True, verbose=False)
    old_model = augmented_classifier()
    lit.L.seed_everything(3, workers=True, verbose=False)  # fit seeds, then builds the module and the loader
    module = ClassifierModule(old_model, cfg)
    fit_module(module, per_sample_loader(old_model, data, 8, seed=3), cfg, None)
    for (k, v), w in zip(new.state_dict().items(), old_model.state_dict().values(), strict=True):
        assert torch.equal(v, w), k


def count_host_reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the calls that read a tensor's value on the host (a device sync on a GPU), except AdamW's step
    counters, which torch keeps on the CPU (no sync)."""
    counts = {"n": 0}
    for name in ("item", "__float__", "__int__", "__bool__", "tolist"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
            if "torch/optim/" not in sys._getframe(1).f_code.co_filename.replace("\\", "/"):
                counts["n"] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


@pytest.mark.parametrize("logger", ["csv", "none"])
def test_no_host_sync_per_training_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logger: str) -> None:
    """The host reads of a training epoch do not grow with its steps: the loss and the accuracy stay on the
    device until the epoch ends (before: ``float(loss)`` per step per logger, ``int(correct)`` per step)."""
    reads = []
    for n in (12, 48):  # 3 and 12 steps of 4
        counts = count_host_reads(monkeypatch)
        with run_scope(Runtime(run_dir=tmp_path / str(n), logger=logger)):
            fit(augmented_classifier(), colour_images(n), TrainConfig(max_epochs=1, batch_size=4, accelerator="cpu"))
        reads.append(counts["n"])
        monkeypatch.undo()
    assert reads[0] == reads[1], reads


def test_one_logging_callback(tmp_path: Path) -> None:
    with run_scope(Runtime(run_dir=tmp_path, logger="csv")):
        trainer = make_trainer(TrainConfig(accelerator="cpu"), "stage")
    reports = [c for c in trainer.callbacks if isinstance(c, EpochReport)]
    assert len(reports) == 1 and reports[0].logger is not None and reports[0].log_line  # progress bars off here
    assert make_trainer(TrainConfig(accelerator="cpu")).callbacks.count(reports[0]) == 0


def test_auto_loading_is_workers_and_pinning_on_cuda_only() -> None:
    auto = TrainConfig()
    assert (auto.num_workers, auto.pin_memory) == ("auto", "auto")
    assert resolve_loading(auto, torch.device("cpu")) == (0, False)
    workers, pin = resolve_loading(auto, torch.device("cuda", 0))
    assert workers == max(1, min(AUTO_WORKERS_MAX, cpu_count() - 1)) and pin is True
    assert resolve_loading(TrainConfig(num_workers=3, pin_memory=False), torch.device("cuda", 0)) == (3, False)
    assert resolve_loading(TrainConfig(num_workers=2, pin_memory=True), torch.device("cpu")) == (2, False)
    for bad in ({"num_workers": -1}, {"num_workers": "many"}, {"pin_memory": "yes"}):
        with pytest.raises(ValueError, match="trainer: (num_workers|pin_memory) must be"):
            TrainConfig(**bad)


def test_deterministic_switches_cudnn_benchmark_and_says_its_cost(caplog: pytest.LogCaptureFixture) -> None:
    before = torch.backends.cudnn.benchmark
    try:
        make_trainer(TrainConfig(accelerator="cpu", deterministic=False))
        assert torch.backends.cudnn.benchmark is True
        make_trainer(TrainConfig(accelerator="cpu", deterministic=True))
        assert torch.backends.cudnn.benchmark is False
        with run_scope(Runtime(deterministic=False)):  # the run's setting, whatever the stage's config says
            make_trainer(TrainConfig(accelerator="cpu", deterministic=True))
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = before
    lit._DETERMINISTIC_NOTE["said"] = False
    with caplog.at_level(logging.INFO, logger="backdoorbench.trainer.lit"):
        lit._note_determinism(True, "gpu")
    assert "cuDNN benchmark off" in caplog.text and "trainer.deterministic=false" in caplog.text


def test_uint8_pixels_are_converted_by_the_model() -> None:
    data = tiny_images(6)
    model = VisionClassifier(nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), 2,
                             ImageSpec(channels=1, height=8, width=8, mean=(0.5,), std=(0.5,)), ["0"]).eval()
    with torch.no_grad():
        assert torch.equal(model({"pixels": data.inputs}), model(model.collate(data.inputs)))
        assert torch.equal(model.predict_logits(data.inputs, 4), model(model.collate(data.inputs)))


def test_a_finished_job_with_the_old_loader_defaults_is_the_same_job(tmp_path: Path) -> None:
    """``num_workers`` / ``pin_memory`` became ``auto``: a sweep re-submitted over jobs that ran with 0 / false
    still skips them (settings that never change results do not make another config)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from backdoorbench.cli import config_dir
    from backdoorbench.engine.sweep import previous_results

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["attack=badnets", "defense=none"])
    old = OmegaConf.to_container(cfg, resolve=True)
    old["trainer"].update(num_workers=0, pin_memory=False)
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(old)))
    assert previous_results(tmp_path, cfg) == []
    cfg.trainer.precision = "bf16-mixed"
    assert previous_results(tmp_path, cfg) == ["trainer.precision"]
