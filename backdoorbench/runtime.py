"""The execution settings of the run in progress: its one device, its run directory, the loader workers, the
training logger, the inference precision and the artifact cache folder (for caches that never change results).

The pipeline resolves them once per run (:func:`backdoorbench.trainer.lit.runtime_for`) and sets them for the
duration of the run with :func:`run_scope`. The training toolkit (every ``fit_module``: victim training,
attack and defense stages) and the modality interface (``Classifier.iter_batches``) read them with
:func:`current`, so that no attack or defense has to thread them through its own configs. Outside a run (the
library used directly, unit tests) :func:`current` returns the defaults: no fixed device (each trainer resolves
its own ``accelerator``), no run directory (no training logs), single-process loaders, full precision.

These settings never change what a run computes on a given device (except ``inference_precision``, opt-in),
which is why most of them stay out of the attack cache key (``TrainConfig.cache_fields``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["INFERENCE_PRECISIONS", "Runtime", "current", "inference_dtype", "intra_op_threads", "run_scope"]

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
