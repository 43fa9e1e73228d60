"""Metric definitions, checked on small examples computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from backdoorbench.metrics import (
    FRR_GRID,
    accuracy,
    attack_success_rate,
    auroc,
    der,
    detection_metrics,
    quantile_threshold,
    rates_at,
    robust_accuracy,
)


def calibrated_metrics(cal: np.ndarray, clean: np.ndarray, poison: np.ndarray, frr_target: float) -> dict:
    """detection_metrics with the thresholds a detector calibrated on ``cal`` would hand it."""
    grid = {frr: quantile_threshold(cal, frr) for frr in FRR_GRID}
    return detection_metrics(quantile_threshold(cal, frr_target), clean, poison, grid)


def test_accuracy_asr_and_robust_accuracy() -> None:
    assert accuracy(np.array([1, 0, 1, 1]), np.array([1, 1, 1, 0])) == 0.5
    assert accuracy([2, 2, 2], [2, 2, 1]) == pytest.approx(2 / 3)
    assert math.isnan(accuracy(np.array([]), np.array([])))
    assert attack_success_rate(np.array([1, 1, 0, 1]), target=1) == 0.75
    assert attack_success_rate(np.array([1, 1, 0, 1]), target=0) == 0.25
    assert math.isnan(attack_success_rate(np.array([]), 1))
    # triggered non-target samples (true label 0): 1 of 4 still classified correctly
    assert robust_accuracy(np.array([1, 0, 1, 1]), np.array([0, 0, 0, 0])) == 0.25


@pytest.mark.parametrize(
    ("ba_before", "asr_before", "ba_after", "asr_after", "expected"),
    [
        (0.9, 0.95, 0.85, 0.15, (0.80 - 0.05 + 1) / 2),  # 0.875: ASR down 0.8, BA down 0.05
        (0.9, 0.95, 0.92, 0.15, (0.80 - 0.0 + 1) / 2),  # BA went up: no credit, no penalty
        (0.9, 0.95, 0.85, 1.00, (0.0 - 0.05 + 1) / 2),  # ASR went up: counted as 0
        (0.9, 1.00, 0.90, 0.00, 1.0),  # perfect defense
        (0.9, 1.00, 0.00, 1.00, 0.05),  # destroys the model, keeps the backdoor
    ],
)
def test_der(ba_before: float, asr_before: float, ba_after: float, asr_after: float, expected: float) -> None:
    assert der(ba_before, asr_before, ba_after, asr_after) == pytest.approx(expected)


def test_auroc_small_examples() -> None:
    assert auroc([0.1, 0.2, 0.3], [0.4, 0.5]) == pytest.approx(1.0)
    assert auroc([0.4, 0.5], [0.1, 0.2, 0.3]) == pytest.approx(0.0)  # poisoned is the positive class
    # one clean score (0.45) above one poison score (0.4): 5 of 6 pairs ordered correctly
    assert auroc([0.1, 0.2, 0.45], [0.4, 0.5]) == pytest.approx(5 / 6)
    assert auroc([0.3], [0.3]) == pytest.approx(0.5)  # a tie counts half
    assert math.isnan(auroc([], [0.3]))
    assert math.isnan(auroc([0.3], []))


def test_quantile_threshold_uses_the_higher_order_statistic() -> None:
    scores = np.arange(1.0, 11.0)  # 1..10
    # (1 - frr) * (n - 1) = 0.9 * 9 = 8.1 -> index 9 -> 10
    assert quantile_threshold(scores, 0.1) == 10.0
    assert quantile_threshold(scores, 0.25) == 8.0  # 6.75 -> index 7
    assert quantile_threshold(scores, 0.5) == 6.0  # 4.5 -> index 5
    assert quantile_threshold(scores[::-1], 0.5) == 6.0  # order does not matter
    # a threshold is always one of the calibration scores, rejecting at most frr of them
    rng = np.random.default_rng(0)
    cal = rng.normal(size=37)
    for frr in (0.01, 0.05, 0.2, 0.5):
        t = quantile_threshold(cal, frr)
        assert t in cal
        assert (cal > t).mean() <= frr
    for bad in ([], [1.0, np.nan], [np.inf]):
        with pytest.raises(ValueError, match="finite"):
            quantile_threshold(np.array(bad), 0.05)


def test_rates_at_threshold_boundary() -> None:
    # strictly above the threshold is rejected: a score equal to it is accepted
    frr, far = rates_at(5.0, np.array([1.0, 5.0, 6.0]), np.array([5.0, 7.0]))
    assert frr == pytest.approx(1 / 3)
    assert far == pytest.approx(1 / 2)
    frr, far = rates_at(0.0, np.array([]), np.array([]))
    assert math.isnan(frr) and math.isnan(far)


def test_detection_metrics_counted_by_hand() -> None:
    cal = np.arange(200.0)  # thresholds: (1 - frr) * 199, rounded up to the next index
    clean = np.array([10.0, 185.0, 192.0, 195.0, 199.5, 50.0])
    poison = np.array([181.0, 189.0, 191.0, 196.0, 198.5, 300.0, 150.0, 250.0])
    m = calibrated_metrics(cal, clean, poison, frr_target=0.05)
    assert m["threshold"] == 190.0  # 189.05 -> 190
    assert m["frr"] == pytest.approx(3 / 6)  # 192, 195, 199.5 > 190
    assert m["far"] == pytest.approx(3 / 8)  # 181, 189, 150 <= 190
    assert list(m["far_at_frr"]) == ["0.005", "0.01", "0.03", "0.05", "0.1"]
    expected = {
        "0.005": 6 / 8,  # threshold 199: all but 300 and 250
        "0.01": 5 / 8,  # threshold 198: 198.5 is now rejected
        "0.03": 4 / 8,  # threshold 194: 181, 189, 191, 150
        "0.05": 3 / 8,  # threshold 190
        "0.1": 1 / 8,  # threshold 180: only 150
    }
    for k, v in expected.items():
        assert m["far_at_frr"][k] == pytest.approx(v), k
    # 32 of the 48 (poison, clean) pairs have the poison scoring higher
    assert m["auroc"] == pytest.approx(32 / 48)
    assert FRR_GRID == (0.005, 0.01, 0.03, 0.05, 0.1)


def test_detection_metrics_threshold_comes_from_calibration_only() -> None:
    cal = np.arange(200.0)
    a = calibrated_metrics(cal, np.array([0.0]), np.array([1000.0]), frr_target=0.1)
    b = calibrated_metrics(cal, np.array([500.0]), np.array([-5.0]), frr_target=0.1)
    assert a["threshold"] == b["threshold"] == 180.0
    assert (a["frr"], a["far"], a["auroc"]) == (0.0, 0.0, 1.0)
    assert (b["frr"], b["far"], b["auroc"]) == (1.0, 1.0, 0.0)
    c = calibrated_metrics(cal, np.array([1.0]), np.array([]), frr_target=0.1)
    assert math.isnan(c["far"]) and math.isnan(c["auroc"])
    assert all(math.isnan(v) for v in c["far_at_frr"].values())


def test_detection_metrics_use_the_thresholds_given_never_recompute_them() -> None:
    """The detector computes its thresholds (fit, or the saved ones); the metrics only count at them."""
    clean = np.array([1.0, 2.0, 3.0, 4.0])
    poison = np.array([2.5, 5.0])
    m = detection_metrics(2.5, clean, poison, {0.01: 4.5, 0.5: 0.0})
    assert m["threshold"] == 2.5
    assert (m["frr"], m["far"]) == (0.5, 0.5)  # 3, 4 rejected; 2.5 (equal) accepted
    assert m["far_at_frr"] == {"0.01": 0.5, "0.5": 0.0}  # keys as given, in order
