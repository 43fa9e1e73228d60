"""``defense=nc_unlearn``: Neural Cleanse's mitigation by unlearning (Wang et al., IEEE S&P 2019, Sec. VI-C;
BackdoorBench's ``defense/nc.py``, step d, and ``config/defense/nc/*.yaml`` for the schedule).

A repair: it gets the backdoored model and the defender's clean reserve. It first runs Neural Cleanse on that
reserve (:func:`~backdoorbench.defenses.inspection.neural_cleanse.cleanse`, the same code as
``defense=neural_cleanse``). When no class is flagged the model is returned unchanged (the paper patches only a
model it detected; BackdoorBench's ``nc.py`` likewise returns the loaded model). Otherwise it builds the
unlearning set as BackdoorBench does: a seeded ``unlearning_ratio`` (20%) of the reserve gets the reversed
trigger of each flagged class stamped on, ``x' = (1 - m) · x + m · p``, with its TRUE label (one copy per
flagged class); the rest (80%) stays clean; then it fine-tunes the model on that set (BackdoorBench: SGD lr 0.01,
momentum 0.9, weight decay 5e-4, cosine over the epochs, batch 256, the model's training augmentation).

What NC concluded is written next to ``results.json``: ``nc_unlearn.json`` (flag, suspected targets, mask norms,
anomaly indices, the unlearning set's size) and ``trigger/`` (the reversed triggers as PNG).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from backdoorbench.config import ConfigError
from backdoorbench.data.base import Samples
from backdoorbench.defenses.base import RepairDefense, Verdict
from backdoorbench.defenses.inspection.common import save_trigger_images
from backdoorbench.defenses.inspection.neural_cleanse import ReverseSchedule, cleanse
from backdoorbench.defenses.repair.common import FinetuneSchedule, RepairModule, clone, repeat_to_steps, train_config
from backdoorbench.modality.base import Classifier
from backdoorbench.registry import register_defense
from backdoorbench.trainer.lit import fit, make_optimizer

log = logging.getLogger(__name__)

SCHEDULES = ("cosine", "step")


@dataclass
class NCUnlearnConfig(FinetuneSchedule):
    name: str = "nc_unlearn"
    clean_fraction: float | None = 0.05  # BackdoorBench ratio: 5% of the training set
    unlearning_ratio: float = 0.2  # share of the reserve stamped with each flagged trigger (paper, BackdoorBench)
    epochs: int = 100  # BackdoorBench epochs
    batch_size: int = 256
    optimizer: str | None = "sgd"
    lr: float | None = 0.01
    lr_schedule: str = "cosine"  # cosine over the epochs (BackdoorBench CosineAnnealingLR) | step (lr_decay_*)
    nesterov: bool = False
    weight_decay: float = 5e-4
    nc: ReverseSchedule = field(default_factory=ReverseSchedule)  # Neural Cleanse's optimisation and flag

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.unlearning_ratio < 1.0:
            raise ValueError(f"defense.unlearning_ratio must be in (0, 1), got {self.unlearning_ratio}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"defense.lr_schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}")


class UnlearnModule(RepairModule):
    """Cross-entropy fine-tuning (:class:`RepairModule` without a teacher) with BackdoorBench's cosine schedule."""

    def configure_optimizers(self) -> Any:
        cfg: NCUnlearnConfig = self.cfg  # type: ignore[assignment]
        if cfg.lr_schedule == "step":
            return super().configure_optimizers()
        name, lr = cfg.resolved(self.model.modality)
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = make_optimizer(params, name, lr, cfg.weight_decay, cfg.momentum, cfg.nesterov)
        t_max = cfg.epochs
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 * (1 + math.cos(math.pi * min(e, t_max) / t_max)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def stamp(images: torch.Tensor, mask: np.ndarray, pattern: np.ndarray) -> torch.Tensor:
    """``(1 - m) · x + m · p`` on uint8 images [N, C, H, W] with a mask [H, W] and a pattern [C, H, W] in [0, 1],
    back to uint8 (rounded)."""
    x = images.to(torch.float64) / 255.0
    m = torch.as_tensor(mask, dtype=torch.float64)
    p = torch.as_tensor(pattern, dtype=torch.float64)
    return ((1 - m) * x + m * p).mul(255.0).round().clamp(0, 255).to(torch.uint8)


def unlearning_set(clean: Samples, verdict: Verdict, ratio: float, rng: np.random.Generator) -> Samples:
    """BackdoorBench's relabelled set: ``round(ratio · n)`` samples of the reserve (drawn with ``rng``) carry each
    flagged class's reversed trigger with their true label (one copy per flagged class); the others stay clean."""
    n = len(clean)
    k = int(round(ratio * n))
    if k < 1 or k >= n:
        raise ConfigError(f"defense.unlearning_ratio={ratio} of {n} clean samples leaves no clean or no stamped part")
    perm = rng.permutation(n)
    keep, stamped = np.sort(perm[k:]), np.sort(perm[:k])
    base = clean.subset(stamped).loaded()
    parts = [clean.subset(keep).loaded()]
    for c in verdict.suspected_targets:
        t = verdict.triggers[c]
        parts.append(Samples(stamp(base.inputs, t["mask"], t["pattern"]), base.labels, "vision"))  # type: ignore[arg-type]
    return Samples.concat(parts)


@register_defense(
    "nc_unlearn",
    modality="vision",
    needs="the backdoored model and the defender's small clean set (with labels)",
    description="Neural Cleanse's mitigation: if NC flags a class, unlearn its reversed trigger by fine-tuning",
    config=NCUnlearnConfig,
)
class NCUnlearn(RepairDefense):
    def __init__(self, cfg: Any, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self.verdict: Verdict | None = None  # what Neural Cleanse concluded (after repair)
        self.unlearning_size: int = 0  # samples fine-tuned on (0: not flagged, model unchanged)

    def repair(self, model: Classifier, clean: Samples) -> Classifier:
        if clean.modality != "vision":
            raise ConfigError("nc_unlearn supports vision only: Neural Cleanse's trigger is a mask over image pixels")
        cfg: NCUnlearnConfig = self.cfg
        t0 = time.perf_counter()
        self.verdict = cleanse(model, clean.inputs, cfg.nc, self.seed)
        self.stage_times["reverse"] = round(time.perf_counter() - t0, 3)
        if not self.verdict.flagged:
            log.info("nc_unlearn: nothing flagged (anomaly index %.2f): model unchanged", self.verdict.score)
            self._record()
            return model
        data = unlearning_set(clean, self.verdict, cfg.unlearning_ratio, self.rng(7))
        self.unlearning_size = len(data)
        log.info("nc_unlearn: flagged %s; unlearning on %d samples", self.verdict.suspected_targets, len(data))
        self._record()
        t0 = time.perf_counter()
        repaired = clone(model)
        for p in repaired.parameters():
            p.requires_grad_(True)
        fit(
            repaired,
            repeat_to_steps(data, cfg.steps_per_epoch, cfg.batch_size),
            train_config(cfg),
            seed=self.seed,
            desc="nc unlearning",
            module_factory=lambda m, _tc: UnlearnModule(m, cfg),
        )
        self.stage_times["unlearn"] = round(time.perf_counter() - t0, 3)
        return repaired

    def _record(self) -> None:
        """``nc_unlearn.json`` and ``trigger/`` in the run's folder (when the pipeline set one)."""
        if self.run_dir is None or self.verdict is None:
            return
        v = self.verdict
        files = save_trigger_images(v, self.run_dir / "trigger")
        record = {
            "flagged": v.flagged,
            "verdict_score": float(v.score),
            "suspected_targets": [int(c) for c in v.suspected_targets],
            "top_class": int(v.top_class),
            "classes": [int(c) for c in v.classes],
            "class_scores": [float(s) for s in v.class_scores],
            "unlearning_size": self.unlearning_size,
            "trigger_files": [str(f.relative_to(self.run_dir)) for f in files],
            **(v.extra or {}),
        }
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "nc_unlearn.json").write_text(json.dumps(record, indent=2))
