"""The training plumbing every stage goes through: :func:`seeded_loader` (the one loader builder),
:func:`make_optimizer` (the one optimiser builder), :func:`make_trainer` (the one Trainer recipe) and
:func:`fit_module` (the one entry point that runs a Lightning module, resuming from a per-epoch safetensors
checkpoint when given one); :func:`fit` trains a :class:`Classifier` with cross-entropy through it."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from backdoorbench import runtime
from backdoorbench.data.base import Samples
from backdoorbench.modality.base import BatchTable, Classifier
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
from backdoorbench.trainer.logs import AccuracyTracker, EpochReport, make_logger, stage_dir
from backdoorbench.trainer.schedule import make_scheduler

__all__ = [
    "ACCELERATORS", "HASHED_WHEN_SET", "NEVER_HASHED", "PRECISIONS", "ClassifierModule", "EpochReport", "TrainConfig",
    "accelerator_problem", "fit", "fit_module", "make_loader", "make_optimizer", "make_trainer", "resolve_device",
    "runtime_for", "seeded_loader",
]

log = logging.getLogger(__name__)
ModelT = TypeVar("ModelT", bound=Classifier)  # fit returns the model it was given, trained


class SamplesDataset(Dataset):
    """Index-preserving torch view of :class:`Samples` whose batches are fetched whole: the DataLoader hands
    :meth:`__getitems__` a batch's indices and gets ``{"inputs", "labels", "index"}`` back (the inputs from the
    model's :class:`~backdoorbench.modality.base.BatchTable`: one gather, no per-sample Python)."""

    def __init__(self, table: BatchTable, labels: np.ndarray) -> None:
        self.table = table
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return {"inputs": self.table.take(index), "labels": self.labels[index], "index": index}

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.__getitems__([i])


def whole_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """The collate function of a dataset that fetches whole batches (``__getitems__``): nothing left to do."""
    return batch


def seeded_loader(
    dataset: Any,
    batch_size: int,
    collate_fn: Callable[[Any], Any],  # a list of items, or the batch a dataset's __getitems__ fetched whole
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
    """Batches ``{"inputs": model.collate_host(...), "labels", "index"}`` of ``samples``, each fetched at once
    (:class:`SamplesDataset`).

    The inputs are prepared once (:meth:`Classifier.batch_table`: texts are tokenised here, without padding, and
    each batch is padded to its longest text with one gather; images are gathered as uint8, converted to
    float by the model on the device). Every batch holds the very tensors ``model.collate`` would give for the
    batch's raw inputs (images: before the uint8 → float step), in the same order as before batches were
    fetched whole, so training is unchanged to the bit on the CPU."""
    dataset = SamplesDataset(model.batch_table(samples.inputs), samples.labels)
    return seeded_loader(dataset, batch_size, whole_batch, seed, shuffle=shuffle, workers=True)


class ClassifierModule(AccuracyTracker, L.LightningModule):
    """Cross-entropy training of a :class:`Classifier` with AdamW (or SGD) and the schedule of
    ``cfg.scheduler`` (linear warm-up/decay by default), stepped every batch."""

    def __init__(self, model: Classifier, cfg: TrainConfig, params: Sequence[torch.Tensor] | None = None) -> None:
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
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["labels"]))  # read by a progress bar only
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


def stage_precision(cfg: TrainConfig) -> str:
    """The precision a training stage runs in: the run's ``trainer.precision`` inside a run (every stage: the
    victim, the attacks', the defenses'), the stage's own ``cfg.precision`` outside one."""
    return runtime.current().precision or cfg.precision


def stage_deterministic(cfg: TrainConfig) -> bool:
    """Whether a training stage asks for deterministic kernels: the run's ``trainer.deterministic`` inside a
    run, the stage's own ``cfg.deterministic`` outside one."""
    rt = runtime.current()
    return cfg.deterministic if rt.deterministic is None else rt.deterministic


#: the cost of ``trainer.deterministic=true`` on a GPU, said once per process
_DETERMINISTIC_NOTE = {"said": False}


def _note_determinism(deterministic: bool, accelerator: str) -> None:
    if accelerator != "gpu" or _DETERMINISTIC_NOTE["said"]:
        return
    _DETERMINISTIC_NOTE["said"] = True
    if deterministic:
        log.info("trainer.deterministic=true on a GPU: deterministic kernels and cuDNN benchmark off (repeatable to "
                 "the bit, often 10-30%% slower for convolutions); trainer.deterministic=false for speed "
                 "(docs/architecture.md, 'Precision, loaders and determinism')")
    else:
        log.info("trainer.deterministic=false: cuDNN picks the fastest kernels; reruns may differ in the last bits")


def make_trainer(cfg: TrainConfig, desc: str = "", callbacks: list[Any] | None = None) -> L.Trainer:
    """The one Trainer recipe (quiet, deterministic by config); ``callbacks`` (e.g. a
    :class:`~backdoorbench.trainer.checkpoint.ResumableCheckpoint` for stages that resume) switch Lightning's
    checkpointing on. Checkpoints are written and read as safetensors + JSON
    (:class:`~backdoorbench.trainer.checkpoint.SafetensorsCheckpointIO`), never pickled, so
    ``fit(ckpt_path=...)`` cannot run code from a checkpoint file.

    The device and the precision: inside a run, the run's (:func:`backdoorbench.runtime.current`), whatever the
    stage's own ``accelerator`` / ``precision`` say; outside a run, :func:`resolve_device` of ``cfg`` and
    ``cfg.precision``. ``cfg.devices`` / ``cfg.strategy`` are the stage's own (the victim's training gets
    ``trainer.*``; the stages of attacks and defenses build configs with one device). One logging callback,
    :class:`~backdoorbench.trainer.logs.EpochReport`: a line per epoch without progress bars, and inside a run
    with a run directory and ``trainer.logger`` other than ``none`` a row per epoch in ``<run dir>/logs/<stage>/``.
    ``trainer.deterministic=true`` (the run's, inside a run) asks for deterministic kernels (on a GPU: cuDNN
    benchmark off, said once in the log); ``false`` lets cuDNN benchmark."""
    from lightning.pytorch.callbacks import Checkpoint

    from backdoorbench.trainer.checkpoint import SafetensorsCheckpointIO

    rt = runtime.current()
    callbacks = list(callbacks or [])
    bars = progress_enabled()
    logger = None
    if rt.run_dir is not None and rt.logger != "none":
        logger = make_logger(rt.logger, stage_dir(rt.run_dir, desc or "train"))
    if logger is not None or not bars:
        callbacks.append(EpochReport(desc, logger, log_line=not bars))
    accelerator, devices = lightning_device(rt.device or resolve_device(cfg), cfg.devices)
    deterministic = stage_deterministic(cfg)
    _note_determinism(deterministic, accelerator)

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
        precision=stage_precision(cfg),  # type: ignore[arg-type]
        gradient_clip_val=cfg.grad_clip or None,
        deterministic="warn" if deterministic else False,
        benchmark=not deterministic,
        logger=False,  # the modules' self.log values feed the progress bar; EpochReport owns the files
        # without a progress bar nothing reads the modules' self.log values: never compute them mid-epoch (each
        # computation reads them from the device)
        log_every_n_steps=50 if bars else 2**31 - 1,
        callbacks=callbacks,
        enable_checkpointing=any(isinstance(c, Checkpoint) for c in callbacks),
        plugins=[SafetensorsCheckpointIO()],
        enable_model_summary=False,
        enable_progress_bar=bars,
        num_sanity_val_steps=0,
    )


def fit(
    model: ModelT,
    samples: Samples,
    cfg: TrainConfig,
    seed: int = 0,
    desc: str = "train",
    module_factory: Callable[[ModelT, TrainConfig], L.LightningModule] | None = None,
    extra_loaders: dict[str, DataLoader] | None = None,
    checkpoint: Path | None = None,
) -> ModelT:
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


@contextmanager
def _progress_values_only(module: L.LightningModule, trainer: L.Trainer) -> Iterator[None]:
    """The modules' ``self.log`` / ``self.log_dict`` values feed the progress bar only (``logger=False``;
    :class:`EpochReport` writes the files). Lightning reads every progress-bar value from the device after each
    step, so without a progress bar the calls are dropped for the fit: no host sync per step."""
    if trainer.progress_bar_callback is not None:
        yield
        return
    module.log = _no_log  # type: ignore[method-assign]
    module.log_dict = _no_log  # type: ignore[method-assign]
    try:
        yield
    finally:
        module.__dict__.pop("log", None)
        module.__dict__.pop("log_dict", None)


def _no_log(*args: Any, **kwargs: Any) -> None:
    return None


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
    # results.json's stages: the device, weights dtype and autocast the stage's first forward really ran in
    with runtime.stage_probe(desc or "train", module, trainer.precision, trainer.strategy.root_device), \
            _progress_values_only(module, trainer):
        trainer.fit(module, train_dataloaders=loaders, ckpt_path=resume)
    # Lightning's teardown moves the module to the CPU: bring it back to the device it trained on, where the
    # stage's caller (evaluation, the next stage, the detectors) uses it
    module.to(trainer.strategy.root_device)
    module.eval()
    return "resumed" if resume is not None else "trained"


def label_counts(samples: Samples, num_classes: int) -> list[int]:
    return np.bincount(samples.labels, minlength=num_classes).tolist()
