"""What the vision attacks share: the config base, the attacker's schedule, poison-sample selection, patch
stamping, and the dirty-label data-poisoning flow.

Images are ``uint8`` tensors ``[N, C, H, W]`` (see :mod:`backdoorbench.modality.vision`); every trigger maps
uint8 images to uint8 images, so a poisoned training set is stored exactly as a delta over the clean one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, cast

import numpy as np
import torch

from backdoorbench.attacks.base import Attack, AttackContext, AttackResult, check_attacker_schedule
from backdoorbench.data.base import Samples
from backdoorbench.data.images import ImageArray
from backdoorbench.data.poisoned import PoisonedDataset
from backdoorbench.modality.base import Classifier
from backdoorbench.seeds import stage_seed
from backdoorbench.trainer.lit import TrainConfig, fit

log = logging.getLogger(__name__)

CORNERS = ("bottom_right", "bottom_left", "top_right", "top_left")

# seed offsets: each random choice of an attack draws from its own stream ``[seed, salt]``
SALT_POISON = 1  # which training samples are poisoned
SALT_TRIGGER = 2  # trigger randomness (WaNet's warping field, Trojan's trigger initialisation)
SALT_NOISE = 3  # WaNet's noise-mode samples


def check_vision_basics(cfg: Any) -> None:
    """The checks every vision attack config shares: target, poison rate and the attacker's schedule."""
    if isinstance(cfg.target, bool) or not isinstance(cfg.target, int) or cfg.target < 0:
        raise ValueError(f"attack.target must be an integer label >= 0, got {cfg.target!r}")
    if not 0.0 <= cfg.poison_rate <= 1.0:
        raise ValueError(f"attack.poison_rate must be in [0, 1], got {cfg.poison_rate}")
    check_attacker_schedule(cfg)


@dataclass
class VisionAttackConfig:
    """Parameters every vision attack has (``attack.*``); each attack's config extends this one."""

    name: str = ""
    target: int = 0  # BackdoorBench's attack_target
    poison_rate: float = 0.1  # share of the training set that is poisoned (BackdoorBench's pratio)
    # the attacker's training schedule for the victim; null = the user's trainer.* value
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None

    def __post_init__(self) -> None:
        check_vision_basics(self)


def check_placement(cfg: Any) -> None:
    """The checks of a patch's placement keys, ``attack.position``, ``attack.margin`` and ``attack.offset`` (the
    patch's fit in the images is checked against the data by :func:`check_patch_fits`)."""
    if cfg.position not in CORNERS:
        raise ValueError(f"attack.position must be one of {CORNERS}, got {cfg.position!r}")
    if cfg.margin < 0:
        raise ValueError(f"attack.margin must be >= 0, got {cfg.margin}")
    if cfg.offset is not None and (len(cfg.offset) != 2 or min(cfg.offset) < 0):
        raise ValueError(f"attack.offset must be null or [row, col] with both >= 0, got {cfg.offset}")


def check_images(images: Any, where: str = "images") -> torch.Tensor | ImageArray:
    """``images`` must be a uint8 tensor ``[N, C, H, W]`` (or a lazy :class:`ImageArray` of them); returns it."""
    if not isinstance(images, (torch.Tensor, ImageArray)) or images.dtype != torch.uint8 or images.dim() != 4:
        got = f"{type(images).__name__}" + (
            f" {images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else ""
        )
        raise TypeError(f"{where}: a vision attack takes uint8 image tensors [N, C, H, W], got {got}")
    return images


def round_to_uint8(values: torch.Tensor) -> torch.Tensor:
    """Float pixel values on the 0-255 scale → uint8 (rounded to nearest, clipped)."""
    return values.round().clamp_(0, 255).to(torch.uint8)


def patch_origin(
    height: int, width: int, size_h: int, size_w: int, position: str, margin: int = 0,
    offset: list[int] | tuple[int, int] | None = None,
) -> tuple[int, int]:
    """Top-left pixel ``(row, col)`` of a ``size_h × size_w`` patch placed in a corner (``margin`` pixels from
    its two edges) or at an explicit ``offset = [row, col]``. Raises ``ValueError`` if it does not fit."""
    if offset is not None:
        top, left = int(offset[0]), int(offset[1])
    else:
        if position not in CORNERS:
            raise ValueError(f"patch position must be one of {CORNERS}, got {position!r}")
        top = height - size_h - margin if position.startswith("bottom") else margin
        left = width - size_w - margin if position.endswith("right") else margin
    if top < 0 or left < 0 or top + size_h > height or left + size_w > width:
        raise ValueError(
            f"a {size_h}x{size_w} patch at (row {top}, col {left}) does not fit in {height}x{width} images "
            f"(position={position!r}, margin={margin}, offset={offset})"
        )
    return top, left


def check_patch_fits(
    height: int, width: int, size: int, position: str, margin: int, offset: list[int] | tuple[int, int] | None,
    what: str | None = None,
) -> None:
    """:class:`~backdoorbench.config.ConfigError` (one line, naming ``what``, default ``attack.size=<size>``, and
    the largest side that fits) when a square ``size`` patch at ``position``/``margin``/``offset`` does not fit
    ``height × width`` images."""
    try:
        patch_origin(height, width, size, size, position, margin, offset)
    except ValueError as exc:
        from backdoorbench.config import ConfigError

        if offset is not None:
            room, where = min(height - int(offset[0]), width - int(offset[1])), f"at attack.offset={list(offset)}"
        else:
            room, where = min(height, width) - margin, f"with attack.margin={margin}"
        fits = f"at most {room} fits {where}" if room >= 1 else f"no patch fits {where}"
        what = what or f"attack.size={size}"
        raise ConfigError(f"{what} does not fit this dataset's {height}x{width} images ({exc}); {fits}") from None


def stamp(images: torch.Tensor, patch: torch.Tensor, top: int, left: int) -> torch.Tensor:
    """Copies of ``images`` with the pixels of the region replaced by ``patch`` (uint8 ``[C or 1, h, w]``)."""
    out = images.clone()
    h, w = patch.shape[-2:]
    out[:, :, top : top + h, left : left + w] = patch.to(images.dtype)
    return out


def choose_dirty(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """``round(rate × n)`` positions out of ``n``, uniformly from all classes, sorted (BackdoorBench's
    ``generate_single_target_attack_train_poison_index`` with ``clean_label=False``)."""
    k = int(round(rate * n))
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    return np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)


def choose_clean_label(labels: np.ndarray, target: int, rate: float, rng: np.random.Generator, name: str) -> np.ndarray:
    """Clean-label selection: ``round(rate × n)`` positions, all of the target class (the rate is a share of
    the whole training set, as in BackdoorBench). A clear error when the target class is too small."""
    n = len(labels)
    k = int(round(rate * n))
    pool = np.flatnonzero(labels == target)
    if k > len(pool):
        raise ValueError(
            f"{name}: attack.poison_rate={rate} asks for {k} poisoned samples ({rate:.1%} of {n}), but only the "
            f"{len(pool)} training samples of the target class {target} ({len(pool) / max(n, 1):.1%}) can be "
            f"poisoned by a clean-label attack; lower attack.poison_rate to at most {len(pool) / max(n, 1):.4f}"
        )
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    return np.sort(rng.choice(pool, size=k, replace=False)).astype(np.int64)


def attacker_train_config(cfg: Any, trainer: TrainConfig, epochs: int | None = None) -> TrainConfig:
    """The user's schedule with the attack's ``epochs``/``lr``/``batch_size`` overrides (``epochs`` given here
    wins over ``cfg.epochs``)."""
    ep = epochs if epochs is not None else cfg.epochs
    return replace(
        trainer,
        max_epochs=ep if ep is not None else trainer.max_epochs,
        lr=cfg.lr if cfg.lr is not None else trainer.lr,
        batch_size=cfg.batch_size if cfg.batch_size is not None else trainer.batch_size,
    )


def train_surrogate(attack: Attack, ctx: AttackContext, epochs: int | None) -> Classifier:
    """The attacker's clean surrogate: a fresh model of the victim's architecture trained on the attacker's
    (clean) training data with the attacker's schedule (``epochs`` null = the schedule's epochs); trained once for
    label-consistent and Trojan with the same schedule and seed when the cache is on."""
    cfg = attacker_train_config(attack.cfg, ctx.trainer, epochs)
    seed = stage_seed(attack.seed, "surrogate")
    return ctx.clean_model(ctx.train, cfg, seed, "attacker: clean surrogate", "surrogate")


class VisionAttack(Attack):
    """A data-poisoning vision attack: poison ``ctx.train`` (``poison_dataset``), train a fresh victim on it.

    Subclasses implement ``apply_trigger`` and, where poisoning is not plain dirty-label, ``poison_dataset``.
    """

    modality = "vision"

    def poison(self, samples: Samples, rate: float, rng: np.random.Generator) -> PoisonedDataset:
        """Dirty-label poisoning: trigger ``round(rate × n)`` samples drawn from all classes, relabel them to
        ``target_labels`` of their true labels (the target for all-to-one attacks)."""
        check_images(samples.inputs, "training set")
        idx = choose_dirty(len(samples), rate, rng)
        chosen = samples.subset(idx).loaded()
        inputs = self.apply_trigger(cast(torch.Tensor, chosen.inputs), rng)  # loaded images: a tensor
        return PoisonedDataset(samples, idx, inputs, self.target_labels(chosen.labels), self.target)

    def poison_dataset(self, ctx: AttackContext) -> PoisonedDataset:
        return self.poison(ctx.train, self.cfg.poison_rate, self.rng(SALT_POISON))

    def train_victim(self, ctx: AttackContext, poisoned: PoisonedDataset) -> Classifier:
        cfg = attacker_train_config(self.cfg, ctx.trainer)
        return fit(ctx.new_model(), poisoned.materialize(), cfg, self.seed, desc=f"attacker: {self.cfg.name} victim",
                   checkpoint=ctx.checkpoint("victim"))

    def apply_test_trigger(self, images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """The test-time trigger; the training trigger unless an attack uses a different test strength."""
        return self.apply_trigger(images, rng)  # type: ignore[return-value]

    def triggered_test(self, test: Samples) -> tuple[Samples, np.ndarray]:
        """Test-time triggered copies of the non-target test samples (true labels kept), for ASR."""
        idx = self.non_target_indices(test)
        base = test.subset(idx).loaded()
        images = cast(torch.Tensor, base.inputs)  # loaded images: a tensor
        return Samples(self.apply_test_trigger(images, self.rng(7919)), base.labels, base.modality), idx

    def run(self, ctx: AttackContext) -> AttackResult:
        if len(ctx.train) == 0:
            raise ValueError(f"{self.cfg.name}: the attacker has no training data")
        check_images(ctx.train.inputs, "training set")
        poisoned = self.poison_dataset(ctx)
        model = self.train_victim(ctx, poisoned)
        changed = poisoned.labels != ctx.train.labels[poisoned.indices]
        info = {
            "poisoned_samples": int(len(poisoned.indices)),
            "relabelled_samples": int(changed.sum()),
            "attacker_samples": len(ctx.train),
            **self.extra_info(),
        }
        return AttackResult(model, poisoned, info, "train")
