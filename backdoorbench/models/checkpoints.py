"""Reading a victim's weights from files made elsewhere, safely, into a backdoorbench :class:`Classifier`.

Formats (see docs/attacks/external.md):

* a safetensors state dict (``model.safetensors`` of a backdoorbench cache entry, or anyone's);
* a plain torch / timm checkpoint (``.pt``, ``.pth``, ``.bin``, ``.ckpt``, ``.tar``): a state dict, possibly
  under ``state_dict`` / ``model`` / ``module`` / ``model_state_dict``, ``module.`` (DataParallel) prefixes
  stripped. Read with ``torch.load(weights_only=True)`` only: a pickle that would construct anything but
  tensors, containers, numpy arrays / scalars and PIL images is refused, never executed;
* a BackdoorBench ``attack_result.pt`` (``model``, ``model_name``, ``num_classes``, ``img_size``,
  ``clean_data``, ``bd_train`` / ``bd_test`` ...; SCLBD/BackdoorBench ``utils/save_load_attack.py``), read
  the same way; its ``bd_test`` (the poisoned test set) is kept for :mod:`backdoorbench.data.backdoorbench_record`.

Key names are matched tolerantly (a missing or extra wrapper prefix such as ``net.`` / ``hf.``), everything
else strictly: every tensor of the model must come from the file with its exact shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from backdoorbench.config import ConfigError

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
WEIGHT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)
FOLDER_FILES = ("model.safetensors", "attack_result.pt", "pytorch_model.bin")  # looked for in a folder
SUPPORTED = (
    "a safetensors state dict (.safetensors), a torch/timm checkpoint (.pt/.pth/.bin/.ckpt/.tar), "
    "a BackdoorBench attack_result.pt, a folder holding one of those, or (text) an HF model folder or hub name"
)

# BackdoorBench utils/aggregate_block/dataset_and_transform_generate.py get_dataset_normalization
BACKDOORBENCH_NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.5,), (0.5,)),
    "tiny": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
    "gtsrb": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "celeba": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# BackdoorBench model_name -> the backdoorbench model with the same parameter names (up to the wrapper prefix)
BACKDOORBENCH_MODELS = {"preactresnet18": "preact_resnet18"}
_BACKDOORBENCH_KEYS = ("model", "model_name", "num_classes")
_STATE_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")


@dataclass
class Checkpoint:
    """A state dict read from a file, its format, and (BackdoorBench) what the file says about itself."""

    state_dict: dict[str, torch.Tensor]
    format: str  # safetensors | torch | backdoorbench
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    #: BackdoorBench: the record's ``bd_test`` as stored (its poisoned test set; read by
    #: :func:`backdoorbench.data.backdoorbench_record.read_bd_test`), None when absent
    bd_test: Any = None


def weights_file(path: Path) -> Path:
    """``path`` itself, or the weights file inside a folder (a cache entry, a BackdoorBench record, an HF/timm
    folder with ``pytorch_model.bin``)."""
    if path.is_file():
        return path
    if not path.exists():
        raise ConfigError(f"attack.path: no such file or folder {str(path)!r}")
    for name in FOLDER_FILES:
        if (path / name).is_file():
            return path / name
    raise ConfigError(f"attack.path: no weights found in the folder {str(path)!r}. Supported: {SUPPORTED}")


def read_checkpoint(path: str | Path) -> Checkpoint:
    """The state dict in ``path`` (file or folder), without running any code from the file."""
    file = weights_file(Path(path))
    suffix = file.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return Checkpoint(dict(load_file(str(file))), "safetensors", file)
        except Exception as exc:
            raise ConfigError(f"attack.path: {file} is not a readable safetensors file ({_first(exc)})") from None
    if suffix not in TORCH_SUFFIXES:
        raise ConfigError(f"attack.path: format of {file.name!r} not recognised. Supported: {SUPPORTED}")
    obj = torch_load_safely(file)
    if isinstance(obj, Mapping) and all(k in obj for k in _BACKDOORBENCH_KEYS):
        meta = {k: _plain(v) for k, v in obj.items() if k in ("model_name", "num_classes", "img_size", "clean_data")}
        return Checkpoint(_tensors(obj["model"], file), "backdoorbench", file, meta, obj.get("bd_test"))
    arch = obj.get("arch") if isinstance(obj, Mapping) else None  # timm's train.py names the model
    return Checkpoint(_tensors(_unwrap(obj), file), "torch", file, {"arch": arch} if isinstance(arch, str) else {})


def torch_load_safely(file: Path) -> Any:
    """``torch.load(weights_only=True)`` with plain data allowed beyond tensors and containers: numpy arrays,
    scalars and dtypes (a BackdoorBench record's ``np.int64`` keys, written under numpy 1's or 2's module
    names) and PIL images (their in-memory poisoned sets: a mode, a size and raw pixel bytes). Their
    reconstruction runs no code from the file; any other global is refused with one clear error."""
    allowed = safe_globals()
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as exc:
        try:
            needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(file))
        except Exception:
            needed = []
        names = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in allowed}
        unsafe = [g for g in needed if g not in names]  # what the file needs beyond the allowed data types
        what = f" (it needs {', '.join(unsafe[:4])}{', ...' if len(unsafe) > 4 else ''})" if unsafe else ""
        raise ConfigError(
            f"attack.path: {file} cannot be loaded safely{what or f' ({_first(exc)})'}: only tensors, numbers, "
            "strings, containers, numpy arrays and PIL images are read (torch.load weights_only=True), never code. "
            "Where you trust the file, convert it once to safetensors: `import torch, safetensors.torch as st; "
            "st.save_file(torch.load(PATH, weights_only=False)['model'], 'model.safetensors')` (the dict key that "
            "holds the state dict), then pass attack.path=model.safetensors"
        ) from None


def safe_globals() -> list[Any]:
    """The globals :func:`torch_load_safely` allows: data types whose unpickling only rebuilds values."""
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    allowed: list[Any] = [np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar]
    for fn in (multiarray._reconstruct, multiarray.scalar):  # the names numpy 1.x wrote (BackdoorBench's era)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            if fn.__module__ != module:
                allowed.append((fn, f"{module}.{fn.__name__}"))
    # the dtype classes of numbers, strings and dates (not object or structured dtypes)
    allowed += sorted({type(np.dtype(t)) for t in set(np.sctypeDict.values()) if np.dtype(t).kind in "biufcUSmM"},
                      key=str)
    try:
        from PIL import Image

        allowed.append(Image.Image)
    except ImportError:  # pragma: no cover - Pillow is a dependency
        pass
    return allowed


def _unwrap(obj: Any) -> Any:
    """The state dict inside a training checkpoint dict (timm: ``state_dict``; others: ``model`` ...)."""
    for _ in range(3):
        if not isinstance(obj, Mapping) or _is_state_dict(obj):
            return obj
        inner = next((obj[k] for k in _STATE_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            return obj
        obj = inner
    return obj


def _is_state_dict(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _tensors(obj: Any, file: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping) or not _is_state_dict(obj):
        keys = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise ConfigError(f"attack.path: {file} holds no state dict of tensors (found {keys}). Supported: {SUPPORTED}")
    sd = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in sd):  # DataParallel / DistributedDataParallel
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


# -- matching a state dict to a model -------------------------------------------------------------------
def align_keys(sd: Mapping[str, torch.Tensor], expected: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``sd`` renamed to fit ``expected``'s keys: as is, with the model's wrapper prefix added (``net.``,
    ``hf.``), or with one or two leading name components removed (an extra wrapper); whichever shares the most
    keys. The non-persistent normalisation buffers (``mean``/``std``) some wrappers store are dropped."""
    want = set(expected)
    bases, current = [dict(sd)], dict(sd)
    for _ in range(2):
        if not current or not all("." in k for k in current):
            break
        current = {k.split(".", 1)[1]: v for k, v in current.items()}
        bases.append(current)
    firsts = {k.split(".", 1)[0] for k in expected}
    prefix = next(iter(firsts)) + "." if len(firsts) == 1 else ""
    candidates = bases + ([{prefix + k: v for k, v in b.items()} for b in bases] if prefix else [])
    best = max(candidates, key=lambda c: len(want & set(c)))
    return {k: v for k, v in best.items() if k.rsplit(".", 1)[-1] not in ("mean", "std") or k in want}


@dataclass
class Mismatch:
    missing: list[str]
    unexpected: list[str]
    shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # key, in the file, in the model

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.shapes)

    def describe(self) -> str:
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} model tensor(s) not in the file, e.g. {', '.join(self.missing[:3])}")
        if self.unexpected:
            extra = ", ".join(self.unexpected[:3])
            parts.append(f"{len(self.unexpected)} file tensor(s) the model lacks, e.g. {extra}")
        if self.shapes:
            parts.append(
                f"{len(self.shapes)} shape mismatch(es), e.g. "
                + ", ".join(f"{k}: {list(a)} in the file vs {list(b)} in the model" for k, a, b in self.shapes[:2])
            )
        return "; ".join(parts)


def compare(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> Mismatch:
    """What keeps ``sd`` from loading strictly into ``model`` (tied / shared tensors may be absent once)."""
    expected = model.state_dict()
    by_storage: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    for k, v in expected.items():
        by_storage.setdefault((v.data_ptr(), tuple(v.shape)), []).append(k)
    aliased = {k for names in by_storage.values() if len(names) > 1 and any(n in sd for n in names) for k in names}
    missing = [k for k in expected if k not in sd and k not in aliased]
    unexpected = [k for k in sd if k not in expected]
    shapes = [
        (k, tuple(sd[k].shape), tuple(v.shape)) for k, v in expected.items() if k in sd and sd[k].shape != v.shape
    ]
    return Mismatch(missing, unexpected, shapes)


def class_count_mismatch(mismatch: Mismatch, num_classes: int) -> int | None:
    """The file's number of classes when the only difference is the classifier head's output size."""
    if mismatch.missing or mismatch.unexpected or not mismatch.shapes:
        return None
    outs = {a[0] for _, a, b in mismatch.shapes if b and b[0] == num_classes and a[1:] == b[1:] and a[0] != b[0]}
    return outs.pop() if len(outs) == 1 and len(mismatch.shapes) <= 2 else None


def suggest_model(checkpoint: Checkpoint, image: Any, current: str, num_classes: int) -> str:
    """The end of a mismatch message: which ``model=`` the weights fit, if any. Vision (``image`` given): every
    other built-in vision model, then ``timm:<name>`` for the name ``model=`` gave (timm's resnet18 given as our
    CIFAR ``model=resnet18``) and the checkpoint's own ``arch`` (timm's train.py)."""
    if image is None:
        return "Choose the model= that built them (model=<the HF folder or name of the base model>)."
    from backdoorbench.models.vision import TIMM_PREFIX, timm_model_name
    from backdoorbench.registry import REGISTRY

    names = [e.name for e in REGISTRY.entries("model")
             if e.supports("vision") and e.config is not None and e.name not in (current, "timm")]
    for bare in dict.fromkeys(n for n in (str(checkpoint.meta.get("arch") or ""), timm_model_name(current)) if n):
        names.append(TIMM_PREFIX + bare)
    for name in dict.fromkeys(n for n in names if n != current):
        try:
            if name.startswith(TIMM_PREFIX):
                import timm

                if not timm.is_model(name[len(TIMM_PREFIX):]):
                    continue
            entry = REGISTRY.get("model", "timm" if name.startswith(TIMM_PREFIX) else name)
            if entry.config is None:  # (calling None raised a TypeError here, skipped below: the same skip)
                continue
            candidate = entry.obj(entry.config(name=name), num_classes, image=image)
        except Exception:  # a candidate that cannot be built for this data is no suggestion
            continue
        if not compare(candidate, align_keys(checkpoint.state_dict, candidate.state_dict())):
            return f"They fit model={name}."
    return "Choose the model= that built them (e.g. resnet18, preact_resnet18, wrn16_1 or timm:<name>)."


def load_into(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    """Copy ``sd`` (already aligned and compared) into ``model``."""
    result = model.load_state_dict(dict(sd), strict=False)
    left = compare(model, sd)
    if left or result.unexpected_keys:  # pragma: no cover - compare() is checked before
        raise ConfigError(f"attack.path: the weights do not load: {left.describe()}")


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
