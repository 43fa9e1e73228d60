"""DAN — Distance-based Anomaly score (Chen et al., Findings of EMNLP 2022, "Expose Backdoors on the
Way: A Feature-Based Efficient Defense against Textual Backdoor Attacks").

For every layer ``l`` (every transformer layer, not the embeddings; every CNN stage for vision):

1. fit class-conditional means ``μ_{l,c}`` and one shared covariance ``Σ_l`` (shrunk: scikit-learn's
   ShrunkCovariance with shrinkage 0.1 by default, as the reference code, computed in torch) on 80% of the
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

Features stay on the model's device (the run's device), and the Gaussians are fitted and the distances
computed there, in float64 (:class:`LayerGaussian`; Apple MPS, which has no float64, falls back to the CPU).
The distance uses the quadratic-form identity over chunks of inputs, so its memory is ``O(chunk · (C + D))``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from backdoorbench.config import ConfigError
from backdoorbench.data.base import Samples
from backdoorbench.defenses.base import Detector, DetectorConfig
from backdoorbench.modality.base import Classifier, Inputs
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


#: bytes of float64 work memory per chunk of the distance (the chunk's features, ``x·P`` and the ``[n, C]``
#: cross terms): bounds the distance's peak memory whatever the number of inputs
CHUNK_BYTES = 64 * 2**20


def shrunk_covariance(centred: torch.Tensor, kind: str = "shrunk", shrinkage: float = 0.1) -> torch.Tensor:
    """The covariance ``[D, D]`` of already-centred float64 features ``[N, D]``, as scikit-learn's estimators
    with ``assume_centered=True`` compute it (``EmpiricalCovariance``, ``ShrunkCovariance``, ``LedoitWolf``,
    ``OAS`` of scikit-learn 1.9), in torch on the features' device. No host synchronisation: the data-driven
    shrinkages stay tensors."""
    if kind not in COVARIANCES:
        raise ValueError(f"unknown covariance estimator {kind!r}; expected one of {COVARIANCES}")
    n, d = centred.shape
    emp = centred.T @ centred / n
    if kind == "empirical" or (d == 1 and kind != "shrunk"):  # one feature: every shrinkage gives emp
        return emp
    mu = torch.trace(emp) / d
    if kind == "shrunk":
        s: torch.Tensor | float = shrinkage
    elif kind == "ledoit_wolf":  # sklearn.covariance.ledoit_wolf_shrinkage, its block sums in closed form
        x2 = centred**2
        trace_terms = x2.sum(0) / n
        beta_ = (x2.sum(1) ** 2).sum()  # sum of the entries of x2ᵀ·x2
        delta_ = (emp**2).sum()  # sum of the squared entries of xᵀx, over n²
        beta = (beta_ / n - delta_) / (d * n)
        delta = (delta_ - 2.0 * mu * trace_terms.sum() + d * mu**2) / d
        beta = torch.minimum(beta, delta)
        s = torch.where(beta == 0, torch.zeros_like(beta), beta / delta)
    else:  # oas: sklearn.covariance._oas
        alpha = (emp**2).mean()
        num = alpha + mu**2
        den = (n + 1) * (alpha - mu**2 / d)
        s = torch.where(den == 0, torch.ones_like(den), torch.clamp(num / den, max=1.0))
    return (1.0 - s) * emp + (s * mu) * torch.eye(d, dtype=emp.dtype, device=emp.device)


def pinvh(matrix: torch.Tensor) -> torch.Tensor:
    """Pseudo-inverse of a symmetric matrix, as ``scipy.linalg.pinvh`` (scikit-learn's ``get_precision``):
    eigenvalues at most ``max|λ| · D · eps`` count as zero."""
    eigvals, eigvecs = torch.linalg.eigh(matrix)
    cutoff = eigvals.abs().max() * matrix.shape[0] * torch.finfo(matrix.dtype).eps
    inverse = torch.where(eigvals.abs() > cutoff, 1.0 / eigvals, torch.zeros_like(eigvals))
    return (eigvecs * inverse) @ eigvecs.T


def to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` on ``device``: asynchronous towards an accelerator, synchronous towards the CPU (a non-blocking copy
    to the host could be read before it lands)."""
    return t.to(device=device, dtype=dtype, non_blocking=torch.device(device).type != "cpu")


def _compute_device(device: torch.device) -> torch.device:
    """Where float64 work runs for features on ``device``: there, except on Apple MPS (no float64)."""
    return torch.device("cpu") if device.type == "mps" else device


@dataclass
class LayerGaussian:
    """Class means ``[C, D]`` and the shared precision matrix ``[D, D]`` of one layer (float64, on the device
    of the features they were fitted on; saved detectors hold them as CPU tensors)."""

    means: torch.Tensor
    precision: torch.Tensor
    #: per device: (precision, class means minus their centre, the centre, μ_cᵀPμ_c) for :meth:`distance`
    _placed: dict[torch.device, tuple[torch.Tensor, ...]] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def fit(
        cls,
        feats: torch.Tensor | np.ndarray,
        labels: torch.Tensor | np.ndarray,
        covariance: str = "shrunk",
        shrinkage: float = 0.1,
    ) -> LayerGaussian:
        """Class means and the precision of the class-centred features, in float64 on the features' device."""
        x = torch.as_tensor(feats)
        device = _compute_device(x.device)
        x = x.to(device=device, dtype=torch.float64)
        present, slot = torch.unique(torch.as_tensor(labels, device=device), return_inverse=True)
        # class sums as a matrix product (deterministic on CUDA, where index_add_ accumulates atomically)
        onehot = (slot[None, :] == torch.arange(len(present), device=device)[:, None]).to(torch.float64)
        means = (onehot @ x) / onehot.sum(1, keepdim=True)
        precision = pinvh(shrunk_covariance(x - means[slot], covariance, shrinkage))
        return cls(means, precision)

    def on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The distance's operands on ``device`` (computed once per device): the precision ``P``, the class
        means minus their centre ``r`` (the mean of the class means), ``r``, and ``(μ_c − r)ᵀP(μ_c − r)``."""
        device = _compute_device(torch.device(device))
        if device not in self._placed:
            precision = to_device(self.precision, device, torch.float64)
            means = to_device(self.means, device, torch.float64)
            centre = means.mean(0)
            centred = means - centre
            self._placed[device] = (precision, centred, centre, ((centred @ precision) * centred).sum(1))
        return self._placed[device]

    def distance(self, feats: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """Squared Mahalanobis distance to the nearest class mean, ``[N]`` float64 on the features' device.

        ``d(x, μ_c) = x'ᵀPx' − 2·x'ᵀPμ'_c + μ'_cᵀPμ'_c`` with ``x' = x − r``, ``μ'_c = μ_c − r`` and ``r`` the
        mean of the class means (the same value as ``(x − μ_c)ᵀP(x − μ_c)``; centring keeps the terms that
        cancel small). In float64, over chunks of ``chunk_size`` inputs (default: :data:`CHUNK_BYTES` of
        work memory), so memory is ``O(chunk · (C + D))``, never ``N × C × D``.
        """
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        precision, centred, centre, mu_p_mu = self.on(feats.device)
        n, d = feats.shape[0], precision.shape[0]
        step = chunk_size or max(1, CHUNK_BYTES // (8 * (2 * d + 2 * len(centred))))
        out = torch.empty(n, dtype=torch.float64, device=precision.device)
        for start in range(0, n, step):
            x = feats[start : start + step].to(device=precision.device, dtype=torch.float64, copy=True)
            x -= centre
            xp = x @ precision  # [n, D]
            dist = torch.addmm(mu_p_mu[None, :], xp, centred.T, alpha=-2.0)  # μPμ − 2·xPμ, [n, C]
            dist += xp.mul_(x).sum(1, keepdim=True)  # + xPx
            out[start : start + step] = dist.min(dim=1).values
        return to_device(out, feats.device)


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
        self, inputs: Inputs, desc: str | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits ``[N, C]`` and per-layer features (selected layers) from one pass per input, float32 on the
        model's device."""
        assert self.model is not None
        model = self.model
        model.eval()
        logits: list[torch.Tensor] = []
        per_layer: list[list[torch.Tensor]] | None = None
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
                per_layer[slot].append(feats[i].float())  # stays on the model's device
            logits.append(out.float())
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
            LayerGaussian.fit(f, gauss_part.labels, self.cfg.covariance, self.cfg.shrinkage) for f in feats
        ]
        _, norm_feats = self.features(norm_part.inputs, desc="DAN: normaliser")
        d = self._distances(norm_feats)
        self.norm_mean = d.mean(0)
        self.norm_std = d.std(0, correction=0).clamp(min=1e-12)  # population std, as the reference
        self.calibration_scores = self._score_from_features(norm_feats)

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
        d = self._distances(per_layer)
        mean = to_device(self.norm_mean, d.device)
        std = to_device(self.norm_std, d.device)
        return aggregate((d - mean) / std, self.cfg.aggregation).cpu().numpy().astype(np.float64)

    def score(self, inputs: Inputs) -> np.ndarray:
        _, feats = self.features(inputs)
        return self._score_from_features(feats)

    def score_and_classify(self, inputs: Inputs) -> tuple[np.ndarray, np.ndarray]:
        logits, feats = self.features(inputs, desc="DAN: scoring")
        return self._score_from_features(feats), logits.argmax(1).cpu().numpy()
