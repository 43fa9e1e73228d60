"""Spectral Signatures (Tran, Li and Madry, NeurIPS 2018; reference code MadryLab/backdoor_data_poisoning; ports in
BackdoorBench, ART, BackdoorBox): poisoned samples leave a trace in the spectrum of the learned representation's
covariance. Per class, the centred features' top right singular vector ``v``; a sample's score is its squared
projection ``((r - mean) · v)^2``; the ``1.5·ε·n_c`` highest-scoring samples of each class are removed, where ``ε``
is the declared upper bound on the poisoned share (``defense.epsilon``), and a fresh model is trained on the rest.
Written once for text and vision on the template of :mod:`~backdoorbench.defenses.training.inspection`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from backdoorbench.data.base import Samples
from backdoorbench.defenses.training.inspection import DataInspectionDefense, Inspection, InspectionConfig, by_class
from backdoorbench.modality.base import Classifier
from backdoorbench.registry import register_defense


@dataclass
class SpectralConfig(InspectionConfig):
    name: str = "spectral"
    epsilon: float = 0.1  # the declared upper bound on the poisoned share of a class (the paper's ε)
    removal_factor: float = 1.5  # remove removal_factor·ε of every class (the paper: 1.5)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.epsilon < 1.0:
            raise ValueError(f"defense.epsilon must be in (0, 1), got {self.epsilon}")
        if not 0.0 < self.removal_factor * self.epsilon <= 1.0:
            share = self.removal_factor * self.epsilon
            raise ValueError(f"defense.removal_factor·epsilon must be in (0, 1], got {share}")


def spectral_scores(features: np.ndarray) -> np.ndarray:
    """Squared projection of each centred row of ``features`` on their top right singular vector."""
    x = np.asarray(features, dtype=np.float64)
    if len(x) == 0:
        return np.zeros(0)
    centred = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return (centred @ vt[0]) ** 2


def top_k_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """True at the ``k`` highest scores (ties: the lower index first, a stable order)."""
    mask = np.zeros(len(scores), dtype=bool)
    if k > 0:
        mask[np.argsort(-np.asarray(scores), kind="stable")[:k]] = True
    return mask


@register_defense(
    "spectral",
    modality=("text", "vision"),
    needs="the (possibly poisoned) training set without provenance, a model trained on it, a fresh-model factory",
    description="Spectral Signatures: per class, squared projection on the top singular vector; remove 1.5·ε",
    config=SpectralConfig,
)
class SpectralSignatures(DataInspectionDefense):
    """Per-class spectral outlier scores; the top ``1.5·ε`` of every class is removed before retraining."""

    def inspect(self, model: Classifier, train: Samples) -> Inspection:
        feats = self.features(model, train)
        scores = np.zeros(len(train))
        removed = np.zeros(len(train), dtype=bool)
        share = self.cfg.removal_factor * self.cfg.epsilon
        for _, idx in by_class(train.labels):
            s = spectral_scores(feats[idx])
            scores[idx] = s
            removed[idx] = top_k_mask(s, int(np.floor(share * len(idx))))
        return Inspection(scores, removed)
