"""The execution settings of the run in progress: its one device, its run directory, the loader workers, the
training logger, the inference precision and the artifact cache folder (for caches that never change results).

The pipeline resolves them once per run (:func:`backdoorbench.trainer.lit.runtime_for`) and sets them for the
duration of the run with :func:`run_scope`. The training toolkit (every ``fit_module``: victim training,
attack and defense stages) and the modality interface (``Classifier.iter_batches``) read them with
:func:`current`, so that no attack or defense has to thread them through its own configs. Outside a run (the
library used directly, unit tests) :func:`current` returns the defaults: no fixed device (each trainer resolves
its own ``accelerator``), no run directory (no training logs), single-process loaders, full precision.
``precision`` (``trainer.precision``) reaches the training loops that run outside Lightning (RAP's trigger
optimisation) through :func:`training_dtype`.

These settings never change what a run computes on a given device (except ``inference_precision``, opt-in),
which is why most of them stay out of the attack cache key (``TrainConfig.cache_fields``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "INFERENCE_PRECISIONS",
    "Runtime",
    "autocast",
    "current",
    "inference_dtype",
    "precision_dtype",
    "run_scope",
    "training_dtype",
]

#: ``trainer.inference_precision`` → the autocast dtype of batched inference (None: no autocast)
INFERENCE_PRECISIONS: dict[str, torch.dtype | None] = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    """Execution settings of one run (see the module docstring)."""

    device: torch.device | None = None  # the run's device; None outside a run
    run_dir: Path | None = None  # training logs go to <run_dir>/logs/<stage>/ (None: no logs)
    logger: str = "csv"  # csv | tensorboard | wandb | mlflow | none
    num_workers: int = 0  # loader worker processes of the loaders that allow them
    pin_memory: bool = False
    inference_precision: str = "32"  # 32 | bf16 | 16: autocast of Classifier.iter_batches
    precision: str = "32-true"  # trainer.precision: Lightning's, and the autocast of training loops outside it
    cache_dir: Path | None = None  # the run's artifact cache (ONION keeps its suspicions there); None: off

    def __post_init__(self) -> None:
        if self.inference_precision not in INFERENCE_PRECISIONS:
            allowed = ", ".join(INFERENCE_PRECISIONS)
            raise ValueError(f"inference_precision must be one of {allowed}, got {self.inference_precision!r}")


_DEFAULT = Runtime()
_CURRENT: ContextVar[Runtime | None] = ContextVar("backdoorbench_runtime", default=None)


def current() -> Runtime:
    """The settings of the run in progress (the defaults outside a run)."""
    return _CURRENT.get() or _DEFAULT


def inference_dtype() -> torch.dtype | None:
    """The autocast dtype for batched inference in this run, or None (full precision)."""
    return INFERENCE_PRECISIONS[current().inference_precision]


def precision_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a ``trainer.precision`` (Lightning's names): float16 for ``16*``, bfloat16 for
    ``bf16*``, None (no autocast) for ``32*`` / ``64*``."""
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return None


def training_dtype() -> torch.dtype | None:
    """The autocast dtype of training loops that run outside Lightning in this run (``trainer.precision``), or
    None (full precision). The weights stay as they are: a ``*-true`` precision runs these loops mixed."""
    return precision_dtype(current().precision)


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[object]:
    """``torch.autocast`` on ``device``'s type with ``dtype``, or a no-op context for None."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


@contextmanager
def run_scope(runtime: Runtime) -> Iterator[Runtime]:
    """Make ``runtime`` the current settings inside the ``with`` block (restored afterwards, also on errors)."""
    token = _CURRENT.set(runtime)
    try:
        yield runtime
    finally:
        _CURRENT.reset(token)
