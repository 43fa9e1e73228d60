"""Label-consistent backdoor (Turner, Tsipras and Madry, "Label-Consistent Backdoor Attacks", arXiv 1912.02771,
2019), adversarial-perturbation variant: a clean-label attack.

1. **Surrogate.** The attacker trains a clean model of the victim's architecture on its training data
   (``surrogate_epochs``; null = the attacker's schedule).
2. **Hard images.** ``round(poison_rate × n)`` training images *of the target class* are made hard to classify
   with an untargeted L∞ PGD attack on the surrogate (maximise the cross-entropy of their true label; no random
   start; ``steps`` signed-gradient steps of ``step_size``, projected to the ``eps`` ball and to [0, 1]). The
   result is rounded to uint8 and kept within ``floor(eps)`` grey levels of the clean image.
3. **Trigger.** The reference's checkerboard trigger is added: a 3×3 ±1 pattern in each of the four corners
   (``all_corners``, the paper's improved trigger) or the bottom-right one only (``bottom_right``). Each pattern
   pixel gets ``± amplitude × 255`` added, then the image is clipped to 0..255; at ``amplitude = 1`` that sets
   the pixels to white (+1) and black (−1), the reference's full-amplitude trigger; ``amplitude < 1`` is the
   paper's reduced-amplitude trigger (e.g. 16/255, 32/255, 64/255 → 0.063, 0.125, 0.251). Patterns and
   positions are those of ``MadryLab/label-consistent-backdoor-code`` (``poison_attack.py``).
4. **Labels unchanged**; the victim is trained on the poisoned set. At test time the trigger (same amplitude,
   as in the reference's ``generate_poisoned_dataset.py``, unless ``test_amplitude`` is set) is added to clean
   images of other classes.

Defaults: PGD eps = 8/255, step size 1.5/255, 100 steps (BackdoorBench's ``resource/label-consistent/
craft_adv_dataset.py``; the paper's L∞ ε = 8 setting — it also reports ε = 16 and 32, which make the images
harder and the attack stronger), trigger ``all_corners`` at full amplitude (BackdoorBench's ``lc`` defaults:
``all-corners``, ``reduced_amplitude: 1``), target 0. ``poison_rate`` is the share of the whole training set
(BackdoorBench's convention; the paper and its code state the share of the target class); only target-class
images can be poisoned, so a rate above the target class's share is an error. Default 0.05, about half of the
target class on 10-class data (BackdoorBench's 0.1 is all of a CIFAR-10 class and more than MNIST's class 0).

Deviations: the paper and BackdoorBench perturb against an *adversarially trained* (PGD) model, whose
perturbations transfer better and look more natural; here the surrogate is a standard model trained on the
attacker's data (adversarial training on CPU would cost several times the victim's training). The trigger is
placed in pixels at any image size (BackdoorBench nearest-resizes its 32×32 annotation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from backdoorbench import runtime
from backdoorbench.attacks.base import AttackContext
from backdoorbench.attacks.vision.common import (
    SALT_POISON,
    VisionAttack,
    VisionAttackConfig,
    check_images,
    choose_clean_label,
    round_to_uint8,
    train_surrogate,
)
from backdoorbench.data.poisoned import PoisonedDataset
from backdoorbench.modality.base import Classifier
from backdoorbench.modality.vision import to_float
from backdoorbench.registry import register_attack

TRIGGERS = ("all_corners", "bottom_right")

# The reference's 3×3 patterns (+1 white, −1 black), rows top to bottom, columns left to right.
CORNER_PATTERNS: dict[str, list[list[int]]] = {
    "top_left": [[1, -1, -1], [-1, 1, -1], [1, -1, 1]],
    "top_right": [[-1, -1, 1], [-1, 1, -1], [1, -1, 1]],
    "bottom_left": [[1, -1, -1], [-1, 1, -1], [1, -1, 1]],
    "bottom_right": [[-1, -1, 1], [-1, 1, -1], [1, -1, 1]],
}


@dataclass
class LabelConsistentConfig(VisionAttackConfig):
    name: str = "label_consistent"
    target: int = 0
    poison_rate: float = 0.05  # share of the whole training set; all poisoned images are of the target class
    eps: float = 8.0  # L∞ bound of the PGD perturbation, 0-255 pixel units (8/255)
    step_size: float = 1.5  # PGD step, 0-255 pixel units (1.5/255)
    steps: int = 100  # PGD iterations
    trigger: str = "all_corners"  # all_corners | bottom_right
    amplitude: float = 1.0  # trigger amplitude on a 0-1 scale (1 = full: pixels set to white/black)
    test_amplitude: float | None = None  # amplitude of the test-time trigger; null = amplitude
    surrogate_epochs: int | None = None  # the clean surrogate's epochs; null = the attacker's schedule
    pgd_batch_size: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eps < 0:
            raise ValueError(f"attack.eps must be >= 0 (0-255 pixel units), got {self.eps}")
        if self.step_size <= 0:
            raise ValueError(f"attack.step_size must be > 0 (0-255 pixel units), got {self.step_size}")
        if self.steps < 0:
            raise ValueError(f"attack.steps must be >= 0, got {self.steps}")
        if self.trigger not in TRIGGERS:
            raise ValueError(f"attack.trigger must be one of {TRIGGERS}, got {self.trigger!r}")
        for key in ("amplitude", "test_amplitude"):
            v = getattr(self, key)
            if v is not None and not 0.0 < v <= 1.0:
                raise ValueError(f"attack.{key} must be in (0, 1], got {v}")
        if self.surrogate_epochs is not None and self.surrogate_epochs < 1:
            raise ValueError(f"attack.surrogate_epochs must be >= 1 or null, got {self.surrogate_epochs}")
        if self.pgd_batch_size < 1:
            raise ValueError(f"attack.pgd_batch_size must be >= 1, got {self.pgd_batch_size}")


def corner_trigger(height: int, width: int, trigger: str) -> torch.Tensor:
    """The trigger as a ±1/0 float map ``[H, W]`` (0 = untouched pixel)."""
    corners = list(CORNER_PATTERNS) if trigger == "all_corners" else ["bottom_right"]
    need = 6 if trigger == "all_corners" else 3
    if height < need or width < need:
        raise ValueError(f"the {trigger} trigger needs images of at least {need}x{need}, got {height}x{width}")
    out = torch.zeros(height, width, dtype=torch.float64)
    for corner in corners:
        pat = torch.tensor(CORNER_PATTERNS[corner], dtype=torch.float64)
        top = height - 3 if corner.startswith("bottom") else 0
        left = width - 3 if corner.endswith("right") else 0
        out[top : top + 3, left : left + 3] = pat
    return out


def add_corner_trigger(images: torch.Tensor, trigger: str, amplitude: float) -> torch.Tensor:
    """``clip(x + amplitude · 255 · pattern)`` on every channel (the reference's trigger_add_mask)."""
    check_images(images)
    pattern = corner_trigger(images.shape[-2], images.shape[-1], trigger)
    return round_to_uint8(images.double() + amplitude * 255.0 * pattern)


def pgd_linf(
    model: Classifier, images: torch.Tensor, labels: np.ndarray, eps: float, step_size: float, steps: int,
    batch_size: int = 256,
) -> torch.Tensor:
    """Untargeted L∞ PGD (maximise cross-entropy of ``labels``; no random start) on uint8 images; ``eps`` and
    ``step_size`` in 0-255 units. Returns uint8 images within ``floor(eps)`` grey levels of the originals.

    The forward passes run in the run's ``trainer.precision`` (:func:`backdoorbench.runtime.train_autocast`); at
    16-bit float the loss is scaled by 2^10 before the gradient (its sign is all PGD uses; the scale keeps small
    gradients from flushing to zero)."""
    check_images(images)
    model.eval()
    device = model.device
    bound = math.floor(eps + 1e-9)
    out = torch.empty_like(images)
    with runtime.stage_probe("attacker: PGD", model, runtime.current().precision):
        for start in range(0, len(images), batch_size):
            _pgd_batch(model, images, labels, out, start, batch_size, eps, step_size, steps, bound, device)
    return out


def _pgd_batch(
    model: Classifier, images: torch.Tensor, labels: np.ndarray, out: torch.Tensor, start: int, batch_size: int,
    eps: float, step_size: float, steps: int, bound: int, device: torch.device,
) -> None:
    """One batch of :func:`pgd_linf`, written into ``out``."""
    scale = 1024.0 if runtime.train_dtype(device) == torch.float16 else 1.0
    x0 = to_float(images[start : start + batch_size]).to(device)
    y = torch.as_tensor(labels[start : start + batch_size], dtype=torch.long, device=device)
    x = x0.clone()
    for _ in range(steps):
        x.requires_grad_(True)
        with runtime.train_autocast(device):
            loss = F.cross_entropy(model({"pixels": x}).float(), y)
        (grad,) = torch.autograd.grad(loss * scale if scale != 1.0 else loss, x)
        with torch.no_grad():
            x = x + step_size / 255.0 * grad.sign()
            x = torch.clamp(x0 + torch.clamp(x - x0, -eps / 255.0, eps / 255.0), 0.0, 1.0)
    adv = round_to_uint8(x.detach().cpu() * 255.0).to(torch.int16)
    orig = images[start : start + batch_size].to(torch.int16)
    out[start : start + batch_size] = torch.clamp(adv, orig - bound, orig + bound).clamp(0, 255).to(torch.uint8)


@register_attack(
    "label_consistent",
    modality="vision",
    category="data poisoning (clean label)",
    needs="task data",
    description="Label-consistent: PGD-hardened target-class images with a 4-corner checkerboard, labels unchanged",
    config=LabelConsistentConfig,
)
class LabelConsistent(VisionAttack):
    """Clean-label poisoning with adversarially perturbed target-class images (Turner et al. 2019)."""

    version = "1"

    def __init__(self, cfg: LabelConsistentConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self._info: dict[str, Any] = {}

    def check_image_size(self, height: int, width: int) -> None:
        try:
            corner_trigger(height, width, self.cfg.trigger)
        except ValueError as exc:
            from backdoorbench.config import ConfigError

            raise ConfigError(f"attack.trigger={self.cfg.trigger}: {exc}") from None

    def apply_trigger(self, images: torch.Tensor, rng: np.random.Generator | None = None) -> torch.Tensor:  # type: ignore[override]
        return add_corner_trigger(images, self.cfg.trigger, self.cfg.amplitude)

    def apply_test_trigger(self, images: torch.Tensor, rng: np.random.Generator | None = None) -> torch.Tensor:
        amp = self.cfg.test_amplitude if self.cfg.test_amplitude is not None else self.cfg.amplitude
        return add_corner_trigger(images, self.cfg.trigger, amp)

    def perturb(self, surrogate: Classifier, images: torch.Tensor, labels: np.ndarray) -> torch.Tensor:
        c = self.cfg
        return pgd_linf(surrogate, images, labels, c.eps, c.step_size, c.steps, c.pgd_batch_size)

    def poison_dataset(self, ctx: AttackContext) -> PoisonedDataset:
        train = ctx.train
        c = self.cfg
        idx = choose_clean_label(train.labels, self.target, c.poison_rate, self.rng(SALT_POISON), "label_consistent")
        chosen = train.subset(idx).loaded()
        images = cast(torch.Tensor, chosen.inputs)  # loaded images: a tensor
        if len(idx) == 0:
            return PoisonedDataset(train, idx, images, chosen.labels, self.target)
        surrogate = train_surrogate(self, ctx, c.surrogate_epochs)
        hard = self.perturb(surrogate, images, chosen.labels)
        self._info = {
            "clean_label": True,
            "surrogate_acc_clean": float((surrogate.predict(chosen.inputs) == chosen.labels).mean()),
            "surrogate_acc_perturbed": float((surrogate.predict(hard) == chosen.labels).mean()),
        }
        return PoisonedDataset(train, idx, self.apply_trigger(hard), chosen.labels, self.target)

    def extra_info(self) -> dict[str, Any]:
        return {"clean_label": True, **self._info}
