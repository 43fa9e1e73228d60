"""SPECTRE (Hayase, Kong, Somani and Oh, "SPECTRE: Defending Against Backdoor Attacks Using Robust Statistics",
ICML 2021; reference code ``SewoongLab/spectre-defense``, Julia: ``quantum_filters.jl``, ``dkk17.jl``, ``util.jl``).

Per class, with ``m = round(ε·n_c)`` the declared number of poisoned samples:

1. PCA of the class's features to ``k`` dimensions (centred);
2. robust covariance estimation (the filter of Diakonikolas, Kamath, Kane, Li, Moitra and Stewart 2017, as
   ``cov_estimation_iterate``): repeatedly whiten with the current covariance, find the top eigenvector of the
   empirical fourth-moment operator ``E[(y⊗y)(y⊗y)ᵀ] − vec(I)vec(I)ᵀ`` and drop the samples whose
   ``yᵀVy − tr V`` deviates most, at most ``2m`` samples in all;
3. whitening of every sample with the robust covariance ``Σ``: ``x̃ = Σ^(-1/2) x``;
4. the QUE score ``τ_i = x̃_iᵀ M x̃_i`` with ``M = exp(α(Σ′ − I)/(‖Σ′‖₂ − 1)) / tr(…)``, ``Σ′`` the covariance of
   the whitened samples, α = 4;
5. the ``round(1.5·m)`` highest-scoring samples are removed.

``k`` is chosen as the reference's ``rcov_auto_quantum_filter``: for each ``k`` in ``{1, 4, 9, …, 100}`` (those the
data allows) the filter runs and the ``k`` whose kept set gives the largest QUE "opnorm" on the 100-d PCA wins.
Text and vision, on the template of :mod:`~backdoorbench.defenses.training.inspection`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from backdoorbench.data.base import Samples
from backdoorbench.defenses.training.inspection import DataInspectionDefense, Inspection, InspectionConfig, by_class
from backdoorbench.modality.base import Classifier
from backdoorbench.registry import register_defense

log = logging.getLogger(__name__)


@dataclass
class SpectreConfig(InspectionConfig):
    name: str = "spectre"
    epsilon: float = 0.1  # the declared poisoned share of a class (the reference's eps, as a count: ε·n_c)
    alpha: float = 4.0  # QUE's α (reference: 4)
    tau: float = 0.1  # the robust filter's failure probability τ (reference: 0.1)
    limit_cov: float = 2.0  # the robust covariance drops at most limit_cov·ε·n_c samples (reference limit1: 2)
    removal_factor: float = 1.5  # remove removal_factor·ε·n_c by QUE score (reference limit2: 1.5)
    max_dims: int = 100  # the largest PCA dimension tried (reference: 100; k in {1, 4, 9, ..., 100})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.epsilon < 1.0:
            raise ValueError(f"defense.epsilon must be in (0, 1), got {self.epsilon}")
        if self.alpha <= 0 or not 0.0 < self.tau < 1.0:
            raise ValueError("defense.alpha must be > 0 and defense.tau in (0, 1)")
        if self.limit_cov < 0 or self.removal_factor <= 0 or self.max_dims < 1:
            raise ValueError("defense.limit_cov must be >= 0, removal_factor > 0 and max_dims >= 1")


# -- linear algebra (rows = samples) ------------------------------------------------------------------
def pca(x: np.ndarray, k: int) -> np.ndarray:
    """The centred rows of ``x`` projected on their top ``k`` principal directions (the reference's ``pca``)."""
    c = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(c, full_matrices=False)
    return c @ vt[:k].T


def sym_power(a: np.ndarray, p: float) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.clip(w, 1e-12, None) ** p) @ v.T


def sym_exp(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.exp(w - w.max())) @ v.T  # scaled by exp(-max): the caller normalises by the trace


def k_lowest(a: np.ndarray, k: int) -> np.ndarray:
    """The reference's ``k_lowest_ind``: True where ``a`` is at most its ``k``-th smallest value (ties included)."""
    if k <= 0:
        return np.zeros(len(a), dtype=bool)
    return a <= np.sort(a)[k - 1]


def _cov_tail(t: float, eps: float) -> float:
    if t <= 10 * math.log(1 / eps):
        return 1.0
    return 3 * eps / (t * math.log(t)) ** 2


def top_fourth_moment_direction(y: np.ndarray) -> tuple[float, np.ndarray, float]:
    """The eigenvalue of largest magnitude of ``T = (1/n) Σ_i (y_i⊗y_i)(y_i⊗y_i)ᵀ − vec(I)vec(I)ᵀ`` (``d²×d²``) and,
    for its unit eigenvector ``v`` read as a symmetric ``d×d`` matrix ``V``: every ``y_iᵀVy_i`` and ``tr V``.

    ``T = B J Bᵀ`` with ``B = [y_i⊗y_i/√n …, vec(I)]`` and ``J = diag(1, …, 1, −1)``; its eigenpairs come from the
    smaller of two problems: ``T`` itself (``d²×d²``, dense) or ``J·BᵀB`` (``(n+1)×(n+1)``, from the Gram matrix
    of entries ``(y_i·y_j)²/n``, ``‖y_i‖²/√n`` and ``d``; ARPACK for the top pair), whose eigenpairs ``(λ, u)``
    give ``T``'s as ``(λ, B u)``."""
    n, d = y.shape
    gram = y @ y.T
    norms = np.diag(gram).copy()
    if d * d <= n + 1:
        z = np.einsum("ni,nj->nij", y, y).reshape(n, d * d)
        eye = np.eye(d).ravel()
        w, vecs = np.linalg.eigh(z.T @ z / n - np.outer(eye, eye))
        j = int(np.argmax(np.abs(w)))
        vm = vecs[:, j].reshape(d, d)
        vm = (vm + vm.T) / 2
        return float(w[j]), np.einsum("ij,jk,ik->i", y, vm, y), float(np.trace(vm))
    c = np.empty((n + 1, n + 1))
    c[:n, :n] = gram**2 / n
    c[:n, n] = c[n, :n] = norms / math.sqrt(n)
    c[n, n] = d
    jc = c.copy()
    jc[n] *= -1.0  # J C: its eigenvalues are T's non-zero ones; T (B u) = λ (B u) for J C u = λ u
    if n + 1 <= 64:
        w, vecs = np.linalg.eig(jc)
        j = int(np.argmax(np.abs(w)))
        lam, u = float(w[j].real), vecs[:, j].real
    else:
        from scipy.sparse.linalg import eigs

        w, vecs = eigs(jc, k=1, which="LM", v0=np.ones(n + 1))
        lam, u = float(w[0].real), vecs[:, 0].real
    a = u / math.sqrt(max(float(u @ c @ u), 1e-300))  # v = B a with ‖v‖² = aᵀ(BᵀB)a = 1
    quad = (gram**2) @ a[:n] / math.sqrt(n) + a[n] * norms  # y_jᵀ V y_j
    trace = float(norms @ a[:n] / math.sqrt(n) + a[n] * d)
    return lam, quad, trace


def cov_filter_step(s: np.ndarray, eps: float, tau: float, limit: int | None) -> np.ndarray | None:
    """One step of the DKK17 robust covariance filter (``cov_estimation_filter``) on rows ``s``: the rows to keep,
    or None when the covariance estimate passes the test (or the filter finds nothing to drop)."""
    n, d = s.shape
    c = 10.0
    sigma = s.T @ s / n
    y = s @ sym_power(sigma, -0.5)  # whitened rows
    norms = np.einsum("ij,ij->i", y, y)
    mask = norms >= c * d * math.log(n / tau)
    if mask.any():  # the early filter: far outliers
        return ~mask if limit is None else ~mask | k_lowest(norms, max(0, n - limit))
    lam, quad, trace = top_fourth_moment_direction(y)
    # Q = 2‖V‖²_F with ‖v‖ = 1 (the reference's Q): the test is λ <= (1 + C ε log²(1/ε))
    if lam <= 1 + c * eps * math.log(1 / eps) ** 2:
        return None
    ps = (quad - trace) / math.sqrt(2)
    diffs = np.abs(ps - np.median(ps))
    for i, diff in enumerate(np.sort(diffs), start=1):
        if diff < 3:
            continue
        t = diff - 3
        if t <= 0:
            continue
        if i / n >= _cov_tail(t, eps):
            keep = diffs <= t
            return keep if limit is None else keep | k_lowest(diffs, max(0, n - limit))
    return None


def robust_cov_selection(s: np.ndarray, eps: float, tau: float, limit: int) -> np.ndarray:
    """``cov_estimation_iterate``: the rows kept after repeated filter steps, dropping at most ``limit`` rows."""
    idx = np.arange(len(s))
    while limit > 0 and len(idx) > s.shape[1] + 1:
        keep = cov_filter_step(s[idx], eps, tau, limit)
        if keep is None:
            break
        limit -= int((~keep).sum())
        idx = idx[keep]
    selected = np.zeros(len(s), dtype=bool)
    selected[idx] = True
    return selected


def que(white: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """QUE scores of whitened rows and the "opnorm" ``tr(Σ′M)/tr(M)`` the reference ranks dimensions by."""
    d = white.shape[1]
    if d == 1:
        return white[:, 0] ** 2, float(np.var(white[:, 0], ddof=1))
    cov = np.cov(white, rowvar=False)
    spread = np.linalg.norm(cov, 2) - 1
    m = sym_exp(alpha * (cov - np.eye(d)) / (spread if abs(spread) > 1e-12 else 1e-12))
    m /= np.trace(m)
    return np.einsum("ij,jk,ik->i", white, m, white), float(np.trace(cov @ m))


def quantum_filter(x: np.ndarray, m: int, k: int, cfg: SpectreConfig) -> tuple[np.ndarray, np.ndarray]:
    """The reference's ``rcov_quantum_filter``: (QUE scores, kept mask) of rows ``x`` at PCA dimension ``k``."""
    n = len(x)
    xp = pca(x, k)
    if k == 1:
        white = xp
    else:
        selected = robust_cov_selection(xp, m / n, cfg.tau, int(round(cfg.limit_cov * m)))
        sigma = np.cov(xp[selected], rowvar=False, bias=True)
        white = xp @ sym_power(sigma, -0.5)
    scores, _ = que(white, cfg.alpha)
    removed = np.zeros(n, dtype=bool)
    removed[np.argsort(-scores, kind="stable")[: int(round(cfg.removal_factor * m))]] = True
    return scores, ~removed


def spectre_class(x: np.ndarray, cfg: SpectreConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """``rcov_auto_quantum_filter`` on one class: (QUE scores, removed mask, chosen k)."""
    n, d = x.shape
    m = max(1, int(round(cfg.epsilon * n)))
    top = min(cfg.max_dims, d, n - 2)
    if top < 1:
        return np.zeros(n), np.zeros(n, dtype=bool), 0
    x100 = pca(x, top)
    ks = sorted({int(round(v**2)) for v in np.linspace(1, math.sqrt(cfg.max_dims), 10)} | {top})
    best: tuple[float, np.ndarray, np.ndarray, int] | None = None
    for k in [k for k in ks if k <= top]:
        scores, kept = quantum_filter(x, m, k, cfg)
        sigma = np.cov(x100[kept], rowvar=False).reshape(top, top)
        _, op = que(x100 @ sym_power(sigma, -0.5), cfg.alpha)
        if best is None or op > best[0]:
            best = (op, scores, kept, k)
    assert best is not None
    return best[1], ~best[2], best[3]


@register_defense(
    "spectre",
    modality=("text", "vision"),
    needs="the (possibly poisoned) training set without provenance, a model trained on it, a fresh-model factory",
    description="SPECTRE: robust covariance, whitening and the QUE score per class; remove 1.5·ε",
    config=SpectreConfig,
)
class Spectre(DataInspectionDefense):
    """Per class: PCA, robust whitening, QUE scores; the top ``1.5·ε·n_c`` are removed before retraining."""

    def __init__(self, cfg: SpectreConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self.chosen_dims: dict[int, int] = {}  # per class: the PCA dimension the auto rule chose

    def inspect(self, model: Classifier, train: Samples) -> Inspection:
        feats = self.features(model, train)
        scores = np.zeros(len(train))
        removed = np.zeros(len(train), dtype=bool)
        for label, idx in by_class(train.labels):
            scores[idx], removed[idx], self.chosen_dims[label] = spectre_class(feats[idx], self.cfg)
        log.info("spectre: PCA dimension per class %s", self.chosen_dims)
        return Inspection(scores, removed)
