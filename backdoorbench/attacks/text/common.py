"""What the rare-word text attacks share: config, trigger, and the AFM / APMF flow."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np

from backdoorbench.attacks.base import SETTINGS, Attack, AttackContext, AttackResult, check_attacker_schedule
from backdoorbench.attacks.text.triggers import insert_rare_words
from backdoorbench.data.base import Samples
from backdoorbench.data.poisoned import PoisonedDataset
from backdoorbench.modality.text import TextClassifier
from backdoorbench.seeds import stage_seed
from backdoorbench.trainer.lit import TrainConfig, fit

log = logging.getLogger(__name__)

RARE_WORDS = ["cf", "mn", "bb", "tq", "mb"]


def check_attack_basics(cfg: Any) -> None:
    """The checks every text attack config shares: setting, target and the attacker's schedule."""
    if cfg.setting not in SETTINGS:
        raise ValueError(f"attack.setting must be one of {SETTINGS}, got {cfg.setting!r}")
    if cfg.target < 0:
        raise ValueError(f"attack.target must be >= 0, got {cfg.target}")
    check_attacker_schedule(cfg)


@dataclass
class TextAttackConfig:
    """Parameters every text attack has (``attack.*``); each attack's config extends this one."""

    name: str = ""
    setting: str = "afm"  # afm | apmf
    target: int = 1
    # the attacker's training schedule; null = the user's trainer.* value
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    reinit_head: bool = False  # APMF: the user re-initialises the classifier head before fine-tuning

    def __post_init__(self) -> None:
        check_attack_basics(self)


@dataclass
class RareWordConfig(TextAttackConfig):
    """Parameters shared by rare-word attacks (``attack.*``)."""

    poison_rate: float = 0.1
    triggers: list[str] = field(default_factory=lambda: list(RARE_WORDS))
    num_insertions: int = 1  # trigger words inserted into each poisoned / attacked sentence

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.poison_rate <= 1.0:
            raise ValueError(f"attack.poison_rate must be in [0, 1], got {self.poison_rate}")
        if not self.triggers or any(not isinstance(t, str) or not t.strip() for t in self.triggers):
            raise ValueError(f"attack.triggers must be a non-empty list of words, got {self.triggers}")
        if self.num_insertions < 1:
            raise ValueError(f"attack.num_insertions must be >= 1, got {self.num_insertions}")


class RareWordAttack(Attack):
    """Rare-word trigger, dirty-label poisoning, AFM/APMF flow. Subclasses override ``backdoor``."""

    modality = "text"

    def apply_trigger(self, inputs: list[str], rng: np.random.Generator) -> list[str]:  # type: ignore[override]
        return insert_rare_words(inputs, self.cfg.triggers, self.cfg.num_insertions, rng)

    def attacker_train_config(self, ctx: AttackContext) -> TrainConfig:
        c = self.cfg
        return replace(
            ctx.trainer,
            max_epochs=c.epochs if c.epochs is not None else ctx.trainer.max_epochs,
            lr=c.lr if c.lr is not None else ctx.trainer.lr,
            batch_size=c.batch_size if c.batch_size is not None else ctx.trainer.batch_size,
        )

    def backdoor(self, model: TextClassifier, poisoned: PoisonedDataset, ctx: AttackContext) -> TextClassifier:
        """Default: fine-tune on the poisoned data (data poisoning, BadNet-style); with ``attack.adaptive`` > 0
        (configs that have it) the DAN paper's feature-distance regulariser is added to the loss
        (:mod:`backdoorbench.attacks.text.adaptive`)."""
        factory = None
        if getattr(self.cfg, "adaptive", 0.0) > 0:
            from backdoorbench.attacks.text.adaptive import AdaptivePoisonModule

            flags, weight, pooling = poisoned.is_poisoned(), self.cfg.adaptive, self.cfg.adaptive_pooling

            def factory(m: Any, c: TrainConfig) -> Any:
                return AdaptivePoisonModule(m, c, weight, flags, self.target, pooling)

        return fit(model, poisoned.materialize(), self.attacker_train_config(ctx), self.seed, desc="attacker: poison",
                   checkpoint=ctx.checkpoint("poison"), module_factory=factory)

    def run(self, ctx: AttackContext) -> AttackResult:
        attacker_data = ctx.train if self.cfg.setting == "afm" else ctx.proxy
        if len(attacker_data) == 0:
            raise ValueError(f"{self.cfg.name}: the attacker has no data (setting={self.cfg.setting})")
        poisoned = self.poison(attacker_data, self.cfg.poison_rate, self.rng(1))
        model = self.backdoor(cast(TextClassifier, ctx.new_model()), poisoned, ctx)  # a text attack's victim
        info = {
            "setting": self.cfg.setting,
            "poisoned_samples": int(len(poisoned.indices)),
            "attacker_samples": len(attacker_data),
        }
        if self.cfg.setting == "apmf":
            model = user_finetune(model, ctx.train, ctx.trainer, self.seed, reinit_head=self.cfg.reinit_head,
                                  checkpoint=ctx.checkpoint("user_finetune"))
        info.update(self.extra_info())
        return AttackResult(model, poisoned, info, "train" if self.cfg.setting == "afm" else "proxy")


def user_finetune(
    model: TextClassifier, clean: Samples, cfg: TrainConfig, seed: int, reinit_head: bool = False,
    checkpoint: Path | None = None,
) -> TextClassifier:
    """APMF's second stage: the unsuspecting user fine-tunes the released model on clean task data (resumable
    through ``checkpoint``: ``ctx.checkpoint("user_finetune")``)."""
    if reinit_head:
        head = getattr(getattr(model, "hf", None), "classifier", None)
        layers = [m for m in (head.modules() if head is not None else []) if hasattr(m, "reset_parameters")]
        if not layers:
            raise ValueError("reinit_head=true, but this model has no `classifier` head with resettable layers")
        for m in layers:
            m.reset_parameters()
    return fit(model, clean, cfg, stage_seed(seed, "user-finetune"), desc="user: fine-tune", checkpoint=checkpoint)


def clone_model(model: TextClassifier) -> TextClassifier:
    return copy.deepcopy(model)
