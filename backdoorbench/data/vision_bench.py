"""CIFAR-100 and Tiny-ImageNet: the other image datasets of the seed papers and of BackdoorBench.

Same contract as :mod:`backdoorbench.data.vision`: each loader reads a local copy in the official
layout (``data.root=``) and returns contiguous ``uint8 [N, 3, H, W]`` images with ``int64`` labels in
``class_names`` order, ``info`` with the per-channel ``mean``/``std`` and ``flip``. With
``download=True`` and no local copy, the archive is fetched first (through torchvision, needs
network access) into ``root``; nothing is downloaded otherwise. Images are decoded with PIL. A file
that cannot be read raises one :class:`~backdoorbench.errors.DataError` naming it; a missing copy
raises one :class:`FileNotFoundError` naming the expected files and the fix (see ``datasets/<name>.md``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from backdoorbench.data._imagefiles import decode_rgb, download_into, folder_samples, to_samples, vision_info
from backdoorbench.data.base import DatasetBundle, data_file, reads_data_file
from backdoorbench.data.cifar10 import _ArrayUnpickler
from backdoorbench.errors import DataError
from backdoorbench.registry import register_dataset

__all__ = [
    "CIFAR100_COARSE_CLASSES",
    "CIFAR100_FINE_CLASSES",
    "load_cifar100",
    "load_tiny_imagenet",
]

CIFAR100_MEAN, CIFAR100_STD = [0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]
TINY_MEAN, TINY_STD = [0.4802, 0.4481, 0.3975], [0.2302, 0.2265, 0.2262]

CIFAR100_FINE_CLASSES = """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur
dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster
man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree
plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail
snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip
turtle wardrobe whale willow_tree wolf woman worm""".split()
CIFAR100_COARSE_CLASSES = """aquatic_mammals fish flowers food_containers fruit_and_vegetables
household_electrical_devices household_furniture insects large_carnivores large_man-made_outdoor_things
large_natural_outdoor_scenes large_omnivores_and_herbivores medium_mammals non-insect_invertebrates people reptiles
small_mammals trees vehicles_1 vehicles_2""".split()
CIFAR100_DIR = "cifar-100-python"
TINY_DIR = "tiny-imagenet-200"
TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"


# -- cifar100 ------------------------------------------------------------------------------------
@reads_data_file("CIFAR-100 file (python pickle)")
def _unpickle100(path: Path) -> dict[str, Any]:
    with open(path, "rb") as fh:
        obj = _ArrayUnpickler(fh, encoding="latin1").load()  # numpy arrays and builtins only
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


@reads_data_file("CIFAR-100 file (python pickle)")
def _read_cifar100(path: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    part = _unpickle100(path)
    if "data" not in part or key not in part:
        raise DataError(f"{path}: a CIFAR-100 file needs 'data' and {key!r}, found {sorted(part)}")
    data = np.asarray(part["data"])
    labels = np.asarray(part[key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != len(labels):
        raise DataError(f"{path}: 'data' must be [N, 3072] with N = {len(labels)} labels, got {data.shape}")
    return data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32), labels


def _cifar100_folder(root: str | None) -> Path | None:
    if root is None:
        return None
    base = Path(root).expanduser()
    return next((f for f in (base, base / CIFAR100_DIR) if (f / "train").is_file()), None)


def _download_cifar100(root: str) -> None:
    from torchvision.datasets import CIFAR100

    CIFAR100(root, train=True, download=True)


@register_dataset(
    "cifar100",
    modality="vision",
    category="classification",
    needs="",
    description="CIFAR-100 (Krizhevsky 2009), 100 (or 20 coarse) classes, 50k/10k 3x32x32; local cifar-100-python/",
)
def load_cifar100(root: str | None = None, *, download: bool = False, label_mode: str = "fine") -> DatasetBundle:
    """CIFAR-100 from the official python version: ``cifar-100-python/{train,test,meta}``.

    ``label_mode``: ``fine`` (100 classes, ``fine_labels``) or ``coarse`` (the 20 superclasses,
    ``coarse_labels``). Class names come from ``meta`` (the standard names if it is absent);
    ``test=None`` without ``test``. ``root`` is that folder or its parent. Unpickled with the same
    allow-list as CIFAR-10 (numpy arrays only: a tampered file cannot run code).
    """
    if label_mode not in ("fine", "coarse"):
        raise DataError(f"dataset 'cifar100': label_mode must be 'fine' or 'coarse', got {label_mode!r}")
    folder = _cifar100_folder(root)
    if folder is None and download:
        url = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
        download_into("cifar100", root, _download_cifar100, url, CIFAR100_DIR)
        folder = _cifar100_folder(root)
    if folder is None:
        where = f"under {Path(root).expanduser()}" if root is not None else "(no data.root was given)"
        raise FileNotFoundError(
            f"dataset 'cifar100': no local copy found: expected {CIFAR100_DIR}/ with train, test and meta (the "
            f"official python version) {where}. Fix: download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz,"
            f" unpack it and pass data.root=/path/to/{CIFAR100_DIR} (or its parent), or set "
            f"data.options.download=true on a machine with network access. See datasets/cifar100.md."
        )
    key = f"{label_mode}_labels"
    class_names = list(CIFAR100_FINE_CLASSES if label_mode == "fine" else CIFAR100_COARSE_CLASSES)
    if (folder / "meta").is_file():
        meta = _unpickle100(folder / "meta")
        if f"{label_mode}_label_names" in meta:
            names = meta[f"{label_mode}_label_names"]
            class_names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
    images, labels = _read_cifar100(folder / "train", key)
    train = to_samples(images, labels, len(class_names), str(folder / "train"))
    test = None
    if (folder / "test").is_file():
        test_images, test_labels = _read_cifar100(folder / "test", key)
        test = to_samples(test_images, test_labels, len(class_names), str(folder / "test"))
    info = vision_info(
        folder,
        f"CIFAR-100 python version ({label_mode} labels)",
        "CIFAR-100 (Krizhevsky, 2009) has no explicit licence; cite the tech report 'Learning Multiple Layers of "
        "Features from Tiny Images'",
        CIFAR100_MEAN,
        CIFAR100_STD,
        flip=True,
    )
    info["label_mode"] = label_mode
    return DatasetBundle("cifar100", "vision", class_names, train=train, test=test, info=info)


# -- tiny_imagenet -------------------------------------------------------------------------------
def _tiny_folder(root: str | None) -> Path | None:
    if root is None:
        return None
    base = Path(root).expanduser()
    return next((f for f in (base, base / TINY_DIR) if (f / "wnids.txt").is_file() and (f / "train").is_dir()), None)


@reads_data_file("Tiny-ImageNet words.txt (wnid<TAB>names)")
def _read_words(path: Path) -> dict[str, str]:
    words = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            wnid, sep, names = line.partition("\t")
            if not sep:
                raise DataError(f"{path}, line {n}: expected 'wnid<TAB>names', got {line[:80]!r}")
            words[wnid.strip()] = names.split(",")[0].strip()
    return words


@reads_data_file("Tiny-ImageNet val_annotations.txt (file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1)")
def _read_val_annotations(path: Path) -> list[tuple[str, str]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            fields = line.split("\t")
            if len(fields) < 2:
                raise DataError(f"{path}, line {n}: expected 'file<TAB>wnid<TAB>box', got {line[:80]!r}")
            rows.append((fields[0].strip(), fields[1].strip()))
    return rows


def _tiny_image(path: Path) -> np.ndarray:
    x = decode_rgb(path, "Tiny-ImageNet image (JPEG)")
    if x.shape != (3, 64, 64):
        raise DataError(f"data file {path} is not a valid Tiny-ImageNet image (JPEG): it is {x.shape[2]}x{x.shape[1]}, "
                        f"not 64x64")  # fmt: skip
    return x


def _download_tiny(root: str) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive(TINY_URL, download_root=root, md5=TINY_MD5)


@register_dataset(
    "tiny_imagenet",
    modality="vision",
    category="classification",
    needs="",
    description="Tiny-ImageNet (CS231n), 200 classes, 100k/10k (val as test) 3x64x64; local tiny-imagenet-200/",
)
def load_tiny_imagenet(
    root: str | None = None,
    *,
    download: bool = False,
    num_classes: int | None = None,
    max_per_class: int | None = None,
    in_memory: bool = False,
) -> DatasetBundle:
    """Tiny-ImageNet from ``tiny-imagenet-200/``: ``train/<wnid>/images/*.JPEG`` and ``val/`` as the test split.

    Classes are the wnids of ``wnids.txt`` in sorted order (torchvision ImageFolder's, as BackdoorBench
    uses), named by the first synonym in ``words.txt`` (the wnid if absent). The val labels come from
    ``val/val_annotations.txt``; ``test/`` is unlabelled and ignored. ``num_classes`` keeps the first k
    classes; ``max_per_class`` caps the images read per class and split (files in sorted order). The images are
    decoded once into a uint8 store in the run's cache (``in_memory=True``: into memory), see ``data/images.py``.
    """
    folder = _tiny_folder(root)
    if folder is None and download:
        download_into("tiny_imagenet", root, _download_tiny, TINY_URL, TINY_DIR)
        folder = _tiny_folder(root)
    if folder is None:
        where = f"under {Path(root).expanduser()}" if root is not None else "(no data.root was given)"
        raise FileNotFoundError(
            f"dataset 'tiny_imagenet': no local copy found: expected {TINY_DIR}/ with wnids.txt, words.txt, "
            f"train/<wnid>/images/*.JPEG and val/images + val/val_annotations.txt {where}. Fix: download "
            f"{TINY_URL}, unzip it and pass data.root=/path/to/{TINY_DIR} (or its parent), or set "
            f"data.options.download=true on a machine with network access. See datasets/tiny_imagenet.md."
        )
    for key, v in (("num_classes", num_classes), ("max_per_class", max_per_class)):
        if v is not None and v < 1:
            raise DataError(f"dataset 'tiny_imagenet': {key} must be >= 1 or null, got {v}")
    with data_file(folder / "wnids.txt", "Tiny-ImageNet wnids.txt (one wnid per line)"):
        wnids = sorted({w.strip() for w in (folder / "wnids.txt").read_text(encoding="utf-8").split()})
    if not wnids:
        raise DataError(f"data file {folder / 'wnids.txt'} is not a valid Tiny-ImageNet wnids.txt: it is empty")
    if num_classes is not None and num_classes > len(wnids):
        raise DataError(
            f"dataset 'tiny_imagenet': num_classes must be in 1..{len(wnids)} (wnids.txt), got {num_classes}"
        )
    wnids = wnids[:num_classes]
    words = _read_words(folder / "words.txt") if (folder / "words.txt").is_file() else {}
    names = [words.get(w) or w for w in wnids]
    names = [f"{n} ({w})" if names.count(n) > 1 else n for n, w in zip(names, wnids)]
    paths: list[Path] = []
    labels: list[int] = []
    settings = {"loader": "tiny_imagenet"}
    for label, wnid in enumerate(wnids):
        class_dir = folder / "train" / wnid / "images"
        files = sorted(class_dir.glob("*.JPEG")) if class_dir.is_dir() else []
        if not files:
            raise DataError(f"dataset 'tiny_imagenet': no images in {class_dir} (class {wnid} of wnids.txt)")
        paths += files[:max_per_class]
        labels += [label] * len(files[:max_per_class])
    train = folder_samples(paths, labels, len(wnids), _tiny_image, settings, str(folder / "train"), in_memory)
    test = None
    annotations = folder / "val" / "val_annotations.txt"
    if annotations.is_file():
        index = {w: i for i, w in enumerate(wnids)}
        counts = [0] * len(wnids)
        test_paths, test_labels = [], []
        for name, wnid in _read_val_annotations(annotations):
            if wnid not in index or (max_per_class is not None and counts[index[wnid]] >= max_per_class):
                continue
            path = folder / "val" / "images" / name
            if not path.is_file():
                raise DataError(f"{annotations} lists {name}, which is not in {path.parent}")
            test_paths.append(path)
            test_labels.append(index[wnid])
            counts[index[wnid]] += 1
        if test_paths:
            test = folder_samples(test_paths, test_labels, len(wnids), _tiny_image, settings, str(annotations),
                                  in_memory)
    info = vision_info(
        folder,
        "Tiny-ImageNet-200 (train/<wnid>/images, val/ as test), 64x64 JPEG",
        "Tiny-ImageNet (Stanford CS231N): a subset of ImageNet; ImageNet terms of access (non-commercial research "
        "and educational use); images belong to their owners",
        TINY_MEAN,
        TINY_STD,
        flip=True,
    )
    info.update(wnids=wnids, max_per_class=max_per_class)
    return DatasetBundle("tiny_imagenet", "vision", names, train=train, test=test, info=info)

