"""Image-file helpers shared by the benchmark vision loaders (``gtsrb``, ``cifar100``, ``tiny_imagenet``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from backdoorbench.data.base import data_file
from backdoorbench.errors import DataError


def decode_rgb(
    path: Path, fmt: str, size: int | None = None, box: tuple[int, int, int, int] | None = None
) -> np.ndarray:
    """``path`` decoded by PIL as RGB ``[3, H, W]`` uint8, optionally cropped to ``box``, then resized (bilinear)
    to ``size`` x ``size``; a file PIL cannot read raises ``DataError("data file ... is not a valid <fmt>: ...")``."""
    with data_file(path, fmt), Image.open(path) as im:
        rgb = im.convert("RGB")
    if box is not None:
        rgb = rgb.crop(box)
    if size is not None and rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


def stack_images(arrays: list[np.ndarray], where: str) -> np.ndarray:
    if not arrays:
        raise DataError(f"{where}: no images found")
    return np.stack(arrays)


def download_into(name: str, root: str | None, fetch: Callable[[str], None], url: str, layout: str) -> None:
    """Run ``fetch(root)`` (a torchvision download); any failure becomes one clear FileNotFoundError."""
    if root is None:
        raise FileNotFoundError(f"dataset {name!r}: download=True needs data.root= (the folder to download into)")
    target = Path(root).expanduser()
    target.mkdir(parents=True, exist_ok=True)
    try:
        fetch(str(target))
    except Exception as exc:  # noqa: BLE001 - offline, blocked, checksum mismatch, torchvision missing
        raise FileNotFoundError(
            f"dataset {name!r}: downloading into {root} failed ({type(exc).__name__}: {exc}). Fix: download {url} "
            f"on a machine with network access, unpack it and pass data.root=/path/to/{layout}. "
            f"See datasets/{name}.md."
        ) from exc
