"""``defense=anp``: Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021; reference ``csdongxian/ANP_backdoor``:
``optimize_mask_cifar.py``, ``prune_neuron_cifar.py``, ``models/anp_batchnorm.py``).

A backdoored network collapses (and predicts the target) when its neurons are perturbed adversarially; a clean
one does not. ANP learns a mask ``m ∈ [0, 1]`` per unit, initialised to 1, on a frozen copy of the model:
every unit's scale ``w`` and bias ``b`` are perturbed multiplicatively, ``w · (m + δ)`` and ``b · (1 + ξ)``
with ``|δ|, |ξ| ≤ ε``. Per batch of the defender's clean data (1% of the training set in the paper):

1. **Perturb**: ``δ, ξ ~ U[-ε, ε]``, then ``anp_steps`` (1) signed-gradient steps of size ``ε / anp_steps``
   that *increase* the clean cross-entropy, projected back onto ``[-ε, ε]`` (ε = ``anp_eps``, 0.4);
2. **Mask step**: SGD (lr 0.2, momentum 0.9) on ``α · CE(m) + (1 − α) · CE(m + δ, 1 + ξ)`` (α =
   ``anp_alpha``, 0.2), masks clipped to [0, 1]; 2000 iterations at batch 128 in the paper.

Units whose mask stays low are the ones the perturbation exposes; :class:`~backdoorbench.defenses.repair.units.
MaskPruning` prunes them in the *original* model (mask ≤ ``threshold`` 0.2, or the ``num_units`` lowest:
the scale is zeroed, the bias kept, as the reference's ``pruning``) and yields the curve over thresholds.

**Units, for any architecture** (:mod:`~backdoorbench.defenses.repair.units`, shared with RNP): BatchNorm
channels of a CNN, LayerNorm features of a transformer (``units=norm``), or ``nn.Linear`` output neurons
(``units=neurons``: the weight's row and the bias entry, the paper's general formulation), through
parametrisations of ``weight`` and ``bias`` on a deep copy of the model — no model copies per architecture.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from backdoorbench.data.base import Samples
from backdoorbench.defenses.repair.common import clone, repeat_to_steps
from backdoorbench.defenses.repair.units import (
    MaskPruning,
    PruningConfig,
    clip_masks,
    freeze_all,
    maskable_units,
    unit_view,
    unit_weight,
)
from backdoorbench.modality.base import Classifier
from backdoorbench.registry import register_defense
from backdoorbench.trainer.lit import TrainConfig, fit

log = logging.getLogger(__name__)


@dataclass
class ANPConfig(PruningConfig):
    name: str = "anp"
    clean_fraction: float | None = 0.01  # the paper's 1% of the training set (500 CIFAR-10 images)
    batch_size: int = 128
    augment: bool = True  # the reference's training transform (random crop + flip) on the clean data
    iterations: int = 2000  # mask-optimisation steps (the reference's nb_iter)
    # steps per Lightning epoch (the clean set repeated, reshuffled each epoch; null = one pass): only the
    # granularity of the per-epoch log, see docs/defenses/anp.md
    steps_per_epoch: int | None = 100
    mask_lr: float = 0.2
    mask_momentum: float = 0.9
    anp_eps: float = 0.4  # perturbation budget: |delta|, |xi| <= eps (0 = no perturbation)
    anp_steps: int = 1  # signed-gradient steps of the perturbation per batch (step size eps / anp_steps)
    anp_alpha: float = 0.2  # loss = alpha * natural CE + (1 - alpha) * perturbed CE
    # project the perturbation onto [-eps, eps] after each step (the paper's constraint); false = the reference
    # code, whose one step from a U[-eps, eps] start can reach 2 eps
    project_noise: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.iterations >= 1, "iterations must be >= 1"),
            (self.steps_per_epoch is None or self.steps_per_epoch >= 1, "steps_per_epoch must be >= 1 or null"),
            (self.mask_lr > 0, "mask_lr must be > 0"),
            (0 <= self.mask_momentum < 1, "mask_momentum must be in [0, 1)"),
            (self.anp_eps >= 0, "anp_eps must be >= 0"),
            (self.anp_steps >= 1, "anp_steps must be >= 1"),
            (0 <= self.anp_alpha <= 1, "anp_alpha must be in [0, 1]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"defense (anp): {msg}")


# -- the perturbed masks -------------------------------------------------------------------------------
class NoisyScale(nn.Module):
    """Parametrisation of one module's ``weight`` (``masked``: ``w ↦ w · (m + δ)``, or ``w · m`` while not
    perturbed) or ``bias`` (``b ↦ b · (1 + ξ)``, or ``b``), one value per unit (axis 0)."""

    noise: torch.Tensor  # a buffer: δ or ξ

    def __init__(self, n: int, masked: bool) -> None:
        super().__init__()
        self.mask = nn.Parameter(torch.ones(n)) if masked else None
        self.register_buffer("noise", torch.zeros(n), persistent=False)
        self.perturbed = False

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return w * unit_view(1.0 + self.noise, w) if self.perturbed else w
        coeff = self.mask + self.noise if self.perturbed else self.mask
        return w * unit_view(coeff, w)


def add_noisy_masks(model: nn.Module, units: str = "norm") -> tuple[dict[str, nn.Parameter], list[NoisyScale]]:
    """Freeze ``model`` and parametrise each maskable module's ``weight`` (mask and δ) and ``bias`` (ξ, where
    it has one); returns ``{module name: mask}`` (the only trainable parameters) and every :class:`NoisyScale`."""
    freeze_all(model)
    masks: dict[str, nn.Parameter] = {}
    scales: list[NoisyScale] = []
    for name, m in maskable_units(model, units, who="ANP"):
        n, device = unit_weight(m).shape[0], unit_weight(m).device
        weight = NoisyScale(n, masked=True).to(device)
        parametrize.register_parametrization(m, "weight", weight)
        masks[name] = weight.mask  # type: ignore[assignment]
        scales.append(weight)
        if isinstance(getattr(m, "bias", None), torch.Tensor):
            bias = NoisyScale(n, masked=False).to(device)
            parametrize.register_parametrization(m, "bias", bias)
            scales.append(bias)
    return masks, scales


def set_perturbed(scales: list[NoisyScale], on: bool) -> None:
    for s in scales:
        s.perturbed = on


class ANPModule(L.LightningModule):
    """One ANP iteration per batch: the adversarial neuron perturbation, then a step on the masks."""

    def __init__(self, model: Classifier, cfg: ANPConfig, masks: dict[str, nn.Parameter], scales: list[NoisyScale]):
        super().__init__()
        self.model, self.cfg, self.masks = model, cfg, masks
        self.scales = scales  # submodules of the model's parametrisations (a plain list: not registered twice)
        self.max_noise = 0.0  # the largest |δ|, |ξ| used in a mask step (checked by the tests)

    def perturb(self, inputs: Any, labels: torch.Tensor) -> None:
        """``δ, ξ ~ U[-ε, ε]``, then ``anp_steps`` steps ``+ (ε / steps) · sign(∇ CE)`` (projected onto [-ε, ε])."""
        eps, steps = self.cfg.anp_eps, self.cfg.anp_steps
        noises = [s.noise for s in self.scales]
        with torch.no_grad():
            for n in noises:
                n.uniform_(-eps, eps)
        set_perturbed(self.scales, True)
        for _ in range(steps):
            for n in noises:
                n.requires_grad_(True)
            loss = F.cross_entropy(self.model(inputs), labels)
            grads = torch.autograd.grad(loss, noises, allow_unused=True)
            with torch.no_grad():
                for n, g in zip(noises, grads):
                    n.requires_grad_(False)
                    if g is not None:
                        n.add_(torch.sign(g), alpha=eps / steps)
                    if self.cfg.project_noise:
                        n.clamp_(-eps, eps)
        self.max_noise = max(self.max_noise, max(float(n.abs().max()) for n in noises))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        inputs = self.model.augment(batch["inputs"]) if self.cfg.augment else batch["inputs"]
        labels = batch["labels"]
        alpha = self.cfg.anp_alpha
        if self.cfg.anp_eps > 0:
            self.perturb(inputs, labels)
            set_perturbed(self.scales, True)
            loss_rob = F.cross_entropy(self.model(inputs), labels)
        else:
            loss_rob = torch.zeros((), device=labels.device)
        set_perturbed(self.scales, False)
        logits = self.model(inputs)
        loss_nat = F.cross_entropy(logits, labels)
        loss = alpha * loss_nat + (1 - alpha) * loss_rob
        self.log_dict({"nat_ce": loss_nat, "rob_ce": loss_rob}, prog_bar=True, batch_size=len(labels))
        return loss

    def on_train_batch_end(self, *args: Any) -> None:
        clip_masks(self.masks)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(list(self.masks.values()), lr=self.cfg.mask_lr, momentum=self.cfg.mask_momentum)


# -- the defense ---------------------------------------------------------------------------------------
@register_defense(
    "anp",
    modality=("text", "vision"),
    needs="the backdoored model and ~1% clean data (with labels); any model with normalisation layers",
    description="adversarial neuron pruning: masks learnt under adversarial neuron perturbation, low masks pruned",
    config=ANPConfig,
)
class ANP(MaskPruning):
    masks_file = "anp_masks.csv"

    def __init__(self, cfg: ANPConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self.max_noise = 0.0

    def optimize_masks(self, model: Classifier, clean: Samples) -> dict[str, nn.Parameter]:
        """The masks ANP learns on a frozen copy of ``model`` (``model`` itself is not changed)."""
        masked = clone(model)
        masks, scales = add_noisy_masks(masked, self.cfg.units)
        # a clean set smaller than a batch is one batch (the reference samples 128 with replacement: the same
        # expected gradient, at several times the cost; docs/defenses/anp.md)
        batch = min(self.cfg.batch_size, len(clean))
        train = repeat_to_steps(clean, self.cfg.steps_per_epoch, batch)
        per_epoch = math.ceil(len(train) / batch)
        module = ANPModule(masked, self.cfg, masks, scales)
        fit(
            masked,
            train,
            TrainConfig(
                max_epochs=math.ceil(self.cfg.iterations / per_epoch),
                max_steps=self.cfg.iterations,
                batch_size=batch,
                grad_clip=0.0,
            ),
            seed=self.seed,
            desc="ANP masks",
            module_factory=lambda _m, _c: module,
        )
        self.max_noise = module.max_noise
        return masks

    def repair(self, model: Classifier, clean: Samples) -> Classifier:
        n_units = sum(unit_weight(m).shape[0] for _, m in maskable_units(model, self.cfg.units, who="ANP"))
        log.info("ANP: %d clean samples, %d %s units, %d iterations", len(clean), n_units, self.cfg.units,
                 self.cfg.iterations)
        masks = self.optimize_masks(model, clean)
        return self.prune_by_masks(model, clean, masks)
