"""Figures written into run directories (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def detector_figure(
    path: Path,
    calibration: np.ndarray | None,
    scored: list[Any],
    target: int | np.ndarray,
    threshold: float | None,
    title: str = "",
) -> Path:
    """Score histograms (clean test, successful poisoned test) with the calibrated threshold, and the ROC."""
    from sklearn.metrics import roc_curve

    plt = _plt()
    clean = next(s for s in scored if s.split == "clean")
    pois = next(s for s in scored if s.split == "poisoned")
    p_scores = pois.scores[pois.preds == target]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    allv = np.concatenate([clean.scores, p_scores] + ([calibration] if calibration is not None else []))
    bins = np.linspace(np.nanmin(allv), np.nanmax(allv), 50)
    ax1.hist(clean.scores, bins=bins, alpha=0.6, density=True, label=f"clean test (n={len(clean.scores)})")
    if len(p_scores):
        ax1.hist(
            p_scores, bins=bins, alpha=0.6, density=True, label=f"poisoned test, attack succeeds (n={len(p_scores)})"
        )
    if threshold is not None:
        ax1.axvline(threshold, color="k", ls="--", label="threshold")
    ax1.set_xlabel("score (higher = more suspicious)")
    ax1.set_ylabel("density")
    ax1.legend(fontsize=8)
    if len(p_scores):
        y = np.r_[np.zeros(len(clean.scores)), np.ones(len(p_scores))]
        fpr, tpr, _ = roc_curve(y, np.r_[clean.scores, p_scores])
        ax2.plot(fpr, tpr)
    ax2.plot([0, 1], [0, 1], color="grey", ls=":")
    ax2.set_xlabel("FRR (clean rejected)")
    ax2.set_ylabel("1 − FAR (poisoned rejected)")
    ax2.set_title("ROC")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
