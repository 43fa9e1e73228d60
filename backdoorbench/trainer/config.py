"""``trainer.*``: :class:`TrainConfig` (a training stage's schedule and the run's execution settings), the
accelerator checks, :func:`resolve_device` (the one device of a run) and :func:`runtime_for` (the run's
execution settings, :class:`~backdoorbench.runtime.Runtime`). Re-exported by :mod:`backdoorbench.trainer.lit`."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from backdoorbench.runtime import INFERENCE_PRECISIONS, Runtime
from backdoorbench.trainer.logs import logger_problem
from backdoorbench.trainer.schedule import SCHEDULERS

PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", "32", "16", "bf16", "64")
#: the most loader workers ``num_workers=auto`` starts on a GPU
AUTO_WORKERS_MAX = 8
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def accelerator_problem(accelerator: str) -> str | None:
    """Why ``accelerator`` cannot run on this machine, or ``None`` when it can."""
    if accelerator not in ACCELERATORS:
        return f"accelerator must be one of {', '.join(ACCELERATORS)}, got {accelerator!r}"
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        return f"accelerator={accelerator}: no GPU visible (torch.cuda.is_available() is False); use cpu or auto"
    if accelerator == "mps" and not torch.backends.mps.is_available():
        return "accelerator=mps: no Apple MPS device visible; use accelerator=cpu or auto"
    return None


def resolve_device(cfg: TrainConfig | str) -> torch.device:
    """The one device of a run: ``auto`` = CUDA if available, else Apple MPS, else the CPU (Lightning's own
    choice for ``accelerator=auto``); ``gpu``/``cuda`` = the first of ``trainer.devices`` when it lists GPU
    indices, else ``cuda:0``. Raises ``ValueError`` when the accelerator is not on this machine."""
    accelerator = cfg if isinstance(cfg, str) else cfg.accelerator
    devices = 1 if isinstance(cfg, str) else cfg.devices
    problem = accelerator_problem(accelerator)
    if problem:
        raise ValueError(f"trainer: {problem}")
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if accelerator in ("gpu", "cuda"):
        first = devices[0] if isinstance(devices, (list, tuple)) and devices else 0
        return torch.device("cuda", int(first))
    return torch.device(accelerator)


#: ``TrainConfig`` fields that never change what is trained (loader processes, logging): never in the cache key
NEVER_HASHED = ("num_workers", "pin_memory", "logger")
#: fields added after the cache key existed: in the key only when they differ from their default, so that
#: every key of a config that does not use them stays what it was
HASHED_WHEN_SET = ("devices", "strategy", "scheduler", "milestones", "gamma", "inference_precision")


@dataclass
class TrainConfig:
    """Optimisation settings of one training stage (``trainer.*`` for the victim's fine-tuning), and the
    run's execution settings (device, loaders, logger, inference precision; see docs/quickstart.md)."""

    max_epochs: int = 3
    max_steps: int = -1
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    optimizer: str = "adamw"  # adamw | sgd
    momentum: float = 0.9  # sgd only
    accelerator: str = "auto"  # auto | cpu | gpu (| cuda | mps)
    precision: str = "32-true"
    grad_clip: float = 1.0
    deterministic: bool = True
    devices: Any = 1  # Lightning's: a count, a list of GPU indices, or "auto"; >1 only with a ddp strategy
    strategy: str = "auto"  # Lightning's: auto | ddp | ddp_spawn | fsdp | deepspeed ...
    scheduler: str = "linear"  # linear | cosine | multistep (all with warmup_ratio warm-up)
    milestones: list[int] = field(default_factory=list)  # multistep: epochs at which lr *= gamma
    gamma: float = 0.1  # multistep
    num_workers: Any = "auto"  # loader worker processes (0: in the main process); auto: see resolve_loading
    pin_memory: Any = "auto"  # page-locked batches for asynchronous copies to a GPU; auto: on CUDA only
    logger: str = "csv"  # csv | tensorboard | wandb | mlflow | none: per-epoch rows in <run dir>/logs/<stage>/
    inference_precision: str = "32"  # 32 | bf16 | 16: autocast of batched inference (opt-in)

    def __post_init__(self) -> None:
        devices_ok = (
            self.devices == "auto"
            or (isinstance(self.devices, int) and not isinstance(self.devices, bool) and self.devices >= 1)
            or (isinstance(self.devices, (list, tuple)) and len(self.devices) > 0
                and all(isinstance(d, int) and d >= 0 for d in self.devices))
        )
        checks = [
            (self.max_epochs >= 1, "max_epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (self.optimizer in ("adamw", "sgd"), "optimizer must be adamw or sgd"),
            (self.grad_clip >= 0, "grad_clip must be >= 0 (0 disables clipping)"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"),
            (devices_ok, f"devices must be a count >= 1, a list of GPU indices or auto, got {self.devices!r}"),
            (self.scheduler in SCHEDULERS, f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}"),
            (all(m >= 1 for m in self.milestones), "milestones must be epochs >= 1"),
            (self.gamma > 0, "gamma must be > 0"),
            (self.num_workers == "auto" or (isinstance(self.num_workers, int) and not isinstance(self.num_workers, bool)
                                            and self.num_workers >= 0),
             f"num_workers must be an integer >= 0 or auto, got {self.num_workers!r}"),
            (self.pin_memory == "auto" or isinstance(self.pin_memory, bool),
             f"pin_memory must be true, false or auto, got {self.pin_memory!r}"),
            (self.inference_precision in INFERENCE_PRECISIONS,
             f"inference_precision must be one of {', '.join(INFERENCE_PRECISIONS)}, got {self.inference_precision!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"trainer: {msg}")
        for problem in (accelerator_problem(self.accelerator), logger_problem(self.logger)):
            if problem:
                raise ValueError(f"trainer: {problem}")

    def cache_fields(self) -> dict[str, Any]:
        """The fields that make up the attack cache key: every field but :data:`NEVER_HASHED`, and the fields of
        :data:`HASHED_WHEN_SET` only when they differ from their defaults (so older keys stay valid)."""
        defaults = {f.name: f.default_factory() if callable(f.default_factory) else f.default
                    for f in fields(self)}
        out = asdict(self)
        for name in NEVER_HASHED:
            out.pop(name)
        for name in HASHED_WHEN_SET:
            if out[name] == defaults[name]:
                out.pop(name)
        return out


def cpu_count() -> int:
    """The CPU cores this process may use (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def resolve_loading(cfg: TrainConfig, device: torch.device) -> tuple[int, bool]:
    """``(num_workers, pin_memory)`` for training on ``device``: the configured values, and for ``auto``
    ``min(8, usable CPU cores - 1)`` workers (at least 1) and pinned memory on CUDA, where the workers decode and
    gather the next batches while the GPU computes and pinned batches copy asynchronously; 0 workers and no
    pinning elsewhere, where the main process computing the step is the only consumer and both only cost."""
    cuda = device.type == "cuda"
    workers = cfg.num_workers
    if workers == "auto":
        workers = max(1, min(AUTO_WORKERS_MAX, cpu_count() - 1)) if cuda else 0
    pin = cfg.pin_memory
    if pin == "auto":
        pin = cuda
    return int(workers), bool(pin) and cuda


def runtime_for(
    cfg: TrainConfig, run_dir: Path | None = None, device: torch.device | None = None,
    cache_dir: str | Path | None = None, threads: int | None = None,
) -> Runtime:
    """The context of a run whose victim trains with ``cfg`` (set by the pipeline with
    :func:`backdoorbench.runtime.run_scope`): its device (``device`` when already resolved), ``cfg.precision``
    and ``cfg.deterministic`` for every training stage, ``cfg.inference_precision``, the loaders
    (:func:`resolve_loading`); ``cache_dir``: the artifact cache folder when the cache is on (the context holds
    its :class:`~backdoorbench.store.ArtifactStore`); ``threads``: the run's intra-op thread count."""
    device = device if device is not None else resolve_device(cfg)
    workers, pin = resolve_loading(cfg, device)
    return Runtime(
        device=device,
        run_dir=Path(run_dir) if run_dir is not None else None,
        logger=cfg.logger,
        num_workers=workers,
        pin_memory=pin,
        inference_precision=cfg.inference_precision,
        cache_dir=Path(cache_dir) if cache_dir is not None else None,
        precision=cfg.precision,
        deterministic=cfg.deterministic,
        threads=threads,
    )
