"""Activation Clustering (Chen, Carvalho, Baracaldo, Ludwig, Edwards, Lee, Molloy and Srivastava, "Detecting Backdoor
Attacks on Deep Neural Networks by Activation Clustering", SafeAI@AAAI 2019, arXiv 1811.03728; reference: ART's
``ActivationDefence``; BackdoorBench's ``ac.py``). Per class, the penultimate features are reduced to 10 dimensions
with ICA (the paper; ``reduce: pca`` as an option) and split into two clusters with k-means; a cluster is poisoned
by the method's own criteria: its relative size (at most ``size_threshold`` = 35% of the class, ART's default) and,
with ``criterion: silhouette``, also a silhouette score of the clustering above ``silhouette_threshold`` (0.10,
ART's). The flagged clusters are removed and a fresh model is trained on the rest. Text and vision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from backdoorbench.data.base import Samples
from backdoorbench.defenses.training.inspection import DataInspectionDefense, Inspection, InspectionConfig, by_class
from backdoorbench.modality.base import Classifier
from backdoorbench.registry import register_defense

REDUCERS = ("ica", "pca")
CRITERIA = ("size", "silhouette")


@dataclass
class ACConfig(InspectionConfig):
    name: str = "activation_clustering"
    reduce: str = "ica"  # ica (the paper: FastICA) | pca
    n_components: int = 10  # the paper: 10 dimensions
    n_clusters: int = 2  # the paper: 2-means
    criterion: str = "size"  # size: relative size only (ART's default) | silhouette: size and silhouette
    size_threshold: float = 0.35  # a cluster holding at most this share of its class is poisoned (ART)
    silhouette_threshold: float = 0.10  # criterion=silhouette: the clustering must score above this (ART)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reduce not in REDUCERS:
            raise ValueError(f"defense.reduce must be one of {', '.join(REDUCERS)}, got {self.reduce!r}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"defense.criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")
        if self.n_components < 1 or self.n_clusters < 2:
            raise ValueError("defense.n_components must be >= 1 and defense.n_clusters >= 2")
        if not 0.0 < self.size_threshold < 1.0:
            raise ValueError(f"defense.size_threshold must be in (0, 1), got {self.size_threshold}")
        if not -1.0 <= self.silhouette_threshold <= 1.0:
            raise ValueError(f"defense.silhouette_threshold must be in [-1, 1], got {self.silhouette_threshold}")


def reduce_features(x: np.ndarray, method: str, n_components: int, seed: int) -> np.ndarray:
    """``x`` reduced to at most ``n_components`` dimensions (no more than the samples or features allow)."""
    from sklearn.decomposition import PCA, FastICA

    k = max(1, min(n_components, x.shape[0] - 1, x.shape[1]))
    if method == "pca":
        return PCA(n_components=k, random_state=seed).fit_transform(x)
    return FastICA(n_components=k, random_state=seed, max_iter=1000, tol=0.005).fit_transform(x)


def cluster_class(reduced: np.ndarray, cfg: ACConfig, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """k-means cluster of each row, each cluster's share of the rows, and the clustering's silhouette score."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    clusters = KMeans(n_clusters=cfg.n_clusters, n_init=10, random_state=seed).fit_predict(reduced)
    share = np.bincount(clusters, minlength=cfg.n_clusters) / len(clusters)
    found = len(np.unique(clusters))
    silhouette = float(silhouette_score(reduced, clusters)) if 1 < found < len(clusters) else -1.0
    return clusters, share, silhouette


@register_defense(
    "activation_clustering",
    modality=("text", "vision"),
    needs="the (possibly poisoned) training set without provenance, a model trained on it, a fresh-model factory",
    description="Activation Clustering: per class, ICA to 10 dims, 2-means; remove the small cluster (<= 35%)",
    config=ACConfig,
)
class ActivationClustering(DataInspectionDefense):
    """Per-class 2-means on reduced features; small (and, optionally, well-separated) clusters are removed.

    The per-sample score is ``1 − the share of its class that its cluster holds``: the smaller a sample's
    cluster, the more suspicious (the method has no finer per-sample score)."""

    def __init__(self, cfg: ACConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        #: per class: the clusters' shares and the silhouette score (for the docs and the tests)
        self.class_info: dict[int, dict[str, object]] = {}

    def inspect(self, model: Classifier, train: Samples) -> Inspection:
        cfg = self.cfg
        feats = self.features(model, train)
        scores = np.zeros(len(train))
        removed = np.zeros(len(train), dtype=bool)
        for label, idx in by_class(train.labels):
            if len(idx) <= cfg.n_clusters:  # too few samples to cluster: keep them
                continue
            reduced = reduce_features(feats[idx], cfg.reduce, cfg.n_components, self.seed)
            clusters, share, silhouette = cluster_class(reduced, cfg, self.seed)
            flagged = share <= cfg.size_threshold
            if cfg.criterion == "silhouette" and silhouette <= cfg.silhouette_threshold:
                flagged[:] = False
            scores[idx] = 1.0 - share[clusters]
            removed[idx] = flagged[clusters]
            self.class_info[label] = {"shares": share.tolist(), "silhouette": silhouette,
                                      "flagged": np.flatnonzero(flagged).tolist()}
        return Inspection(scores, removed)
