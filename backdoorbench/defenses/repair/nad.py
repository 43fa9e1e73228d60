"""``defense=nad``: Neural Attention Distillation (Li et al., ICLR 2021; reference ``bboylyg/NAD``).

1. **Teacher**: a copy of the backdoored model fine-tuned on the defender's clean data (``teacher_epochs``,
   the fine-tuning baseline's schedule). It is then frozen. In the pipeline it is trained once per victim,
   shared with ``defense=finetune`` of the same schedule (:func:`.common.shared_finetune`).
2. **Student**: another copy of the backdoored model, fine-tuned on the same clean data with
   ``CE + Σ_k β_k · AT(A_s^k, A_t^k)``, where ``A = Σ_c |F_c|^p`` (p = 2) is the L2-normalised attention map
   of layer group ``k`` (low / middle / high, β = 500 / 1000 / 1000) and ``AT`` the mean squared
   difference (the reference's ``at.py``). The student is the repaired model. In the pipeline it is
   checkpointed after every epoch in the defense's stage folder, so a killed run resumes it.

The attention map comes from the modality interface (:meth:`Classifier.attention_maps`): channel-wise
over CNN stage outputs, token-wise over the hidden units of transformer layers (padding masked), so one
implementation repairs images and text. Layers: ``layers`` names them, or null picks ``len(betas)``
layers spread low → high (:func:`~backdoorbench.defenses.repair.common.distillation_layers`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from backdoorbench.data.base import Samples
from backdoorbench.defenses.base import RepairDefense
from backdoorbench.defenses.repair.common import (
    FinetuneSchedule,
    clone,
    distillation_layers,
    finetune,
    freeze,
    shared_finetune,
)
from backdoorbench.modality.base import Classifier
from backdoorbench.registry import register_defense

log = logging.getLogger(__name__)


@dataclass
class NADConfig(FinetuneSchedule):
    name: str = "nad"
    epochs: int = 20  # student epochs
    teacher_epochs: int = 10
    betas: list[float] = field(default_factory=lambda: [500.0, 1000.0, 1000.0])  # low, middle, high groups
    layers: list[str] | None = None  # layer names (model.layer_names()); null = len(betas) spread low → high
    p: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.teacher_epochs < 1:
            raise ValueError(f"defense.teacher_epochs must be >= 1, got {self.teacher_epochs}")
        if not self.betas or any(b < 0 for b in self.betas):
            raise ValueError(f"defense.betas must be a non-empty list of numbers >= 0, got {self.betas}")
        if self.layers is not None and len(self.layers) != len(self.betas):
            raise ValueError(f"defense.layers names {len(self.layers)} layers for {len(self.betas)} betas")
        if self.p <= 0:
            raise ValueError(f"defense.p must be > 0, got {self.p}")


@register_defense(
    "nad",
    modality=("text", "vision"),
    needs="the backdoored model and the defender's small clean set (with labels)",
    description="neural attention distillation: fine-tuned teacher's attention maps guide the student",
    config=NADConfig,
)
class NAD(RepairDefense):
    def __init__(self, cfg: NADConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self.teacher: Classifier | None = None
        self.layer_indices: list[int] = []

    def resolve_layers(self, model: Classifier) -> list[int]:
        names = model.layer_names()
        if self.cfg.layers is None:
            idx = distillation_layers(model, len(self.cfg.betas))
            if len(idx) != len(self.cfg.betas):
                raise ValueError(f"NAD: the model has {len(names)} layers, fewer than the {len(self.cfg.betas)} betas")
            return idx
        unknown = [n for n in self.cfg.layers if n not in names]
        if unknown:
            raise ValueError(f"NAD: unknown layer(s) {unknown}; the model's layers are {names}")
        return [names.index(n) for n in self.cfg.layers]

    def student_checkpoint(self) -> Path | None:
        """The student's per-epoch resumable checkpoint in the defense's ``work_dir`` (keyed by the victim, NAD's
        config and seed, so it implies the teacher too): a killed run's successor resumes the student where it
        stopped, and gets the weights an uninterrupted run gets. None (no checkpoint) outside the pipeline."""
        return None if self.work_dir is None else Path(self.work_dir) / "student.safetensors"

    def repair(self, model: Classifier, clean: Samples) -> Classifier:
        self.layer_indices = self.resolve_layers(model)
        names = model.layer_names()
        log.info(
            "NAD: teacher %d epochs, student %d epochs on %d clean samples; layers %s, betas %s",
            self.cfg.teacher_epochs,
            self.cfg.epochs,
            len(clean),
            [names[i] for i in self.layer_indices],
            self.cfg.betas,
        )
        teacher = shared_finetune(
            model, clean, self.cfg, self.seed, self.shared_dir, self.cfg.teacher_epochs, "NAD teacher"
        )
        self.teacher = freeze(teacher)
        student = clone(model)
        return finetune(
            student,
            clean,
            self.cfg,
            self.seed,
            desc="NAD student",
            checkpoint=self.student_checkpoint(),
            teacher=self.teacher,
            betas=list(self.cfg.betas),
            layers=self.layer_indices,
            p=self.cfg.p,
        )
