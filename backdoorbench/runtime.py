"""The execution settings of the run in progress: its one device, its training and inference precision, its run
directory, the loader workers, the training logger and the artifact cache folder (for caches that never change
results), and the record of the device and precision each stage actually ran in.

The pipeline resolves them once per run (:func:`backdoorbench.trainer.lit.runtime_for`) and sets them for the
duration of the run with :func:`run_scope`. The training toolkit (every ``fit_module``: victim training,
attack and defense stages), the modality interface (``Classifier.iter_batches``) and the hand-written loops
(label-consistent PGD, Trojan's trigger search: :func:`train_autocast`) read them with :func:`current`, so that
no attack or defense has to thread them through its own configs. Outside a run (the library used directly, unit
tests) :func:`current` returns the defaults: no fixed device (each trainer resolves its own ``accelerator``),
no fixed precision (each stage's own ``TrainConfig.precision``), no run directory (no training logs),
single-process loaders, full-precision inference, nothing recorded.

Apart from the precisions, these settings never change what a run computes on a given device, which is why
most of them stay out of the attack cache key (``TrainConfig.cache_fields``; the precisions are in it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "INFERENCE_PRECISIONS", "TRAIN_AUTOCAST", "Runtime", "autocast", "current", "inference_dtype", "inference_probe",
    "intra_op_threads",
    "record_stage", "run_scope", "stage_probe", "train_autocast", "train_dtype",
]

#: ``trainer.inference_precision`` → the autocast dtype of batched inference (None: no autocast)
INFERENCE_PRECISIONS: dict[str, torch.dtype | None] = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}
#: ``trainer.precision`` (Lightning's names) → the autocast dtype of hand-written training loops (PGD, trigger
#: search) that Lightning does not run: the mixed precisions' dtype; the ``*-true`` ones, which Lightning applies
#: by casting the weights, as autocast to the same dtype there; 32 / 64: none
TRAIN_AUTOCAST: dict[str, torch.dtype | None] = {
    "32-true": None, "32": None, "64-true": None, "64": None,
    "16-mixed": torch.float16, "16": torch.float16, "16-true": torch.float16,
    "bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16, "bf16-true": torch.bfloat16,
}


@dataclass(frozen=True)
class Runtime:
    """Execution settings of one run (see the module docstring)."""

    device: torch.device | None = None  # the run's device; None outside a run
    run_dir: Path | None = None  # training logs go to <run_dir>/logs/<stage>/ (None: no logs)
    logger: str = "csv"  # csv | tensorboard | wandb | mlflow | none
    num_workers: int = 0  # loader worker processes of the loaders that allow them (trainer.num_workers resolved)
    pin_memory: bool = False  # page-locked batches (trainer.pin_memory resolved: CUDA only)
    inference_precision: str = "32"  # 32 | bf16 | 16: autocast of Classifier.iter_batches
    cache_dir: Path | None = None  # the run's artifact cache (ONION keeps its suspicions there); None: off
    precision: str | None = None  # trainer.precision of every training stage; None: each stage's own
    deterministic: bool | None = None  # trainer.deterministic of every training stage; None: each stage's own
    #: what each stage ran in, filled while the run goes (results.json's ``stages``); see :func:`record_stage`
    stages: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.inference_precision not in INFERENCE_PRECISIONS:
            allowed = ", ".join(INFERENCE_PRECISIONS)
            raise ValueError(f"inference_precision must be one of {allowed}, got {self.inference_precision!r}")
        if self.precision is not None and self.precision not in TRAIN_AUTOCAST:
            raise ValueError(f"precision must be one of {', '.join(TRAIN_AUTOCAST)}, got {self.precision!r}")


_DEFAULT = Runtime()
_CURRENT: ContextVar[Runtime | None] = ContextVar("backdoorbench_runtime", default=None)


def current() -> Runtime:
    """The settings of the run in progress (the defaults outside a run)."""
    return _CURRENT.get() or _DEFAULT


def inference_dtype() -> torch.dtype | None:
    """The autocast dtype for batched inference in this run, or None (full precision)."""
    return INFERENCE_PRECISIONS[current().inference_precision]


def train_dtype(device: torch.device | str | None = None) -> torch.dtype | None:
    """The autocast dtype of the run's ``trainer.precision`` for hand-written loops on ``device``
    (:data:`TRAIN_AUTOCAST`); None at 32/64 bits and outside a run. ``16-mixed`` on a CPU is bf16, as Lightning
    makes it (CPU autocast has no fp16 AMP)."""
    precision = current().precision
    dtype = TRAIN_AUTOCAST.get(precision) if precision is not None else None
    if dtype == torch.float16 and precision in ("16-mixed", "16") and device is not None \
            and torch.device(device).type == "cpu":
        return torch.bfloat16
    return dtype


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` on ``device``'s type with ``dtype``, or a no-op context for None (e.g. ONION's LM under
    :func:`inference_dtype`, RAP's optimisation under :func:`train_dtype`)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def train_autocast(device: torch.device | str) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` on ``device`` with the dtype of the run's ``trainer.precision`` (:func:`train_dtype`),
    for training loops written by hand (Lightning applies the precision to the others); a no-op at 32/64 bits
    and outside a run."""
    return autocast(device, train_dtype(device))


def inference_probe(name: str, module: torch.nn.Module) -> contextlib.AbstractContextManager[dict[str, Any]]:
    """:func:`stage_probe` of an inference stage (evaluation, a detector's fit or scoring) of ``module``, at the
    run's ``trainer.inference_precision``."""
    return stage_probe(name, module, current().inference_precision, kind="inference")


def record_stage(name: str, info: dict[str, Any]) -> str:
    """Record what stage ``name`` ran in (``device``, ``precision``, ...) for the run's results (``-2``, ``-3``
    ... when a name repeats); the name used. Outside a run nothing is recorded."""
    rt = _CURRENT.get()
    if rt is None:
        return name
    key, i = name, 1
    while key in rt.stages:
        i += 1
        key = f"{name}-{i}"
    rt.stages[key] = info
    return key


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


@contextmanager
def stage_probe(
    name: str, module: torch.nn.Module, precision: str | None = None, device: Any = None, kind: str = "training"
) -> Iterator[dict[str, Any]]:
    """Measure, on the first forward call of a leaf module of ``module`` inside the block, what stage ``name``
    really ran in: the input's device, the weights' dtype and the autocast dtype active there (None: none);
    ``precision`` is the setting asked for (``kind``: ``training`` or ``inference``). Recorded with
    :func:`record_stage` when the block ends (the dict is yielded; it fills in on the first call), with
    ``measured: false`` and the given ``device`` when nothing ran (a stage loaded from its finished checkpoint).
    Hooks are removed after the first call: no cost afterwards."""
    info: dict[str, Any] = {"kind": kind, "device": None, "precision": precision, "autocast": None, "param_dtype": None,
                            "measured": False}
    handles: list[Any] = []

    def hook(mod: torch.nn.Module, args: tuple[Any, ...]) -> None:
        x = next((a for a in args if isinstance(a, torch.Tensor)), None)
        param = next(mod.parameters(recurse=False), None)
        if x is None or param is None:
            return
        dev = x.device
        info["device"], info["measured"] = str(dev), True
        info["param_dtype"] = _dtype_name(param.dtype)
        if torch.is_autocast_enabled(dev.type):
            info["autocast"] = _dtype_name(torch.get_autocast_dtype(dev.type))
        for h in handles:
            h.remove()
        handles.clear()

    for m in module.modules():
        if next(m.children(), None) is None and next(m.parameters(recurse=False), None) is not None:
            handles.append(m.register_forward_pre_hook(hook))
    try:
        yield info
    finally:
        for h in handles:
            h.remove()
        if info["device"] is None and device is not None:
            info["device"] = str(device)
        if info["device"] is not None:
            record_stage(name, info)


@contextmanager
def run_scope(runtime: Runtime) -> Iterator[Runtime]:
    """Make ``runtime`` the current settings inside the ``with`` block (restored afterwards, also on errors)."""
    token = _CURRENT.set(runtime)
    try:
        yield runtime
    finally:
        _CURRENT.reset(token)


@contextmanager
def intra_op_threads(threads: int | None) -> Iterator[int]:
    """Run the ``with`` block with ``threads`` torch intra-op threads (None: the count in force), restored
    afterwards, also on errors. Yields the count in force inside. CPU convolution and normalisation backward
    sum in an order that depends on this count, so a training stage pinned to one count computes the same
    weights on any machine (docs/reproducibility.md)."""
    before = torch.get_num_threads()
    if threads is not None and threads != before:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
