"""``trainer.*``: :class:`TrainConfig` (a training stage's schedule and the run's execution settings), the
accelerator checks, :func:`resolve_device` (the one device of a run) and :func:`runtime_for` (the run's
execution settings, :class:`~backdoorbench.runtime.Runtime`). Re-exported by :mod:`backdoorbench.trainer.lit`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from backdoorbench.runtime import INFERENCE_PRECISIONS, Runtime
from backdoorbench.trainer.logs import logger_problem
from backdoorbench.trainer.schedule import SCHEDULERS

PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", "32", "16", "bf16", "64")
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
    num_workers: int = 0  # loader worker processes (0: in the main process)
    pin_memory: bool = False
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
            (self.num_workers >= 0, "num_workers must be >= 0"),
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
        defaults = {f.name: f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
                    for f in fields(self)}
        out = asdict(self)
        for name in NEVER_HASHED:
            out.pop(name)
        for name in HASHED_WHEN_SET:
            if out[name] == defaults[name]:
                out.pop(name)
        return out


def runtime_for(
    cfg: TrainConfig, run_dir: Path | None = None, device: torch.device | None = None, cache_dir: Path | None = None
) -> Runtime:
    """The execution settings of a run whose victim trains with ``cfg`` (set by the pipeline with
    :func:`backdoorbench.runtime.run_scope`); ``device``: the run's device when already resolved;
    ``cache_dir``: the artifact cache folder when the cache is on."""
    return Runtime(
        device=device if device is not None else resolve_device(cfg),
        run_dir=Path(run_dir) if run_dir is not None else None,
        logger=cfg.logger,
        num_workers=cfg.num_workers,
        pin_memory=cfg.pin_memory,
        inference_precision=cfg.inference_precision,
        precision=cfg.precision,
        cache_dir=Path(cache_dir) if cache_dir is not None else None,
    )
