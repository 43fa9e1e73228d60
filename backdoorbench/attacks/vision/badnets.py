"""BadNets (Gu, Dolan-Gavitt and Garg, "BadNets: Identifying Vulnerabilities in the Machine Learning Model
Supply Chain", 2017): a small patch stamped onto ``poison_rate`` of the training images, which are relabelled
to the target (all-to-one) or to ``(y + 1) mod K`` (all-to-all, the paper's MNIST all-to-all attack).

Defaults (BackdoorBench ``config/attack/badnet/default.yaml`` and ``resource/badnet/``): target 0, poison rate
0.1 drawn from all classes, a 3×3 patch in the bottom-right corner with no margin. ``pattern: grid`` is
BackdoorBench's ``trigger_image_grid.png`` checkerboard (pixel ``(i, j)`` of the patch white when ``i + j`` is
even, so the corners and the centre are white), close to the paper's MNIST "pattern" trigger; ``pattern:
square`` is BackdoorBench's default ``trigger_image.png``, an all-white 3×3 square. Every channel gets the same
value. Deviation: the black cells of the grid are 0 here; BackdoorBench stores them as 1 (its trigger file
marks the patch by values > 0), a difference of 1/255.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from backdoorbench.attacks.base import AttackContext, AttackResult
from backdoorbench.attacks.vision.common import (
    VisionAttack,
    VisionAttackConfig,
    check_images,
    check_patch_fits,
    check_placement,
    patch_origin,
    stamp,
)
from backdoorbench.data.base import Samples
from backdoorbench.registry import register_attack

PATTERNS = ("grid", "square")


@dataclass
class BadNetsConfig(VisionAttackConfig):
    name: str = "badnets"
    target: int = 0
    poison_rate: float = 0.1
    pattern: str = "grid"  # grid (3×3 checkerboard) | square (all white)
    size: int = 3  # side of the patch in pixels
    position: str = "bottom_right"  # bottom_right | bottom_left | top_right | top_left
    margin: int = 0  # pixels between the patch and the two edges of its corner
    offset: list[int] | None = None  # [row, col] of the patch's top-left pixel; overrides position/margin
    all_to_all: bool = False  # label y -> (y + 1) mod K instead of the target

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pattern not in PATTERNS:
            raise ValueError(f"attack.pattern must be one of {PATTERNS}, got {self.pattern!r}")
        if self.size < 1:
            raise ValueError(f"attack.size must be >= 1 pixel, got {self.size}")
        check_placement(self)


def patch_pattern(pattern: str, size: int) -> torch.Tensor:
    """The ``size × size`` uint8 patch (one channel, broadcast over the image's channels)."""
    if pattern == "square":
        return torch.full((1, size, size), 255, dtype=torch.uint8)
    i, j = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (((i + j) % 2 == 0).to(torch.uint8) * 255)[None]


@register_attack(
    "badnets",
    modality="vision",
    category="data poisoning",
    needs="task data",
    description="BadNets: a 3x3 patch (grid or white square) in a corner, dirty labels (all-to-one or all-to-all)",
    config=BadNetsConfig,
)
class BadNets(VisionAttack):
    """Patch-trigger data poisoning; all-to-one by default, all-to-all with ``all_to_all=true``."""

    version = "1"

    def __init__(self, cfg: BadNetsConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self.num_classes: int | None = None

    def check(self, num_classes: int) -> None:
        super().check(num_classes)
        if self.cfg.all_to_all and num_classes < 2:
            from backdoorbench.config import ConfigError

            raise ConfigError("attack.all_to_all needs at least two classes")
        self.num_classes = num_classes

    def check_image_size(self, height: int, width: int) -> None:
        c = self.cfg
        check_patch_fits(height, width, c.size, c.position, c.margin, c.offset)

    def apply_trigger(self, images: torch.Tensor, rng: np.random.Generator | None = None) -> torch.Tensor:  # type: ignore[override]
        check_images(images)
        _, _, h, w = images.shape
        c = self.cfg
        top, left = patch_origin(h, w, c.size, c.size, c.position, c.margin, c.offset)
        return stamp(images, patch_pattern(c.pattern, c.size), top, left)

    # -- all-to-all ---------------------------------------------------------------------------
    def target_labels(self, true_labels: np.ndarray) -> np.ndarray:
        if not self.cfg.all_to_all:
            return super().target_labels(true_labels)
        if self.num_classes is None:
            raise RuntimeError("badnets all-to-all: the number of classes is unknown; call check() or run() first")
        return (np.asarray(true_labels, dtype=np.int64) + 1) % self.num_classes

    def triggered_test(self, test: Samples) -> tuple[Samples, np.ndarray]:
        """All-to-one: the non-target test samples. All-to-all: every test sample (each one's target,
        ``(y + 1) mod K``, differs from its label)."""
        if not self.cfg.all_to_all:
            return super().triggered_test(test)
        idx = np.arange(len(test))
        images = cast(torch.Tensor, test.loaded().inputs)  # loaded images: a tensor
        return Samples(self.apply_trigger(images, self.rng(7919)), test.labels.copy(), test.modality), idx

    def run(self, ctx: AttackContext) -> AttackResult:
        self.num_classes = ctx.num_classes
        return super().run(ctx)

    def extra_info(self) -> dict[str, Any]:
        return {"all_to_all": bool(self.cfg.all_to_all), "num_classes": self.num_classes}

    def restore(self, info: dict[str, Any]) -> None:
        if info.get("num_classes") is not None and self.num_classes is None:
            self.num_classes = int(info["num_classes"])
