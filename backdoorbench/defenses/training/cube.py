"""CUBE (Cui, Yi, Wang, Xu, Zhang, Liu, Sun, "A Unified Evaluation of Textual Backdoor Learning: Frameworks and
Benchmarks", NeurIPS 2022 Datasets & Benchmarks; reference: OpenBackdoor's ``CUBEDefender``).

Representations of a model trained on the (possibly poisoned) data → dimensionality reduction → density
clustering (HDBSCAN) over the whole training set; then, per training label, the largest cluster among that label's
samples is kept and every other cluster (HDBSCAN's noise included) holding less than half of the label's samples is
removed. A fresh model is trained on the rest. The paper and OpenBackdoor reduce with PCA (20) then UMAP (2 dims);
umap-learn is not in this project's lock, so the second step is scikit-learn's t-SNE (``reduce: tsne``, a
neighbour embedding like UMAP) or PCA (``reduce: pca``). Written once: text and vision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from backdoorbench.data.base import Samples
from backdoorbench.defenses.training.inspection import DataInspectionDefense, Inspection, InspectionConfig, by_class
from backdoorbench.modality.base import Classifier
from backdoorbench.registry import register_defense

REDUCERS = ("tsne", "pca")


@dataclass
class CUBEConfig(InspectionConfig):
    name: str = "cube"
    pca_components: int = 20  # OpenBackdoor: PCA to 20 before UMAP
    reduce: str = "tsne"  # tsne | pca: the second reduction (the paper: UMAP, not installed)
    n_components: int = 2  # OpenBackdoor: UMAP to 2 dimensions
    perplexity: float = 30.0  # t-SNE (scikit-learn's default)
    min_samples: int = 100  # HDBSCAN min_samples (OpenBackdoor: 100); capped below the training-set size
    min_cluster_size: int = 5  # HDBSCAN (the library default)
    cluster_selection_epsilon: float = 0.0  # HDBSCAN (OpenBackdoor: 0)
    drop_scale: float = 0.5  # a non-majority cluster is removed when it holds less than this share of its label

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reduce not in REDUCERS:
            raise ValueError(f"defense.reduce must be one of {', '.join(REDUCERS)}, got {self.reduce!r}")
        if min(self.pca_components, self.n_components, self.min_samples) < 1 or self.min_cluster_size < 2:
            raise ValueError("defense.pca_components, n_components, min_samples must be >= 1, min_cluster_size >= 2")
        if self.perplexity <= 0 or self.cluster_selection_epsilon < 0 or not 0 < self.drop_scale <= 1:
            raise ValueError("defense.perplexity must be > 0, cluster_selection_epsilon >= 0, drop_scale in (0, 1]")


def embed(features: np.ndarray, cfg: CUBEConfig, seed: int) -> np.ndarray:
    """PCA to ``pca_components``, then t-SNE or PCA to ``n_components`` (each capped by the data)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    n, d = features.shape
    x = PCA(n_components=max(1, min(cfg.pca_components, n, d)), random_state=seed).fit_transform(features)
    k = max(1, min(cfg.n_components, x.shape[1]))
    if cfg.reduce == "pca":
        return x[:, :k]  # PCA's components are ordered: the first k of the 20
    perplexity = min(cfg.perplexity, max(1.0, (n - 1) / 3))
    return TSNE(n_components=k, perplexity=perplexity, random_state=seed, init="pca").fit_transform(x)


def cluster(embedding: np.ndarray, cfg: CUBEConfig) -> np.ndarray:
    """HDBSCAN cluster labels (-1 = noise)."""
    from sklearn.cluster import HDBSCAN

    n = len(embedding)
    return HDBSCAN(min_samples=max(1, min(cfg.min_samples, n - 1)), min_cluster_size=min(cfg.min_cluster_size, n),
                   cluster_selection_epsilon=cfg.cluster_selection_epsilon, copy=True).fit_predict(embedding)


def filter_clusters(labels: np.ndarray, clusters: np.ndarray, drop_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """OpenBackdoor's ``filtering``: per training label, keep its largest cluster, remove every other cluster (noise
    included) holding fewer than ``drop_scale`` of the label's samples. Returns (removed mask, per-sample score =
    1 − the share of its label that its cluster holds)."""
    removed = np.zeros(len(labels), dtype=bool)
    scores = np.zeros(len(labels))
    for _, idx in by_class(labels):
        ids, counts = np.unique(clusters[idx], return_counts=True)
        share = dict(zip(ids.tolist(), (counts / len(idx)).tolist(), strict=True))
        scores[idx] = [1.0 - share[c] for c in clusters[idx].tolist()]
        if len(ids) < 2:
            continue
        order = np.argsort(counts, kind="stable")  # ascending; the last one (largest) is always kept
        for j in order[:-1]:
            if counts[j] < drop_scale * len(idx):
                removed[idx[clusters[idx] == ids[j]]] = True
    return removed, scores


@register_defense(
    "cube",
    modality=("text", "vision"),
    needs="the (possibly poisoned) training set without provenance, a model trained on it, a fresh-model factory",
    description="CUBE: features -> PCA + t-SNE -> HDBSCAN; per label, remove the non-majority clusters",
    config=CUBEConfig,
)
class CUBE(DataInspectionDefense):
    """Density clustering of the whole training set's representations; non-majority clusters per label removed."""

    def __init__(self, cfg: CUBEConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self.clusters: np.ndarray | None = None  # HDBSCAN's labels of the training samples

    def inspect(self, model: Classifier, train: Samples) -> Inspection:
        feats = self.features(model, train)
        self.clusters = cluster(embed(feats, self.cfg, self.seed), self.cfg)
        removed, scores = filter_clusters(np.asarray(train.labels), self.clusters, self.cfg.drop_scale)
        return Inspection(scores, removed)
