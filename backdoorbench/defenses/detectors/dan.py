"""DAN — Distance-based Anomaly score (Chen et al., Findings of EMNLP 2022, "Expose Backdoors on the
Way: A Feature-Based Efficient Defense against Textual Backdoor Attacks").

For every layer ``l`` (every transformer layer, not the embeddings; every CNN stage for vision):

1. fit class-conditional means ``μ_{l,c}`` and one shared covariance ``Σ_l`` (shrunk, scikit-learn
   scikit-learn's ShrunkCovariance with shrinkage 0.1 by default, as the reference code) on 80% of the
   defender's clean data;
2. ``d_l(x) = min_c (h_l(x) − μ_{l,c})ᵀ Σ_l⁻¹ (h_l(x) − μ_{l,c})`` — distance to the nearest class mean;
3. normalise with the mean and standard deviation of ``d_l`` on the other 20%:
   ``s_l = (d_l − m_l) / σ_l``;
4. score = ``max_l s_l``;
5. the rejection threshold is the (1 − FRR) quantile of the scores of that same 20% split, which the
   Gaussians never saw (as in the reference implementation).

Scoring needs one forward pass per input: the same pass yields the logits, so predictions come free.
Written once against the modality interface (``Classifier.forward_features``), so it serves text and
vision alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from backdoorbench.config import ConfigError
from backdoorbench.data.base import Samples
from backdoorbench.defenses.base import Detector, DetectorConfig
from backdoorbench.modality.base import Classifier
from backdoorbench.registry import register_defense

COVARIANCES = ("ledoit_wolf", "oas", "empirical", "shrunk")
AGGREGATIONS = ("max", "mean")


@dataclass
class DANConfig(DetectorConfig):
    name: str = "dan"
    clean_size: int = 1000  # the whole defender reserve (the paper uses the full validation set)
    pooling: str = "cls"  # cls | mean  (token pooling for text; vision features are always GAP-pooled)
    covariance: str = "shrunk"  # shrunk (reference: ShrunkCovariance, 0.1) | ledoit_wolf | oas | empirical
    shrinkage: float = 0.1  # only for covariance=shrunk
    fit_fraction: float = 0.8  # share of DAN's clean data for the Gaussians; the rest fits the normaliser
    aggregation: str = "max"  # max (paper) | mean
    layers: list[int] = field(default_factory=list)  # 0-based layer indices; empty = every layer

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"defense.pooling must be cls or mean, got {self.pooling!r}")
        if self.covariance not in COVARIANCES:
            raise ValueError(f"defense.covariance must be one of {COVARIANCES}, got {self.covariance!r}")
        if not 0.0 <= self.shrinkage <= 1.0:
            raise ValueError(f"defense.shrinkage must be in [0, 1], got {self.shrinkage}")
        if not 0.0 < self.fit_fraction < 1.0:
            raise ValueError(f"defense.fit_fraction must be in (0, 1), got {self.fit_fraction}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"defense.aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        need = min_clean_samples(self.fit_fraction)
        if self.clean_fraction is None and self.clean_size < need:  # refused before the victim is trained
            raise ValueError(
                f"defense.clean_size={self.clean_size}: DAN needs at least {need} clean samples with "
                f"defense.fit_fraction={self.fit_fraction:g} (2 to fit the class Gaussians, 2 to normalise)"
            )


def covariance_estimator(kind: str, shrinkage: float = 0.1) -> Any:
    from sklearn import covariance as skc

    if kind == "ledoit_wolf":
        return skc.LedoitWolf(assume_centered=True)
    if kind == "oas":
        return skc.OAS(assume_centered=True)
    if kind == "empirical":
        return skc.EmpiricalCovariance(assume_centered=True)
    if kind == "shrunk":
        return skc.ShrunkCovariance(assume_centered=True, shrinkage=shrinkage)
    raise ValueError(f"unknown covariance estimator {kind!r}; expected one of {COVARIANCES}")


@dataclass
class LayerGaussian:
    """Class means ``[C, D]`` and the shared precision matrix ``[D, D]`` of one layer."""

    means: torch.Tensor
    precision: torch.Tensor

    @classmethod
    def fit(
        cls, feats: np.ndarray, labels: np.ndarray, covariance: str = "shrunk", shrinkage: float = 0.1
    ) -> LayerGaussian:
        feats = np.asarray(feats, dtype=np.float64)
        labels = np.asarray(labels)
        present = np.unique(labels)
        means = np.stack([feats[labels == c].mean(0) for c in present])
        centered = feats - means[np.searchsorted(present, labels)]
        est = covariance_estimator(covariance, shrinkage).fit(centered)
        return cls(torch.from_numpy(means), torch.from_numpy(np.asarray(est.get_precision())))

    def distance(self, feats: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance to the nearest class mean, ``[N]``."""
        x = feats.to(self.means.dtype)
        diff = x[:, None, :] - self.means[None, :, :]  # [N, C, D]
        d = torch.einsum("ncd,de,nce->nc", diff, self.precision, diff)
        return d.min(dim=1).values


def aggregate(normalised: torch.Tensor, how: str = "max") -> torch.Tensor:
    """Combine per-layer normalised distances ``[N, L]`` into one score ``[N]``."""
    return normalised.max(dim=1).values if how == "max" else normalised.mean(dim=1)


def min_clean_samples(fit_fraction: float) -> int:
    """The fewest clean samples DAN can split into >= 2 for the Gaussians and >= 2 for the normaliser."""
    n = 4
    while not (2 <= round(fit_fraction * n) <= n - 2):
        n += 1
    return n


@register_defense(
    "dan",
    modality=("text", "vision"),
    category="detector",
    needs="defender's clean validation data (with labels) and the model's intermediate features",
    description="layer-wise Mahalanobis distance to the nearest class mean, normalised, max-aggregated",
    config=DANConfig,
)
class DAN(Detector):
    """Feature-based backdoor input detector (Chen et al. 2022)."""

    calibrates_itself = True

    def __init__(self, cfg: DANConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self.gaussians: list[LayerGaussian] = []
        self.layer_index: list[int] = []
        self.norm_mean: torch.Tensor | None = None
        self.norm_std: torch.Tensor | None = None

    @torch.no_grad()
    def features(
        self, inputs: Sequence[Any] | torch.Tensor, desc: str | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits ``[N, C]`` and per-layer features (selected layers) from one pass per input."""
        assert self.model is not None
        model = self.model
        model.eval()
        logits, per_layer = [], None
        for batch in model.iter_batches(inputs, self.cfg.batch_size, desc):
            out, feats = model.forward_features(batch, self.cfg.pooling)
            if not self.layer_index:
                self.layer_index = list(self.cfg.layers) or list(range(len(feats)))
                bad = [i for i in self.layer_index if not 0 <= i < len(feats)]
                if bad:
                    raise ConfigError(f"defense.layers {bad} out of range: the model has {len(feats)} layers")
            if per_layer is None:
                per_layer = [[] for _ in self.layer_index]
            for slot, i in enumerate(self.layer_index):
                per_layer[slot].append(feats[i].float().cpu())
            logits.append(out.float().cpu())
        assert per_layer is not None, "no inputs"
        return torch.cat(logits), [torch.cat(f) for f in per_layer]

    def _distances(self, per_layer: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([g.distance(f) for g, f in zip(self.gaussians, per_layer)], dim=1)  # [N, L]

    def _fit(self, model: Classifier, clean: Samples) -> None:
        n = len(clean)
        perm = self.rng(2).permutation(n)
        n_fit = int(round(self.cfg.fit_fraction * n))
        if n_fit < 2 or n - n_fit < 2:
            need = min_clean_samples(self.cfg.fit_fraction)
            raise ConfigError(
                f"DAN got {n} clean samples but needs at least {need} with defense.fit_fraction="
                f"{self.cfg.fit_fraction:g} (2 to fit the class Gaussians, 2 to normalise the scores); give it more "
                "with defense.clean_size (or defense.clean_fraction), and data.holdout_size, the defender's reserve "
                "they are drawn from"
            )
        gauss_part, norm_part = clean.subset(np.sort(perm[:n_fit])), clean.subset(np.sort(perm[n_fit:]))
        _, feats = self.features(gauss_part.inputs, desc="DAN: clean features")
        self.gaussians = [
            LayerGaussian.fit(f.numpy(), gauss_part.labels, self.cfg.covariance, self.cfg.shrinkage) for f in feats
        ]
        _, norm_feats = self.features(norm_part.inputs, desc="DAN: normaliser")
        d = self._distances(norm_feats)
        self.norm_mean = d.mean(0)
        self.norm_std = d.std(0, correction=0).clamp(min=1e-12)  # population std, as the reference
        self.calibration_scores = self._score_from_features(norm_feats).astype(np.float64)

    def fitted_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if self.norm_mean is None or self.norm_std is None:
            raise RuntimeError("call fit() first")
        tensors = {"norm_mean": self.norm_mean, "norm_std": self.norm_std}
        for i, g in enumerate(self.gaussians):
            tensors[f"layer{i}.means"], tensors[f"layer{i}.precision"] = g.means, g.precision
        return tensors, {"layer_index": list(self.layer_index)}

    def load_fitted_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.layer_index = [int(i) for i in meta["layer_index"]]
        self.gaussians = [
            LayerGaussian(tensors[f"layer{i}.means"], tensors[f"layer{i}.precision"])
            for i in range(len(self.layer_index))
        ]
        self.norm_mean, self.norm_std = tensors["norm_mean"], tensors["norm_std"]

    def _score_from_features(self, per_layer: list[torch.Tensor]) -> np.ndarray:
        assert self.norm_mean is not None and self.norm_std is not None
        normalised = (self._distances(per_layer) - self.norm_mean) / self.norm_std
        return aggregate(normalised, self.cfg.aggregation).numpy()

    def score(self, inputs: Sequence[Any] | torch.Tensor) -> np.ndarray:
        _, feats = self.features(inputs)
        return self._score_from_features(feats)

    def score_and_classify(self, inputs: Sequence[Any] | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        logits, feats = self.features(inputs, desc="DAN: scoring")
        return self._score_from_features(feats), logits.argmax(1).numpy()
