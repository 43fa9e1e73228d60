"""DBD -- Backdoor Defense via Decoupling the training process (Huang, Li, Wu, Qin and Ren, ICLR 2022;
reference code ``SCLBD/DBD``).

A poisoned sample's label is wrong for its content, and end-to-end supervised training lets the network
learn the trigger→target shortcut. DBD decouples training into three stages so that the labels never
shape the feature extractor directly:

1. **Self-supervised backbone** (``ssl.py``): SimCLR on the training images with labels removed. Poisoned
   images cluster with their true class, not with the target: the trigger is a small part of the image and
   the strong augmentations often remove it.
2. **Label-noise learning** (``sce.py``): the backbone is frozen and a linear head is trained on all labels with the
   symmetric cross-entropy (SCE = α·CE + β·RCE, robust to wrong labels). Poisoned samples, whose labels
   disagree with their features, end with high loss. The ``ε`` share of samples with the lowest SCE loss
   keep their labels; the rest become unlabelled.
3. **Semi-supervised fine-tuning** (``mixmatch.py``): MixMatch over the whole model (backbone + head),
   with the kept samples as labelled data and the others as unlabelled data.

Each stage is one Lightning fit that writes its weights to the defense's ``work_dir`` as safetensors
(``stage1_ssl.safetensors``, ``stage2_sce.safetensors`` with ``stage2_split.json``,
``stage3_mixmatch.safetensors``); a finished stage is loaded, not retrained, and an interrupted stage resumes
from its last finished epoch (``*.partial.safetensors``: weights, optimizer, scheduler, loop counters and
every RNG state, see :mod:`backdoorbench.trainer.checkpoint`), exactly as the uninterrupted run. No file is
ever unpickled: a given ``ssl_checkpoint`` in another format loads with ``torch.load(weights_only=True)``. The paper's
ablations are ``defense.variant``: ``no_ss`` (supervised CE from scratch: no defense), ``ss_ce`` (frozen SSL
backbone + linear head with CE), ``ss_sce`` (frozen SSL backbone + SCE head), ``dbd`` (the full defense).
The settings and their checks are in ``dbd_config.py``, the checkpoint formats a stage loads in ``dbd_checkpoints.py``.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from backdoorbench.config import ConfigError
from backdoorbench.data.base import Samples
from backdoorbench.data.images import ImageArray, as_image_array
from backdoorbench.defenses.base import TrainingDefense
from backdoorbench.defenses.training.dbd_checkpoints import load_model_state
from backdoorbench.defenses.training.dbd_config import DBDConfig, DBDFullConfig
from backdoorbench.defenses.training.mixmatch import MixMatchModule
from backdoorbench.defenses.training.sce import LinearHeadModule, low_loss_indices, sce_loss
from backdoorbench.defenses.training.ssl import SimCLRAugment, SSLModule, make_method
from backdoorbench.modality.base import Classifier
from backdoorbench.modality.vision import VisionClassifier, to_float
from backdoorbench.registry import register_defense
from backdoorbench.runtime import intra_op_threads
from backdoorbench.seeds import stage_seed
from backdoorbench.trainer.checkpoint import (
    save_state_dict,
)
from backdoorbench.trainer.lit import ClassifierModule, TrainConfig, fit_module, seeded_loader

log = logging.getLogger(__name__)

SPLIT_FILE = "stage2_split.json"
FINAL = ".safetensors"  # <stage>.safetensors: the finished stage's model weights
PARTIAL = ".partial.safetensors"  # <stage>.partial.safetensors: the running stage's state after its last epoch


# -- data loading ------------------------------------------------------------------------------------------
class _Indices(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def _loader(
    images: torch.Tensor | ImageArray,
    labels: torch.Tensor,
    batch_size: int,
    seed: int,
    drop_last: bool = False,
    num_samples: int | None = None,
    nested: bool = False,
) -> DataLoader:
    """Batches ``{"pixels", "labels", "index"}`` of uint8 images, shuffled by ``seed``; with ``num_samples``,
    that many draws without replacement (passes over the data concatenated), for fixed-length epochs.
    ``nested``: ``{"inputs": {"pixels"}, "labels", "index"}``, as :func:`~backdoorbench.trainer.lit.make_loader`."""

    def collate(idx: list[int]) -> dict[str, Any]:
        t = torch.tensor(idx, dtype=torch.long)
        pixels = to_float(images[t])
        batch = {"inputs": {"pixels": pixels}} if nested else {"pixels": pixels}
        return {**batch, "labels": labels[t], "index": t}

    n = len(images)
    return seeded_loader(_Indices(n), batch_size, collate, seed, drop_last=drop_last, num_samples=num_samples or n)


# -- the defense -------------------------------------------------------------------------------------------
@register_defense(
    "dbd_full",
    modality="vision",
    needs="the (possibly poisoned) training set without provenance, and a fresh-model factory",
    description="DBD with the paper's full-scale schedule (SimCLR 100 epochs, MixMatch 190x1024 steps; GPU)",
    config=DBDFullConfig,
)
@register_defense(
    "dbd",
    modality="vision",
    needs="the (possibly poisoned) training set without provenance, and a fresh-model factory",
    description="self-supervised backbone, SCE head to split off low-loss samples, MixMatch fine-tuning",
    config=DBDConfig,
)
class DBD(TrainingDefense):
    """Decoupled training: SSL backbone → SCE linear head and low-loss filter → MixMatch fine-tuning."""

    def __init__(self, cfg: DBDConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        # stage_times (declared on Defense): a stage loaded from its checkpoint counts its loading time
        #: per stage: "trained", "resumed" (from a partial checkpoint) or "loaded" (finished checkpoint)
        self.stage_status: dict[str, str] = {}
        #: stage 2's per-sample SCE losses (no augmentation), in training-set order
        self.sample_losses: np.ndarray | None = None
        self.threads: int | None = None  #: the CPU thread count DBD's stages ran with
        self._scratch: tempfile.TemporaryDirectory[str] | None = None  # the stage folder outside a context (_dir)

    # -- helpers ---------------------------------------------------------------------------------------
    def _dir(self) -> Path:
        """The stage folder: the run's context's (``Defense.work_dir``), or outside one a temporary folder that lives
        as long as this defense object (its stages then start from scratch)."""
        if self.work_dir is not None:
            d = Path(self.work_dir)
        else:
            if self._scratch is None:
                self._scratch = tempfile.TemporaryDirectory(prefix="backdoorbench-dbd-")
            d = Path(self._scratch.name)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _fit_stage(self, stage: str, module: L.LightningModule, loaders: Any, epochs: int) -> None:
        """Fit ``module`` with a per-epoch resumable checkpoint (``<stage>.partial.safetensors``), resuming
        from it when an earlier run was interrupted; then save the model's weights as
        ``<stage>.safetensors`` and drop the partial checkpoint."""
        partial = self._dir() / f"{stage}{PARTIAL}"
        cfg = TrainConfig(max_epochs=epochs, grad_clip=0.0)  # in a run: the run's device and trainer.precision
        self.stage_status[stage] = "resumed" if partial.is_file() else "trained"  # known before a crash, too
        fit_module(module, loaders, cfg, self.seed, f"DBD {stage}", checkpoint=partial)
        model = cast(torch.nn.Module, module.model)  # every stage's module holds the model it trains
        save_state_dict(self._dir() / f"{stage}{FINAL}", model.state_dict(), {"stage": stage})
        partial.unlink(missing_ok=True)

    def _timed(self, stage: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        log.info("DBD %s: start", stage)
        out = fn()
        self.stage_times[stage] = round(time.perf_counter() - t0, 3)
        log.info("DBD %s: %s in %.1fs", stage, self.stage_status.get(stage, "done"), self.stage_times[stage])
        return out

    # -- stages ----------------------------------------------------------------------------------------
    def train_ssl(self, model: VisionClassifier, images: ImageArray) -> None:
        """Stage 1: self-supervised training of ``model.net`` on ``images`` (labels unused)."""
        cfg = self.cfg
        method = make_method(
            cfg.ssl, cfg.ssl_backend, model, cfg.proj_hidden_dim, cfg.proj_dim, cfg.temperature, cfg.byol_momentum
        )
        aug = SimCLRAugment(
            crop_scale=(cfg.crop_scale_min, 1.0),
            flip=model.image.flip,
            jitter_prob=cfg.jitter_prob,
            jitter=cfg.jitter_strength,
            hue=cfg.jitter_strength / 4,
            grayscale_prob=cfg.grayscale_prob,
            blur_prob=cfg.blur_prob,
        )
        module = SSLModule(model, method, aug, cfg.ssl_lr, cfg.ssl_weight_decay)
        batch = min(cfg.ssl_batch_size, len(images))
        dummy = torch.zeros(len(images), dtype=torch.long)
        loader = _loader(images, dummy, batch, self.seed, drop_last=True, nested=True)
        self._fit_stage("stage1_ssl", module, loader, cfg.ssl_epochs)

    def train_head(self, model: VisionClassifier, images: ImageArray, labels: torch.Tensor, loss: str) -> None:
        """Stage 2: a linear head on the frozen backbone, with SCE (``loss="sce"``) or CE."""
        cfg = self.cfg
        if loss == "sce":
            loss_fn: Callable[..., torch.Tensor] = lambda lo, y: sce_loss(  # noqa: E731
                lo, y, cfg.sce_alpha, cfg.sce_beta, cfg.rce_log_zero
            )
        else:
            loss_fn = F.cross_entropy
        frozen = [p for n, p in model.named_parameters() if not n.startswith(_head_prefix(model))]
        flags = [p.requires_grad for p in frozen]
        for p in frozen:
            p.requires_grad_(False)
        try:
            module = LinearHeadModule(model, loss_fn, cfg.head_lr)
            seed = stage_seed(self.seed, "dbd-head-loader")
            loader = _loader(images, labels, min(cfg.head_batch_size, len(images)), seed, nested=True)
            self._fit_stage(f"stage2_{loss}", module, loader, cfg.head_epochs)
        finally:
            for p, f in zip(frozen, flags, strict=True):
                p.requires_grad_(f)

    def record_losses(self, model: VisionClassifier, images: ImageArray, labels: torch.Tensor) -> np.ndarray:
        """Each sample's SCE loss under the stage-2 model, without augmentation (the reference's record)."""
        logits = model.predict_logits(images, self.cfg.batch_size)
        cfg = self.cfg
        return sce_loss(logits, labels.cpu(), cfg.sce_alpha, cfg.sce_beta, cfg.rce_log_zero, "none").double().numpy()

    def train_mixmatch(
        self, model: VisionClassifier, images: ImageArray, labels: torch.Tensor, labelled: np.ndarray
    ) -> None:
        """Stage 3: MixMatch over the whole model; ``labelled`` keep their labels, the rest are unlabelled."""
        cfg = self.cfg
        mask = np.zeros(len(images), dtype=bool)
        mask[labelled] = True
        unl = np.flatnonzero(~mask)
        xi = torch.from_numpy(np.asarray(labelled, dtype=np.int64))
        ui = torch.from_numpy(unl.astype(np.int64))
        batch = min(cfg.mixmatch_batch_size, len(xi), max(len(ui), 1))
        iters = cfg.mixmatch_iterations or max(1, len(xi) // batch)
        x_seed, u_seed = stage_seed(self.seed, "dbd-labelled-loader"), stage_seed(self.seed, "dbd-unlabelled-loader")
        xl = _loader(images.select(xi), labels[xi], batch, x_seed, drop_last=True, num_samples=iters * batch)
        loaders: dict[str, DataLoader] = {"x": xl}
        if len(ui):
            loaders["u"] = _loader(
                images.select(ui), labels[ui], batch, u_seed, drop_last=True, num_samples=iters * batch
            )
        else:  # ε = 1: nothing unlabelled; MixMatch degenerates to mixup on the labelled data
            loaders["u"] = _loader(
                images.select(xi), labels[xi], batch, u_seed, drop_last=True, num_samples=iters * batch
            )
        from lightning.pytorch.utilities import CombinedLoader

        module = MixMatchModule(
            model,
            lr=cfg.mixmatch_lr,
            lambda_u=cfg.lambda_u,
            rampup_epochs=cfg.mixmatch_epochs if cfg.rampup_epochs is None else cfg.rampup_epochs,
            temperature=cfg.sharpen_temperature,
            alpha=cfg.mixup_alpha,
            k=cfg.guess_augmentations,
            iterations=iters,
            seed=self.seed,
        )
        log.info(
            "DBD stage3_mixmatch: %d labelled, %d unlabelled, %d steps of %d per epoch", len(xi), len(ui), iters, batch
        )
        self._fit_stage("stage3_mixmatch", module, CombinedLoader(loaders, mode="min_size"), cfg.mixmatch_epochs)

    def train_supervised(self, model: VisionClassifier, images: ImageArray, labels: torch.Tensor) -> None:
        """The no-SS ablation: ordinary supervised training with CE (= no defense)."""
        cfg = self.cfg
        tcfg = TrainConfig(
            max_epochs=cfg.supervised_epochs,
            batch_size=128,
            lr=cfg.supervised_lr,
            weight_decay=5e-4,
            warmup_ratio=0.0,
            optimizer="sgd",
            grad_clip=0.0,
        )
        loader = _loader(images, labels, min(128, len(images)), self.seed, nested=True)
        self._fit_stage("supervised", ClassifierModule(model, tcfg), loader, cfg.supervised_epochs)

    # -- the whole defense -----------------------------------------------------------------------------
    def train(self, train: Samples, model_factory: Callable[[], Classifier]) -> Classifier:
        """DBD's stages with ``defense.threads`` CPU threads (default 1: the same result on any machine)."""
        with intra_op_threads(self.cfg.threads) as threads:
            self.threads = threads
            return self._train(train, model_factory)

    def _train(self, train: Samples, model_factory: Callable[[], Classifier]) -> Classifier:
        cfg = self.cfg
        inputs = train.inputs  # checked before it is wrapped: a list of texts cannot be wrapped
        if not isinstance(inputs, (torch.Tensor, ImageArray)) or inputs.dtype != torch.uint8 or inputs.dim() != 4:
            raise ConfigError("DBD needs images as a uint8 tensor [N, C, H, W] (vision data)")
        images = as_image_array(inputs)  # subsets below are index views (select), not copies
        labels = torch.as_tensor(np.asarray(train.labels), dtype=torch.long)
        model = model_factory()
        if not isinstance(model, VisionClassifier):
            raise ConfigError(f"DBD needs a vision classifier, got {type(model).__name__}")
        work = self._dir()
        n = len(images)
        all_idx = np.arange(n)
        self.stage_times, self.stage_status = {}, {}
        log.info("DBD (%s): %d training samples, stage checkpoints in %s", cfg.variant, n, work)

        if cfg.variant == "no_ss":
            self._run_or_load("supervised", model, lambda: self.train_supervised(model, images, labels))
            self.labelled_indices = all_idx
            return self._finish(model)

        final_stage = {"dbd": "stage3_mixmatch", "ss_sce": "stage2_sce", "ss_ce": "stage2_ce"}[cfg.variant]
        split = self._load_split(n) if cfg.variant == "dbd" else None
        if (work / f"{final_stage}{FINAL}").is_file() and (cfg.variant != "dbd" or split is not None):
            # the last stage is finished: its weights are the answer
            self._run_or_load(final_stage, model, lambda: None)
            self.labelled_indices = split if split is not None else all_idx
            return self._finish(model)

        # stage 1 (or a given SSL checkpoint)
        if cfg.ssl_checkpoint:
            self._timed("stage1_ssl", lambda: self._load_given_ssl(model))
        else:
            self._run_or_load("stage1_ssl", model, lambda: self.train_ssl(model, images))

        # stage 2
        head_loss = "ce" if cfg.variant == "ss_ce" else "sce"
        self._run_or_load(f"stage2_{head_loss}", model, lambda: self.train_head(model, images, labels, head_loss))
        if cfg.variant != "dbd":
            self.labelled_indices = all_idx  # the head was trained on every label
            return self._finish(model)
        if split is None:
            t0 = time.perf_counter()
            self.sample_losses = self.record_losses(model, images, labels)
            split = low_loss_indices(self.sample_losses, cfg.epsilon)
            self._save_split(split, self.sample_losses)
            self.stage_times["stage2_filter"] = round(time.perf_counter() - t0, 3)
            log.info(
                "DBD filter: kept %d of %d labels (ε %.2f), SCE loss kept ≤ %.4f < dropped",
                len(split),
                n,
                cfg.epsilon,
                float(np.max(self.sample_losses[split])),
            )
        self.labelled_indices = split

        # stage 3
        self._run_or_load("stage3_mixmatch", model, lambda: self.train_mixmatch(model, images, labels, split))
        return self._finish(model)

    def _run_or_load(self, stage: str, model: VisionClassifier, run: Callable[[], None]) -> None:
        ckpt = self._dir() / f"{stage}{FINAL}"
        if ckpt.is_file():
            self.stage_status[stage] = "loaded"
            self._timed(stage, lambda: load_model_state(model, ckpt, stage))
            return
        self._timed(stage, run)

    def _load_given_ssl(self, model: VisionClassifier) -> None:
        self.stage_status["stage1_ssl"] = "loaded"
        load_model_state(model, Path(self.cfg.ssl_checkpoint).expanduser(), "defense.ssl_checkpoint")

    def _save_split(self, split: np.ndarray, losses: np.ndarray) -> None:
        path = self._dir() / SPLIT_FILE
        tmp = path.with_suffix(".tmp")
        payload = {
            "n": int(len(losses)),
            "epsilon": self.cfg.epsilon,
            "labelled": [int(i) for i in split],
            "losses": [float(v) for v in losses],
        }
        tmp.write_text(json.dumps(payload))
        tmp.replace(path)

    def _load_split(self, n: int) -> np.ndarray | None:
        path = self._dir() / SPLIT_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        if data.get("n") != n:
            log.warning("DBD: %s is for %s samples, not %d; recomputing the split", path, data.get("n"), n)
            return None
        self.sample_losses = np.asarray(data.get("losses", []), dtype=np.float64)
        return np.asarray(data["labelled"], dtype=np.int64)

    def _finish(self, model: VisionClassifier) -> VisionClassifier:
        model.eval()
        summary = {
            "variant": self.cfg.variant,
            "stage_times": self.stage_times,
            "stage_status": self.stage_status,
            "threads": self.threads,
            "labelled": None if self.labelled_indices is None else len(self.labelled_indices),
            "config": asdict(self.cfg),
        }
        if self.run_dir is not None:
            Path(self.run_dir).mkdir(parents=True, exist_ok=True)
            path = Path(self.run_dir) / "dbd_stages.json"
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(summary, indent=2))
            tmp.replace(path)
        log.info(
            "DBD done: %s",
            ", ".join(f"{k} {v:.1f}s ({self.stage_status.get(k, '-')})" for k, v in self.stage_times.items()),
        )
        return model


def _head_prefix(model: VisionClassifier) -> str:
    """The parameter-name prefix of the model's classifier (``net.fc``, ``net.linear``, ``net.head``...)."""
    head = model.net.get_classifier()  # type: ignore[operator]
    for name, module in model.named_modules():
        if module is head:
            return name + "."
    raise ConfigError(f"DBD: cannot find the classifier of {type(model.net).__name__}")
