"""WaNet (Nguyen and Tran, "WaNet – Imperceptible Warping-based Backdoor Attack", ICLR 2021): the trigger is a
fixed, smooth warping of the image.

Warping field (reference code ``VinAIResearch/Warping-based_Backdoor_Attack-release``, ``train.py``): a
``k × k × 2`` grid of uniform random offsets in [−1, 1], divided by its mean absolute value, upsampled to the
image size with bicubic interpolation (``align_corners=True``). The sampling grid is

    grid = clamp((identity + s · noise / H) · grid_rescale, −1, 1)

and the warped image is ``F.grid_sample(x, grid, align_corners=True)`` (bilinear). At ``s = 0`` (and
``grid_rescale = 1``) the warp is the identity. The field is drawn from the attack's seed, so it is fixed for a
run and reproducible.

Poisoning: ``round(poison_rate × n)`` training images from all classes are warped and relabelled to the target
(``ρ_a``). In *noise mode*, ``round(cross_ratio × poisoned)`` further images (``ρ_n = ρ_a × cross_ratio``) are
warped with the field plus per-image random noise (uniform in [−1, 1] / H per grid coordinate, then clamped) and
**keep their labels**, so that the network learns the exact warp rather than any warp.

Defaults (the paper and its reference code, also BackdoorBench's ``config/attack/wanet/default.yaml``): k = 4,
s = 0.5, grid_rescale = 1, poison rate 0.1, cross_ratio 2, noise mode on, target 0, all-to-one.

Deviations: the reference poisons on the fly, the first ρ_a / ρ_n of every shuffled batch, so every image is
warped in some epochs and the noise is redrawn at each step; here a fixed set of images is poisoned once (the
poisoned set is a stored delta, like every attack's) and each noise-mode image has one fixed noise draw. The
reference's extra training augmentation (random crop 5, rotation 10) is replaced by the model's standard
crop/flip augmentation. Non-square images use ``H`` for the row offsets and ``W`` for the column offsets (the
reference divides both by ``H``; identical for square images). Warped images are rounded to uint8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from backdoorbench.attacks.base import AttackContext
from backdoorbench.attacks.vision.common import (
    SALT_NOISE,
    SALT_POISON,
    SALT_TRIGGER,
    VisionAttack,
    VisionAttackConfig,
    check_images,
    choose_dirty,
    round_to_uint8,
)
from backdoorbench.data.poisoned import PoisonedDataset
from backdoorbench.modality.vision import to_float
from backdoorbench.registry import register_attack


@dataclass
class WaNetConfig(VisionAttackConfig):
    name: str = "wanet"
    target: int = 0
    poison_rate: float = 0.1  # ρ_a: warped and relabelled
    k: int = 4  # control grid size
    s: float = 0.5  # warping strength
    grid_rescale: float = 1.0
    noise_mode: bool = True
    cross_ratio: float = 2.0  # ρ_n = ρ_a × cross_ratio: warped + noise, labels kept

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 1:
            raise ValueError(f"attack.k (control grid size) must be >= 1, got {self.k}")
        if self.s < 0:
            raise ValueError(f"attack.s (warping strength) must be >= 0, got {self.s}")
        if self.grid_rescale <= 0:
            raise ValueError(f"attack.grid_rescale must be > 0, got {self.grid_rescale}")
        if self.cross_ratio < 0:
            raise ValueError(f"attack.cross_ratio must be >= 0, got {self.cross_ratio}")
        if self.noise_mode and self.poison_rate * (1 + self.cross_ratio) > 1:
            raise ValueError(
                f"attack.poison_rate × (1 + cross_ratio) = {self.poison_rate * (1 + self.cross_ratio):.3f} exceeds 1: "
                "there are not enough training images for the poisoned and the noise-mode samples"
            )


def identity_grid(height: int, width: int) -> torch.Tensor:
    """``[1, H, W, 2]`` grid_sample coordinates of the pixel centres (x = column, y = row), in [−1, 1]."""
    ys = torch.linspace(-1, 1, steps=height)
    xs = torch.linspace(-1, 1, steps=width)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((x, y), dim=2)[None]


def noise_field(k: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """The reference's random field: ``k × k`` uniform [−1, 1] offsets normalised by their mean absolute value,
    bicubically upsampled to ``[1, H, W, 2]``."""
    ins = torch.rand(1, 2, k, k, generator=generator) * 2 - 1
    ins = ins / torch.mean(torch.abs(ins))
    return F.interpolate(ins, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)


def warp_grid(noise: torch.Tensor, s: float, grid_rescale: float) -> torch.Tensor:
    """``clamp((identity + s · noise / size) · grid_rescale, −1, 1)``, ``[1, H, W, 2]``."""
    _, h, w, _ = noise.shape
    scale = torch.tensor([w, h], dtype=noise.dtype)  # x offsets in units of the width, y of the height
    return torch.clamp((identity_grid(h, w) + s * noise / scale) * grid_rescale, -1, 1)


def warp(images: torch.Tensor, grid: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """uint8 images warped by ``grid`` (``[1 or N, H, W, 2]``), bilinear, rounded back to uint8."""
    check_images(images)
    out = torch.empty_like(images)
    for start in range(0, len(images), batch_size):
        chunk = to_float(images[start : start + batch_size]).double()
        g = grid if grid.shape[0] == 1 else grid[start : start + batch_size]
        g = g.expand(len(chunk), -1, -1, -1).double()
        warped = F.grid_sample(chunk, g, mode="bilinear", padding_mode="zeros", align_corners=True)
        out[start : start + batch_size] = round_to_uint8(warped * 255.0)
    return out


@register_attack(
    "wanet",
    modality="vision",
    category="data poisoning",
    needs="task data",
    description="WaNet: a fixed smooth warping field (k=4, s=0.5) as the trigger, noise mode, dirty labels",
    config=WaNetConfig,
)
class WaNet(VisionAttack):
    """Warping-based data poisoning with noise-mode samples."""

    version = "1"

    def __init__(self, cfg: WaNetConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self._noise: dict[tuple[int, int], torch.Tensor] = {}
        self.noise_indices: np.ndarray = np.zeros(0, dtype=np.int64)
        self.backdoor_count = 0

    def field(self, height: int, width: int) -> torch.Tensor:
        """The attack's fixed random field ``[1, H, W, 2]`` (before the strength ``s``), from the seed."""
        if (height, width) not in self._noise:
            gen = torch.Generator().manual_seed(int(self.rng(SALT_TRIGGER).integers(2**62)))
            self._noise[(height, width)] = noise_field(self.cfg.k, height, width, gen)
        return self._noise[(height, width)]

    def grid(self, height: int, width: int) -> torch.Tensor:
        return warp_grid(self.field(height, width), self.cfg.s, self.cfg.grid_rescale)

    def apply_trigger(self, images: torch.Tensor, rng: np.random.Generator | None = None) -> torch.Tensor:  # type: ignore[override]
        check_images(images)
        _, _, h, w = images.shape
        return warp(images, self.grid(h, w))

    def apply_noise_warp(self, images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Noise mode: the warp plus per-image uniform noise in [−1, 1] / size on the grid, clamped."""
        check_images(images)
        n, _, h, w = images.shape
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        ins = torch.rand(n, h, w, 2, generator=gen) * 2 - 1
        scale = torch.tensor([w, h], dtype=ins.dtype)
        grid = torch.clamp(self.grid(h, w) + ins / scale, -1, 1)
        return warp(images, grid)

    def poison_dataset(self, ctx: AttackContext) -> PoisonedDataset:
        train = ctx.train
        n = len(train)
        rng = self.rng(SALT_POISON)
        bd = choose_dirty(n, self.cfg.poison_rate, rng)
        n_cross = int(round(self.cfg.cross_ratio * len(bd))) if self.cfg.noise_mode else 0
        rest = np.setdiff1d(np.arange(n), bd)
        if n_cross > len(rest):
            raise ValueError(f"wanet: {n_cross} noise-mode samples requested, only {len(rest)} images left")
        cross = np.sort(rng.choice(rest, size=n_cross, replace=False)).astype(np.int64) if n_cross else rest[:0]
        self.noise_indices = cross
        bd_set, cross_set = train.subset(bd).loaded(), train.subset(cross).loaded()
        self.backdoor_count = len(bd)
        warped = self.apply_trigger(cast(torch.Tensor, bd_set.inputs))  # loaded images: tensors
        inputs = torch.cat([warped, self.apply_noise_warp(cast(torch.Tensor, cross_set.inputs), self.rng(SALT_NOISE))])
        labels = np.concatenate([self.target_labels(bd_set.labels), cross_set.labels])
        idx = np.concatenate([bd, cross])
        order = np.argsort(idx, kind="stable")
        return PoisonedDataset(train, idx[order], inputs[torch.from_numpy(order)], labels[order], self.target)

    def backdoor_samples(self, poisoned: PoisonedDataset) -> tuple[np.ndarray, np.ndarray]:
        """Noise-mode samples are modified but keep their labels and carry no trigger: not backdoor samples."""
        backdoor, modified = super().backdoor_samples(poisoned)
        backdoor[self.noise_indices] = False
        return backdoor, modified

    def restore(self, info: dict[str, Any]) -> None:
        """A cached victim: which training images are noise-mode samples (labels kept, no trigger)."""
        self.noise_indices = np.asarray(info.get("noise_indices", []), dtype=np.int64)

    def extra_info(self) -> dict[str, Any]:
        return {
            "backdoor_samples": int(self.backdoor_count),
            "noise_samples": int(len(self.noise_indices)),
            "noise_indices": self.noise_indices.tolist(),
        }
