"""What the pruning repairs share (RNP, ANP): the units they mask, the masks, and pruning by mask value.

**Units, for any architecture, with no model copies per architecture.** A unit is one output channel of a
normalisation layer's affine scale: every module whose class name contains "Norm" and that has a 1-d
``weight`` parameter (BatchNorm, GroupNorm, LayerNorm, timm's LayerNorm2d / BatchNormAct2d, RMSNorm) —
BatchNorm channels of a CNN, LayerNorm features of a transformer. ``units=neurons`` takes the output neurons
of the ``nn.Linear`` layers instead (rows of their weight; the classifier head excluded) — the transformer
feed-forward neurons — and ``units=all`` both. A mask is a :mod:`torch.nn.utils.parametrize` parametrisation
of the unit's ``weight`` (``w · m``), registered on a deep copy of whatever model comes in.

:class:`MaskPruning` is the shared last step: the *original* model with the lowest-mask units' scale set to
zero (mask ≤ ``threshold``, or the ``num_units`` lowest), and the curve over thresholds 0, 0.05, …, 0.9 (the
references' ``pruning_max`` / ``pruning_step``) with the defender's clean accuracy at each threshold.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, cast

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from backdoorbench.data.base import Samples
from backdoorbench.defenses.base import DefenseConfig, RepairDefense
from backdoorbench.defenses.repair.common import clone
from backdoorbench.errors import ModelError
from backdoorbench.modality.base import Classifier

log = logging.getLogger(__name__)

UNITS = ("norm", "neurons", "all")
PRUNE_BY = ("threshold", "number")


@dataclass
class PruningConfig(DefenseConfig):
    """The keys of pruning by mask value (``defense.*``), shared by RNP and ANP."""

    units: str = "norm"  # norm | neurons | all
    prune_by: str = "threshold"  # threshold | number
    threshold: float = 0.2  # prune units whose mask is <= threshold
    num_units: int | None = None  # prune_by=number: how many of the lowest-mask units
    curve_max: float = 0.9  # thresholds of the reported curve: 0, curve_step, ..., curve_max
    curve_step: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            (self.units in UNITS, f"units must be one of {UNITS}"),
            (self.prune_by in PRUNE_BY, f"prune_by must be one of {PRUNE_BY}"),
            (0 <= self.threshold <= 1, "threshold must be in [0, 1]"),
            (self.prune_by != "number" or (self.num_units or 0) >= 1, "prune_by=number needs num_units >= 1"),
            (0 < self.curve_step <= 1 and 0 <= self.curve_max <= 1, "curve_step in (0, 1], curve_max in [0, 1]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"defense ({self.name}): {msg}")


# -- units and masks -------------------------------------------------------------------------------
def is_norm(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return "norm" in type(module).__name__.lower() and isinstance(w, nn.Parameter) and w.dim() == 1


def maskable_units(model: nn.Module, units: str = "norm", who: str = "RNP") -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module whose output units are masked, in module order."""
    found: list[tuple[str, nn.Module]] = []
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    head = linears[-1][0] if linears else None  # the classifier head is never masked
    for name, m in model.named_modules():
        if units in ("norm", "all") and is_norm(m):
            found.append((name, m))
        elif units in ("neurons", "all") and isinstance(m, nn.Linear) and name != head:
            found.append((name, m))
    if not found:
        raise ModelError(
            f"{who}: {type(model).__name__} has no {units!r} units to mask "
            "(norm: modules named *Norm* with a 1-d weight; neurons: nn.Linear layers)"
        )
    return found


def unit_weight(module: nn.Module) -> torch.Tensor:
    """The ``weight`` of a module :func:`maskable_units` found (a tensor: a norm layer's or an ``nn.Linear``'s)."""
    return cast(torch.Tensor, module.weight)


def unit_view(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``v`` (one value per unit) in ``w``'s dtype, shaped to broadcast over ``w``'s axis 0."""
    return v.to(w.dtype).view(-1, *([1] * (w.dim() - 1)))


class UnitMask(nn.Module):
    """Parametrisation ``w ↦ w · m`` with one mask value per output unit (axis 0 of ``w``)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.mask = nn.Parameter(torch.ones(n))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * unit_view(self.mask, w)


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def add_masks(model: nn.Module, units: str = "norm") -> dict[str, nn.Parameter]:
    """Freeze ``model`` and give each of its maskable modules a :class:`UnitMask` on ``weight``; returns
    ``{module name: mask parameter}`` (the only trainable parameters left)."""
    freeze_all(model)
    masks: dict[str, nn.Parameter] = {}
    for name, m in maskable_units(model, units):
        w = unit_weight(m)
        um = UnitMask(w.shape[0]).to(w.device)
        parametrize.register_parametrization(m, "weight", um)
        masks[name] = um.mask
    return masks


def clip_masks(masks: dict[str, nn.Parameter], lower: float = 0.0, upper: float = 1.0) -> None:
    with torch.no_grad():
        for m in masks.values():
            m.clamp_(lower, upper)


def mask_values(masks: dict[str, nn.Parameter]) -> list[tuple[str, int, float]]:
    """``(module, unit index, mask value)`` for every unit, lowest mask first (ties in module order)."""
    rows = [(name, i, float(v)) for name, m in masks.items() for i, v in enumerate(m.detach().cpu().tolist())]
    return sorted(rows, key=lambda r: r[2])


@torch.no_grad()
def prune_units(model: nn.Module, units: list[tuple[str, int]], bias: bool = False) -> None:
    """Set the scale (axis-0 slice of ``weight``) of each ``(module name, unit index)`` to zero, in place;
    with ``bias``, its bias too (where the module has one)."""
    modules = dict(model.named_modules())
    for name, idx in units:
        modules[name].weight[idx] = 0.0
        b = getattr(modules[name], "bias", None)
        if bias and isinstance(b, torch.Tensor):
            b[idx] = 0.0


# -- pruning the original model by mask value ----------------------------------------------------------
class MaskPruning(RepairDefense):
    """A repair that learns one mask value per unit (:attr:`values`), then prunes the original model's
    lowest-mask units. Subclasses compute the masks and call :meth:`prune_by_masks`."""

    sweep_name = "pruning threshold (mask value ≤)"
    #: the CSV (in the run folder) listing every unit's mask value
    masks_file: ClassVar[str] = "masks.csv"

    def __init__(self, cfg: PruningConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self.values: list[tuple[str, int, float]] = []
        self.pruned: list[tuple[str, int]] = []
        self._original: Classifier | None = None

    def selected(self, threshold: float | None = None) -> list[tuple[str, int]]:
        """The units pruned at ``threshold`` (default: the configured rule)."""
        if threshold is None and self.cfg.prune_by == "number":
            return [(n, i) for n, i, _ in self.values[: self.cfg.num_units]]
        t = self.cfg.threshold if threshold is None else threshold
        return [(n, i) for n, i, v in self.values if v <= t]

    def prune_by_masks(self, model: Classifier, clean: Samples, masks: dict[str, nn.Parameter]) -> Classifier:
        """A copy of ``model`` with the selected units pruned; records the curve's clean accuracy and the masks."""
        self.values = mask_values(masks)
        self._original = model
        self.pruned = self.selected()
        repaired = clone(model)
        prune_units(repaired, self.pruned)
        repaired.eval()
        log.info("%s: pruned %d of %d units", type(self).__name__, len(self.pruned), len(self.values))
        self.sweep_info = {  # the defender's clean accuracy along the curve
            t: {"units_pruned": float(count), "clean_acc": m.accuracy(clean, self.cfg.batch_size)}
            for t, m, count in self._pruned_at_thresholds()
        }
        self.write_masks()
        return repaired

    @property
    def chosen_setting(self) -> float | None:
        """The threshold the repaired model was pruned at (None when pruning by number)."""
        return self.cfg.threshold if self.cfg.prune_by == "threshold" else None

    def thresholds(self) -> list[float]:
        n = int(np.floor(self.cfg.curve_max / self.cfg.curve_step + 1e-9))
        return [round(k * self.cfg.curve_step, 4) for k in range(n + 1)]

    def _pruned_at_thresholds(self) -> Iterator[tuple[float, Classifier, int]]:
        """Cumulative pruning of one copy of the original model, threshold by threshold (as the references):
        ``(threshold, the pruned model, how many units are pruned)``."""
        if self._original is None:
            return
        model = clone(self._original)
        done = 0
        for t in self.thresholds():
            todo = [(n, i) for n, i, v in self.values[done:] if v <= t]
            prune_units(model, todo)
            done += len(todo)
            model.eval()
            yield t, model, done

    def sweep(self) -> Iterator[tuple[float, Classifier]]:
        return ((t, m) for t, m, _ in self._pruned_at_thresholds())

    def write_masks(self) -> None:
        if self.run_dir is None:
            return
        with (self.run_dir / self.masks_file).open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["module", "unit", "mask", "pruned"])
            pruned = set(self.pruned)
            for name, i, v in self.values:
                w.writerow([name, i, f"{v:.6f}", int((name, i) in pruned)])
