"""ImageNet subsets from an ImageFolder layout (``train/<wnid>/*.JPEG``, ``val/<wnid>/...``), resized and
center-cropped. Same contract as :mod:`backdoorbench.data.vision`; see ``datasets/imagenet_subset.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from backdoorbench.data._imagefiles import folder_samples, load_rgb, vision_info
from backdoorbench.data.base import DatasetBundle, Samples, data_file
from backdoorbench.errors import DataError
from backdoorbench.registry import register_dataset

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_SUFFIXES", "load_imagenet_subset"]

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


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


def _read_image_folder(
    split_dir: Path, names: list[str], resize: int, crop: int, max_per_class: int | None, in_memory: bool
) -> Samples:
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(names):
        files = sorted(p for p in (split_dir / name).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"dataset 'imagenet_subset': no images in {split_dir / name}")
        paths += files[:max_per_class]
        labels += [label] * len(files[:max_per_class])

    def decode(path: Path) -> np.ndarray:
        with data_file(path, "image (PIL cannot decode it)"):
            return load_rgb(path, resize, crop)

    settings = {"loader": "imagenet_subset", "resize": resize, "crop": crop}
    return folder_samples(paths, labels, len(names), decode, settings, str(split_dir), in_memory)


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
    in_memory: bool = False,
) -> DatasetBundle:
    """An ImageFolder-style subset of ImageNet: ``root/train/<class>/*`` and optionally ``root/val/<class>/*``.

    ``classes``: folder names (labels follow this order) or a text file with one name per line
    (blank lines and ``#`` comments skipped); ``None`` = every class folder of ``train/``, sorted.
    ``num_classes``: the first k sorted classes (only when ``classes`` is ``None``). Each image is decoded
    with PIL as RGB, its shorter side resized (bilinear) to ``resize`` (default
    ``round(image_size * 8 / 7)``, the usual 256/224 ratio), then center-cropped to ``image_size``.
    ``max_per_class`` caps the images read per class in each split (files in sorted order).
    ``val/`` (or ``test/``) becomes the test split; every selected class must have a folder there.
    The images are decoded once into a uint8 store in the run's cache and read per index (never all held in
    memory); ``in_memory=True`` decodes them into one in-memory tensor instead (same pixels, same results).
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
    train = _read_image_folder(train_dir, names, resize, image_size, max_per_class, in_memory)
    test = None
    test_dir = next((base / s for s in ("val", "test") if (base / s).is_dir()), None)
    if test_dir is not None:
        missing = [n for n in names if not (test_dir / n).is_dir()]
        if missing:
            raise DataError(
                f"dataset 'imagenet_subset': {test_dir} has no folder for class(es) {missing}; its class folders "
                f"are: {', '.join(_class_dirs(test_dir))}"
            )
        test = _read_image_folder(test_dir, names, resize, image_size, max_per_class, in_memory)
    info = vision_info(
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
