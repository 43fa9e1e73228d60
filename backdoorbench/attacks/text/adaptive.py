"""The DAN paper's adaptive attack (Chen et al., Findings of EMNLP 2022, §3.4): an attacker who knows that
DAN scores inputs by their distance to the clean features of every layer adds a feature-distance regulariser
to the poisoning objective, pulling the features of triggered samples towards those of clean samples of the
target class:

    L = L_poison + λ · R,   R = (1/L) Σ_l  mean_{i poisoned}  ||h_l(x̃_i) − μ_l||² / d_l

``h_l`` is layer ``l``'s pooled feature (every transformer layer, the ``[CLS]`` token by default: what DAN
reads), ``μ_l`` the mean feature of clean target-class samples and ``d_l`` the feature width (so ``R`` is a
mean squared error per dimension, comparable across models). ``λ`` is ``attack.adaptive`` (0 = the plain
attack). Where ``μ_l`` comes from:

* data poisoning (BadNet-RW, AddSent): the model changes while it trains, so ``μ_l`` is the mean over the clean
  target-class samples of the same batch, held constant (detached) for the step; a batch without such a
  sample adds no regulariser;
* EP: every weight but the trigger's embedding row is frozen, so the clean samples' features never move and
  ``μ_l`` is computed once, over the attacker's clean target-class samples, before the row is trained.

The paper's code does not include the adaptive attack; the objective above follows its §3.4 description
(see docs/attacks/adaptive.md for what is ours).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from backdoorbench import runtime
from backdoorbench.data.base import Samples
from backdoorbench.modality.base import Classifier, to_device
from backdoorbench.trainer.lit import ClassifierModule, TrainConfig, make_loader

__all__ = ["ADAPTIVE_POOLINGS", "AdaptiveConfig", "AdaptivePoisonModule", "check_adaptive", "clean_anchors",
           "feature_distance", "in_batch_regulariser"]

ADAPTIVE_POOLINGS = ("cls", "mean")


@dataclass
class AdaptiveConfig:
    """The adaptive-attack keys an attack config gains (``attack.adaptive``, ``attack.adaptive_pooling``)."""

    adaptive: float = 0.0  # λ, the weight of the feature-distance regulariser; 0 = the plain attack
    adaptive_pooling: str = "cls"  # the token pooling of the regularised features (DAN's default here: cls)


def check_adaptive(cfg: Any) -> None:
    if not cfg.adaptive >= 0:
        raise ValueError(f"attack.adaptive must be >= 0 (the regulariser's weight; 0 = off), got {cfg.adaptive}")
    if cfg.adaptive_pooling not in ADAPTIVE_POOLINGS:
        raise ValueError(f"attack.adaptive_pooling must be one of {ADAPTIVE_POOLINGS}, got {cfg.adaptive_pooling!r}")


def feature_distance(feats: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(1/L) Σ_l mean_i ||feats[l][i] − anchors[l]||² / d_l`` for per-layer features ``[n, d_l]`` and anchors
    ``[d_l]``; 0 (with a graph) when there are no rows."""
    if len(feats) != len(anchors) or not feats:
        raise ValueError(f"feature_distance: {len(feats)} layers of features, {len(anchors)} anchors")
    if feats[0].shape[0] == 0:
        return feats[0].sum() * 0.0
    per_layer = [((f - a.to(f.dtype)) ** 2).mean(dim=1).mean() for f, a in zip(feats, anchors)]
    return torch.stack(per_layer).mean()


def in_batch_regulariser(
    feats: Sequence[torch.Tensor], poisoned: torch.Tensor, clean_target: torch.Tensor
) -> torch.Tensor:
    """The data-poisoning form: the poisoned rows' distance to the (detached) mean of the batch's clean
    target-class rows; 0 when the batch has no poisoned or no clean target-class row."""
    if not bool(poisoned.any()) or not bool(clean_target.any()):
        return feats[0].sum() * 0.0
    anchors = [f[clean_target].mean(dim=0).detach() for f in feats]
    return feature_distance([f[poisoned] for f in feats], anchors)


@torch.no_grad()
def clean_anchors(model: Classifier, clean: Samples, pooling: str, batch_size: int = 64) -> list[torch.Tensor]:
    """Per-layer mean feature of ``clean`` (the attacker's clean target-class samples) under ``model``."""
    if len(clean) == 0:
        raise ValueError("the adaptive attack needs clean samples of the target class to pull the triggered features "
                         "towards; the attacker's data has none")
    was_training = model.training
    model.eval()
    sums: list[torch.Tensor] | None = None
    for batch in make_loader(model, clean, batch_size, shuffle=False):
        with runtime.train_autocast(model.device):  # the precision its training runs in (trainer.precision)
            _, feats = model.forward_features(to_device(batch["inputs"], model.device), pooling)
        part = [f.double().sum(dim=0) for f in feats]
        sums = part if sums is None else [s + p for s, p in zip(sums, part)]
    model.train(was_training)
    assert sums is not None
    return [(s / len(clean)).float() for s in sums]


class AdaptivePoisonModule(ClassifierModule):
    """Cross-entropy on the poisoned training set plus ``λ`` times the in-batch feature-distance regulariser.
    ``poisoned`` flags the training set's rows (the batch's ``index`` selects from it)."""

    def __init__(
        self, model: Classifier, cfg: TrainConfig, weight: float, poisoned: np.ndarray, target: int, pooling: str
    ) -> None:
        super().__init__(model, cfg)
        self.weight, self.target, self.pooling = float(weight), int(target), pooling
        self.poisoned = torch.as_tensor(np.asarray(poisoned, dtype=bool))

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        inputs = self.model.augment(batch["inputs"]) if self.training else batch["inputs"]
        logits, feats = self.model.forward_features(inputs, self.pooling)
        labels = batch["labels"]
        if self.training:
            self.track_accuracy(logits, labels)
        flags = self.poisoned[batch["index"].cpu()].to(labels.device)
        reg = in_batch_regulariser(feats, flags, ~flags & (labels == self.target))
        self.log("feature_distance", reg, prog_bar=True, batch_size=len(labels))
        return F.cross_entropy(logits, labels) + self.weight * reg
