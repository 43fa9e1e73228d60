"""GTSRB, the German Traffic Sign Recognition Benchmark (Stallkamp et al. 2012), from its official archives.

Same contract as :mod:`backdoorbench.data.vision`: contiguous ``uint8 [N, 3, S, S]`` images with
``int64`` labels 0..42 in ``GTSRB_CLASSES`` order, ``info`` with ``mean``/``std`` and ``flip`` (false:
traffic signs are not mirror-symmetric). With ``download=True`` and no local copy, torchvision fetches
its layout into ``root`` first (needs network access). See ``datasets/gtsrb.md``.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np

from backdoorbench.data._imagefiles import decode_rgb, download_into, folder_samples, vision_info
from backdoorbench.data.base import DatasetBundle, reads_data_file
from backdoorbench.errors import DataError
from backdoorbench.registry import register_dataset

__all__ = ["GTSRB_CLASSES", "GTSRB_MEAN", "GTSRB_STD", "GTSRB_TEST_GT", "load_gtsrb"]

GTSRB_MEAN, GTSRB_STD = [0.3403, 0.3121, 0.3214], [0.2724, 0.2608, 0.2669]
GTSRB_CLASSES = [
    "speed limit 20", "speed limit 30", "speed limit 50", "speed limit 60", "speed limit 70", "speed limit 80",
    "end of speed limit 80", "speed limit 100", "speed limit 120", "no passing",
    "no passing for vehicles over 3.5 t", "right-of-way at the next intersection", "priority road", "yield",
    "stop", "no vehicles", "vehicles over 3.5 t prohibited", "no entry", "general caution",
    "dangerous curve to the left", "dangerous curve to the right", "double curve", "bumpy road", "slippery road",
    "road narrows on the right", "road work", "traffic signals", "pedestrians", "children crossing",
    "bicycles crossing", "beware of ice/snow", "wild animals crossing", "end of all speed and passing limits",
    "turn right ahead", "turn left ahead", "ahead only", "go straight or right", "go straight or left",
    "keep right", "keep left", "roundabout mandatory", "end of no passing",
    "end of no passing by vehicles over 3.5 t",
]  # fmt: skip
_CLASS_DIR = re.compile(r"^\d{5}$")
GTSRB_TEST_GT = "GT-final_test.csv"
# official archives (GTSRB_Final_Training_Images.zip / GTSRB_Final_Test_Images.zip), torchvision's
# download (root/gtsrb/GTSRB/{Training,Final_Test/Images}, root/gtsrb/GT-final_test.csv), BackdoorBench's renaming
_GTSRB_TRAIN = ("Final_Training/Images", "GTSRB/Final_Training/Images", "gtsrb/GTSRB/Training", "GTSRB/Training",
                "Training", "Train")  # fmt: skip
_GTSRB_TEST = ("Final_Test/Images", "GTSRB/Final_Test/Images", "gtsrb/GTSRB/Final_Test/Images", "Test")


_GTSRB_COLUMNS = {"Filename", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"}


@reads_data_file("GTSRB annotation CSV (Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId)")
def _read_gtsrb_csv(path: Path) -> list[tuple[str, tuple[int, int, int, int], int]]:
    """(file name, ROI box, class id) per row of a semicolon-separated GTSRB annotation file."""
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=";", skipinitialspace=True)
        missing = _GTSRB_COLUMNS - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{path}: missing column(s) {sorted(missing)}; found {reader.fieldnames}")
        for row in reader:
            try:
                x1, y1, x2, y2 = (int(row[k]) for k in ("Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2"))
                label = int(row["ClassId"])
            except (TypeError, ValueError):
                where = f"{path}, line {reader.line_num}"
                raise DataError(f"{where}: expected integer Roi.* and ClassId values, got {row}") from None
            if not 0 <= label < len(GTSRB_CLASSES):
                raise DataError(f"{path}, line {reader.line_num}: ClassId {label} out of range 0..42")
            rows.append((row["Filename"].strip(), (x1, y1, x2, y2), label))
    return rows


def _gtsrb_files(folder: Path, rows: list, csv_path: Path) -> tuple[list, list, list]:
    paths, boxes, labels = [], [], []
    for name, box, label in rows:
        path = folder / name
        if not path.is_file():
            raise DataError(f"{csv_path} lists {name}, which is not in {folder}")
        paths.append(path)
        boxes.append(tuple(box))
        labels.append(label)
    return paths, boxes, labels


def _gtsrb_samples(paths: list, boxes: list, labels: list, size: int, crop_roi: bool, where: str, in_memory: bool):
    box_of = dict(zip(paths, boxes))

    def decode(path: Path) -> np.ndarray:
        return decode_rgb(path, "GTSRB image (PPM)", size, box_of[path] if crop_roi else None)

    settings = {"loader": "gtsrb", "size": size, "crop_roi": crop_roi, "boxes": boxes if crop_roi else None}
    return folder_samples(paths, labels, 43, decode, settings, where, in_memory)


def _gtsrb_train_dir(base: Path) -> Path | None:
    for folder in (base, *(base / d for d in _GTSRB_TRAIN)):
        if folder.is_dir() and any(p.is_dir() and _CLASS_DIR.match(p.name) for p in folder.iterdir()):
            return folder
    return None


def _gtsrb_test(base: Path) -> tuple[Path, Path] | None:
    """(test image folder, GT-final_test.csv with ClassId), or None when either is missing."""
    for folder in (base / d for d in _GTSRB_TEST):
        if folder.is_dir():
            above = [p for p in list(folder.parents)[:3] if p == base or base in p.parents]  # never above root
            for where in (folder, *above, base / "gtsrb"):
                if (where / GTSRB_TEST_GT).is_file():
                    return folder, where / GTSRB_TEST_GT
    return None


def _download_gtsrb(root: str) -> None:
    from torchvision.datasets import GTSRB

    for split in ("train", "test"):
        GTSRB(root, split=split, download=True)


@register_dataset(
    "gtsrb",
    modality="vision",
    category="classification",
    needs="",
    description="GTSRB traffic signs (Stallkamp et al. 2012), 43 classes, 39,209/12,630 resized to 3x32x32; local",
)
def load_gtsrb(
    root: str | None = None,
    *,
    download: bool = False,
    image_size: int = 32,
    crop_roi: bool = False,
    in_memory: bool = False,
) -> DatasetBundle:
    """GTSRB from the official archives: ``Final_Training/Images/<class>/*.ppm`` with ``GT-<class>.csv``.

    The test split is ``Final_Test/Images/*.ppm`` with the labelled ``GT-final_test.csv`` (from
    ``GTSRB_Final_Test_GT.zip``; next to the images, or up to three folders above); ``test=None``
    without it. torchvision's layout (``gtsrb/GTSRB/Training``, ``gtsrb/GT-final_test.csv``) and
    BackdoorBench's (``Train/<class>``, ``Test/``) are found too. A class folder without its CSV is
    read as ``*.ppm`` labelled by the folder name. Every image is resized (bilinear) to
    ``image_size`` x ``image_size``, as BackdoorBench does; ``crop_roi`` first crops it to the sign's
    ROI box from the CSV. No horizontal flip (traffic signs are not mirror-symmetric). The images are decoded
    once into a uint8 store in the run's cache (``in_memory=True``: into memory), see ``data/images.py``.
    """
    base = Path(root).expanduser() if root is not None else None
    train_dir = _gtsrb_train_dir(base) if base is not None else None
    if train_dir is None and download:
        download_into("gtsrb", root, _download_gtsrb, "https://benchmark.ini.rub.de/gtsrb_dataset.html", "GTSRB")
        train_dir = _gtsrb_train_dir(base)  # type: ignore[arg-type]
    if base is None or train_dir is None:
        where = f"under {base}" if base is not None else "(no data.root was given)"
        raise FileNotFoundError(
            f"dataset 'gtsrb': no local copy found: expected GTSRB/Final_Training/Images/<00000..00042>/*.ppm with "
            f"GT-<class>.csv (and Final_Test/Images/ + {GTSRB_TEST_GT} for the test split) {where}. Fix: unpack "
            f"GTSRB_Final_Training_Images.zip, GTSRB_Final_Test_Images.zip and GTSRB_Final_Test_GT.zip "
            f"(https://benchmark.ini.rub.de/gtsrb_dataset.html) and pass data.root=/path/to/GTSRB, or set "
            f"data.options.download=true on a machine with network access. See datasets/gtsrb.md."
        )
    if image_size < 1:
        raise DataError(f"dataset 'gtsrb': image_size must be >= 1, got {image_size}")
    paths: list[Path] = []
    boxes: list[tuple] = []
    labels: list[int] = []
    for class_dir in sorted(p for p in train_dir.iterdir() if p.is_dir() and _CLASS_DIR.match(p.name)):
        csv_path = class_dir / f"GT-{class_dir.name}.csv"
        if csv_path.is_file():
            rows = _read_gtsrb_csv(csv_path)
        else:  # torchvision-style folder of images: the folder name is the class id
            label = int(class_dir.name)
            if label >= len(GTSRB_CLASSES):
                raise DataError(f"{class_dir}: class folder {class_dir.name} out of range 00000..00042")
            rows = [(p.name, (0, 0, 0, 0), label) for p in sorted(class_dir.glob("*.ppm"))]
            if crop_roi:
                raise DataError(f"dataset 'gtsrb': crop_roi needs the ROI boxes of {csv_path}, which is missing")
        part = _gtsrb_files(class_dir, rows, csv_path)
        paths += part[0]
        boxes += part[1]
        labels += part[2]
    train = _gtsrb_samples(paths, boxes, labels, image_size, crop_roi, str(train_dir), in_memory)
    test = None
    found = _gtsrb_test(base)
    if found is not None:
        test_dir, gt = found
        t_paths, t_boxes, t_labels = _gtsrb_files(test_dir, _read_gtsrb_csv(gt), gt)
        test = _gtsrb_samples(t_paths, t_boxes, t_labels, image_size, crop_roi, str(gt), in_memory)
    info = vision_info(
        train_dir,
        f"GTSRB PPM images + GT CSVs, {'ROI crop, ' if crop_roi else ''}resized to {image_size}x{image_size}",
        "GTSRB (Stallkamp et al., 2012): free for research; cite the IJCNN 2011 / Neural Networks 2012 papers",
        GTSRB_MEAN,
        GTSRB_STD,
        flip=False,
    )
    info.update(image_size=image_size, crop_roi=crop_roi)
    return DatasetBundle("gtsrb", "vision", list(GTSRB_CLASSES), train=train, test=test, info=info)

