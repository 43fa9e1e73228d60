"""Metric definitions (fixed; see docs/metrics.md).

* BA — accuracy on the clean test set.
* ASR — over test samples whose true label is not the target, with the trigger applied: the fraction
  classified as the target.
* R-Acc — over the same triggered samples: the fraction classified as their true label.
* DER — (max(0, ΔASR) − max(0, ΔBA) + 1) / 2 with Δ = before − after (BackdoorBench).
* Detectors: the threshold is the (1 − FRR target) quantile of scores on the defender's held-out
  clean calibration data. FRR = share of clean test inputs rejected; FAR = share of poisoned test
  inputs accepted, over triggered non-target test inputs on which the attack succeeds; AUROC with
  poisoned (successful) as the positive class.
* Data inspection: over the training set, recall of the poisoned samples, clean samples removed (count, %),
  AUROC of the per-sample score (poisoned positive): :func:`inspection_metrics`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

FRR_GRID = (0.005, 0.01, 0.03, 0.05, 0.1)


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    preds, labels = np.asarray(preds), np.asarray(labels)
    return float((preds == labels).mean()) if len(labels) else float("nan")


def attack_success_rate(preds_triggered: np.ndarray, target: int | np.ndarray) -> float:
    """``preds_triggered``: predictions on triggered inputs whose true label is not the target; ``target``:
    the target label, or one per input (all-to-all attacks)."""
    p = np.asarray(preds_triggered)
    return float((p == target).mean()) if len(p) else float("nan")


def robust_accuracy(preds_triggered: np.ndarray, true_labels: np.ndarray) -> float:
    return accuracy(preds_triggered, true_labels)


def der(ba_before: float, asr_before: float, ba_after: float, asr_after: float) -> float:
    d_asr = asr_before - asr_after
    d_ba = ba_before - ba_after
    return (max(0.0, d_asr) - max(0.0, d_ba) + 1.0) / 2.0


def auroc(clean_scores: np.ndarray, poison_scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    c, p = np.asarray(clean_scores, float), np.asarray(poison_scores, float)
    if len(c) == 0 or len(p) == 0:
        return float("nan")
    y = np.concatenate([np.zeros(len(c)), np.ones(len(p))])
    return float(roc_auc_score(y, np.concatenate([c, p])))


def quantile_threshold(calibration_scores: np.ndarray, frr: float) -> float:
    """The (1 − frr) quantile of clean calibration scores: about ``frr`` of clean inputs score above it."""
    scores = np.asarray(calibration_scores, dtype=np.float64)
    if scores.size == 0 or not np.all(np.isfinite(scores)):
        raise ValueError("calibration scores must be a non-empty array of finite numbers")
    return float(np.quantile(scores, 1.0 - frr, method="higher"))


def rates_at(threshold: float, clean_scores: np.ndarray, poison_scores: np.ndarray) -> tuple[float, float]:
    """(FRR, FAR) at ``threshold``: inputs scoring strictly above it are rejected."""
    c, p = np.asarray(clean_scores, float), np.asarray(poison_scores, float)
    frr = float((c > threshold).mean()) if len(c) else float("nan")
    far = float((p <= threshold).mean()) if len(p) else float("nan")
    return frr, far


def detection_metrics(
    threshold: float,
    clean_scores: np.ndarray,
    poison_scores: np.ndarray,
    grid_thresholds: Mapping[float, float],
) -> dict[str, object]:
    """The threshold, FRR/FAR at it, FAR at each FRR of the grid, AUROC.

    ``threshold`` is the detector's (its :func:`quantile_threshold` at the target FRR, computed once when it was
    fitted, or the one it was saved with); ``grid_thresholds`` its threshold at each FRR of the grid
    (``{frr: detector.threshold_at(frr)}``, in the order of the report). Both come from the clean calibration
    scores only. ``poison_scores`` must already be restricted to triggered non-target inputs on which the attack
    succeeds.
    """
    thr = float(threshold)
    frr, far = rates_at(thr, clean_scores, poison_scores)
    grid = {_key(g): rates_at(t, clean_scores, poison_scores)[1] for g, t in grid_thresholds.items()}
    return {"threshold": thr, "frr": frr, "far": far, "far_at_frr": grid, "auroc": auroc(clean_scores, poison_scores)}


def _key(frr: float) -> str:
    return f"{frr:g}"


# -- data inspection (training-time defenses that remove training samples) ----------------------------------
def inspection_metrics(scores: np.ndarray, removed: np.ndarray, poisoned: np.ndarray | None) -> dict[str, float | int]:
    """Sample-level metrics of a data-inspection defense over the training set, computed from the provenance the
    defense never saw: ``removed`` (count) and ``removed_fraction``; with ``poisoned`` (True = the sample carries
    the backdoor), ``poison_recall`` (poisoned samples removed / poisoned samples), ``clean_removed`` (count),
    ``clean_removed_fraction`` (clean samples removed / clean samples) and ``sample_auroc`` (AUROC of the
    per-sample score, poisoned positive)."""
    s, r = np.asarray(scores, dtype=np.float64), np.asarray(removed, dtype=bool)
    out: dict[str, float | int] = {"removed": int(r.sum()),
                                   "removed_fraction": float(r.mean()) if len(r) else float("nan")}
    if poisoned is None:
        return out
    p = np.asarray(poisoned, dtype=bool)
    if not (s.shape == r.shape == p.shape):
        raise ValueError(f"scores {s.shape}, removed {r.shape} and poisoned {p.shape} must have one shape")
    clean = ~p
    out.update(
        poisoned_samples=int(p.sum()),
        poison_recall=float(r[p].mean()) if p.any() else float("nan"),
        clean_removed=int((r & clean).sum()),
        clean_removed_fraction=float(r[clean].mean()) if clean.any() else float("nan"),
        sample_auroc=auroc(s[clean], s[p]),
    )
    return out
