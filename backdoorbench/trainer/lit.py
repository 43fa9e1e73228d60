"""The training plumbing every stage goes through: :func:`seeded_loader` (the one loader builder),
:func:`make_optimizer` (the one optimiser builder), :func:`make_trainer` (the one Trainer recipe) and
:func:`fit_module` (the one entry point that runs a Lightning module, resuming from a per-epoch safetensors
checkpoint when given one); :func:`fit` trains a :class:`Classifier` with cross-entropy through it."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from backdoorbench.data.base import Samples
from backdoorbench.modality.base import Classifier
from backdoorbench.progress import progress_enabled

log = logging.getLogger(__name__)


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


@dataclass
class TrainConfig:
    """Optimisation settings of one training stage (``trainer.*`` for the victim's fine-tuning)."""

    max_epochs: int = 3
    max_steps: int = -1
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    optimizer: str = "adamw"  # adamw | sgd
    momentum: float = 0.9  # sgd only
    accelerator: str = "auto"
    precision: str = "32-true"
    grad_clip: float = 1.0
    deterministic: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.max_epochs >= 1, "max_epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (self.optimizer in ("adamw", "sgd"), "optimizer must be adamw or sgd"),
            (self.grad_clip >= 0, "grad_clip must be >= 0 (0 disables clipping)"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"trainer: {msg}")
        problem = accelerator_problem(self.accelerator)
        if problem:
            raise ValueError(f"trainer: {problem}")


class SamplesDataset(Dataset):
    """Index-preserving torch view of :class:`Samples` (returns ``(input, label, index)``)."""

    def __init__(self, samples: Samples) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int, int]:
        return self.samples.inputs[i], int(self.samples.labels[i]), i


def seeded_loader(
    dataset: Any,
    batch_size: int,
    collate_fn: Callable[[list[Any]], Any],
    seed: int,
    shuffle: bool = True,
    drop_last: bool = False,
    num_samples: int | None = None,
) -> DataLoader:
    """The one loader builder: batches of ``dataset`` in an order drawn from ``seed`` alone (single process).

    ``num_samples``: that many draws without replacement (passes over the data concatenated), for epochs of a
    fixed length; then the sampler owns the generator. The generators live on the loader (``generator`` or
    ``sampler.generator``), where :class:`~backdoorbench.trainer.checkpoint.ResumableCheckpoint` saves and
    restores them."""
    from torch.utils.data import RandomSampler

    gen = torch.Generator().manual_seed(seed)
    if num_samples is not None:
        sampler = RandomSampler(dataset, num_samples=num_samples, generator=gen)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn, drop_last=drop_last)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=collate_fn,
        generator=gen,
        drop_last=drop_last,
        num_workers=0,
    )


def make_optimizer(
    params: Any, name: str, lr: float, weight_decay: float = 0.0, momentum: float = 0.9, nesterov: bool = False
) -> torch.optim.Optimizer:
    """The one optimiser builder: ``sgd`` (with momentum, optionally Nesterov) or ``adamw``."""
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov and momentum > 0
        )
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be sgd or adamw, got {name!r}")


def make_loader(model: Classifier, samples: Samples, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """Batches ``{"inputs": model.collate(...), "labels", "index"}`` of ``samples``."""

    def collate(items: list[tuple[Any, int, int]]) -> dict[str, Any]:
        inputs = [it[0] for it in items]
        if isinstance(samples.inputs, torch.Tensor):
            inputs = torch.stack(inputs)  # type: ignore[assignment]
        return {
            "inputs": model.collate(inputs),
            "labels": torch.tensor([it[1] for it in items], dtype=torch.long),
            "index": torch.tensor([it[2] for it in items], dtype=torch.long),
        }

    return seeded_loader(SamplesDataset(samples), batch_size, collate, seed, shuffle=shuffle)


class ClassifierModule(L.LightningModule):
    """Cross-entropy training of a :class:`Classifier` with AdamW (or SGD) and linear warm-up/decay."""

    def __init__(self, model: Classifier, cfg: TrainConfig, params: list[torch.nn.Parameter] | None = None) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self._params = params

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        inputs = self.model.augment(batch["inputs"]) if self.training else batch["inputs"]
        return F.cross_entropy(self.model(inputs), batch["labels"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def configure_optimizers(self) -> Any:
        from transformers import get_linear_schedule_with_warmup

        params = self._params if self._params is not None else [p for p in self.model.parameters() if p.requires_grad]
        opt = make_optimizer(params, self.cfg.optimizer, self.cfg.lr, self.cfg.weight_decay, self.cfg.momentum)
        total = int(self.trainer.estimated_stepping_batches)
        sched = get_linear_schedule_with_warmup(opt, int(self.cfg.warmup_ratio * total), max(total, 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


class EpochLog(L.Callback):
    """One INFO line per finished epoch: stage, epoch i/n, mean training loss, elapsed time and ETA.

    ``make_trainer`` adds it when progress bars are off (output redirected, ``BACKDOORBENCH_PROGRESS=0``), so
    that a long stage in a cluster job's log still shows it is alive and how long it will take.
    """

    def __init__(self, desc: str = "train") -> None:
        self.desc = desc or "train"
        self.t0 = 0.0
        self.loss_sum = 0.0
        self.loss_n = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.t0 = time.perf_counter()
        self.start_epoch = trainer.current_epoch  # a resumed stage counts its ETA from where it resumed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.loss_sum, self.loss_n = 0.0, 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self.loss_sum += float(loss.detach())
            self.loss_n += 1

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        done, total = trainer.current_epoch + 1, trainer.max_epochs or 0
        if trainer.max_steps and trainer.max_steps > 0:  # max_steps may end training before max_epochs
            per_epoch = max(trainer.global_step // max(done, 1), 1)
            total = min(total or done, -(-trainer.max_steps // per_epoch))
        elapsed = time.perf_counter() - self.t0
        ran = done - self.start_epoch
        eta = elapsed / max(ran, 1) * max(total - done, 0)
        loss = f"train loss {self.loss_sum / self.loss_n:.4f}" if self.loss_n else "train loss n/a"
        log.info("%s: epoch %d/%d, %s, %s elapsed, ETA %s", self.desc, done, total, loss, _duration(elapsed),
                 _duration(eta))


def make_trainer(cfg: TrainConfig, desc: str = "", callbacks: list[Any] | None = None) -> L.Trainer:
    """The one Trainer recipe (no logger, quiet, deterministic by config); ``callbacks`` (e.g. a
    :class:`~backdoorbench.trainer.checkpoint.ResumableCheckpoint` for stages that resume) switch Lightning's
    checkpointing on. Checkpoints are written and read as safetensors + JSON
    (:class:`~backdoorbench.trainer.checkpoint.SafetensorsCheckpointIO`), never pickled, so
    ``fit(ckpt_path=...)`` cannot run code from a checkpoint file. Without progress bars an :class:`EpochLog`
    logs one line per epoch."""
    from lightning.pytorch.callbacks import Checkpoint

    from backdoorbench.trainer.checkpoint import SafetensorsCheckpointIO

    callbacks = list(callbacks or [])
    if not progress_enabled():
        callbacks.append(EpochLog(desc))

    for pattern in (
        ".*does not have many workers.*",
        ".*GPU available but not used.*",
        ".*Trying to infer the `batch_size`.*",
        ".*LeafSpec.*",
        ".*checkpoint.*exists and is not empty.*",
    ):
        warnings.filterwarnings("ignore", pattern)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch.accelerators.cuda").setLevel(logging.WARNING)
    return L.Trainer(
        max_epochs=cfg.max_epochs,
        max_steps=cfg.max_steps,
        accelerator=cfg.accelerator,
        devices=1,
        precision=cfg.precision,  # type: ignore[arg-type]
        gradient_clip_val=cfg.grad_clip or None,
        deterministic="warn" if cfg.deterministic else False,
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=any(isinstance(c, Checkpoint) for c in callbacks),
        plugins=[SafetensorsCheckpointIO()],
        enable_model_summary=False,
        enable_progress_bar=progress_enabled(),
        num_sanity_val_steps=0,
    )


def fit(
    model: Classifier,
    samples: Samples,
    cfg: TrainConfig,
    seed: int = 0,
    desc: str = "train",
    module_factory: Callable[[Classifier, TrainConfig], L.LightningModule] | None = None,
    extra_loaders: dict[str, DataLoader] | None = None,
    checkpoint: Path | None = None,
) -> Classifier:
    """Train ``model`` on ``samples`` with Lightning; returns the same (trained) model in eval mode.

    ``checkpoint``: a path for a per-epoch resumable checkpoint (see :func:`fit_module`): an interrupted call
    with the same arguments resumes from its last finished epoch and ends with the same weights as an
    uninterrupted one; a finished checkpoint is loaded without training. The caller deletes it when done."""
    if len(samples) == 0:
        raise ValueError(f"{desc}: no training samples")
    L.seed_everything(seed, workers=True, verbose=False)
    module = module_factory(model, cfg) if module_factory else ClassifierModule(model, cfg)
    loader = make_loader(model, samples, cfg.batch_size, shuffle=True, seed=seed)
    if extra_loaders:
        from lightning.pytorch.utilities import CombinedLoader

        train_loaders: Any = CombinedLoader({"main": loader, **extra_loaders}, mode="max_size_cycle")
    else:
        train_loaders = loader
    log.info("%s: %d samples, %d epochs", desc, len(samples), cfg.max_epochs)
    # seeded above, before the module and loader were built
    fit_module(module, train_loaders, cfg, None, desc, checkpoint=checkpoint)
    model.eval()
    return model


def fit_module(
    module: L.LightningModule,
    loaders: Any,
    cfg: TrainConfig,
    seed: int | None,
    desc: str = "train",
    checkpoint: Path | None = None,
) -> str:
    """The one entry point of every training stage: seed (unless ``seed`` is None: the caller seeded before
    building the module), fit ``module`` on ``loaders`` with :func:`make_trainer`, leave it in eval mode.

    With ``checkpoint`` (a path), the full training state — weights, optimiser, schedule, every RNG and the
    loaders' generators — is written there after each epoch (safetensors + JSON, atomic) and, when the file
    exists from an interrupted run, training resumes from it and continues exactly as the uninterrupted run
    would have. Returns ``"resumed"`` or ``"trained"``."""
    from backdoorbench.trainer.checkpoint import ResumableCheckpoint, checkpoint_progress

    if seed is not None:
        L.seed_everything(seed, workers=True, verbose=False)
    callbacks: list[Any] = []
    resume = None
    if checkpoint is not None:
        callbacks.append(ResumableCheckpoint(checkpoint, loaders))
        resume = checkpoint if Path(checkpoint).is_file() else None
        if resume is not None:
            log.info("%s: resuming from %s (%s)", desc, resume, checkpoint_progress(resume))
    module.train()
    make_trainer(cfg, desc, callbacks=callbacks).fit(module, train_dataloaders=loaders, ckpt_path=resume)
    module.eval()
    return "resumed" if resume is not None else "trained"


def label_counts(samples: Samples, num_classes: int) -> list[int]:
    return np.bincount(samples.labels, minlength=num_classes).tolist()
