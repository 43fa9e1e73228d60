"""The run's context: the one carrier of run-wide settings. Its one device, its training and inference precision,
its CPU thread count, its run directory, the loader workers, the training logger, the artifact cache
(:class:`~backdoorbench.store.ArtifactStore`) with every folder under it, the stage folders of the component now
running, and the record of the device and precision each stage actually ran in.

**Folders.** Components never assemble paths or get them set on their objects: they ask the context.
:meth:`Runtime.attack_folders` and :meth:`Runtime.defense_folders` give the context in which an attack or a
defense runs (the engine enters it with :func:`run_scope`), whose :attr:`Runtime.work_dir` (resumable stage
checkpoints) and :attr:`Runtime.shared_dir` (stages shared between components) the component reads;
:meth:`Runtime.cache_folder` names a folder under the cache (ONION's suspicions, decoded images) and
:meth:`Runtime.lm_dir` the converted language models' folder.

The pipeline resolves them once per run (:func:`backdoorbench.trainer.lit.runtime_for`) and sets them for the
duration of the run with :func:`run_scope`. The training toolkit (every ``fit_module``: victim training,
attack and defense stages), the modality interface (``Classifier.iter_batches``) and the hand-written loops
(label-consistent PGD, Trojan's trigger search: :func:`train_autocast`) read them with :func:`current`, so that
no attack or defense has to thread them through its own configs. Outside a run (the library used directly, unit
tests) :func:`current` returns the **default context** ``Runtime()``: no fixed device (each trainer resolves its
own ``accelerator``), no fixed precision (each stage's own ``TrainConfig.precision``), the thread count in
force, no run directory (no training logs, no figures), no artifact cache (no stage folders: stages start from
scratch and share nothing; DBD, which needs one, asks for ``run_scope(Runtime(run_dir=...))``), language models
converted under the default cache folder (:func:`~backdoorbench.store.default_cache_dir`), single-process
loaders, full-precision inference, nothing recorded. Set a context of your own with
``with run_scope(Runtime(cache_dir=..., run_dir=...)):`` to give a component folders.

Apart from the precisions, these settings never change what a run computes on a given device, which is why
most of them stay out of the attack cache key (``TrainConfig.cache_fields``; the precisions are in it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from backdoorbench.store import ArtifactStore, default_cache_dir

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
    cache_dir: Path | None = None  # the run's artifact cache folder (cache.dir); None: the cache is off
    precision: str | None = None  # trainer.precision of every training stage; None: each stage's own
    deterministic: bool | None = None  # trainer.deterministic of every training stage; None: each stage's own
    threads: int | None = None  # the run's torch intra-op thread count (trainer threads); None: the count in force
    #: the stage folder of the component now running: an attack's or a defense's resumable stage checkpoints
    #: (:meth:`attack_folders`, :meth:`defense_folders`); None: stages start from scratch
    work_dir: Path | None = None
    #: the folder of stages the component now running shares with others (clean models attacks start from; a
    #: victim's fine-tuning shared by repair defenses); None: share nothing
    shared_dir: Path | None = None
    #: what each stage ran in, filled while the run goes (results.json's ``stages``); see :func:`record_stage`
    stages: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False)
    #: the artifact cache at :attr:`cache_dir` (None when the cache is off): built once from ``cache_dir`` and
    #: handed on to every context derived from this one (:meth:`attack_folders`, :meth:`defense_folders`)
    store: ArtifactStore | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))
            if self.store is None or self.store.root != self.cache_dir:
                object.__setattr__(self, "store", ArtifactStore(self.cache_dir))
        elif self.store is not None:
            object.__setattr__(self, "cache_dir", self.store.root)
        if self.run_dir is not None:
            object.__setattr__(self, "run_dir", Path(self.run_dir))
        if self.inference_precision not in INFERENCE_PRECISIONS:
            allowed = ", ".join(INFERENCE_PRECISIONS)
            raise ValueError(f"inference_precision must be one of {allowed}, got {self.inference_precision!r}")
        if self.precision is not None and self.precision not in TRAIN_AUTOCAST:
            raise ValueError(f"precision must be one of {', '.join(TRAIN_AUTOCAST)}, got {self.precision!r}")

    # -- the folders: named here, nowhere else ---------------------------------------------------------------
    def cache_folder(self, *parts: str) -> Path | None:
        """``<cache>/<parts...>``: a folder of the artifact cache (ONION's suspicions ``onion/<key>``, decoded
        images ``images``); None when the cache is off."""
        return None if self.store is None else self.store.root.joinpath(*parts)

    def lm_dir(self, name: str) -> Path:
        """Where the converted language model ``name`` is kept: ``<cache>/lm/<name>``, under the default cache
        folder when the cache is off or outside a run (the conversion never changes results)."""
        root = self.store.root if self.store is not None else default_cache_dir()
        return root / "lm" / name

    def attack_folders(self, victim_key: str) -> Runtime:
        """The context the attack that builds victim ``victim_key`` runs in: its stage checkpoints in
        ``<cache>/partial-<victim key>/`` (:attr:`work_dir`), the clean models attacks share in
        ``<cache>/clean-models/`` (:attr:`shared_dir`); neither without a cache."""
        return replace(self, work_dir=self.cache_folder(f"partial-{victim_key}"),
                       shared_dir=self.cache_folder("clean-models"))

    def defense_folders(self, victim_key: str | None, stage_key: str) -> Runtime:
        """The context a training or repair defense runs in: its stage checkpoints (:attr:`work_dir`) in
        ``<cache>/defense-<stage key>/`` (``stage_key``: the victim, the defense and its config, the seed), so
        that an interrupted run resumes there, or in ``<run dir>/defense_work/`` without a cache or a victim key;
        the stages it shares with other defenses of the same victim (:attr:`shared_dir`) in
        ``<cache>/stages-<victim key>/`` (None without either)."""
        cached = self.store is not None and victim_key is not None
        work = self.cache_folder(f"defense-{stage_key}") if cached else None
        if work is None and self.run_dir is not None:
            work = self.run_dir / "defense_work"
        shared = self.cache_folder(f"stages-{victim_key}") if cached else None
        return replace(self, work_dir=work, shared_dir=shared)

    @property
    def stage_folder_locked(self) -> bool:
        """Whether :attr:`work_dir` is under the cache, where two jobs may meet (the engine locks it then)."""
        return self.store is not None and self.work_dir is not None and self.store.root in self.work_dir.parents


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
