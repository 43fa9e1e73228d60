"""SIG (Barni, Kallas and Tondi, "A New Backdoor Attack in CNNs by Training Set Corruption Without Label
Poisoning", ICIP 2019): a clean-label attack. A horizontal sinusoidal signal

    v(i, j) = Δ · sin(2π · j · f / m),   j = 0 … m − 1 the column, m the image width,

the same for every row ``i`` and every channel, is added to training images *of the target class only*, whose
labels stay unchanged: ``x' = clip(round(x + v), 0, 255)``. The network learns the signal as a feature of the
target class; at test time the signal is added to images of other classes.

Defaults: Δ = 20 (0-255 pixel units) and f = 6, the paper's sinusoidal signal and the defaults of BackdoorBench's
``sigTriggerAttack``; target 0. ``poison_rate`` is the share of the *whole* training set that is poisoned, as in
BackdoorBench (its ``pratio``; the paper states the share of the target class instead), and only target-class
images can be chosen, so it cannot exceed the target class's share of the data (a clear error otherwise).
Default 0.05: on 10-class data that is about half of the target class (BackdoorBench's 0.1 is all of a
CIFAR-10 class, and more than MNIST's class 0 holds, 9.9%).

Deviations: the test-time Δ equals the training Δ unless ``test_delta`` is set (the paper also evaluates
stronger test-time signals; BackdoorBench's config uses Δ = 40). BackdoorBench's transform blends
``0.2·x + 0.8·v`` instead of adding the signal; this follows the paper's additive formula. The column index
starts at 0 (BackdoorBench) rather than 1 (the paper), a phase shift of one pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from backdoorbench.attacks.base import AttackContext
from backdoorbench.attacks.vision.common import (
    SALT_POISON,
    VisionAttack,
    VisionAttackConfig,
    check_images,
    choose_clean_label,
    round_to_uint8,
)
from backdoorbench.data.poisoned import PoisonedDataset
from backdoorbench.registry import register_attack


@dataclass
class SIGConfig(VisionAttackConfig):
    name: str = "sig"
    target: int = 0
    poison_rate: float = 0.05  # share of the whole training set; all poisoned images are of the target class
    delta: float = 20.0  # Δ, amplitude in 0-255 pixel units
    frequency: float = 6.0  # f, periods across the image width
    test_delta: float | None = None  # Δ of the test-time signal; null = delta

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.delta <= 0:
            raise ValueError(f"attack.delta must be > 0 (0-255 pixel units), got {self.delta}")
        if self.test_delta is not None and self.test_delta <= 0:
            raise ValueError(f"attack.test_delta must be > 0 or null (= delta), got {self.test_delta}")
        if self.frequency <= 0:
            raise ValueError(f"attack.frequency must be > 0, got {self.frequency}")


def sig_signal(width: int, delta: float, frequency: float) -> torch.Tensor:
    """``v(j) = Δ·sin(2π j f / m)`` for the ``m = width`` columns, float64 ``[width]``."""
    j = torch.arange(width, dtype=torch.float64)
    return delta * torch.sin(2 * math.pi * j * frequency / width)


def add_signal(images: torch.Tensor, delta: float, frequency: float) -> torch.Tensor:
    check_images(images)
    v = sig_signal(images.shape[-1], delta, frequency)
    return round_to_uint8(images.double() + v.view(1, 1, 1, -1))


@register_attack(
    "sig",
    modality="vision",
    category="data poisoning (clean label)",
    needs="task data",
    description="SIG: a horizontal sinusoidal signal added to target-class images, labels unchanged",
    config=SIGConfig,
)
class SIG(VisionAttack):
    """Clean-label sinusoidal-signal poisoning."""

    version = "1"

    def apply_trigger(self, images: torch.Tensor, rng: np.random.Generator | None = None) -> torch.Tensor:  # type: ignore[override]
        return add_signal(images, self.cfg.delta, self.cfg.frequency)

    def apply_test_trigger(self, images: torch.Tensor, rng: np.random.Generator | None = None) -> torch.Tensor:
        delta = self.cfg.test_delta if self.cfg.test_delta is not None else self.cfg.delta
        return add_signal(images, delta, self.cfg.frequency)

    def poison_dataset(self, ctx: AttackContext) -> PoisonedDataset:
        train = ctx.train
        idx = choose_clean_label(train.labels, self.target, self.cfg.poison_rate, self.rng(SALT_POISON), "sig")
        chosen = train.subset(idx).loaded()
        images = cast(torch.Tensor, chosen.inputs)  # loaded images: a tensor
        return PoisonedDataset(train, idx, self.apply_trigger(images), chosen.labels, self.target)

    def extra_info(self) -> dict[str, Any]:
        return {"clean_label": True}
