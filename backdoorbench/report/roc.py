"""ROC figures: one curve per detector for one attack, from the runs' per-input ``scores.csv``."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any


def roc_figure(path: Path, attack: str, runs: list[tuple[str, Path]]) -> Path:
    """One ROC curve per detector for one attack, from each run's ``scores.csv``."""
    import numpy as np
    from sklearn.metrics import roc_curve

    from backdoorbench.plots import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for detector, run_dir in sorted(runs):
        y, s = [], []
        with (run_dir / "scores.csv").open() as f:
            for row in csv.DictReader(f):
                if row["score"] == "":
                    continue
                if row["split"] == "clean":
                    y.append(0)
                elif row.get("attack_success") == "1":
                    y.append(1)
                else:
                    continue
                s.append(float(row["score"]))
        if len(set(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(np.array(y), np.array(s))
        ax.plot(fpr, tpr, label=detector)
    return save_roc(fig, ax, path, "FRR (clean inputs rejected)", "1 − FAR (poisoned inputs rejected)",
                    f"ROC: {attack}")


def save_roc(fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Finish a ROC figure (chance diagonal, axis labels, title, legend) and write it to ``path``."""
    from backdoorbench.plots import _plt

    ax.plot([0, 1], [0, 1], color="grey", ls=":")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path
