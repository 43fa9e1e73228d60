"""Trainer settings (issue 14): the learning-rate schedules on hand-computed values, the per-epoch training logs
in the run directory, loader workers that do not change the batches, text tokenised once with the very batches
of per-batch tokenisation, the vectorised crop/flip equal to the per-image loop, and the attack cache keys of
the default configs unchanged by the new keys."""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from test_device import tiny_classifier, tiny_images

from backdoorbench.cli import config_dir
from backdoorbench.config import ConfigError, to_dataclass
from backdoorbench.data.base import Samples
from backdoorbench.engine.spec import validate
from backdoorbench.engine.victim import attack_cache_spec
from backdoorbench.modality.vision import random_crop_flip
from backdoorbench.runtime import Runtime, run_scope
from backdoorbench.store import cache_key
from backdoorbench.trainer.lit import ClassifierModule, TrainConfig, fit, make_loader
from backdoorbench.trainer.schedule import make_scheduler


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=list(overrides))


# -- schedules ---------------------------------------------------------------------------------------------
def lrs(name: str, steps: int, **kw) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, name, **kw)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_linear_warmup_then_linear_decay() -> None:
    got = lrs("linear", 11, total_steps=10, warmup_steps=2)
    assert got == pytest.approx([0.0, 0.5, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0.0])


def test_cosine_warmup_then_half_cosine() -> None:
    got = lrs("cosine", 11, total_steps=10, warmup_steps=2)
    want = [0.0, 0.5] + [0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 11)]
    assert got == pytest.approx(want)
    assert got[2] == pytest.approx(1.0) and got[6] == pytest.approx(0.5) and got[10] == pytest.approx(0.0)


def test_multistep_warmup_then_gamma_at_each_milestone_epoch() -> None:
    got = lrs("multistep", 18, total_steps=18, warmup_steps=2, steps_per_epoch=4, milestones=[4, 2], gamma=0.1)
    assert got == pytest.approx([0.0, 0.5] + [1.0] * 6 + [0.1] * 8 + [0.01] * 2)


def test_unknown_or_bad_settings_are_config_errors() -> None:
    for bad in ({"scheduler": "step"}, {"devices": 0}, {"milestones": [0]}, {"num_workers": -1}, {"logger": "x"}):
        with pytest.raises(ConfigError):
            to_dataclass(TrainConfig, bad, "trainer")


@pytest.mark.skipif(any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")), reason="installed")
def test_a_logger_whose_package_is_missing_names_it() -> None:
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        to_dataclass(TrainConfig, {"logger": "tensorboard"}, "trainer")


# -- per-epoch logs in the run directory ----------------------------------------------------------------------
def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_every_stage_writes_one_row_per_epoch_into_the_run_directory(tmp_path: Path) -> None:
    model = tiny_classifier()
    cfg = TrainConfig(max_epochs=3, batch_size=6, lr=0.5, optimizer="sgd", warmup_ratio=0.0, scheduler="multistep",
                      milestones=[1, 2], gamma=0.1, accelerator="cpu")
    with run_scope(Runtime(run_dir=tmp_path, logger="csv")):
        fit(model, tiny_images(24), cfg, seed=0, desc="victim training")  # 4 batches per epoch
        fit(model, tiny_images(24), TrainConfig(max_epochs=1, batch_size=12), seed=0, desc="victim training")
    rows = read_rows(tmp_path / "logs" / "victim_training" / "metrics.csv")
    assert [int(float(r["epoch"])) for r in rows] == [1, 2, 3]
    assert all(0.0 <= float(r["train_acc"]) <= 1.0 and float(r["loss"]) > 0 for r in rows)
    # the lr after each epoch: multiplied by gamma at the end of epochs 1 and 2 (steps 4 and 8)
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.05, 0.005, 0.005])
    assert len(read_rows(tmp_path / "logs" / "victim_training-2" / "metrics.csv")) == 1  # a repeated stage


def test_repair_fine_tuning_logs_its_training_accuracy(tmp_path: Path) -> None:
    from backdoorbench.defenses.repair.common import FinetuneSchedule, finetune

    with run_scope(Runtime(run_dir=tmp_path)):
        finetune(tiny_classifier(), tiny_images(12), FinetuneSchedule(epochs=2, batch_size=6), seed=0, desc="FT")
    rows = read_rows(tmp_path / "logs" / "FT" / "metrics.csv")
    assert len(rows) == 2 and all(0.0 <= float(r["train_acc"]) <= 1.0 for r in rows)


def test_no_logs_outside_a_run_or_with_logger_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    fit(tiny_classifier(), tiny_images(12), TrainConfig(max_epochs=1, batch_size=6), seed=0)
    with run_scope(Runtime(run_dir=tmp_path / "run", logger="none")):
        fit(tiny_classifier(), tiny_images(12), TrainConfig(max_epochs=1, batch_size=6), seed=0)
    assert list(tmp_path.rglob("*.csv")) == []


def test_training_accuracy_is_counted_on_the_training_batches() -> None:
    model = tiny_classifier()
    module = ClassifierModule(model, TrainConfig())
    batch = {"inputs": model.collate(tiny_images(6).inputs), "labels": torch.tensor([0, 1, 2, 0, 1, 2])}
    module.train()
    logits = model(batch["inputs"])
    loss = module.loss(batch)
    assert float(loss) == pytest.approx(float(F.cross_entropy(logits, batch["labels"])))
    assert module.pop_epoch_accuracy() == pytest.approx(float((logits.argmax(1) == batch["labels"]).float().mean()))
    assert module.pop_epoch_accuracy() is None


# -- loaders ---------------------------------------------------------------------------------------------------
def batches(loader) -> list[dict]:
    return [b for b in loader]


def test_loader_workers_give_the_same_batches_and_training(tmp_path: Path) -> None:
    model, data = tiny_classifier(), tiny_images(30)
    plain = batches(make_loader(model, data, 7, shuffle=True, seed=5))
    with run_scope(Runtime(num_workers=2, pin_memory=False)):
        loader = make_loader(model, data, 7, shuffle=True, seed=5)
        assert loader.num_workers == 2
        parallel = batches(loader)
    assert len(plain) == len(parallel)
    for a, b in zip(plain, parallel, strict=True):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["inputs"]["pixels"], b["inputs"]["pixels"])
    cfg = TrainConfig(max_epochs=1, batch_size=8, accelerator="cpu")
    one = fit(tiny_classifier(), data, cfg, seed=1)
    with run_scope(Runtime(num_workers=2)):
        two = fit(tiny_classifier(), data, cfg, seed=1)
    for (k, v), w in zip(one.state_dict().items(), two.state_dict().values(), strict=True):
        assert torch.equal(v, w), k


class CountingTokenizer:
    """Forwards to a tokenizer and counts the calls that tokenise text."""

    def __init__(self, tok) -> None:
        self.tok, self.calls = tok, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tok(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.tok, name)


def test_text_is_tokenised_once_with_the_batches_of_per_batch_tokenisation(tiny_text_model) -> None:
    model = tiny_text_model
    texts = [" ".join(["word"] * (i % 9 + 1)) + f" number {i}" for i in range(23)]
    texts.append(" ".join(["very long sentence"] * 40))  # truncated to max_length
    data = Samples(texts, np.arange(len(texts)) % 2)
    counting = CountingTokenizer(model.tokenizer)
    model.tokenizer = counting
    loader = make_loader(model, data, 5, shuffle=True, seed=3)
    got = batches(loader) + batches(loader)  # two epochs
    assert counting.calls == 1  # the whole dataset, once
    widths = set()
    for b in got:
        want = model.collate([texts[i] for i in b["index"].tolist()])  # what every batch used to be
        assert list(b["inputs"]) == list(want)
        for key in want:
            assert torch.equal(b["inputs"][key], want[key]), key
        widths.add(want["input_ids"].shape[1])
    assert len(widths) > 1 and max(widths) == model.max_length  # dynamic padding, truncation


# -- crop / flip -----------------------------------------------------------------------------------------------
def loop_crop_flip(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """The per-image loop this framework used before issue 14 (the reference)."""
    b, _, h, w = x.shape
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).tolist()
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator).tolist()
        x = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])
    if flip:
        mask = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return x


@pytest.mark.parametrize(("pad", "flip", "channels"), [(2, True, 3), (3, False, 3), (0, True, 3), (1, True, 3),
                                                      (4, False, 1)])
def test_vectorised_crop_flip_equals_the_loop(pad: int, flip: bool, channels: int) -> None:
    x = torch.rand(9, channels, 7, 10)  # not square: rows and columns cannot be swapped unnoticed
    for seed in range(3):
        got = random_crop_flip(x, pad, flip, torch.Generator().manual_seed(seed))
        want = loop_crop_flip(x, pad, flip, torch.Generator().manual_seed(seed))
        assert torch.equal(got, want)
        # the same strides too: a convolution picks its kernel by them (a grey image with permuted strides
        # trained to other weights)
        assert got.stride() == want.stride()
        conv = torch.nn.Conv2d(channels, 4, 3)
        assert torch.equal(conv(got), conv(want))
    torch.manual_seed(11)
    got = random_crop_flip(x, pad, flip)  # the global generator
    torch.manual_seed(11)
    assert torch.equal(got, loop_crop_flip(x, pad, flip))


# -- the attack cache keys ----------------------------------------------------------------------------------
#: the keys of the default configs before issue 14 added trainer keys (computed at 7c2f50b)
OLD_KEYS = {(): "158cef179831e33bc71a", ("attack=badnets",): "6223fad1247f2898cf38"}


def key(*overrides: str) -> str:
    spec = validate(compose_cfg(*overrides))
    return cache_key(attack_cache_spec(spec, spec.attack.obj(spec.attack_cfg, spec.seed)))


@pytest.mark.parametrize("overrides", list(OLD_KEYS))
def test_default_cache_keys_are_unchanged(overrides: tuple[str, ...]) -> None:
    assert key(*overrides) == OLD_KEYS[overrides]
    # execution-only settings never enter the key
    assert key(*overrides, "trainer.num_workers=2", "trainer.logger=none", "trainer.pin_memory=true") == (
        OLD_KEYS[overrides]
    )


def test_settings_that_change_the_victim_change_the_key() -> None:
    base = OLD_KEYS[()]
    changed = {key(o) for o in ("trainer.scheduler=cosine", "trainer.gamma=0.5", "trainer.devices=[0]",
                                "trainer.inference_precision=bf16")}
    assert base not in changed and len(changed) == 4
