"""What the repair defenses share: the fine-tuning schedule and the one Lightning module that fine-tunes a
model on the defender's clean data, optionally distilling a frozen teacher's attention maps (NAD).

Fine-tuning is NAD without a teacher, and NAD's teacher *is* the fine-tuned model, so both defenses are
the same module with different arguments. The schedule is NAD's reference (``bboylyg/NAD``): SGD with
Nesterov momentum 0.9, weight decay 1e-4, learning rate 0.1 for the first two epochs and 0.01 after,
batch 64. Transformers would not survive SGD at lr 0.1, so text models default to AdamW at 5e-5 with
the same step decay (×0.1 after epoch 2): a documented deviation (NAD was only published for CNNs).

Because NAD's teacher *is* fine-tuning's result, :func:`shared_finetune` trains it once per victim, clean set,
schedule and seed: the pipeline gives repair defenses a per-victim folder under the artifact cache
(``Defense.shared_dir``), where the finished fine-tuning checkpoint stays, so ``defense=finetune`` and NAD's
teacher on the same victim train it once between them (and an interrupted one resumes).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from backdoorbench.data.base import Samples
from backdoorbench.defenses.base import DefenseConfig
from backdoorbench.modality.base import Classifier, weights_fingerprint
from backdoorbench.store import cache_key, shared_checkpoint
from backdoorbench.trainer.lit import TrainConfig, fit, make_optimizer
from backdoorbench.trainer.logs import AccuracyTracker

OPTIMIZERS = ("sgd", "adamw")
#: per-modality defaults where the config says null: (optimizer, learning rate)
MODALITY_DEFAULTS = {"vision": ("sgd", 0.1), "text": ("adamw", 5e-5)}


@dataclass
class FinetuneSchedule(DefenseConfig):
    """The fine-tuning schedule of fine-tuning, NAD's teacher and NAD's student (``defense.*``)."""

    clean_fraction: float | None = 0.05  # the papers' 5% of the training set as the defender's clean data
    epochs: int = 10
    batch_size: int = 64
    optimizer: str | None = None  # sgd | adamw | null = modality default (vision sgd, text adamw)
    lr: float | None = None  # null = modality default (vision 0.1, text 5e-5)
    lr_decay_epoch: int = 2  # multiply the learning rate by lr_decay from this epoch on (NAD: 0.1 → 0.01)
    lr_decay: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    augment: bool = True  # the model's training augmentation (random crop + flip for images; none for text)
    # optimisation steps per epoch: null = one pass over the clean data (the papers); a number repeats the
    # clean data so that every epoch takes that many steps (e.g. 40 = 5% of CIFAR-10 at batch 64)
    steps_per_epoch: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            (self.steps_per_epoch is None or self.steps_per_epoch >= 1, "defense.steps_per_epoch must be >= 1 or null"),
            (self.epochs >= 1, f"defense.epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"defense.batch_size must be >= 1, got {self.batch_size}"),
            (self.optimizer in (None, *OPTIMIZERS), f"defense.optimizer must be sgd, adamw or null: {self.optimizer}"),
            (self.lr is None or self.lr > 0, f"defense.lr must be > 0 or null, got {self.lr}"),
            (self.lr_decay_epoch >= 0, f"defense.lr_decay_epoch must be >= 0, got {self.lr_decay_epoch}"),
            (0 < self.lr_decay <= 1, f"defense.lr_decay must be in (0, 1], got {self.lr_decay}"),
            (self.weight_decay >= 0, f"defense.weight_decay must be >= 0, got {self.weight_decay}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    def resolved(self, modality: str) -> tuple[str, float]:
        opt, lr = MODALITY_DEFAULTS.get(modality, MODALITY_DEFAULTS["vision"])
        return self.optimizer or opt, self.lr if self.lr is not None else lr


def clone(model: Classifier) -> Classifier:
    """An independent copy of a classifier (weights, buffers, tokenizer) on the same device."""
    return copy.deepcopy(model)


def freeze(model: Classifier) -> Classifier:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def distillation_layers(model: Classifier, count: int = 3) -> list[int]:
    """Indices of ``count`` layers spread low → high over the model's layers (NAD's low / middle / high
    groups): the stage outputs of a 3-stage WRN are all three; a 4-stage ResNet gives stages 2-4; a
    6-layer transformer gives layers 2, 4 and 6."""
    n = len(model.layer_names())
    if n == 0:
        raise ValueError(f"{type(model).__name__} exposes no layers for attention maps")
    if count >= n:
        return list(range(n))
    return sorted({max(0, round(n * (k + 1) / count) - 1) for k in range(count)})


def attention_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """NAD's AT loss between two batches of L2-normalised attention maps: the mean squared difference."""
    return F.mse_loss(student, teacher)


class RepairModule(AccuracyTracker, L.LightningModule):
    """Cross-entropy fine-tuning on clean data, plus ``Σ_k β_k · AT(student_k, teacher_k)`` over the
    chosen layers when a (frozen) teacher is given (NAD)."""

    def __init__(
        self,
        model: Classifier,
        cfg: FinetuneSchedule,
        teacher: Classifier | None = None,
        betas: list[float] | None = None,
        layers: list[int] | None = None,
        p: float = 2.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.teacher = [teacher] if teacher is not None else []  # a list: not a submodule, never trained
        self.betas = list(betas or [])
        self.layers = list(layers or [])
        self.p = p
        if teacher is not None and len(self.betas) != len(self.layers):
            raise ValueError(f"NAD: {len(self.betas)} betas for {len(self.layers)} layers")

    def on_fit_start(self) -> None:
        if self.teacher:  # the teacher is not a submodule, so Lightning does not move it
            self.teacher[0].to(self.device)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        inputs = self.model.augment(batch["inputs"]) if self.cfg.augment else batch["inputs"]
        labels = batch["labels"]
        if not self.teacher:
            logits = self.model(inputs)
            self.track_accuracy(logits, labels)  # the train_acc column of the stage's log
            loss = F.cross_entropy(logits, labels)
            self.log("train_loss", loss, prog_bar=True, batch_size=len(labels))
            return loss
        logits, maps = self.model.attention_maps(inputs, self.p)
        self.track_accuracy(logits, labels)
        teacher = self.teacher[0]
        teacher.eval()
        with torch.no_grad():
            _, t_maps = teacher.attention_maps(inputs, self.p)
        ce = F.cross_entropy(logits, labels)
        at = sum(b * attention_loss(maps[i], t_maps[i]) for b, i in zip(self.betas, self.layers))
        loss = ce + at
        self.log_dict({"ce": ce, "at": at}, prog_bar=True, batch_size=len(labels))
        return loss

    def configure_optimizers(self) -> Any:
        name, lr = self.cfg.resolved(self.model.modality)
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = make_optimizer(params, name, lr, self.cfg.weight_decay, self.cfg.momentum, self.cfg.nesterov)
        decay_at, factor = self.cfg.lr_decay_epoch, self.cfg.lr_decay
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch < decay_at else factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def train_config(cfg: FinetuneSchedule, epochs: int | None = None) -> TrainConfig:
    """The :class:`TrainConfig` that carries epochs and batch size to :func:`~backdoorbench.trainer.lit.fit`
    (the optimiser comes from :class:`RepairModule`; no gradient clipping, as the reference)."""
    return TrainConfig(max_epochs=epochs or cfg.epochs, batch_size=cfg.batch_size, grad_clip=0.0)


def repeat_to_steps(samples: Samples, steps_per_epoch: int | None, batch_size: int) -> Samples:
    """``samples`` repeated (whole copies, then a prefix) until one epoch has ``steps_per_epoch`` batches;
    unchanged when null or already that large. The loader shuffles the repeated set every epoch."""
    if steps_per_epoch is None or len(samples) == 0:
        return samples
    n = steps_per_epoch * batch_size
    if len(samples) >= n:
        return samples
    return samples.subset(np.resize(np.arange(len(samples)), n))


def finetune(
    model: Classifier,
    clean: Samples,
    cfg: FinetuneSchedule,
    seed: int,
    epochs: int | None = None,
    desc: str = "fine-tune",
    checkpoint: Path | None = None,
    **distill: Any,
) -> Classifier:
    """Fine-tune ``model`` in place on ``clean`` (with NAD's distillation terms when ``distill`` holds a
    ``teacher``, ``betas`` and ``layers``); returns it in eval mode. ``checkpoint``: a resumable per-epoch
    checkpoint path (:func:`~backdoorbench.trainer.lit.fit`); a finished one is loaded without training."""
    for p in model.parameters():
        p.requires_grad_(True)
    return fit(
        model,
        repeat_to_steps(clean, cfg.steps_per_epoch, cfg.batch_size),
        train_config(cfg, epochs),
        seed=seed,
        desc=desc,
        module_factory=lambda m, _tc: RepairModule(m, cfg, **distill),
        checkpoint=checkpoint,
    )


def finetune_key(model: Classifier, clean: Samples, cfg: FinetuneSchedule, seed: int, epochs: int | None) -> str:
    """What fine-tuning's result depends on: the model's weights, the clean set, every field of the schedule
    (not the defense's name, nor a subclass's own fields such as NAD's betas), the epochs and the seed."""
    schedule = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(FinetuneSchedule)}
    schedule.pop("name")
    schedule["epochs"] = train_config(cfg, epochs).max_epochs  # the epochs the fit runs
    return cache_key({
        "model": weights_fingerprint(model),
        "modality": model.modality,
        "clean": clean.digest(),
        "schedule": schedule,
        "seed": seed,
    })


def shared_finetune(
    model: Classifier,
    clean: Samples,
    cfg: FinetuneSchedule,
    seed: int,
    shared_dir: Path | None,
    epochs: int | None = None,
    desc: str = "fine-tune",
) -> Classifier:
    """A fine-tuned copy of ``model`` (``model`` itself is not changed), trained once per :func:`finetune_key`:
    with a ``shared_dir`` its finished checkpoint is kept there (``finetune-<key>.safetensors``) and loaded by the
    next call with the same key, whichever defense makes it (fine-tuning, NAD's teacher); a lock makes a
    concurrent call wait for the first. The loaded model equals the trained one: training is seeded and the
    checkpoint holds the whole training state. Without ``shared_dir``, plain :func:`finetune` on a copy."""
    if shared_dir is None:
        return finetune(clone(model), clean, cfg, seed, epochs, desc)
    key = finetune_key(model, clean, cfg, seed, epochs)
    with shared_checkpoint(Path(shared_dir) / f"finetune-{key}.safetensors", desc) as ckpt:
        return finetune(clone(model), clean, cfg, seed, epochs, desc, checkpoint=ckpt)
