"""The poisoned test set a BackdoorBench record carries: ``bd_test`` of its ``attack_result.pt``.

BackdoorBench (SCLBD/BackdoorBench) measures ASR on ``bd_test``: the test images whose label the backdoor
changes (all-to-one: the non-target ones), with the trigger applied and relabelled to the backdoor's label
(``utils/backdoor_generate_poison_index.py``, then ``prepro_cls_DatasetBD_v2.subset``). Its records store it
in one of these forms, all read here:

* **v2, images on disk** (``attack/*.py`` pass ``save_folder_path=<record>/bd_test_dataset``): the state of
  ``prepro_cls_DatasetBD_v2.retrieve_state()``; ``bd_data_container.data_dict`` maps each poisoned test
  index (``np.int64``) to ``{"path": "<save_folder_path>/<label>/<index>.png", "other_info": [bd_label,
  label]}``. The PNGs are found under the record folder (next to ``attack_result.pt``), wherever the record
  was written from; a path leading outside it is refused;
* **v2, in memory** (``save_folder_path=None``): the same state, ``data_dict`` values
  ``(PIL image, bd_label, label)``;
* **v1** (``prepro_cls_DatasetBD``, BackdoorBench 1.x): ``{"x": images, "y": bd labels, "original_index",
  "original_targets"}`` with ``x`` a list of PIL images or a float ``[N, C, H, W]`` tensor of 0..255 values
  (or an array, channels first or last).

Images become the uint8 ``[N, C, H, W]`` tensors :class:`~backdoorbench.data.base.Samples` holds; a PIL
image whose size differs from the data's is resized bilinearly, as BackdoorBench's test transform
(``Resize``) does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backdoorbench.data.base import Samples, uint8_images
from backdoorbench.errors import DataError


@dataclass
class RecordTest:
    """A record's poisoned test set: the images with their true labels, each one's backdoor label (what
    BackdoorBench's ASR counts as success) and its index in the record's test set."""

    samples: Samples
    targets: np.ndarray
    index: np.ndarray
    form: str  # "v2 (image files)" | "v2 (in memory)" | "v1"

    def label_map(self, num_classes: int) -> np.ndarray:
        """The record's label transform: true label → backdoor label (-1 for a class it does not poison,
        e.g. the all-to-one target); a :class:`DataError` when one class goes to several labels."""
        mapping = np.full(num_classes, -1, dtype=np.int64)
        for label in np.unique(self.samples.labels):
            targets = np.unique(self.targets[self.samples.labels == label])
            if len(targets) > 1:
                raise DataError(f"bd_test relabels class {label} to several labels {targets.tolist()}")
            mapping[label] = targets[0]
        return mapping


def read_bd_test(state: Any, record_dir: Path, shape: tuple[int, int, int], num_classes: int) -> RecordTest:
    """The record's ``bd_test`` as a :class:`RecordTest` of images of ``shape`` (channels, height, width); a
    :class:`DataError` saying why when it cannot be read."""
    if not isinstance(state, Mapping):
        raise DataError(f"the record has no bd_test state (found {type(state).__name__})")
    if isinstance(state.get("bd_data_container"), Mapping):
        images, targets, labels, index, form = _v2(state, Path(record_dir), shape)
    elif "x" in state and "y" in state:
        images, targets, labels, index, form = _v1(state, shape)
    else:
        raise DataError(f"bd_test holds neither BackdoorBench's v2 nor v1 layout (keys {sorted(map(str, state))})")
    for name, y in (("backdoor", targets), ("original", labels)):
        bad = y[(y < 0) | (y >= num_classes)]
        if bad.size:
            raise DataError(f"bd_test {name} label {int(bad[0])} is not a label of the data (0..{num_classes - 1})")
    return RecordTest(Samples(images, labels, "vision"), targets, index, form)


def _v2(state: Mapping, record_dir: Path, shape: tuple[int, int, int]) -> tuple[Any, ...]:
    container = state["bd_data_container"]
    data = {int(k): v for k, v in dict(container.get("data_dict") or {}).items()}
    order = state.get("original_index_array")
    order = sorted(data) if order is None else [int(i) for i in np.asarray(order).reshape(-1)]
    keys = [i for i in order if i in data]  # the poisoned ones: BackdoorBench's bd_test keeps only those
    if not keys:
        raise DataError("bd_test holds no poisoned test images (its data_dict is empty)")
    folder = container.get("save_folder_path") or state.get("save_folder_path")
    images, targets, labels, on_disk = [], [], [], False
    for k in keys:
        value = data[k]
        if isinstance(value, Mapping) and "path" in value:  # saved under save_folder_path
            on_disk = True
            image = _open(_resolve(str(value["path"]), folder, record_dir))
            info = list(value.get("other_info") or [])
        elif isinstance(value, (tuple, list)) and len(value) >= 3:  # in memory: (image, bd_label, label)
            image, info = value[0], list(value[1:])
        else:
            raise DataError(f"bd_test entry {k} is neither {{'path', 'other_info'}} nor (image, bd_label, label)")
        if len(info) < 2:
            raise DataError(f"bd_test entry {k} lacks its labels (other_info = [bd_label, label])")
        images.append(_image(image, shape, f"bd_test entry {k}"))
        targets.append(int(info[0]))
        labels.append(int(info[1]))
    form = "v2 (image files)" if on_disk else "v2 (in memory)"
    return torch.stack(images), np.array(targets), np.array(labels), np.array(keys, dtype=np.int64), form


def _v1(state: Mapping, shape: tuple[int, int, int]) -> tuple[Any, ...]:
    x, y, original = state["x"], state.get("y"), state.get("original_targets")
    if x is None or y is None:
        raise DataError("bd_test holds no images (x is None)")
    if original is None:
        raise DataError("bd_test has no original_targets: the true labels of its images are unknown")
    if isinstance(x, (torch.Tensor, np.ndarray)):
        arr = torch.as_tensor(x)
        if arr.is_floating_point() and arr.numel() and float(arr.max()) > 1.0:  # BackdoorBench 1.x: float 0..255
            arr = arr / 255.0
        try:
            images = uint8_images(arr)
        except (TypeError, ValueError) as exc:
            raise DataError(f"bd_test images: {exc}") from None
        if tuple(images.shape[1:]) != shape:
            raise DataError(f"bd_test images are {tuple(images.shape[1:])} (C, H, W) but the data's are {shape}")
    elif isinstance(x, Sequence):
        images = torch.stack([_image(img, shape, f"bd_test image {i}") for i, img in enumerate(x)])
    else:
        raise DataError(f"bd_test x is a {type(x).__name__}, not images")
    targets, labels = _ints(y), _ints(original)
    index = _ints(state["original_index"]) if state.get("original_index") is not None else np.arange(len(images))
    if not len(images) == len(targets) == len(labels) == len(index):
        raise DataError(
            f"bd_test holds {len(images)} images, {len(targets)} labels (y), {len(labels)} original_targets and "
            f"{len(index)} original_index entries"
        )
    return images, targets, labels, index, "v1"


def _ints(values: Any) -> np.ndarray:
    arr = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    return arr.reshape(-1).astype(np.int64)


def _resolve(path: str, folder: Any, record_dir: Path) -> Path:
    """Where BackdoorBench's ``<save_folder_path>/<label>/<index>.png`` lies now: under the record folder."""
    p, f = path.replace("\\", "/"), str(folder or "").replace("\\", "/").rstrip("/")
    if not f or not p.startswith(f + "/"):
        raise DataError(f"bd_test image {path!r} does not lie under the record's save_folder_path {folder!r}")
    root = record_dir.resolve()
    file = (root / Path(f).name / p[len(f) + 1 :]).resolve()
    if not file.is_relative_to(root):
        raise DataError(f"bd_test image {path!r} leads outside the record folder {root}")
    if not file.is_file():
        raise DataError(
            f"bd_test image {file} not found: keep attack_result.pt in its record folder, next to "
            f"{Path(f).name}/ where BackdoorBench saved the poisoned test images"
        )
    return file


def _open(file: Path) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as img:
            img.load()
            return img.copy()
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"bd_test image {file} is not a readable image ({exc})") from None


def _image(image: Any, shape: tuple[int, int, int], what: str) -> torch.Tensor:
    """One image (PIL, or an array / tensor) as uint8 ``[C, H, W]`` of ``shape``."""
    from PIL import Image

    channels, height, width = shape
    if isinstance(image, Image.Image):
        if channels not in (1, 3):
            raise DataError(f"{what}: a PIL image cannot give {channels}-channel inputs")
        image = image.convert("L" if channels == 1 else "RGB")
        if image.size != (width, height):  # as BackdoorBench's test transform: Resize((h, w)), bilinear
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        return uint8_images(np.asarray(image)[None])[0]
    try:
        arr = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
        if arr.is_floating_point() and arr.numel() and float(arr.max()) > 1.0:
            arr = arr / 255.0
        out = uint8_images(arr[None])[0]
    except (TypeError, ValueError) as exc:
        raise DataError(f"{what}: {exc}") from None
    if tuple(out.shape) != shape:
        raise DataError(f"{what} is {tuple(out.shape)} (C, H, W) but the data's images are {shape}")
    return out
