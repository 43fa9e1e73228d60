"""``defense=dbd`` / ``defense=dbd_full``: DBD's settings (:class:`DBDConfig`) and their checks.

The keys and their defaults (the embedded 2-core CPU schedule) are documented in docs/defenses/dbd.md;
``configs/defense/dbd_full.yaml`` holds the paper's values. The defense itself is
:class:`backdoorbench.defenses.training.dbd.DBD`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from backdoorbench.defenses.base import DefenseConfig
from backdoorbench.defenses.training.ssl import SOLO_INSTALL, SSL_BACKENDS, SSL_METHODS, solo_available

VARIANTS = ("dbd", "ss_sce", "ss_ce", "no_ss")


@dataclass
class DBDConfig(DefenseConfig):
    """``defense=dbd``; defaults are the embedded (2-core CPU, MNIST-5k) schedule, ``dbd_full`` the paper's. The
    three stages run on the run's device and in its ``trainer.precision`` (the keys ``defense.accelerator`` /
    ``defense.precision`` of earlier versions are refused with a message naming the run-wide key)."""

    #: keys of earlier versions → the run-wide key that replaces them (a ConfigError names it)
    RETIRED: ClassVar[dict[str, str]] = {"accelerator": "trainer.accelerator", "precision": "trainer.precision"}
    #: what the stage-folder key of every DBD run before their removal held for them (their defaults): kept in the
    #: key (``engine.victim.defense_work_dir``) so that existing stage checkpoints stay valid; the run's precision
    #: is in the key through the victim's (trainer.precision is part of the attack cache key)
    STAGE_KEY_COMPAT: ClassVar[dict[str, Any]] = {"accelerator": "auto", "precision": "32-true"}

    name: str = "dbd"
    variant: str = "dbd"  # dbd (SS+SCE+tuning) | ss_sce | ss_ce | no_ss (the paper's ablations)
    batch_size: int = 256  # inference batch (loss records, evaluation)
    threads: int | None = 1  # CPU threads of DBD's training; 1: the same weights whatever the run's `threads`
    # -- stage 1: self-supervised backbone
    ssl: str = "simclr"  # simclr | byol | barlow_twins | vicreg
    ssl_backend: str = "lightly"  # lightly | solo (solo-learn's loss functions)
    ssl_checkpoint: str | None = None  # finished stage-1 weights (stage1_ssl.safetensors) instead of training stage 1
    ssl_epochs: int = 40
    ssl_batch_size: int = 256
    ssl_lr: float = 0.2  # SGD, momentum 0.9, cosine decay to 0 (reference: 0.4 at batch 512)
    ssl_weight_decay: float = 1e-4
    temperature: float = 0.5  # NT-Xent temperature (SimCLR)
    proj_hidden_dim: int | None = None  # projection head width; null = the backbone's feature width
    proj_dim: int = 128  # projection output
    byol_momentum: float = 0.99  # BYOL's base EMA momentum (cosine to 1)
    crop_scale_min: float = 0.2  # random resized crop: smallest area share
    jitter_prob: float = 0.8
    jitter_strength: float = 0.4  # brightness/contrast/saturation; hue gets a quarter of it (0.1)
    grayscale_prob: float = 0.2  # RGB only
    blur_prob: float = 0.5
    # -- stage 2: linear head on the frozen backbone (SCE), filter
    head_epochs: int = 10
    head_batch_size: int = 128
    head_lr: float = 0.05  # Adam (reference 0.002 over 13x more steps; see docs)
    sce_alpha: float = 0.1
    sce_beta: float = 1.0
    rce_log_zero: float = -4.0  # RCE's log(0) value A (Wang et al. 2019: -4; SCLBD/DBD's 1e-4 clamp ≈ -9.21)
    epsilon: float = 0.5  # share of samples (lowest SCE loss) that keep their labels
    # -- stage 3: MixMatch over the whole model
    mixmatch_epochs: int = 20
    mixmatch_iterations: int | None = None  # steps per epoch; null = labelled samples / batch (reference: 1024)
    mixmatch_batch_size: int = 64
    mixmatch_lr: float = 0.002  # Adam
    lambda_u: float = 15.0
    rampup_epochs: float | None = None  # linear ramp-up of λu; null = mixmatch_epochs (the reference)
    sharpen_temperature: float = 0.5
    mixup_alpha: float = 0.75
    guess_augmentations: int = 2  # K
    # -- variant no_ss: plain supervised training (SGD, momentum 0.9, weight decay 5e-4, linear decay)
    supervised_epochs: int = 15
    supervised_lr: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"defense.{msg}")

        need(
            self.threads is None or (isinstance(self.threads, int) and self.threads >= 1),
            f"threads must be a positive integer or null (the run's threads), got {self.threads!r}",
        )
        need(self.variant in VARIANTS, f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        need(self.ssl in SSL_METHODS, f"ssl must be one of {', '.join(SSL_METHODS)}, got {self.ssl!r}")
        need(
            self.ssl_backend in SSL_BACKENDS,
            f"ssl_backend must be one of {', '.join(SSL_BACKENDS)}, got {self.ssl_backend!r}",
        )
        for key in (
            "batch_size",
            "ssl_epochs",
            "ssl_batch_size",
            "proj_dim",
            "head_epochs",
            "head_batch_size",
            "mixmatch_epochs",
            "mixmatch_batch_size",
            "guess_augmentations",
            "supervised_epochs",
        ):
            need(getattr(self, key) >= 1, f"{key} must be an integer >= 1, got {getattr(self, key)}")
        for key in ("proj_hidden_dim", "mixmatch_iterations"):
            v = getattr(self, key)
            need(v is None or v >= 1, f"{key} must be >= 1 or null, got {v}")
        for key in ("ssl_lr", "head_lr", "mixmatch_lr", "supervised_lr", "temperature", "sharpen_temperature"):
            need(getattr(self, key) > 0, f"{key} must be > 0, got {getattr(self, key)}")
        for key in ("ssl_weight_decay", "sce_alpha", "sce_beta", "lambda_u"):
            need(getattr(self, key) >= 0, f"{key} must be >= 0, got {getattr(self, key)}")
        need(self.sce_alpha + self.sce_beta > 0, "sce_alpha and sce_beta must not both be 0")
        need(self.rce_log_zero < 0, f"rce_log_zero must be < 0 (log of a clamped zero), got {self.rce_log_zero}")
        need(0.0 < self.epsilon <= 1.0, f"epsilon must be in (0, 1], got {self.epsilon}")
        need(0.0 <= self.byol_momentum < 1.0, f"byol_momentum must be in [0, 1), got {self.byol_momentum}")
        need(0.0 < self.crop_scale_min <= 1.0, f"crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        for key in ("jitter_prob", "grayscale_prob", "blur_prob"):
            need(0.0 <= getattr(self, key) <= 1.0, f"{key} must be in [0, 1], got {getattr(self, key)}")
        need(0.0 <= self.jitter_strength <= 1.0, f"jitter_strength must be in [0, 1], got {self.jitter_strength}")
        need(self.mixup_alpha > 0, f"mixup_alpha must be > 0, got {self.mixup_alpha}")
        need(
            self.rampup_epochs is None or self.rampup_epochs >= 0,
            f"rampup_epochs must be >= 0 or null, got {self.rampup_epochs}",
        )
        if self.ssl_checkpoint is not None and not Path(self.ssl_checkpoint).expanduser().is_file():
            raise ValueError(f"defense.ssl_checkpoint: no such file {self.ssl_checkpoint!r}")
        if self.ssl_backend == "solo" and self.variant != "no_ss" and not solo_available():
            raise ValueError(
                f"defense.ssl_backend=solo needs solo-learn's loss functions; install them with `{SOLO_INSTALL}` "
                "(or use defense.ssl_backend=lightly)"
            )


@dataclass
class DBDFullConfig(DBDConfig):
    """``defense=dbd_full``: the same defense and keys; ``configs/defense/dbd_full.yaml`` holds the paper's values."""

    name: str = "dbd_full"
