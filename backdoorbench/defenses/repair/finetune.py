"""``defense=finetune``: plain fine-tuning on the defender's clean data — the baseline every repair paper
compares against (NAD's "Finetuning" row). The backdoored model is trained further with cross-entropy on
the clean set; a backdoor that the clean data never exercises often survives it.

Defaults: NAD's teacher schedule (5% clean data, 10 epochs, SGD-Nesterov lr 0.1 → 0.01 after 2 epochs,
momentum 0.9, weight decay 1e-4, batch 64); text models AdamW 5e-5 → 5e-6 (see ``common``).
"""

from __future__ import annotations

from dataclasses import dataclass

from backdoorbench.data.base import Samples
from backdoorbench.defenses.base import RepairDefense
from backdoorbench.defenses.repair.common import FinetuneSchedule, shared_finetune
from backdoorbench.modality.base import Classifier
from backdoorbench.registry import register_defense


@dataclass
class FinetuneConfig(FinetuneSchedule):
    name: str = "finetune"


@register_defense(
    "finetune",
    modality=("text", "vision"),
    needs="the backdoored model and the defender's small clean set (with labels)",
    description="fine-tune the backdoored model on the defender's clean data (baseline of repair papers)",
    config=FinetuneConfig,
)
class Finetune(RepairDefense):
    def repair(self, model: Classifier, clean: Samples) -> Classifier:
        return shared_finetune(model, clean, self.cfg, self.seed, self.shared_dir, desc="fine-tune")
