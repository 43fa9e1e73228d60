"""DAN: the per-layer Gaussians, the aggregation and the full detector on a tiny fake classifier whose
features are known in closed form, so every number can be recomputed independently here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from backdoorbench.config import ConfigError
from backdoorbench.data.base import Samples
from backdoorbench.defenses.detectors.dan import DAN, DANConfig, LayerGaussian, aggregate
from backdoorbench.modality.base import Batch, Classifier


# -- LayerGaussian by hand --------------------------------------------------------------------------
def _toy_layer() -> tuple[np.ndarray, np.ndarray]:
    # class 0 around (1, 1), class 1 around (5, 5), with the same offsets (-1,-1), (1,-1), (0,2)
    feats = np.array([[0, 0], [2, 0], [1, 3], [4, 4], [6, 4], [5, 7]], dtype=float)
    labels = np.array([0, 0, 0, 1, 1, 1])
    return feats, labels


def test_layer_gaussian_fit_by_hand() -> None:
    feats, labels = _toy_layer()
    g = LayerGaussian.fit(feats, labels, covariance="empirical")
    assert torch.allclose(g.means, torch.tensor([[1.0, 1.0], [5.0, 5.0]], dtype=torch.float64))
    # pooled class-centred covariance (assume_centered):
    # 2 * ([[1,1],[1,1]] + [[1,-1],[-1,1]] + [[0,0],[0,4]]) / 6
    cov = np.array([[2 / 3, 0.0], [0.0, 2.0]])
    assert np.allclose(g.precision.numpy(), np.linalg.inv(cov))
    assert np.allclose(g.precision.numpy(), [[1.5, 0.0], [0.0, 0.5]])
    x = torch.tensor([[1.0, 2.0], [4.0, 5.0], [3.0, 3.0]])
    # (1,2): (0,1) to class 0 -> 0.5; (4,5): (-1,0) to class 1 -> 1.5; (3,3): (±2,±2) to both -> 6 + 2 = 8
    assert torch.allclose(g.distance(x), torch.tensor([0.5, 1.5, 8.0], dtype=torch.float64))


def test_layer_gaussian_class_order_and_shrinkage_estimators() -> None:
    feats, labels = _toy_layer()
    g = LayerGaussian.fit(feats, 1 - labels, covariance="empirical")
    assert torch.allclose(g.means[0], torch.tensor([5.0, 5.0], dtype=torch.float64))  # label 0 first
    shrunk = LayerGaussian.fit(feats, labels, covariance="shrunk", shrinkage=1.0)
    # full shrinkage: mu * I with mu = trace(cov) / d = (2/3 + 2) / 2 = 4/3
    assert np.allclose(shrunk.precision.numpy(), np.eye(2) * 0.75)
    for kind in ("ledoit_wolf", "oas"):
        p = LayerGaussian.fit(feats, labels, covariance=kind).precision.numpy()
        assert np.allclose(p, p.T) and np.all(np.linalg.eigvalsh(p) > 0)
    with pytest.raises(ValueError, match="unknown covariance"):
        LayerGaussian.fit(feats, labels, covariance="diag")


def test_aggregate_max_and_mean() -> None:
    d = torch.tensor([[1.0, 3.0], [2.0, -1.0], [-4.0, -2.0]])
    assert torch.equal(aggregate(d, "max"), torch.tensor([3.0, 2.0, -2.0]))
    assert torch.equal(aggregate(d, "mean"), torch.tensor([2.0, 0.5, -3.0]))


# -- a fake classifier with known features ------------------------------------------------------------
W = torch.tensor([[-1.0, 1.0], [0.3, 0.2]])  # logits = x @ W: class 1 where x0 is large
A = torch.tensor([[0.6, -0.4], [0.5, 0.8]])


def layer_feats(x: torch.Tensor) -> list[torch.Tensor]:
    # layer 0: the input; layer 1: a fixed map of it. The tanh makes the two layers' Mahalanobis
    # distances differ (a purely linear invertible map would leave them identical).
    return [x, torch.tanh(x @ A)]


class FakeClassifier(Classifier):
    modality = "vision"

    def __init__(self) -> None:
        super().__init__(num_classes=2)
        self.w = nn.Parameter(W.clone(), requires_grad=False)
        self.passes = 0  # forward_features calls, in inputs

    def collate(self, inputs: Sequence[Any] | torch.Tensor) -> Batch:
        return {"x": torch.as_tensor(np.asarray(inputs), dtype=torch.float32)}

    def forward(self, batch: Batch) -> torch.Tensor:
        return batch["x"] @ self.w

    def forward_features(self, batch: Batch, pooling: str = "cls") -> tuple[torch.Tensor, list[torch.Tensor]]:
        self.passes += len(batch["x"])
        return self.forward(batch), layer_feats(batch["x"])


def make_clean(n: int = 100, seed: int = 0) -> Samples:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    centres = np.array([[-2.0, 0.0], [2.0, 0.0]])
    x = centres[labels] + rng.normal(size=(n, 2))
    return Samples(torch.tensor(x, dtype=torch.float32), labels, "vision")


def _fit_np(feats: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    classes = np.unique(labels)
    means = np.stack([feats[labels == c].mean(0) for c in classes])
    centred = np.concatenate([feats[labels == c] - means[i] for i, c in enumerate(classes)])
    cov = centred.T @ centred / len(centred)
    return means, np.linalg.inv(cov)


def _dist_np(feats: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    return np.min([np.einsum("nd,de,ne->n", feats - m, precision, feats - m) for m in means], axis=0)


class Recorder:
    """Wraps ``DAN.features`` to record which inputs each stage of ``fit`` used."""

    def __init__(self, det: DAN) -> None:
        self.calls: list[tuple[str | None, torch.Tensor]] = []
        self._features = det.features
        det.features = self  # type: ignore[method-assign]

    def __call__(self, inputs, desc=None):
        self.calls.append((desc, torch.as_tensor(inputs).clone()))
        return self._features(inputs, desc)


@pytest.fixture
def fitted() -> tuple[DAN, FakeClassifier, Samples, Recorder]:
    cfg = DANConfig(covariance="empirical", frr=0.25, batch_size=7)
    det = DAN(cfg, seed=3)
    rec = Recorder(det)
    model = FakeClassifier()
    clean = make_clean()
    det.fit(model, clean)
    return det, model, clean, rec


def _labels_of(rows: torch.Tensor, clean: Samples) -> np.ndarray:
    lookup = {tuple(r.tolist()): int(y) for r, y in zip(clean.inputs, clean.labels)}
    return np.array([lookup[tuple(r.tolist())] for r in rows])


def test_dan_fit_splits_the_clean_data(fitted) -> None:
    det, _, clean, rec = fitted
    assert len(rec.calls) == 2  # one pass for the Gaussians, one for the normaliser (and the threshold)
    parts = [{tuple(r.tolist()) for r in x} for _, x in rec.calls]
    assert [len(x) for _, x in rec.calls] == [80, 20]  # fit_fraction = 0.8 of the 100 clean samples
    assert not (parts[0] & parts[1])
    assert parts[0] | parts[1] == {tuple(r.tolist()) for r in clean.inputs}


def test_dan_statistics_match_a_hand_computation(fitted) -> None:
    det, _, clean, rec = fitted
    gauss_x, norm_x = (x for _, x in rec.calls)
    gauss_y = _labels_of(gauss_x, clean)
    fitted_np = [_fit_np(f.double().numpy(), gauss_y) for f in layer_feats(gauss_x)]
    assert len(det.gaussians) == 2 and det.layer_index == [0, 1]
    for g, (means, precision) in zip(det.gaussians, fitted_np):
        assert np.allclose(g.means.numpy(), means, atol=1e-6)
        assert np.allclose(g.precision.numpy(), precision, rtol=1e-5, atol=1e-6)

    def raw(x: torch.Tensor) -> np.ndarray:  # [N, L] distances to the nearest class mean
        return np.stack([_dist_np(f.double().numpy(), *fitted_np[i]) for i, f in enumerate(layer_feats(x))], 1)

    # normaliser: per-layer mean and (population) standard deviation on the normaliser split
    d_norm = raw(norm_x)
    mean, std = d_norm.mean(0), d_norm.std(0)
    assert np.allclose(det.norm_mean.numpy(), mean, rtol=1e-5)
    assert np.allclose(det.norm_std.numpy(), std, rtol=1e-5)
    normalised = (d_norm - mean) / std
    assert np.allclose(normalised.mean(0), 0.0, atol=1e-9) and np.allclose(normalised.std(0), 1.0)

    def expected_scores(x: torch.Tensor) -> np.ndarray:
        return ((raw(x) - mean) / std).max(1)  # max over layers

    # the threshold: the (1 - frr) quantile ('higher') of the normaliser split's scores
    cal_scores = expected_scores(norm_x)
    assert np.allclose(det.calibration_scores, cal_scores, rtol=1e-5, atol=1e-6)
    n = len(cal_scores)
    assert n == 20
    k = int(np.ceil((1 - 0.25) * (n - 1)))  # 14.25 -> 15
    assert k == 15
    assert det.threshold == pytest.approx(np.sort(cal_scores)[k], rel=1e-6)
    assert det.threshold == det.threshold_at(0.25)
    assert (det.calibration_scores > det.threshold).sum() == n - 1 - k

    test_x = make_clean(30, seed=11).inputs
    assert np.allclose(det.score(test_x), expected_scores(test_x), rtol=1e-5, atol=1e-6)


def test_dan_max_over_layers_differs_from_each_layer(fitted) -> None:
    det, _, _, _ = fitted
    x = make_clean(40, seed=5).inputs
    _, feats = det.features(x)
    per_layer = ((det._distances(feats) - det.norm_mean) / det.norm_std).numpy()
    scores = det.score(x)
    assert np.allclose(scores, per_layer.max(1))
    # the layers disagree, so the max is not just one of them
    assert (per_layer[:, 0] > per_layer[:, 1]).any() and (per_layer[:, 1] > per_layer[:, 0]).any()
    det.cfg.aggregation = "mean"
    assert np.allclose(det.score(x), per_layer.mean(1))


def test_dan_outliers_score_higher_and_are_rejected(fitted) -> None:
    det, _, _, _ = fitted
    inliers = make_clean(40, seed=7).inputs
    outliers = torch.tensor([[0.0, 12.0], [0.0, -15.0], [25.0, 20.0], [-30.0, 9.0]])
    s_in, s_out = det.score(inliers), det.score(outliers)
    assert s_out.min() > s_in.max()
    assert s_out.min() > det.calibration_scores.max()
    assert det.predict(outliers).all()
    assert (det.predict(inliers) == (s_in > det.threshold)).all()


def test_dan_score_and_classify_one_pass_per_input(fitted) -> None:
    det, model, _, _ = fitted
    x = make_clean(23, seed=9).inputs
    model.reset_forward_count()
    model.passes = 0
    scores, preds = det.score_and_classify(x)
    assert model.forward_count == 23  # one pass per scored input (not one for scores + one for predictions)
    assert model.passes == 23
    assert np.array_equal(preds, (x @ W).argmax(1).numpy())
    assert np.allclose(scores, det.score(x))
    assert len(scores) == len(preds) == 23


def test_dan_layer_selection_and_errors() -> None:
    clean = make_clean(40)
    det = DAN(DANConfig(covariance="empirical", layers=[1]), seed=0).fit(FakeClassifier(), clean)
    assert det.layer_index == [1] and len(det.gaussians) == 1
    assert det.gaussians[0].means.shape == (2, 2)
    with pytest.raises(ConfigError, match="out of range"):
        DAN(DANConfig(covariance="empirical", layers=[5]), seed=0).fit(FakeClassifier(), clean)
    with pytest.raises(ConfigError, match="DAN got 4 clean samples but needs at least 8 .*defense.clean_size.*"
                                          "data.holdout_size"):
        DAN(DANConfig(covariance="empirical"), seed=0).fit(FakeClassifier(), make_clean(4))
    small = DAN(DANConfig(covariance="shrunk"), seed=0).fit(FakeClassifier(), make_clean(10))
    assert len(small.calibration_scores) == 2  # 8 samples for the Gaussians, 2 for the normaliser
    with pytest.raises(RuntimeError, match="fit"):
        DAN(DANConfig(), seed=0).reject(np.zeros(2))


def test_dan_config_validation() -> None:
    for bad in ({"pooling": "max"}, {"covariance": "x"}, {"shrinkage": 2.0}, {"fit_fraction": 1.0},
                {"aggregation": "min"}, {"frr": 0.0}, {"calibration_fraction": 1.0}, {"batch_size": 0}):
        with pytest.raises(ValueError):
            DANConfig(**bad)
