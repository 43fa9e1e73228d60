"""CIFAR-10: the official python pickles (``cifar-10-batches-py``, optional torchvision download) and
``cifar10_samples``, the 20 real test images shipped inside ``foolbox`` (smoke tests). Same contract as
:mod:`backdoorbench.data.vision`; see ``datasets/cifar10.md``.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np

from backdoorbench.assets import find_package_file
from backdoorbench.data._imagefiles import download_into, load_rgb, stack_images, to_samples, vision_info
from backdoorbench.data.base import DatasetBundle, reads_data_file
from backdoorbench.errors import DataError
from backdoorbench.registry import register_dataset

__all__ = ["CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "load_cifar10", "load_cifar10_samples"]

CIFAR10_MEAN, CIFAR10_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FOOLBOX_PIP = "foolbox==3.3.4"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
_SAMPLE_NAME = re.compile(r"^cifar10_(\d+)_(\d+)\.png$")


# -- cifar10 -------------------------------------------------------------------------------------
class _ArrayUnpickler(pickle.Unpickler):
    """Unpickle only builtins and numpy arrays: a CIFAR batch cannot run code when it is loaded."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),  # arrays pickled with protocol 5
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # bytes pickled by Python 3 with protocol < 3
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")


@reads_data_file("CIFAR-10 batch (python pickle)")
def _unpickle(path: Path) -> dict[str, Any]:
    with open(path, "rb") as fh:
        try:
            obj = _ArrayUnpickler(fh, encoding="latin1").load()  # the official files are Python 2 pickles
        except (EOFError, pickle.UnpicklingError) as exc:  # an uncompressed pickle: not "damaged compressed data"
            if not isinstance(exc, EOFError) and "truncated" not in str(exc):
                raise
            size = Path(path).stat().st_size
            what = "the file is empty (0 bytes)" if size == 0 else f"the pickle ends early, after {size} bytes"
            raise DataError(f"{path}: {what}; an interrupted download or copy? Replace it with the file from "
                            "the CIFAR-10 archive") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


@reads_data_file("CIFAR-10 batch (python pickle)")
def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    if "data" not in batch or "labels" not in batch:
        raise DataError(f"{path}: a CIFAR-10 batch needs 'data' and 'labels', found {sorted(batch)}")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != len(labels):
        raise DataError(f"{path}: 'data' must be [N, 3072] with N = {len(labels)} labels, got {data.shape}")
    # each row: 1024 red, then 1024 green, then 1024 blue values, each plane row-major 32x32
    return data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32), labels


def _cifar10_folder(root: str | Path | None) -> Path | None:
    if root is None:
        return None
    base = Path(root).expanduser()
    for folder in (base, base / CIFAR10_DIR):
        if all((folder / name).is_file() for name in CIFAR10_TRAIN):
            return folder
    return None


def _download_cifar10(root: str) -> None:
    from torchvision.datasets import CIFAR10

    CIFAR10(root, train=True, download=True)


@register_dataset(
    "cifar10",
    modality="vision",
    category="classification",
    needs="",
    description="CIFAR-10 (Krizhevsky 2009), 50k/10k 3x32x32; local cifar-10-batches-py/ (download: true to fetch)",
)
def load_cifar10(root: str | None = None, *, download: bool = False) -> DatasetBundle:
    """CIFAR-10 from the official python version (``cifar-10-batches-py/``).

    Reads ``data_batch_1``..``data_batch_5`` (train), ``test_batch`` (test; ``None`` if absent) and
    ``batches.meta`` (class names, if present). ``root`` is that folder or its parent. With
    ``download=True`` and no local copy, torchvision downloads and unpacks the archive into ``root``
    first (needs network access). Batches are unpickled with an allow-list (numpy arrays only).
    """
    folder = _cifar10_folder(root)
    if folder is None and download:
        url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
        download_into("cifar10", root, _download_cifar10, url, CIFAR10_DIR)
        folder = _cifar10_folder(root)
    if folder is None:
        where = f"under {Path(root).expanduser()}" if root is not None else "(no data.root was given)"
        raise FileNotFoundError(
            f"dataset 'cifar10': no local copy found: expected {CIFAR10_DIR}/ with {', '.join(CIFAR10_TRAIN)}, "
            f"test_batch and batches.meta (the official python version) {where}. Fix: download "
            f"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, unpack it and pass "
            f"data.root=/path/to/{CIFAR10_DIR} (or its parent), or set data.options.download=true on a machine "
            f"with network access. See datasets/cifar10.md."
        )
    class_names = list(CIFAR10_CLASSES)
    if (folder / "batches.meta").is_file():
        meta = _unpickle(folder / "batches.meta")
        if "label_names" in meta:
            class_names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in meta["label_names"]]
    parts = [_read_cifar_batch(folder / name) for name in CIFAR10_TRAIN]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    train = to_samples(images, labels, len(class_names), str(folder))
    test = None
    if (folder / "test_batch").is_file():
        test_images, test_labels = _read_cifar_batch(folder / "test_batch")
        test = to_samples(test_images, test_labels, len(class_names), str(folder / "test_batch"))
    info = vision_info(
        folder,
        "CIFAR-10 python version (pickled batches)",
        "CIFAR-10 (Krizhevsky, 2009) has no explicit licence; cite the tech report 'Learning Multiple Layers of "
        "Features from Tiny Images'",
        CIFAR10_MEAN,
        CIFAR10_STD,
        flip=True,
    )
    return DatasetBundle("cifar10", "vision", class_names, train=train, test=test, info=info)


# -- cifar10_samples -----------------------------------------------------------------------------
def _foolbox_data(root: str | Path | None) -> Path:
    if root is not None:
        path = Path(root).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"dataset 'cifar10_samples': {path} is not a folder; data.root= must name a folder of "
                f"cifar10_NN_LABEL.png files"
            )
        return path
    try:
        return find_package_file("foolbox", "data", pip_spec=FOOLBOX_PIP)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"dataset 'cifar10_samples': the 20 CIFAR-10 images ship with the foolbox package, which was not found "
            f"({exc}). Install it with `pip install --no-deps {FOOLBOX_PIP}` or pass data.root=/path/to/folder"
        ) from exc


@register_dataset(
    "cifar10_samples",
    modality="vision",
    category="classification",
    needs="",
    description="20 real CIFAR-10 test images shipped in foolbox (smoke tests only; far too few to train on)",
)
def load_cifar10_samples(root: str | None = None) -> DatasetBundle:
    """The 20 CIFAR-10 test images in foolbox's ``data/`` folder, ``cifar10_NN_LABEL.png``: for smoke tests only.

    Images are ordered by ``NN``; labels come from the file names. All 20 are ``train``; ``test=None``.
    ``root`` may name another folder of files named the same way.
    """
    folder = _foolbox_data(root)
    found = []
    for path in folder.iterdir():
        m = _SAMPLE_NAME.match(path.name)
        if m and path.is_file():
            found.append((int(m.group(1)), int(m.group(2)), path))
    if not found:
        raise FileNotFoundError(f"dataset 'cifar10_samples': no cifar10_NN_LABEL.png files in {folder}")
    found.sort(key=lambda item: (item[0], item[2].name))
    images = stack_images([load_rgb(p) for _, _, p in found], str(folder))
    labels = np.asarray([label for _, label, _ in found], dtype=np.int64)
    train = to_samples(images, labels, 10, str(folder))
    info = vision_info(
        folder,
        "foolbox sample PNGs (cifar10_NN_LABEL.png)",
        "CIFAR-10 images (no explicit licence; cite Krizhevsky 2009); foolbox is MIT-licensed",
        CIFAR10_MEAN,
        CIFAR10_STD,
        flip=True,
    )
    return DatasetBundle("cifar10_samples", "vision", list(CIFAR10_CLASSES), train=train, test=None, info=info)
