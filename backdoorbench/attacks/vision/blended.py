"""Blended (Chen, Liu, Li, Lu and Song, "Targeted Backdoor Attacks on Deep Learning Systems Using Data
Poisoning", 2017, the *blended injection* strategy): a key pattern is blended into ``poison_rate`` of the
training images, ``x' = (1 − α)·x + α·pattern``, which are relabelled to the target; at test time the same
blend is applied.

Defaults: α = 0.2 for training and testing (the paper's training α; BackdoorBench's
``attack_train_blended_alpha`` and ``attack_test_blended_alpha`` are both 0.2), target 0, poison rate 0.1
(BackdoorBench ``config/attack/blended/default.yaml``). The pattern is the paper's *random pattern*: every pixel
drawn uniformly from 0..255, here from a fixed generator (``pattern_seed``, default 0), so every run and every
seed share one key pattern, with the shape of the data. ``pattern_path`` uses an image file instead (read with
PIL, converted to the data's channels and resized bilinearly to the image size), e.g. the Hello Kitty image the
paper and BackdoorBench use, which is not shipped here (licence). The blend is computed on the 0-255 scale and
rounded to the nearest integer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from backdoorbench.attacks.vision.common import VisionAttack, VisionAttackConfig, check_images, round_to_uint8
from backdoorbench.registry import register_attack


@dataclass
class BlendedConfig(VisionAttackConfig):
    name: str = "blended"
    target: int = 0
    poison_rate: float = 0.1
    alpha: float = 0.2  # blend ratio for training images
    test_alpha: float | None = None  # blend ratio at test time; null = alpha
    pattern_path: str | None = None  # an image file; null = uniform random noise from pattern_seed
    pattern_seed: int = 0  # seed of the random noise pattern (fixed, independent of the run seed)

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("alpha", "test_alpha"):
            v = getattr(self, key)
            if v is not None and not 0.0 < v <= 1.0:
                raise ValueError(f"attack.{key} must be in (0, 1], got {v}")
        if self.pattern_path is not None and not Path(self.pattern_path).is_file():
            raise ValueError(f"attack.pattern_path: no such file {self.pattern_path!r}")
        if self.pattern_seed < 0:
            raise ValueError(f"attack.pattern_seed must be >= 0, got {self.pattern_seed}")


def noise_pattern(channels: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Uniform random uint8 noise ``[C, H, W]`` from a fixed seed."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, size=(channels, height, width), dtype=np.uint8))


def image_pattern(path: str, channels: int, height: int, width: int) -> torch.Tensor:
    """An image file as a uint8 ``[C, H, W]`` pattern (grey for one channel, RGB for three), resized bilinearly."""
    from PIL import Image

    if channels not in (1, 3):
        raise ValueError(f"a pattern image can be blended into 1- or 3-channel images, not {channels}")
    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB").resize((width, height), Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


def blend(images: torch.Tensor, pattern: torch.Tensor, alpha: float) -> torch.Tensor:
    """``round((1 − α)·x + α·pattern)`` on the 0-255 scale."""
    return round_to_uint8((1.0 - alpha) * images.double() + alpha * pattern.double()[None])


@register_attack(
    "blended",
    modality="vision",
    category="data poisoning",
    needs="task data",
    description="Blended: a random-noise (or image) key pattern blended in with alpha 0.2, dirty labels",
    config=BlendedConfig,
)
class Blended(VisionAttack):
    """Blended-injection data poisoning (``alpha`` for training images, ``test_alpha`` for the test trigger)."""

    version = "1"

    def __init__(self, cfg: BlendedConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self._patterns: dict[tuple[int, int, int], torch.Tensor] = {}

    def pattern(self, channels: int, height: int, width: int) -> torch.Tensor:
        key = (channels, height, width)
        if key not in self._patterns:
            c = self.cfg
            self._patterns[key] = (
                image_pattern(c.pattern_path, channels, height, width)
                if c.pattern_path
                else noise_pattern(channels, height, width, c.pattern_seed)
            )
        return self._patterns[key]

    def blend(self, images: torch.Tensor, alpha: float) -> torch.Tensor:
        check_images(images)
        _, c, h, w = images.shape
        return blend(images, self.pattern(c, h, w), alpha)

    def apply_trigger(self, images: torch.Tensor, rng: np.random.Generator | None = None) -> torch.Tensor:  # type: ignore[override]
        return self.blend(images, self.cfg.alpha)

    def apply_test_trigger(self, images: torch.Tensor, rng: np.random.Generator | None = None) -> torch.Tensor:
        alpha = self.cfg.test_alpha if self.cfg.test_alpha is not None else self.cfg.alpha
        return self.blend(images, alpha)
