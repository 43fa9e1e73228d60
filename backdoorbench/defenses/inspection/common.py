"""Shared pieces of model inspection: the MAD outlier test over per-class statistics (Neural Cleanse's anomaly
index) and writing reconstructed triggers as PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from backdoorbench.defenses.base import Verdict

#: the MAD's consistency constant for normally distributed data (Neural Cleanse, mad_outlier_detection.py)
CONSISTENCY = 1.4826


def anomaly_index(values: np.ndarray | list[float]) -> tuple[np.ndarray, float, float]:
    """Per-value anomaly index ``|v - median| / (1.4826 * median(|v - median|))``, the median and the MAD.
    A MAD of 0 (more than half the values equal) is floored at 1e-12, so that any other value is an outlier."""
    v = np.asarray(values, dtype=np.float64)
    median = float(np.median(v))
    mad = CONSISTENCY * float(np.median(np.abs(v - median)))
    return np.abs(v - median) / max(mad, 1e-12), median, mad


def low_outliers(
    values: np.ndarray | list[float], threshold: float = 2.0
) -> tuple[list[int], np.ndarray, float, float]:
    """The positions whose value is below the median with an anomaly index above ``threshold``, smallest value
    first (Neural Cleanse flags the classes whose trigger is abnormally *small*); also the indices, median, MAD."""
    v = np.asarray(values, dtype=np.float64)
    index, median, mad = anomaly_index(v)
    flagged = [int(i) for i in np.argsort(v, kind="stable") if v[i] < median and index[i] > threshold]
    return flagged, index, median, mad


def _png(path: Path, image: np.ndarray) -> Path:
    from PIL import Image

    a = np.clip(np.round(np.asarray(image, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
    if a.ndim == 3:  # [C, H, W] -> grey [H, W] or RGB [H, W, 3]
        a = a[0] if a.shape[0] == 1 else np.moveaxis(a[:3], 0, -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)
    return path


def save_trigger_images(verdict: Verdict, folder: Path) -> list[Path]:
    """Write each class's reconstructed trigger to ``folder``: an image trigger as ``mask_<c>.png`` (grey, white =
    trigger pixel), ``pattern_<c>.png`` and ``trigger_<c>.png`` (mask × pattern, what is stamped on an image); a
    text trigger (``{"tokens": [...]}``) as ``tokens_<c>.txt``, one token a line."""
    files: list[Path] = []
    for label, parts in sorted(verdict.triggers.items()):
        if "tokens" in parts:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"tokens_{label}.txt"
            path.write_text("".join(f"{t}\n" for t in parts["tokens"]), encoding="utf-8")
            files.append(path)
            continue
        mask, pattern = np.asarray(parts["mask"]), np.asarray(parts["pattern"])
        files.append(_png(folder / f"mask_{label}.png", mask))
        files.append(_png(folder / f"pattern_{label}.png", pattern))
        files.append(_png(folder / f"trigger_{label}.png", mask[None] * pattern))
    return files
