"""``defense=rnp``: Reconstructive Neuron Pruning (Li et al., ICML 2023; reference ``bboylyg/RNP``).

1. **Unlearn** (neuron level): a copy of the backdoored model is trained to *maximise* cross-entropy on the
   defender's clean data (SGD lr 0.01, momentum 0.9, weight decay 5e-4, ×0.1 at epochs 10 and 20), until
   its accuracy over an epoch is ≤ ``clean_threshold`` (0.2) or ``unlearn_epochs`` (20) have run. Clean
   features collapse; the backdoor's, which clean data never exercises, survive.
2. **Recover** (filter level): the unlearned model's weights are frozen; a mask ``m ∈ [0, 1]`` per unit,
   initialised to 1, scales the unit and is learnt to *minimise* ``α · CE`` on the clean data (α 0.2,
   SGD lr 0.2, momentum 0.9, ``recover_epochs`` 20, masks clipped to [0, 1] after every step). Recovering
   clean accuracy needs the clean units back; the backdoor units stay low.
3. **Prune** the *original* backdoored model: units whose mask is ≤ ``threshold`` (0.2) — or the
   ``num_units`` lowest — get their scale set to 0 (the reference zeroes the BatchNorm weight, keeps the bias).

**Units, for any architecture, with no model copies per architecture.** A unit is one output channel of a
normalisation layer's affine scale: every module whose class name contains "Norm" and that has a 1-d
``weight`` parameter (BatchNorm, GroupNorm, LayerNorm, timm's LayerNorm2d / BatchNormAct2d, RMSNorm). The
mask is a :mod:`torch.nn.utils.parametrize` parametrisation of that ``weight`` (``w · m``), registered on
a deep copy of whatever model comes in — BatchNorm channels of a CNN, LayerNorm features of a
transformer. ``units=neurons`` masks the output neurons of the ``nn.Linear`` layers instead (rows of their
weight; the classifier head excluded) — the transformer feed-forward neurons — and ``units=all`` both.

After :meth:`repair`, :meth:`sweep` yields the pruned model at thresholds 0, 0.05, …, 0.9 (the reference's
``pruning_max`` / ``pruning_step``) for the ASR/BA-vs-threshold curve; the defender's clean accuracy at
each threshold is recorded beside it (``sweep_info``), the only curve the defense may choose from.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from backdoorbench.data.base import Samples
from backdoorbench.defenses.base import DefenseConfig, RepairDefense
from backdoorbench.defenses.repair.common import clone, repeat_to_steps
from backdoorbench.modality.base import Classifier
from backdoorbench.registry import register_defense
from backdoorbench.trainer.lit import TrainConfig, fit

log = logging.getLogger(__name__)

UNITS = ("norm", "neurons", "all")
PRUNE_BY = ("threshold", "number")
UNLEARN_STOPS = ("epoch", "step")


@dataclass
class RNPConfig(DefenseConfig):
    name: str = "rnp"
    clean_fraction: float | None = 0.01  # the paper's 1% of the training set
    batch_size: int = 128
    augment: bool = True  # the model's training augmentation during unlearning and recovery
    steps_per_epoch: int | None = None  # null = one pass over the clean data; a number repeats it (see nad)
    # unlearning
    unlearn_lr: float = 0.01
    unlearn_epochs: int = 20
    unlearn_milestones: list[int] = field(default_factory=lambda: [10, 20])
    unlearn_momentum: float = 0.9
    unlearn_weight_decay: float = 5e-4
    unlearn_grad_clip: float = 20.0  # gradient-norm clip (0 = off); see docs/defenses/rnp.md
    clean_threshold: float = 0.2  # stop unlearning once an epoch's clean accuracy is <= this
    # epoch: check the accuracy over each epoch (the reference) | step: over each batch, stopping at once (a
    # declared deviation for defender sets of a few steps per epoch, where one epoch overshoots; docs/defenses/rnp.md)
    unlearn_stop: str = "epoch"
    # recovery
    recover_lr: float = 0.2
    recover_epochs: int = 20
    recover_momentum: float = 0.9
    alpha: float = 0.2  # the recovery loss is alpha * CE (the reference's)
    units: str = "norm"  # norm | neurons | all
    # pruning
    prune_by: str = "threshold"  # threshold | number
    threshold: float = 0.2  # prune units whose mask is <= threshold
    num_units: int | None = None  # prune_by=number: how many of the lowest-mask units
    curve_max: float = 0.9  # thresholds of the reported curve: 0, curve_step, ..., curve_max
    curve_step: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.unlearn_lr > 0 and self.recover_lr > 0, "unlearn_lr and recover_lr must be > 0"),
            (self.unlearn_epochs >= 1 and self.recover_epochs >= 1, "unlearn_epochs and recover_epochs must be >= 1"),
            (0 <= self.clean_threshold <= 1, "clean_threshold must be in [0, 1]"),
            (self.alpha > 0, "alpha must be > 0"),
            (self.units in UNITS, f"units must be one of {UNITS}"),
            (self.prune_by in PRUNE_BY, f"prune_by must be one of {PRUNE_BY}"),
            (0 <= self.threshold <= 1, "threshold must be in [0, 1]"),
            (self.prune_by != "number" or (self.num_units or 0) >= 1, "prune_by=number needs num_units >= 1"),
            (0 < self.curve_step <= 1 and 0 <= self.curve_max <= 1, "curve_step in (0, 1], curve_max in [0, 1]"),
            (self.unlearn_grad_clip >= 0, "unlearn_grad_clip must be >= 0"),
            (self.steps_per_epoch is None or self.steps_per_epoch >= 1, "steps_per_epoch must be >= 1 or null"),
            (self.unlearn_stop in UNLEARN_STOPS, f"unlearn_stop must be one of {UNLEARN_STOPS}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"defense (rnp): {msg}")


# -- units and masks -------------------------------------------------------------------------------
def is_norm(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return "norm" in type(module).__name__.lower() and isinstance(w, nn.Parameter) and w.dim() == 1


def maskable_units(model: nn.Module, units: str = "norm") -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module whose output units RNP masks, in module order."""
    found: list[tuple[str, nn.Module]] = []
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    head = linears[-1][0] if linears else None  # the classifier head is never masked
    for name, m in model.named_modules():
        if units in ("norm", "all") and is_norm(m):
            found.append((name, m))
        elif units in ("neurons", "all") and isinstance(m, nn.Linear) and name != head:
            found.append((name, m))
    if not found:
        raise ValueError(
            f"RNP: {type(model).__name__} has no {units!r} units to mask "
            "(norm: modules named *Norm* with a 1-d weight; neurons: nn.Linear layers)"
        )
    return found


class UnitMask(nn.Module):
    """Parametrisation ``w ↦ w · m`` with one mask value per output unit (axis 0 of ``w``)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.mask = nn.Parameter(torch.ones(n))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask.to(w.dtype).view(-1, *([1] * (w.dim() - 1)))


def add_masks(model: nn.Module, units: str = "norm") -> dict[str, nn.Parameter]:
    """Freeze ``model`` and give each of its maskable modules a :class:`UnitMask` on ``weight``; returns
    ``{module name: mask parameter}`` (the only trainable parameters left)."""
    for p in model.parameters():
        p.requires_grad_(False)
    masks: dict[str, nn.Parameter] = {}
    for name, m in maskable_units(model, units):
        um = UnitMask(m.weight.shape[0]).to(m.weight.device)
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
def prune_units(model: nn.Module, units: list[tuple[str, int]]) -> None:
    """Set the scale (axis-0 slice of ``weight``) of each ``(module name, unit index)`` to zero, in place."""
    modules = dict(model.named_modules())
    for name, idx in units:
        modules[name].weight[idx] = 0.0


# -- the two optimisation stages (Lightning) ---------------------------------------------------------
class UnlearnModule(L.LightningModule):
    """Gradient *ascent* on clean cross-entropy; stops once an epoch's accuracy is <= ``clean_threshold``."""

    def __init__(self, model: Classifier, cfg: RNPConfig) -> None:
        super().__init__()
        self.model, self.cfg = model, cfg
        self.correct = self.seen = self.steps = 0
        self.history: list[float] = []  # per epoch (and the stopping batch's accuracy with unlearn_stop=step)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        inputs = self.model.augment(batch["inputs"]) if self.cfg.augment else batch["inputs"]
        logits = self.model(inputs)
        loss = F.cross_entropy(logits, batch["labels"])
        hits = (logits.argmax(1) == batch["labels"]).sum()
        self.correct = self.correct + hits  # on the device; read once per epoch (unlearn_stop=epoch)
        self.seen += len(batch["labels"])
        self.steps += 1
        self.log("clean_ce", loss, prog_bar=True, batch_size=len(batch["labels"]))
        # unlearn_stop=step: this batch's accuracy (before its update), as the epoch check uses the accuracy
        # accumulated over the epoch's batches; Lightning stops after this step
        if self.cfg.unlearn_stop == "step":  # this batch's accuracy decides: one host read per step, by design
            right = int(hits)
            if right / len(batch["labels"]) <= self.cfg.clean_threshold:
                self.history.append(right / len(batch["labels"]))
                self.trainer.should_stop = True
        return -loss

    def on_train_epoch_end(self) -> None:
        if self.trainer.should_stop and self.cfg.unlearn_stop == "step":
            return  # stopped by a batch; its accuracy is the last of the history
        acc = int(self.correct) / max(self.seen, 1)
        self.history.append(acc)
        self.correct = self.seen = 0
        if acc <= self.cfg.clean_threshold:
            self.trainer.should_stop = True

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(
            self.model.parameters(),
            lr=self.cfg.unlearn_lr,
            momentum=self.cfg.unlearn_momentum,
            weight_decay=self.cfg.unlearn_weight_decay,
        )
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(self.cfg.unlearn_milestones), gamma=0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


class RecoverModule(L.LightningModule):
    """Learn the unit masks of a frozen (unlearned) model: minimise ``α · CE``, masks clipped to [0, 1]."""

    def __init__(self, model: Classifier, cfg: RNPConfig, masks: dict[str, nn.Parameter]) -> None:
        super().__init__()
        self.model, self.cfg = model, cfg
        self.masks = masks

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        inputs = self.model.augment(batch["inputs"]) if self.cfg.augment else batch["inputs"]
        loss = self.cfg.alpha * F.cross_entropy(self.model(inputs), batch["labels"])
        self.log("mask_loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def on_train_batch_end(self, *args: Any) -> None:
        clip_masks(self.masks)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(list(self.masks.values()), lr=self.cfg.recover_lr, momentum=self.cfg.recover_momentum)


# -- the defense ---------------------------------------------------------------------------------------
@register_defense(
    "rnp",
    modality=("text", "vision"),
    category="repair",
    needs="the backdoored model and ~1% clean data (with labels); any model with normalisation layers",
    description="reconstructive neuron pruning: unlearn, recover unit masks, prune the low-mask units",
    config=RNPConfig,
)
class RNP(RepairDefense):
    sweep_name = "pruning threshold (mask value ≤)"

    def __init__(self, cfg: RNPConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self.values: list[tuple[str, int, float]] = []
        self.unlearn_history: list[float] = []
        self.unlearn_steps = 0
        self.pruned: list[tuple[str, int]] = []
        self._original: Classifier | None = None

    def unlearn(self, model: Classifier, clean: Samples) -> Classifier:
        module = UnlearnModule(model, self.cfg)
        fit(
            model,
            clean,
            TrainConfig(
                max_epochs=self.cfg.unlearn_epochs, batch_size=self.cfg.batch_size, grad_clip=self.cfg.unlearn_grad_clip
            ),
            seed=self.seed,
            desc="RNP unlearn",
            module_factory=lambda _m, _c: module,
        )
        self.unlearn_history, self.unlearn_steps = module.history, module.steps
        last = module.history[-1] if module.history else float("nan")
        log.info("RNP: unlearning ran %d steps (stop per %s), clean accuracy %.3f", module.steps,
                 self.cfg.unlearn_stop, last)
        if not last <= self.cfg.clean_threshold:
            log.warning(
                "RNP: clean accuracy %.3f is still above %.2f after %d unlearning epochs; recovering from there",
                last,
                self.cfg.clean_threshold,
                self.cfg.unlearn_epochs,
            )
        return model

    def recover(self, unlearned: Classifier, clean: Samples) -> dict[str, nn.Parameter]:
        masks = add_masks(unlearned, self.cfg.units)
        fit(
            unlearned,
            clean,
            TrainConfig(max_epochs=self.cfg.recover_epochs, batch_size=self.cfg.batch_size, grad_clip=0.0),
            seed=self.seed,
            desc="RNP recover",
            module_factory=lambda m, _c: RecoverModule(m, self.cfg, masks),
        )
        return masks

    def selected(self, threshold: float | None = None) -> list[tuple[str, int]]:
        """The units pruned at ``threshold`` (default: the configured rule)."""
        if threshold is None and self.cfg.prune_by == "number":
            return [(n, i) for n, i, _ in self.values[: self.cfg.num_units]]
        t = self.cfg.threshold if threshold is None else threshold
        return [(n, i) for n, i, v in self.values if v <= t]

    def repair(self, model: Classifier, clean: Samples) -> Classifier:
        n_units = sum(m.weight.shape[0] for _, m in maskable_units(model, self.cfg.units))
        log.info("RNP: %d clean samples, %d %s units", len(clean), n_units, self.cfg.units)
        train = repeat_to_steps(clean, self.cfg.steps_per_epoch, self.cfg.batch_size)
        unlearned = self.unlearn(clone(model), train)
        masks = self.recover(unlearned, train)
        self.values = mask_values(masks)
        del unlearned
        self._original = model
        self.pruned = self.selected()
        repaired = clone(model)
        prune_units(repaired, self.pruned)
        repaired.eval()
        log.info("RNP: pruned %d of %d units", len(self.pruned), n_units)
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
        """Cumulative pruning of one copy of the original model, threshold by threshold (as the reference):
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
        with (self.run_dir / "rnp_masks.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["module", "unit", "mask", "pruned"])
            pruned = set(self.pruned)
            for name, i, v in self.values:
                w.writerow([name, i, f"{v:.6f}", int((name, i) in pruned)])
