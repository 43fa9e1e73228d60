"""What a stage actually ran on, measured rather than echoed from the config (``benchmarks/gpu_smoke.py``).

:class:`DeviceTracker` collects, per named stage (``with tracker.stage("attack"): ...``; stages nest and every
measurement goes to the innermost open stage):

- **parameters** and **inputs**: the device and dtype of each module's own parameters and of its first tensor
  input, at every ``nn.Module`` forward (a global forward pre-hook), counted per module call;
- **ops**: the device of the first tensor argument of every torch function call (a ``TorchFunctionMode`` on the
  tracking thread), which also sees tensor code outside modules (a detector's statistics, a perturbation);
- **model calls** and **compute time**: the number of outermost module forwards (a module called while no other
  is running: a model's forward on a batch) and the process CPU time spent in them and in autograd
  (``torch.autograd.backward`` / ``grad`` outside a forward), i.e. the stage's model arithmetic on the CPU; the
  rest of its time is Python-side work (set-up, data, metrics). Meaningful on the CPU only (on CUDA it is
  launch time);
- **peak GPU memory**: ``torch.cuda.max_memory_allocated``, reset when a stage opens or closes;
- **GPU busy share**: a helper thread polls the default CUDA stream of the GPU that work was last seen on about
  every millisecond (``Stream.query()`` is ``False`` while kernels are queued or running) and counts busy samples
  per stage.
  The *CPU share* of a stage is the rest: the part of its wall time in which the GPU had nothing to do. On a
  run without CUDA it is 1. (Process CPU time is no measure of this on CUDA: a synchronising host thread
  spin-waits and counts as busy; torch.profiler allows one session per process and is heavy.)

:func:`track_devices` is the one-stage form: ``with track_devices(model) as rec: model(x)``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


@dataclass
class StageRecord:
    """What one stage used; repeated stages of the same path add up."""

    name: str
    seconds: float = 0.0  # wall time, excluding nested stages
    params: Counter = field(default_factory=Counter)  # "cuda:0 float32" -> module calls
    inputs: Counter = field(default_factory=Counter)  # "cuda:0 uint8" -> module calls
    ops: Counter = field(default_factory=Counter)  # "cuda:0" -> torch calls
    peak_gpu_mib: float = 0.0
    gpu_samples: int = 0
    gpu_busy_samples: int = 0
    calls: int = 0  # outermost module forwards
    compute_cpu_s: float = 0.0  # process CPU seconds in outermost forwards and autograd calls

    @property
    def gpu_busy(self) -> float | None:
        """Share of the stage's samples in which the GPU was busy (``None``: no samples, no CUDA)."""
        return self.gpu_busy_samples / self.gpu_samples if self.gpu_samples else None

    @property
    def cpu_share(self) -> float:
        """Share of the wall time with the GPU idle (1 without CUDA)."""
        busy = self.gpu_busy
        return 1.0 if busy is None else 1.0 - busy

    def devices(self) -> set[str]:
        """Every device this stage's parameters, inputs or ops were on."""
        return {k.split(" ")[0] for c in (self.params, self.inputs, self.ops) for k in c}

    def summary(self) -> dict[str, Any]:
        return {
            "stage": self.name,
            "seconds": round(self.seconds, 3),
            "params": share(self.params),
            "inputs": share(self.inputs),
            "ops": share(self.ops),
            "peak_gpu_mib": round(self.peak_gpu_mib, 1),
            "gpu_busy": None if self.gpu_busy is None else round(self.gpu_busy, 3),
            "cpu_share": round(self.cpu_share, 3),
            "calls": self.calls,
            "compute_cpu_s": round(self.compute_cpu_s, 3),
        }


def share(counts: Counter) -> str:
    """``"cuda:0 float32"`` when one key has every count, else each key with its share: ``"cpu 90%, cuda:0 10%"``;
    ``"-"`` when empty."""
    total = sum(counts.values())
    if not total:
        return "-"
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in counts.most_common())


def _first_tensor(args: Any) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, torch.Tensor):
                    return b
    return None


class _OpCounter(TorchFunctionMode):
    def __init__(self, tracker: DeviceTracker) -> None:
        super().__init__()
        self.tracker = tracker

    def __torch_function__(self, func, types, args=(), kwargs=None):
        t = _first_tensor(args)
        if t is not None and getattr(func, "__name__", "") != "__get__":  # attribute reads are no work
            self.tracker._seen(t.device, self.tracker._current().ops, str(t.device))
        return func(*args, **(kwargs or {}))


class DeviceTracker:
    """Per-stage devices, peak GPU memory and GPU-busy share (see the module docstring). Use as a context
    manager (installs the hooks, the op counter and the GPU sampler; removes them on exit) and open stages with
    :meth:`stage`. ``model``: hook only this module tree instead of every module; ``ops``: count torch calls
    too (a Python call per torch call: slower); ``interval``: seconds between GPU samples."""

    def __init__(self, model: nn.Module | None = None, ops: bool = True, interval: float = 0.001) -> None:
        self.model, self.count_ops, self.interval = model, ops, interval
        self.records: dict[str, StageRecord] = {}
        self._stack: list[tuple[StageRecord, float]] = [(StageRecord("(outside stages)"), time.perf_counter())]
        self._handles: list[Any] = []
        self._mode: _OpCounter | None = None
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        self._cuda: torch.device | None = None
        self._depth = 0  # module forwards (and autograd calls) now running
        self._t_outer = 0.0
        self._autograd: tuple[Any, Any] | None = None

    # -- recording ---------------------------------------------------------------------------------------
    def _current(self) -> StageRecord:
        return self._stack[-1][0]

    def _seen(self, device: torch.device, counter: Counter, key: str) -> None:
        counter[key] += 1
        if device.type == "cuda":  # the GPU whose stream the sampler polls: the last one work was seen on
            self._cuda = device

    def _outer_enter(self) -> None:
        if self._depth == 0:
            self._t_outer = time.process_time()
        self._depth += 1

    def _outer_exit(self, call: bool) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth == 0:
            rec = self._current()
            rec.compute_cpu_s += time.process_time() - self._t_outer
            rec.calls += call

    def _forward_post(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._outer_exit(True)

    def _timed_autograd(self, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._outer_enter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._outer_exit(False)

        return timed

    def _forward_pre(self, module: nn.Module, args: tuple) -> None:
        if self.model is None:
            self._outer_enter()
        rec = self._current()
        for p in module._parameters.values():
            if p is not None:
                self._seen(p.device, rec.params, f"{p.device} {str(p.dtype).replace('torch.', '')}")
                break
        t = _first_tensor(args)
        if t is not None:
            self._seen(t.device, rec.inputs, f"{t.device} {str(t.dtype).replace('torch.', '')}")

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            rec = self._current()
            busy = False
            if self._cuda is not None:  # never initialises CUDA itself: before any CUDA work the GPU is idle
                try:  # the main thread's stream is the device's default stream (no stream contexts here)
                    busy = not torch.cuda.default_stream(self._cuda).query()
                except RuntimeError:
                    busy = False
            rec.gpu_samples += 1
            rec.gpu_busy_samples += busy

    def _memory_mark(self, rec: StageRecord) -> None:
        if torch.cuda.is_initialized():
            rec.peak_gpu_mib = max(rec.peak_gpu_mib, torch.cuda.max_memory_allocated() / 2**20)
            torch.cuda.reset_peak_memory_stats()

    def _switch(self) -> None:
        """Close the current segment of the innermost stage (its time and peak memory so far)."""
        rec, t0 = self._stack[-1]
        now = time.perf_counter()
        rec.seconds += now - t0
        self._memory_mark(rec)
        self._stack[-1] = (rec, now)

    @contextmanager
    def stage(self, name: str) -> Iterator[StageRecord]:
        """Open stage ``name`` (nested in the open one) for the ``with`` block. Its record is keyed by its path:
        ``"attack/fit: victim"`` for a stage ``fit: victim`` opened inside ``attack``."""
        self._switch()
        path = name if len(self._stack) == 1 else f"{self._stack[-1][0].name}/{name}"
        rec = self.records.setdefault(path, StageRecord(path))
        self._stack.append((rec, time.perf_counter()))
        try:
            yield rec
        finally:
            self._switch()
            self._stack.pop()
            self._stack[-1] = (self._stack[-1][0], time.perf_counter())

    # -- installing --------------------------------------------------------------------------------------
    def __enter__(self) -> DeviceTracker:
        self._stop.clear()
        self._stack = [(StageRecord("(outside stages)"), time.perf_counter())]
        if self.model is None:
            self._handles.append(nn.modules.module.register_module_forward_pre_hook(self._forward_pre))
            self._handles.append(nn.modules.module.register_module_forward_hook(self._forward_post, always_call=True))
            self._depth = 0
            self._autograd = (torch.autograd.backward, torch.autograd.grad)
            torch.autograd.backward = self._timed_autograd(self._autograd[0])
            torch.autograd.grad = self._timed_autograd(self._autograd[1])
        else:
            self._handles += [m.register_forward_pre_hook(self._forward_pre) for m in self.model.modules()]
        if self.count_ops:
            self._mode = _OpCounter(self)
            self._mode.__enter__()
        if torch.cuda.is_available():
            self._sampler = threading.Thread(target=self._sample, name="gpu-busy-sampler", daemon=True)
            self._sampler.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join()
        if self._mode is not None:
            self._mode.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._autograd is not None:
            torch.autograd.backward, torch.autograd.grad = self._autograd
            self._autograd = None


@contextmanager
def track_devices(model: nn.Module | None = None, ops: bool = True) -> Iterator[StageRecord]:
    """One stage: ``with track_devices(model) as rec: ...``; ``rec.params`` / ``rec.inputs`` / ``rec.ops`` /
    ``rec.peak_gpu_mib`` / ``rec.gpu_busy`` hold what the block used (``model=None``: every module)."""
    with DeviceTracker(model, ops=ops) as tracker, tracker.stage("block") as rec:
        yield rec
