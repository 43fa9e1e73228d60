"""A tiny vision victim obtained through ``engine.victim.obtain_victim``, for the cache-concurrency and resume
tests: 16×16 grey images, a two-layer conv net, BadNets. Run as a script (one job of a concurrent pair) it
prints one JSON line: ``{"pid", "hit", "key", "sum"}``.

The attack (:class:`MarkedBadNets`) appends its PID to ``$BB_TEST_MARKER`` when it starts (one line per
victim trained) and, with ``$BB_TEST_GATE`` set, waits until that file exists before training, so that a test
can hold a job inside the locked section for as long as it needs."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from backdoorbench.attacks.vision.badnets import BadNets, BadNetsConfig
from backdoorbench.config import DataConfig
from backdoorbench.data.base import Samples
from backdoorbench.engine.spec import RunSpec
from backdoorbench.engine.victim import Victim, obtain_victim
from backdoorbench.modality.vision import ImageSpec, VisionClassifier
from backdoorbench.runtime import Runtime, run_scope
from backdoorbench.trainer.lit import TrainConfig

K, SIZE = 4, 16


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.fc = nn.Linear(16, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv2(F.relu(self.conv1(x)))).mean(dim=(2, 3)))


def new_model() -> VisionClassifier:
    torch.manual_seed(0)
    spec = ImageSpec(channels=1, height=SIZE, width=SIZE, mean=(0.5,), std=(0.5,), flip=True)
    return VisionClassifier(TinyNet(), K, spec, stages=["conv1", "conv2"])


class MarkedBadNets(BadNets):
    """BadNets that records each run in ``$BB_TEST_MARKER`` and may wait for ``$BB_TEST_GATE``."""

    def run(self, ctx):  # type: ignore[no-untyped-def]
        marker, gate = os.environ.get("BB_TEST_MARKER"), os.environ.get("BB_TEST_GATE")
        if marker:
            with open(marker, "a") as fh:
                fh.write(f"{os.getpid()}\n")
        while gate and not Path(gate).exists():
            time.sleep(0.05)
        return super().run(ctx)


def setting(cache: Path, epochs: int = 1) -> tuple[RunSpec, MarkedBadNets, SimpleNamespace, SimpleNamespace]:
    rng = np.random.default_rng(0)
    labels = np.arange(48) % K
    x = rng.integers(20, 121, size=(48, 1, SIZE, SIZE)) + 30 * labels[:, None, None, None]
    train = Samples(torch.from_numpy(x.astype(np.uint8)), labels, "vision")
    empty = Samples(torch.zeros(0, 1, SIZE, SIZE, dtype=torch.uint8), np.zeros(0, dtype=np.int64), "vision")
    trainer = TrainConfig(max_epochs=epochs, batch_size=16, lr=0.05, optimizer="sgd", weight_decay=0.0,
                          warmup_ratio=0.0, accelerator="cpu", grad_clip=0.0)
    attack_cfg = BadNetsConfig(name="badnets", poison_rate=0.25)
    spec = RunSpec(attack=None, defense=None, dataset=None, model=None, attack_cfg=attack_cfg,  # type: ignore[arg-type]
                   defense_cfg=None, data_cfg=DataConfig(name="tiny"), model_cfg={"name": "tinynet"},
                   trainer_cfg=trainer, seed=0, modality="vision", cache_dir=str(cache), cache_enabled=True)
    splits = SimpleNamespace(train=train, proxy=empty)
    bundle = SimpleNamespace(num_classes=K, unlabeled=None)
    return spec, MarkedBadNets(attack_cfg, 0), splits, bundle


def obtain(cache: Path, epochs: int = 1) -> Victim:
    spec, attack, splits, bundle = setting(cache, epochs)
    with run_scope(Runtime(cache_dir=cache)):  # the run's context holds the artifact store
        return obtain_victim(spec, attack, splits, bundle, new_model)  # type: ignore[arg-type]


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(process)d %(name)s: %(message)s")
    torch.set_num_threads(1)
    victim = obtain(Path(sys.argv[1]))
    total = float(sum(p.double().sum() for p in victim.model.state_dict().values()))
    print(json.dumps({"pid": os.getpid(), "hit": victim.cache["hit"], "key": victim.cache["key"], "sum": total}))
