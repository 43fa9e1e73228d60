"""What a training stage reports while it runs: :class:`EpochReport`, the one logging callback of a Trainer
(one INFO line per epoch when progress bars are off, and one row per epoch — loss, training accuracy, learning
rate, seconds — through a Lightning logger into the run directory, ``<run dir>/logs/<stage>/``: ``metrics.csv``
with ``trainer.logger=csv``, event files with ``tensorboard``, or a wandb / MLflow run stored under the same
folder). The loss and the accuracy are summed on the device and read once per epoch: no host sync per training step.

The accuracy column is the training accuracy of the epoch: the share of the epoch's training batches (as the
model saw them, augmented) that the model classified right, counted during the forward pass the loss needs
anyway (no extra pass, no held-out split taken from the defender's data). Modules that classify
(:class:`AccuracyTracker` subclasses: ``ClassifierModule`` and its subclasses, the repair fine-tuning) fill it;
for the others (self-supervised, MixMatch, mask learning) the column is empty.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

log = logging.getLogger("backdoorbench.trainer.lit")  # the training toolkit logs under one name

LOGGERS = ("csv", "tensorboard", "wandb", "mlflow", "none")
_NEEDS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}


def logger_problem(name: str) -> str | None:
    """Why ``trainer.logger=name`` cannot be used here, or None."""
    if name not in LOGGERS:
        return f"logger must be one of {', '.join(LOGGERS)}, got {name!r}"
    needs = _NEEDS.get(name, ())
    if needs and not any(importlib.util.find_spec(m) is not None for m in needs):
        return f"logger={name} needs the package {needs[0]!r} (pip install {needs[0]}); or use logger=csv"
    return None


def stage_dir(run_dir: Path, desc: str) -> Path:
    """A new folder ``<run_dir>/logs/<stage>`` for one training stage (``-2``, ``-3``, ... when it repeats)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", desc.strip()).strip("_.") or "train"
    base = Path(run_dir) / "logs"
    path, i = base / slug, 1
    while path.exists():
        i += 1
        path = base / f"{slug}-{i}"
    return path


def make_logger(name: str, folder: Path) -> Any:
    """The Lightning logger ``name`` writing into ``folder`` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    if name == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(str(folder.parent), name=folder.name, version="")
    if name == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(str(folder.parent), name=folder.name, version="", default_hp_metric=False)
    if name == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(name=folder.name, save_dir=str(folder))
    if name == "mlflow":
        from lightning.pytorch.loggers import MLFlowLogger

        return MLFlowLogger(experiment_name="backdoorbench", run_name=folder.name,
                            tracking_uri=f"file:{folder / 'mlruns'}")
    raise ValueError(f"no logger {name!r}")


class AccuracyTracker:
    """Mixin of a Lightning module that counts its training accuracy (for :class:`EpochReport`). The counts stay
    on the module's device until the epoch ends (no host sync per step)."""

    _acc_correct: Any = 0
    _acc_seen = 0

    def track_accuracy(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self._acc_correct = self._acc_correct + (logits.detach().argmax(1) == labels).sum()
        self._acc_seen += int(labels.numel())  # a shape: known on the host

    def pop_epoch_accuracy(self) -> float | None:
        """The accuracy counted since the last call (None when nothing was counted); resets the counts. One host
        sync (reading the count)."""
        seen, correct = self._acc_seen, self._acc_correct
        self._acc_correct = self._acc_seen = 0
        return int(correct) / seen if seen else None


class EpochReport(L.Callback):
    """What a training stage reports, once per epoch: the mean training loss (summed on the device step by step,
    read once at the epoch's end), the training accuracy, the learning rate and the seconds, as one INFO line
    (``log_line``: when progress bars are off) and/or one row through ``logger`` (a Lightning logger of its own:
    modules' ``self.log`` calls never reach it, so the file holds exactly one row per epoch). The one logging
    callback of a Trainer; nothing in it reads a device value per step."""

    def __init__(self, desc: str = "train", logger: Any = None, log_line: bool = True) -> None:
        self.desc = desc or "train"
        self.logger, self.log_line = logger, log_line
        self.loss_sum: Any = 0.0
        self.loss_n = 0
        self.t0 = self.t_epoch = 0.0
        self.start_epoch = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.t0 = time.perf_counter()
        self.start_epoch = trainer.current_epoch  # a resumed stage counts its ETA from where it resumed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.loss_sum, self.loss_n = 0.0, 0
        self.t_epoch = time.perf_counter()
        if isinstance(pl_module, AccuracyTracker):
            pl_module.pop_epoch_accuracy()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            wide = torch.float32 if loss.device.type == "mps" else torch.float64  # MPS has no float64
            self.loss_sum = self.loss_sum + loss.detach().reshape(()).to(wide)
            self.loss_n += 1

    @property
    def mean_loss(self) -> float | None:
        return float(self.loss_sum) / self.loss_n if self.loss_n else None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        mean_loss = self.mean_loss  # the epoch's one read of the summed loss
        if self.logger is not None:
            row: dict[str, float] = {"epoch": float(trainer.current_epoch + 1),
                                     "seconds": round(time.perf_counter() - self.t_epoch, 3)}
            if mean_loss is not None:
                row["loss"] = mean_loss
            acc = pl_module.pop_epoch_accuracy() if isinstance(pl_module, AccuracyTracker) else None
            if acc is not None:
                row["train_acc"] = acc
            if trainer.optimizers:
                row["lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
            self.logger.log_metrics(row, step=trainer.current_epoch + 1)
            self.logger.save()
        if self.log_line:
            self._log_line(trainer, mean_loss)

    def _log_line(self, trainer: L.Trainer, mean_loss: float | None) -> None:
        done, total = trainer.current_epoch + 1, trainer.max_epochs or 0
        if trainer.max_steps and trainer.max_steps > 0:  # max_steps may end training before max_epochs
            per_epoch = max(trainer.global_step // max(done, 1), 1)
            total = min(total or done, -(-trainer.max_steps // per_epoch))
        elapsed = time.perf_counter() - self.t0
        ran = done - self.start_epoch
        eta = elapsed / max(ran, 1) * max(total - done, 0)
        loss = f"train loss {mean_loss:.4f}" if mean_loss is not None else "train loss n/a"
        log.info("%s: epoch %d/%d, %s, %s elapsed, ETA %s", self.desc, done, total, loss, _duration(elapsed),
                 _duration(eta))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.logger is not None:
            self.logger.finalize("success")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"
