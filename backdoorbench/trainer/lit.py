"""The training plumbing every stage goes through: :func:`seeded_loader` (the one loader builder),
:func:`make_optimizer` (the one optimiser builder), :func:`make_trainer` (the one Trainer recipe) and
:func:`fit_module` (the one entry point that runs a Lightning module, resuming from a per-epoch safetensors
checkpoint when given one); :func:`fit` trains a :class:`Classifier` with cross-entropy through it."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from backdoorbench import runtime
from backdoorbench.data.base import Samples
from backdoorbench.modality.base import Classifier
from backdoorbench.progress import progress_enabled
from backdoorbench.trainer.config import (
    ACCELERATORS,
    HASHED_WHEN_SET,
    NEVER_HASHED,
    PRECISIONS,
    TrainConfig,
    accelerator_problem,
    resolve_device,
    runtime_for,
)
from backdoorbench.trainer.logs import AccuracyTracker, EpochLog, EpochMetrics, make_logger, stage_dir
from backdoorbench.trainer.schedule import make_scheduler

__all__ = [
    "ACCELERATORS", "HASHED_WHEN_SET", "NEVER_HASHED", "PRECISIONS", "ClassifierModule", "EpochLog", "TrainConfig",
    "accelerator_problem", "fit", "fit_module", "make_loader", "make_optimizer", "make_trainer", "resolve_device",
    "runtime_for", "seeded_loader",
]

log = logging.getLogger(__name__)


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
    workers: bool = False,
) -> DataLoader:
    """The one loader builder: batches of ``dataset`` in an order drawn from ``seed`` alone.

    ``num_samples``: that many draws without replacement (passes over the data concatenated), for epochs of a
    fixed length; then the sampler owns the generator. The generators live on the loader (``generator`` or
    ``sampler.generator``), where :class:`~backdoorbench.trainer.checkpoint.ResumableCheckpoint` saves and
    restores them.

    ``workers=True`` lets the run's ``trainer.num_workers`` / ``trainer.pin_memory`` apply. Only a loader
    whose ``collate_fn`` is a pure function of its items may ask for it: the order is drawn in the main
    process either way, but a collate that draws random numbers would draw them in the workers' copies of
    its generator. Workers are forked (where the platform can), so closures need not be picklable."""
    from torch.utils.data import RandomSampler

    rt = runtime.current()
    extra: dict[str, Any] = {}
    if workers and rt.num_workers > 0:
        import multiprocessing as mp

        extra = {"num_workers": rt.num_workers, "persistent_workers": False}
        if "fork" in mp.get_all_start_methods():
            extra["multiprocessing_context"] = "fork"
    if workers and rt.pin_memory:
        extra["pin_memory"] = True
    gen = torch.Generator().manual_seed(seed)
    if num_samples is not None:
        sampler = RandomSampler(dataset, num_samples=num_samples, generator=gen)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn, drop_last=drop_last,
                          **extra)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate_fn, generator=gen, drop_last=drop_last,
        **extra,
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
    """Batches ``{"inputs": model.collate(...), "labels", "index"}`` of ``samples``.

    The inputs are encoded once (:meth:`Classifier.encode`: texts are tokenised here, without padding) and each
    batch is padded by :meth:`Classifier.collate_encoded`, which gives the very tensors ``model.collate`` would
    give for the batch's raw inputs (dynamic, per-batch padding), without tokenising every batch of every
    epoch again."""
    encoded = model.encode(samples.inputs)
    stack = not isinstance(samples.inputs, list)  # image tensors and lazy ImageArrays: stack the items
    dataset = SamplesDataset(samples if encoded is None else Samples(encoded, samples.labels))
    return seeded_loader(dataset, batch_size, _Collate(model, stack, encoded is not None), seed, shuffle=shuffle,
                         workers=True)


class _Collate:
    """``make_loader``'s collate function (a plain object: picklable where workers are spawned)."""

    def __init__(self, model: Classifier, stack: bool, encoded: bool) -> None:
        self.model, self.stack, self.encoded = model, stack, encoded

    def __call__(self, items: list[tuple[Any, int, int]]) -> dict[str, Any]:
        inputs: Any = [it[0] for it in items]
        if self.encoded:
            batch = self.model.collate_encoded(inputs)
        else:
            batch = self.model.collate(torch.stack(inputs) if self.stack else inputs)
        return {
            "inputs": batch,
            "labels": torch.tensor([it[1] for it in items], dtype=torch.long),
            "index": torch.tensor([it[2] for it in items], dtype=torch.long),
        }


class ClassifierModule(AccuracyTracker, L.LightningModule):
    """Cross-entropy training of a :class:`Classifier` with AdamW (or SGD) and the schedule of
    ``cfg.scheduler`` (linear warm-up/decay by default), stepped every batch."""

    def __init__(self, model: Classifier, cfg: TrainConfig, params: list[torch.nn.Parameter] | None = None) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self._params = params

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        inputs = self.model.augment(batch["inputs"]) if self.training else batch["inputs"]
        logits = self.model(inputs)
        if self.training:
            self.track_accuracy(logits, batch["labels"])
        return F.cross_entropy(logits, batch["labels"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def configure_optimizers(self) -> Any:
        params = self._params if self._params is not None else [p for p in self.model.parameters() if p.requires_grad]
        opt = make_optimizer(params, self.cfg.optimizer, self.cfg.lr, self.cfg.weight_decay, self.cfg.momentum)
        total = int(self.trainer.estimated_stepping_batches)
        per_epoch = self.trainer.num_training_batches
        per_epoch = int(per_epoch) if per_epoch not in (None, float("inf")) else max(total // self.cfg.max_epochs, 1)
        c = self.cfg
        sched = make_scheduler(opt, c.scheduler, total, int(c.warmup_ratio * total), per_epoch, c.milestones, c.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def lightning_device(device: torch.device, devices: Any = 1) -> tuple[str, Any]:
    """Lightning's ``(accelerator, devices)`` for training on ``device``: ``("gpu", [i])`` for ``cuda:i`` (or
    ``devices`` itself when it asks for several GPUs: a ddp run), ``("mps", 1)``, ``("cpu", 1)``."""
    if device.type == "cuda":
        several = devices == "auto" or (isinstance(devices, int) and devices > 1) or (
            isinstance(devices, (list, tuple)) and len(devices) > 1)
        return "gpu", devices if several else [device.index or 0]
    return device.type, 1


def make_trainer(cfg: TrainConfig, desc: str = "", callbacks: list[Any] | None = None) -> L.Trainer:
    """The one Trainer recipe (quiet, deterministic by config); ``callbacks`` (e.g. a
    :class:`~backdoorbench.trainer.checkpoint.ResumableCheckpoint` for stages that resume) switch Lightning's
    checkpointing on. Checkpoints are written and read as safetensors + JSON
    (:class:`~backdoorbench.trainer.checkpoint.SafetensorsCheckpointIO`), never pickled, so
    ``fit(ckpt_path=...)`` cannot run code from a checkpoint file. Without progress bars an :class:`EpochLog`
    logs one line per epoch.

    The device: inside a run, the run's one device (:func:`backdoorbench.runtime.current`), whatever the stage's
    own ``accelerator`` says; outside a run, :func:`resolve_device` of ``cfg``. ``cfg.devices`` /
    ``cfg.strategy`` are the stage's own (the victim's training gets ``trainer.*``; the stages of attacks and
    defenses build configs with one device). Inside a run with a run directory and ``trainer.logger`` other
    than ``none``, an :class:`~backdoorbench.trainer.logs.EpochMetrics` writes one row per epoch into
    ``<run dir>/logs/<stage>/``."""
    from lightning.pytorch.callbacks import Checkpoint

    from backdoorbench.trainer.checkpoint import SafetensorsCheckpointIO

    rt = runtime.current()
    callbacks = list(callbacks or [])
    if not progress_enabled():
        callbacks.append(EpochLog(desc))
    if rt.run_dir is not None and rt.logger != "none":
        callbacks.append(EpochMetrics(make_logger(rt.logger, stage_dir(rt.run_dir, desc or "train"))))
    accelerator, devices = lightning_device(rt.device or resolve_device(cfg), cfg.devices)

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
        accelerator=accelerator,
        devices=devices,
        strategy=cfg.strategy,
        precision=cfg.precision,  # type: ignore[arg-type]
        gradient_clip_val=cfg.grad_clip or None,
        deterministic="warn" if cfg.deterministic else False,
        logger=False,  # the modules' self.log values feed the progress bar; EpochMetrics owns the files
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
    would have. The module ends on the device it trained on (the run's device), not on the CPU where
    Lightning leaves it. Returns ``"resumed"`` or ``"trained"``."""
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
    trainer = make_trainer(cfg, desc, callbacks=callbacks)
    trainer.fit(module, train_dataloaders=loaders, ckpt_path=resume)
    # Lightning's teardown moves the module to the CPU: bring it back to the device it trained on, where the
    # stage's caller (evaluation, the next stage, the detectors) uses it
    module.to(trainer.strategy.root_device)
    module.eval()
    return "resumed" if resume is not None else "trained"


def label_counts(samples: Samples, num_classes: int) -> list[int]:
    return np.bincount(samples.labels, minlength=num_classes).tolist()
