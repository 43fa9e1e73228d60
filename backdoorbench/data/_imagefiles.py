"""Helpers shared by the vision loaders (``data/vision.py``, ``cifar10.py``, ``imagenet.py``, ``gtsrb.py``,
``vision_bench.py``): uint8 ``Samples`` with checked labels, the ``info`` the vision modality reads, image decoding."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from backdoorbench import runtime
from backdoorbench.data.base import Samples, data_file
from backdoorbench.data.images import ImageArray, decode_to_store
from backdoorbench.errors import DataError


def to_samples(images: np.ndarray, labels: np.ndarray, num_classes: int, where: str) -> Samples:
    """uint8 ``[N, C, H, W]`` images and labels in ``0..num_classes-1`` as contiguous vision ``Samples``."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"{where}: expected uint8 images [N, C, H, W], got {images.dtype} {images.shape}")
    labels = np.asarray(labels, dtype=np.int64)
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise DataError(f"{where}: label {int(bad[0])} out of range 0..{num_classes - 1}")
    images = np.require(images, requirements=["C_CONTIGUOUS", "WRITEABLE"])  # copies read-only / strided input
    return Samples(torch.from_numpy(images), labels, "vision")


def folder_samples(
    files: Sequence[Path],
    labels: Sequence[int] | np.ndarray,
    num_classes: int,
    decode: Callable[[Path], np.ndarray],
    settings: dict,
    where: str,
    in_memory: bool = False,
) -> Samples:
    """Vision ``Samples`` of image files, each decoded by ``decode(path)`` → ``uint8 [C, H, W]``.

    By default the images are decoded once into a uint8 store in the run's cache (an anonymous temporary file
    without one) and read per index (:func:`~backdoorbench.data.images.decode_to_store`): the decoded set is never
    held in memory. ``in_memory=True`` decodes them into one in-memory tensor instead (same pixels)."""
    labels = np.asarray(labels, dtype=np.int64)
    if in_memory:
        return to_samples(stack_images([decode(p) for p in files], where), labels, num_classes, where)
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise DataError(f"{where}: label {int(bad[0])} out of range 0..{num_classes - 1}")
    images: ImageArray = decode_to_store(list(files), decode, settings, where, runtime.current().cache_folder("images"))
    return Samples(images, labels, "vision")


def vision_info(source: Path | str, fmt: str, licence: str, mean: list[float], std: list[float], flip: bool) -> dict:
    """The ``info`` of a vision ``DatasetBundle``: what ``image_spec`` reads (mean, std, flip) and the provenance."""
    return {
        "source": str(source),
        "format": fmt,
        "licence": licence,
        "mean": list(mean),
        "std": list(std),
        "flip": flip,
    }


def load_rgb(path: Path, resize: int | None = None, crop: int | None = None) -> np.ndarray:
    """Decode ``path`` with PIL as RGB ``[3, H, W]`` uint8; optionally resize the shorter side, then center-crop."""
    with Image.open(path) as im:
        if resize is not None:
            w, h = im.size
            scale = resize / min(w, h)
            # JPEG: let the decoder downscale by a power of two while staying >= the target size
            im.draft("RGB", (max(resize, int(np.ceil(w * scale))), max(resize, int(np.ceil(h * scale)))))
        rgb = im.convert("RGB")
    if resize is not None:
        w, h = rgb.size
        size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
        if size != (w, h):
            rgb = rgb.resize(size, Image.Resampling.BILINEAR)
    if crop is not None:
        w, h = rgb.size
        if w < crop or h < crop:
            raise DataError(f"{path}: image {w}x{h} is smaller than the crop size {crop}")
        left, top = int(round((w - crop) / 2.0)), int(round((h - crop) / 2.0))
        rgb = rgb.crop((left, top, left + crop, top + crop))
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


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


def stack_images(arrays: Sequence[np.ndarray], where: str) -> np.ndarray:
    """One ``[N, C, H, W]`` array; no images, or images of different sizes, raise a ``DataError``."""
    if not arrays:
        raise DataError(f"{where}: no images found")
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise DataError(f"{where}: images have different sizes {sorted(shapes)}; set a crop size")
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
