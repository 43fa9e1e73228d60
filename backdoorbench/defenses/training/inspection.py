"""The data-inspection template: poisoned-sample detection and cleansing, written once for text and vision.

A data-inspection defense is a training-time defense (the defender owns the possibly poisoned training set and
trains the deployed model). :class:`DataInspectionDefense` runs the family's common steps; a method implements
one of them, :meth:`~DataInspectionDefense.inspect`:

1. **A model trained on the data.** The features come from a model trained on the whole training set with the
   user's trainer settings. In the pipeline that model exists already: the victim was trained on exactly this
   training set (``feature_model: victim``, the default, as BackdoorBench's AC / Spectral Signatures read the
   attack's model); ``feature_model: train`` trains a fresh one instead.
2. **Score and select** (``inspect``): one score per training sample, higher = more suspicious, and the removed
   set, by the method's own rule (Spectral Signatures: the top 1.5·ε per class; Activation Clustering: the small
   cluster; CUBE: the non-majority clusters; ...).
3. **Retrain** a fresh model on the kept samples with the user's trainer settings (``trainer.*``; the epochs can
   be changed with ``defense.retrain_epochs``).

The defense never learns which samples are poisoned: it gets plain :class:`~backdoorbench.data.base.Samples`
(inputs and training labels). The pipeline (``engine/protocols.py``, the ``training`` protocol) reads
:attr:`~DataInspectionDefense.sample_scores` and :attr:`~DataInspectionDefense.removed` afterwards and computes
the sample-level metrics from the poisoned set's provenance (recall of the poisoned samples, clean samples
removed, AUROC of the score), written to ``results.json`` and ``train_scores.csv``.

Features go through the modality interface: ``forward_features`` gives one pooled vector per layer (a CNN's stage
outputs, global-average pooled; a transformer's hidden states, ``[CLS]`` or mean pooled); ``layer: -1`` (default)
is the last one, the penultimate representation the papers use.
"""

from __future__ import annotations

import logging
import time
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from backdoorbench.config import ConfigError
from backdoorbench.data.base import Samples
from backdoorbench.defenses.base import DefenseConfig, TrainingDefense
from backdoorbench.modality.base import Classifier
from backdoorbench.trainer.lit import TrainConfig, fit

log = logging.getLogger(__name__)

FEATURE_MODELS = ("victim", "train")
POOLINGS = ("cls", "mean")


@dataclass
class InspectionConfig(DefenseConfig):
    """Settings every data-inspection defense has (``defense.*``)."""

    batch_size: int = 128  # inference batch (features, losses)
    layer: int = -1  # which layer of forward_features: -1 = the last (penultimate representation)
    pooling: str = "cls"  # text: cls | mean token pooling (images: global average)
    feature_model: str = "victim"  # victim: the model trained on this training set | train: train a fresh one
    retrain: bool = True  # false: return the feature model, only inspect (detection metrics only)
    retrain_epochs: int | None = None  # null = trainer.max_epochs

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 1:
            raise ValueError(f"defense.batch_size must be >= 1, got {self.batch_size}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"defense.pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.feature_model not in FEATURE_MODELS:
            raise ValueError(
                f"defense.feature_model must be one of {', '.join(FEATURE_MODELS)}, got {self.feature_model!r}"
            )
        if self.retrain_epochs is not None and self.retrain_epochs < 1:
            raise ValueError(f"defense.retrain_epochs must be >= 1 or null, got {self.retrain_epochs}")


@dataclass
class Inspection:
    """What a method decided: one score per training sample (higher = more suspicious) and the removed mask."""

    scores: np.ndarray
    removed: np.ndarray

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64)
        self.removed = np.asarray(self.removed, dtype=bool)
        if self.scores.shape != self.removed.shape or self.scores.ndim != 1:
            raise ValueError(f"scores {self.scores.shape} and removed {self.removed.shape} must be equal 1-d shapes")
        if not np.all(np.isfinite(self.scores)):
            raise ValueError("inspection scores must be finite")


# -- helpers the methods share ---------------------------------------------------------------------------
@torch.no_grad()
def extract_features(
    model: Classifier, inputs: Any, batch_size: int, layer: int = -1, pooling: str = "cls", desc: str | None = None
) -> np.ndarray:
    """``[N, D]`` float64 features of ``inputs`` at ``layer`` of ``model.forward_features`` (eval mode)."""
    was_training = model.training
    model.eval()
    out = []
    for batch in model.iter_batches(inputs, batch_size, desc):
        _, feats = model.forward_features(batch, pooling)
        if not -len(feats) <= layer < len(feats):
            raise ConfigError(f"defense.layer={layer}: the model has {len(feats)} feature layers")
        out.append(feats[layer].float().flatten(1).cpu())
    model.train(was_training)
    if not out:
        return np.zeros((0, 0))
    return torch.cat(out).double().numpy()


def per_sample_loss(model: Classifier, samples: Samples, batch_size: int, desc: str | None = None) -> np.ndarray:
    """Cross-entropy of every sample under ``model`` (eval mode, no augmentation)."""
    logits = model.predict_logits(samples.inputs, batch_size, desc)
    labels = torch.as_tensor(np.asarray(samples.labels), dtype=torch.long)
    return F.cross_entropy(logits, labels, reduction="none").double().numpy()


def by_class(labels: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """``(label, indices)`` for every label present, in label order."""
    labels = np.asarray(labels)
    return [(int(c), np.flatnonzero(labels == c)) for c in np.unique(labels)]


# -- the template ---------------------------------------------------------------------------------------
class DataInspectionDefense(TrainingDefense):
    """Score every training sample, remove a set by the method's rule, retrain on the rest."""

    def __init__(self, cfg: Any, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        #: after :meth:`train`: one score per training sample (higher = more suspicious), and the removed mask
        self.sample_scores: np.ndarray | None = None
        self.removed: np.ndarray | None = None

    @abstractmethod
    def inspect(self, model: Classifier, train: Samples) -> Inspection:
        """Score every sample of ``train`` with ``model`` (trained on it) and choose the removed set."""

    # -- shared steps ------------------------------------------------------------------------------------
    def features(self, model: Classifier, train: Samples) -> np.ndarray:
        cfg = self.cfg
        return extract_features(model, train.inputs, cfg.batch_size, cfg.layer, cfg.pooling, "inspect: features")

    def fit_model(
        self,
        model: Classifier,
        samples: Samples,
        trainer: TrainConfig,
        stage: str,
        epochs: int | None = None,
        module_factory: Callable[[Classifier, TrainConfig], Any] | None = None,
    ) -> Classifier:
        """Train ``model`` on ``samples`` with the user's trainer settings (``epochs`` overriding), resumable from
        ``<work_dir>/<stage>.partial.safetensors`` when the pipeline set a work folder."""
        cfg = replace(trainer, max_epochs=epochs) if epochs is not None else trainer
        ckpt = None
        if self.work_dir is not None:
            Path(self.work_dir).mkdir(parents=True, exist_ok=True)
            ckpt = Path(self.work_dir) / f"{stage}.partial.safetensors"
        t0 = time.perf_counter()
        out = fit(model, samples, cfg, self.seed, desc=f"defense: {stage}", checkpoint=ckpt,
                  module_factory=module_factory)
        if ckpt is not None:
            ckpt.unlink(missing_ok=True)
        self.stage_times[stage] = round(time.perf_counter() - t0, 3)
        return out

    def train(
        self,
        train: Samples,
        model_factory: Callable[[], Classifier],
        trained: Classifier | None = None,
        trainer: TrainConfig | None = None,
    ) -> Classifier:
        """``trained``: a model already trained on ``train`` (the pipeline passes the victim when it was trained on
        exactly this set); ``trainer``: the user's trainer settings (default: :class:`TrainConfig`'s)."""
        cfg = self.cfg
        trainer = trainer if trainer is not None else TrainConfig()
        if trained is None or cfg.feature_model == "train":
            trained = self.fit_model(model_factory(), train, trainer, "feature_model")
        t0 = time.perf_counter()
        result = self.inspect(trained, train)
        self.stage_times["inspect"] = round(time.perf_counter() - t0, 3)
        if len(result.scores) != len(train):
            raise RuntimeError(f"{type(self).__name__}.inspect returned {len(result.scores)} scores for {len(train)}")
        self.sample_scores, self.removed = result.scores, result.removed
        kept = np.flatnonzero(~result.removed)
        log.info("%s: removed %d of %d training samples", cfg.name, int(result.removed.sum()), len(train))
        if not cfg.retrain:
            return trained
        if len(kept) == 0:
            raise ConfigError(f"{cfg.name}: removed every training sample; nothing left to retrain on")
        return self.fit_model(model_factory(), train.subset(kept), trainer, "retrain", cfg.retrain_epochs)
