"""What a run needs to be repeatable, and the record of how repeatable it was.

:func:`set_determinism` seeds everything and asks torch for deterministic algorithms with ``warn_only=True``:
an operation that has no deterministic implementation (none of the CPU kernels this library uses; some CUDA
kernels, e.g. ``index_add_`` or ``scatter_add_`` backward) then runs anyway and only warns.
:func:`record_nondeterminism` catches those warnings during the run (each operation printed once) and
:func:`reproducibility_record` writes them, with the thread count actually in force, into ``results.json``
(``"reproducibility"``), so that ``report`` can warn when a table mixes thread counts or nondeterministic
runs. What is guaranteed is in docs/reproducibility.md: bit-identical results for the same seed, machine
(device, library versions) and thread count; CPU convolution backward sums in an order that depends on the
thread count, so another thread count gives other (equally valid) weights.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["NONDETERMINISTIC", "record_nondeterminism", "reproducibility_record", "set_determinism"]

#: the text of torch's warning for an operation without a deterministic implementation (``warn_only=True``)
NONDETERMINISTIC = "does not have a deterministic implementation"
_OP = re.compile(r"^\s*(.*?)\s+" + NONDETERMINISTIC)


def set_determinism(seed: int, threads: int | None, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch (also loader workers), ask for deterministic algorithms (warn only) with
    cuDNN benchmark off, unless ``trainer.deterministic=false`` (then every stage of the run lets cuDNN benchmark:
    faster on a GPU, not repeatable to the bit), and set torch's intra-op thread count (``None``: leave torch's
    default, the machine's cores)."""
    import lightning as L

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    L.seed_everything(seed, workers=True, verbose=False)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic
    if threads:
        torch.set_num_threads(threads)


def _op_name(text: str) -> str:
    m = _OP.match(text)
    return m.group(1) if m else text.splitlines()[0][:200]


@contextmanager
def record_nondeterminism() -> Iterator[list[str]]:
    """Inside the ``with`` block, every warning torch gives for an operation without a deterministic
    implementation is caught, whatever the warning filters in force before (an ``always`` filter goes first;
    a filter added inside the block that ignores every ``UserWarning`` would still hide them); the list it
    yields gets each such operation once (in the order first seen), and each is shown once. Other warnings
    pass through unchanged. Filters and ``warnings.showwarning`` are restored afterwards."""
    ops: list[str] = []
    with warnings.catch_warnings():
        shown = warnings.showwarning  # the one in force (catch_warnings restores it on exit)

        def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
            if NONDETERMINISTIC in str(message):
                op = _op_name(str(message))
                if op in ops:
                    return
                ops.append(op)
            shown(message, category, filename, lineno, file, line)

        warnings.filterwarnings("always", message=f".*{NONDETERMINISTIC}")
        warnings.showwarning = show
        yield ops


def reproducibility_record(threads_configured: int | None, device: Any, ops: list[str]) -> dict[str, Any]:
    """The ``"reproducibility"`` entry of ``results.json``: the intra-op / inter-op thread counts in force
    (``torch.get_num_threads()``, not only the configured ``threads``), the device, whether deterministic
    algorithms were on, and the operations that ran without a deterministic implementation (empty:
    every operation was deterministic)."""
    return {
        "threads": torch.get_num_threads(),
        "threads_configured": threads_configured,
        "interop_threads": torch.get_num_interop_threads(),
        "device": str(device),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "nondeterministic_ops": list(ops),
        "deterministic": torch.are_deterministic_algorithms_enabled() and not ops,
    }


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``'s first ``model name``; else what :mod:`platform` knows)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment(device: Any) -> dict[str, Any]:
    """Where the work happens, as the process runs it: the thread counts in force (``torch.get_num_threads()``,
    not the configured ``threads``), the device (and the GPU's name), the CPU model, and the versions of the
    libraries the arithmetic depends on. Recorded in a cached victim's ``meta.json`` (where it was trained) and in
    every run's ``versions.json`` (where the run ran, beside its victim's); ``report`` warns when a table mixes
    them (report_groups.environment_warnings)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    env: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "device": str(device),
        "cpu": cpu_model(),
        "python": platform.python_version(),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(str(device)))
    for pkg in ("torch", "transformers", "lightning", "numpy"):
        try:
            env[pkg] = version(pkg)
        except PackageNotFoundError:
            env[pkg] = None
    return env
