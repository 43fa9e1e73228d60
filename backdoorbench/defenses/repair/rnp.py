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

**Units, for any architecture** (:mod:`~backdoorbench.defenses.repair.units`, shared with ANP): one output
channel of a normalisation layer's affine scale (BatchNorm channels of a CNN, LayerNorm features of a
transformer), masked by a parametrisation of that ``weight`` on a deep copy of whatever model comes in;
``units=neurons`` masks the output neurons of the ``nn.Linear`` layers instead (the classifier head excluded),
``units=all`` both.

After :meth:`repair`, :meth:`sweep` yields the pruned model at thresholds 0, 0.05, …, 0.9 (the reference's
``pruning_max`` / ``pruning_step``) for the ASR/BA-vs-threshold curve; the defender's clean accuracy at
each threshold is recorded beside it (``sweep_info``), the only curve the defense may choose from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from backdoorbench.data.base import Samples
from backdoorbench.defenses.repair.common import clone, repeat_to_steps
from backdoorbench.defenses.repair.units import (
    MaskPruning,
    PruningConfig,
    add_masks,
    clip_masks,
    maskable_units,
    unit_weight,
)
from backdoorbench.modality.base import Classifier
from backdoorbench.registry import register_defense
from backdoorbench.trainer.lit import TrainConfig, fit

log = logging.getLogger(__name__)

UNLEARN_STOPS = ("epoch", "step")


@dataclass
class RNPConfig(PruningConfig):
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
    # units (norm | neurons | all), pruning (prune_by, threshold 0.2, num_units) and the curve: PruningConfig

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.unlearn_lr > 0 and self.recover_lr > 0, "unlearn_lr and recover_lr must be > 0"),
            (self.unlearn_epochs >= 1 and self.recover_epochs >= 1, "unlearn_epochs and recover_epochs must be >= 1"),
            (0 <= self.clean_threshold <= 1, "clean_threshold must be in [0, 1]"),
            (self.alpha > 0, "alpha must be > 0"),
            (self.unlearn_grad_clip >= 0, "unlearn_grad_clip must be >= 0"),
            (self.steps_per_epoch is None or self.steps_per_epoch >= 1, "steps_per_epoch must be >= 1 or null"),
            (self.unlearn_stop in UNLEARN_STOPS, f"unlearn_stop must be one of {UNLEARN_STOPS}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"defense (rnp): {msg}")


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
    needs="the backdoored model and ~1% clean data (with labels); any model with normalisation layers",
    description="reconstructive neuron pruning: unlearn, recover unit masks, prune the low-mask units",
    config=RNPConfig,
)
class RNP(MaskPruning):
    masks_file = "rnp_masks.csv"

    def __init__(self, cfg: RNPConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self.unlearn_history: list[float] = []
        self.unlearn_steps = 0

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

    def repair(self, model: Classifier, clean: Samples) -> Classifier:
        n_units = sum(unit_weight(m).shape[0] for _, m in maskable_units(model, self.cfg.units))
        log.info("RNP: %d clean samples, %d %s units", len(clean), n_units, self.cfg.units)
        train = repeat_to_steps(clean, self.cfg.steps_per_epoch, self.cfg.batch_size)
        unlearned = self.unlearn(clone(model), train)
        masks = self.recover(unlearned, train)
        del unlearned
        return self.prune_by_masks(model, clean, masks)
