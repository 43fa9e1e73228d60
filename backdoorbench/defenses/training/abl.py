"""ABL -- Anti-Backdoor Learning (Li, Lyu, Koren, Lyu, Li and Ma, NeurIPS 2021; reference code ``bboylyg/ABL``,
``backdoor_isolation.py`` / ``backdoor_unlearning.py``; port in BackdoorBench).

Backdoor samples are learned much faster than clean ones. ABL trains a fresh model in three stages:

1. **Isolation** with the local gradient ascent (LGA) loss ``sign(CE − γ)·CE`` (the reference applies it to the
   batch-mean cross-entropy): once the loss falls below γ, the update ascends, so clean samples hover around γ
   while the backdoor samples, learned fast, fall further. After ``isolation_epochs`` each training sample's
   loss is recorded (no augmentation) and the ``isolation_ratio`` lowest-loss share is isolated.
2. **Training on the rest** with plain cross-entropy (the reference's optional "fine-tuning of the isolation
   model", which restores clean accuracy).
3. **Unlearning**: gradient ascent (``−CE``) on the isolated samples, ``unlearning_epochs`` at a small constant
   ``unlearning_lr``, without augmentation.

Loss-based, so one implementation serves text and vision. The per-sample score reported is ``−loss`` after the
isolation stage (lower loss = more suspicious) and the "removed" set is the isolated one (unlearned, not just
dropped). The optimiser, batch size and schedule of stages 1-2 are the user's ``trainer.*``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from backdoorbench.config import ConfigError
from backdoorbench.data.base import Samples
from backdoorbench.defenses.training.inspection import (
    DataInspectionDefense,
    Inspection,
    InspectionConfig,
    per_sample_loss,
)
from backdoorbench.modality.base import Classifier
from backdoorbench.registry import register_defense
from backdoorbench.runtime import intra_op_threads
from backdoorbench.trainer.lit import ClassifierModule, TrainConfig


@dataclass
class ABLConfig(InspectionConfig):
    name: str = "abl"
    isolation_ratio: float = 0.01  # reference: 1% of the training set isolated
    gamma: float = 0.5  # LGA threshold γ (reference: 0.5 on CIFAR-10)
    isolation_epochs: int = 5  # reference tuning_epochs: 10 (paper: T_te = 20)
    finetune_epochs: int | None = None  # stage 2 on the non-isolated samples; null = trainer.max_epochs (ref.: 60)
    unlearning_epochs: int = 5  # reference: 5
    unlearning_lr: float = 5.0e-4  # reference: 5e-4 (SGD, momentum 0.9)
    threads: int | None = 1  # CPU threads of ABL's training (1: the same result at any run threads); null = the run's

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.isolation_ratio < 1.0:
            raise ValueError(f"defense.isolation_ratio must be in (0, 1), got {self.isolation_ratio}")
        if self.gamma < 0:
            raise ValueError(f"defense.gamma must be >= 0, got {self.gamma}")
        if self.isolation_epochs < 1 or self.unlearning_epochs < 0:
            raise ValueError("defense.isolation_epochs must be >= 1 and defense.unlearning_epochs >= 0")
        if self.finetune_epochs is not None and self.finetune_epochs < 0:
            raise ValueError(f"defense.finetune_epochs must be >= 0 or null, got {self.finetune_epochs}")
        if self.unlearning_lr <= 0:
            raise ValueError(f"defense.unlearning_lr must be > 0, got {self.unlearning_lr}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"defense.threads must be a positive integer or null (the run's threads), got "
                             f"{self.threads!r}")


def lga_loss(ce: torch.Tensor, gamma: float) -> torch.Tensor:
    """ABL's local gradient ascent: ``sign(CE − γ)·CE`` (descends above γ, ascends below it)."""
    return torch.sign(ce - gamma) * ce


class LGAModule(ClassifierModule):
    """Cross-entropy training with the LGA loss on the batch-mean cross-entropy (the reference's ``train_step``)."""

    def __init__(self, model: Classifier, cfg: TrainConfig, gamma: float) -> None:
        super().__init__(model, cfg)
        self.gamma = gamma

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        ce = super().loss(batch)
        return lga_loss(ce, self.gamma) if self.training else ce


class UnlearnModule(ClassifierModule):
    """Gradient ascent on the isolated samples: loss ``−CE``, no augmentation (the reference's unlearning step)."""

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        return -F.cross_entropy(self.model(batch["inputs"]), batch["labels"])


@register_defense(
    "abl",
    modality=("text", "vision"),
    needs="the (possibly poisoned) training set without provenance, and a fresh-model factory",
    description="Anti-Backdoor Learning: LGA isolates the lowest-loss 1%, train on the rest, unlearn the isolated",
    config=ABLConfig,
)
class ABL(DataInspectionDefense):
    """Isolate with the LGA loss, train on the rest, unlearn the isolated samples by gradient ascent."""

    def inspect(self, model: Classifier, train: Samples) -> Inspection:
        """The isolation rule on ``model`` (trained with LGA): the ``isolation_ratio`` lowest-loss samples."""
        loss = per_sample_loss(model, train, self.cfg.batch_size, "abl: losses")
        k = int(len(train) * self.cfg.isolation_ratio)  # the reference: int(n * ratio)
        removed = np.zeros(len(train), dtype=bool)
        removed[np.argsort(loss, kind="stable")[:k]] = True
        return Inspection(-loss, removed)

    def train(
        self,
        train: Samples,
        model_factory: Any,
        trained: Classifier | None = None,
        trainer: TrainConfig | None = None,
    ) -> Classifier:
        """``trained`` is ignored: ABL trains its own model from the start (its LGA isolation stage), with
        ``defense.threads`` CPU threads (docs/reproducibility.md)."""
        with intra_op_threads(self.cfg.threads):
            return self._train(train, model_factory, trainer)

    def _train(self, train: Samples, model_factory: Any, trainer: TrainConfig | None) -> Classifier:
        cfg = self.cfg
        trainer = trainer if trainer is not None else TrainConfig()
        gamma = cfg.gamma
        model = self.fit_model(model_factory(), train, trainer, "isolation", cfg.isolation_epochs,
                               module_factory=lambda m, c: LGAModule(m, c, gamma))
        t0 = time.perf_counter()
        result = self.inspect(model, train)
        self.stage_times["inspect"] = round(time.perf_counter() - t0, 3)
        self.sample_scores, self.removed = result.scores, result.removed
        isolated, rest = np.flatnonzero(result.removed), np.flatnonzero(~result.removed)
        if len(rest) == 0:
            raise ConfigError("abl: the isolated set is the whole training set; lower defense.isolation_ratio")
        if cfg.finetune_epochs != 0:
            model = self.fit_model(model, train.subset(rest), trainer, "finetune", cfg.finetune_epochs)
        if len(isolated) and cfg.unlearning_epochs > 0:
            unlearn = replace(trainer, lr=cfg.unlearning_lr, scheduler="multistep", milestones=[], warmup_ratio=0.0,
                              batch_size=min(trainer.batch_size, len(isolated)))
            model = self.fit_model(model, train.subset(isolated), unlearn, "unlearning", cfg.unlearning_epochs,
                                   module_factory=UnlearnModule)
        model.eval()
        return model
