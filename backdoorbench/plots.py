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


def repair_curve_figure(
    path: Path, curve: list[dict[str, float]], name: str, title: str = "", chosen: float | None = None
) -> Path:
    """BA and ASR on the test set against a repair defense's knob (RNP: the pruning threshold), with the
    defender's clean accuracy where the defense recorded it (the only curve it may choose from)."""
    plt = _plt()
    xs = np.array([row["setting"] for row in curve])
    order = np.argsort(xs)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs[order], 100 * np.array([curve[i]["ba"] for i in order]), "o-", label="BA (test, reporting only)")
    ax.plot(xs[order], 100 * np.array([curve[i]["asr"] for i in order]), "s-", label="ASR (test, reporting only)")
    if all("clean_acc" in row for row in curve):
        ax.plot(
            xs[order],
            100 * np.array([curve[i]["clean_acc"] for i in order]),
            "^--",
            color="grey",
            label="defender's clean accuracy",
        )
    if chosen is not None:
        ax.axvline(chosen, color="k", ls=":", lw=1, label=f"configured setting ({chosen:g})")
    ax.set_xlabel(name)
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def attention_figure(path: Path, before: Any, after: Any, triggered: Any, n: int = 4, title: str = "") -> Path:
    """NAD-style attention maps (``Σ_c |F_c|²``, per stage) of a few triggered test images under the
    backdoored and the repaired model: one row per image; the image, then each stage before | after."""
    import torch

    from backdoorbench.modality.base import attention_map, to_device

    images = triggered.inputs[:n]
    rows = []
    for model in (before, after):
        model.eval()
        with torch.no_grad():
            _, feats = model.forward_features(to_device(model.collate(images), model.device), pooling="none")
        maps = [attention_map(f.float(), 2.0).view(f.shape[0], *f.shape[2:]) for f in feats if f.dim() == 4]
        rows.append([m.cpu().numpy() for m in maps])
    n_stage = len(rows[0])
    plt = _plt()
    fig, axes = plt.subplots(len(images), 1 + 2 * n_stage, figsize=(1.6 * (1 + 2 * n_stage), 1.7 * len(images)))
    axes = np.atleast_2d(axes)
    names = list(getattr(before, "layer_names", lambda: [])()) or [f"stage {i + 1}" for i in range(n_stage)]
    for i in range(len(images)):
        img = images[i].permute(1, 2, 0).numpy()
        axes[i, 0].imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
        for s in range(n_stage):
            for j, which in enumerate(("before", "after")):
                ax = axes[i, 1 + 2 * s + j]
                ax.imshow(rows[j][s][i], cmap="jet")
                if i == 0:
                    ax.set_title(f"{names[s] if s < len(names) else s}\n{which}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_title("triggered input", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
