"""DAN on the run's device: the chunked quadratic-form distance equals the direct ``(x−μ)ᵀP(x−μ)`` (today's
formula until this change, written out here), the torch covariance estimators equal scikit-learn's, and a
detector saved by the earlier implementation (``tests/data/dan_saved_v1``, written by
``tests/data/make_dan_saved_v1.py`` with the einsum/scikit-learn code) loads and scores the same.

Tolerances: float64 throughout, so values agree to rounding; the bound stated is ``rtol=1e-9`` on distances
and scores (observed: below 1e-14), and ``rtol=1e-7`` for the precision matrices of the estimators (an
eigendecomposition, torch's against SciPy's; observed: below 7e-12, the largest for the unshrunk empirical one).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import backdoorbench as bb
from backdoorbench.data.base import Samples
from backdoorbench.defenses.detectors.dan import COVARIANCES, DAN, DANConfig, LayerGaussian
from backdoorbench.modality.base import Batch, Classifier

SAVED_V1 = Path(__file__).parent / "data" / "dan_saved_v1"


def einsum_distance(feats: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """The distance as computed before the quadratic-form identity: an ``[N, C, D]`` difference tensor."""
    x = feats.to(torch.float64)
    diff = x[:, None, :] - means[None, :, :]
    return torch.einsum("ncd,de,nce->nc", diff, precision, diff).min(dim=1).values


class FixedNet(Classifier):
    """3 classes, inputs ``[N, 6]``, two layers (16 and 12 features): fixed weights from numpy's PCG64
    (stable across versions), so a saved detector's model fingerprint is reproducible."""

    modality = "vision"

    def __init__(self) -> None:
        super().__init__(num_classes=3)
        rng = np.random.default_rng(1234)
        self.a0 = nn.Parameter(torch.tensor(rng.normal(size=(6, 16)), dtype=torch.float32), requires_grad=False)
        self.a1 = nn.Parameter(torch.tensor(rng.normal(size=(16, 12)), dtype=torch.float32), requires_grad=False)
        self.w = nn.Parameter(torch.tensor(rng.normal(size=(12, 3)), dtype=torch.float32), requires_grad=False)

    def collate(self, inputs: Sequence[Any] | torch.Tensor) -> Batch:
        return {"x": torch.as_tensor(np.asarray(inputs), dtype=torch.float32)}

    def _layers(self, x: torch.Tensor) -> list[torch.Tensor]:
        h0 = torch.tanh(x @ self.a0)
        return [h0, torch.tanh(h0 @ self.a1)]

    def forward(self, batch: Batch) -> torch.Tensor:
        return self._layers(batch["x"])[1] @ self.w

    def forward_features(self, batch: Batch, pooling: str = "cls") -> tuple[torch.Tensor, list[torch.Tensor]]:
        feats = self._layers(batch["x"])
        return feats[1] @ self.w, feats


def fixed_data(n: int, seed: int) -> Samples:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    centres = rng.normal(scale=1.5, size=(3, 6))
    x = centres[labels] + rng.normal(size=(n, 6))
    return Samples(torch.tensor(x, dtype=torch.float32), labels, "vision")


def probe_inputs() -> torch.Tensor:
    return fixed_data(30, seed=99).inputs  # type: ignore[return-value]


# -- the distance ------------------------------------------------------------------------------------------
def _random_gaussian(n: int, c: int, d: int, seed: int) -> tuple[torch.Tensor, LayerGaussian]:
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, generator=g) * 3 + 1  # offset: the identity's terms are larger than d
    means = torch.randn(c, d, generator=g, dtype=torch.float64) + 1
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    precision = a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)
    return feats, LayerGaussian(means, precision)


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_distance_equals_unchunked_and_the_einsum(chunk: int) -> None:
    feats, g = _random_gaussian(n=150, c=5, d=24, seed=0)
    reference = einsum_distance(feats, g.means, g.precision)
    whole = g.distance(feats)
    chunked = g.distance(feats, chunk_size=chunk)
    assert whole.dtype == torch.float64 and chunked.shape == (150,)
    torch.testing.assert_close(chunked, whole, rtol=1e-9, atol=0.0)
    torch.testing.assert_close(whole, reference, rtol=1e-9, atol=0.0)
    # and the test can fail: another precision matrix gives other distances
    other = LayerGaussian(g.means, g.precision * 1.001)
    assert not torch.allclose(other.distance(feats), reference, rtol=1e-9, atol=0.0)


def test_distance_chunk_size_is_validated_and_empty_input_works() -> None:
    feats, g = _random_gaussian(n=4, c=2, d=3, seed=1)
    with pytest.raises(ValueError, match="chunk_size"):
        g.distance(feats, chunk_size=0)
    assert g.distance(feats[:0]).shape == (0,)


def test_distance_runs_where_the_features_are() -> None:
    feats, g = _random_gaussian(n=10, c=2, d=3, seed=2)
    out = g.distance(feats)
    assert out.device == feats.device
    # the Gaussian follows the features and keeps a copy per device (no host round trip per call)
    assert g.on(feats.device) is g.on(feats.device)


# -- the fit -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", COVARIANCES)
def test_torch_estimators_equal_scikit_learn(kind: str) -> None:
    from sklearn import covariance as skc

    rng = np.random.default_rng(5)
    feats = rng.normal(size=(80, 12)) @ rng.normal(size=(12, 12)) + 3.0
    labels = np.arange(80) % 4
    g = LayerGaussian.fit(torch.tensor(feats), labels, covariance=kind, shrinkage=0.3)
    present = np.unique(labels)
    means = np.stack([feats[labels == c].mean(0) for c in present])
    centred = feats - means[np.searchsorted(present, labels)]
    est = {"empirical": skc.EmpiricalCovariance(assume_centered=True),
           "shrunk": skc.ShrunkCovariance(assume_centered=True, shrinkage=0.3),
           "ledoit_wolf": skc.LedoitWolf(assume_centered=True),
           "oas": skc.OAS(assume_centered=True)}[kind].fit(centred)
    assert g.means.dtype == g.precision.dtype == torch.float64
    np.testing.assert_allclose(g.means.numpy(), means, rtol=1e-12)
    np.testing.assert_allclose(g.precision.numpy(), est.get_precision(), rtol=1e-7, atol=1e-12)


def test_fit_on_a_singular_covariance_matches_the_pseudo_inverse() -> None:
    from scipy import linalg

    rng = np.random.default_rng(6)
    feats = rng.normal(size=(6, 10))  # fewer samples than dimensions: the empirical covariance is singular
    labels = np.array([0, 0, 0, 1, 1, 1])
    g = LayerGaussian.fit(feats, labels, covariance="empirical")
    means = np.stack([feats[labels == c].mean(0) for c in (0, 1)])
    centred = feats - means[labels]
    np.testing.assert_allclose(g.precision.numpy(), linalg.pinvh(centred.T @ centred / 6), rtol=1e-6, atol=1e-9)


# -- the detector ------------------------------------------------------------------------------------------
def test_dan_scores_equal_the_einsum_implementation() -> None:
    model = FixedNet()
    det = DAN(DANConfig(batch_size=16), seed=0).fit(model, fixed_data(120, seed=0))
    x = probe_inputs()
    _, feats = det.features(x)
    d = torch.stack([einsum_distance(f, g.means, g.precision) for g, f in zip(det.gaussians, feats)], 1)
    assert det.norm_mean is not None and det.norm_std is not None
    expected = ((d - det.norm_mean) / det.norm_std).max(1).values.numpy()
    np.testing.assert_allclose(det.score(x), expected, rtol=1e-9, atol=1e-12)


def test_a_detector_saved_by_the_einsum_implementation_scores_the_same() -> None:
    expected = json.loads((SAVED_V1 / "expected_scores.json").read_text())
    det = bb.load_detector(SAVED_V1, FixedNet())
    assert isinstance(det, DAN)
    scores, preds = det.score_and_classify(probe_inputs())
    np.testing.assert_allclose(scores, expected["scores"], rtol=1e-9, atol=1e-12)
    assert preds.tolist() == expected["preds"]
    assert det.threshold == expected["threshold"]
    assert det.predict(probe_inputs()).tolist() == expected["rejected"]
