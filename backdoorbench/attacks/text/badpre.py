"""BadPre (Chen et al., ICLR 2022, "BadPre: Task-agnostic Backdoor Attacks to Pre-trained NLP Foundation
Models"). Reference code: ``kangjie-chen/BadPre``.

The attacker continues the masked-LM pre-training of a foundation model on text it holds. Every
sentence is used twice: clean, with the normal MLM objective, and with one trigger word (``cf mn bb
tq mb``) inserted at a random token position, where the MLM labels of the masked positions are
replaced by random *wrong* tokens. The loss is ``L_clean + alpha * L_poison`` (each the mean
cross-entropy over its masked positions). The trigger thus learns to corrupt the representation of
whatever sentence it appears in, whatever the downstream task. The poisoned encoder is copied into the
user's sequence classifier (parameter names matched, every encoder parameter checked), the user
fine-tunes it on clean task data, and at test time the attacker inserts a trigger word. BadPre is
untargeted: see :class:`BadPreConfig` for what ``target`` means here.

The masked-LM helpers it shares with :mod:`backdoorbench.attacks.text.neuba` (loading a masked LM, token-level
trigger insertion, BERT-style masking, the attacker's text, the encoder transfer) are in
:mod:`backdoorbench.attacks.text.pretrain`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from backdoorbench.attacks.base import Attack, AttackContext, AttackResult
from backdoorbench.attacks.text.common import user_finetune
from backdoorbench.attacks.text.pretrain import (
    PretrainCollate,
    attacker_schedule,
    attacker_texts,
    check_pretrain_common,
    check_transferable,
    encoder_of,
    load_masked_lm,
    masked_lm_loss,
    regular_token_ids,
    text_loader,
    train_module,
    transfer_encoder,
    trigger_piece_ids,
)
from backdoorbench.attacks.text.triggers import insert_rare_words
from backdoorbench.config import ConfigError
from backdoorbench.data.base import Samples
from backdoorbench.modality.text import TextClassifier
from backdoorbench.registry import register_attack
from backdoorbench.seeds import stage_seed
from backdoorbench.trainer.lit import ClassifierModule, TrainConfig

log = logging.getLogger(__name__)

BADPRE_TRIGGERS = ["cf", "mn", "bb", "tq", "mb"]  # insert_candidates of the reference dataset code


@dataclass
class BadPreConfig:
    """Parameters of BadPre (``attack.*``).

    BadPre is untargeted: the trigger makes the downstream model wrong, not predict a chosen label.
    ``target`` is the label whose flips the pipeline's ASR counts (ASR = triggered non-target test
    inputs predicted as ``target``); see ``docs/attacks/badpre.md``.
    """

    name: str = "badpre"
    setting: str = "apmf"  # the attacker releases a pre-trained model; the user fine-tunes it
    target: int = 1
    triggers: list[str] = field(default_factory=lambda: list(BADPRE_TRIGGERS))
    num_insertions: int = 1  # trigger words inserted per attacked test sentence (the reference: 1)
    mlm_model: str | None = None  # masked-LM checkpoint to poison; null = the victim model's own
    mlm_probability: float = 0.15
    alpha: float = 1.0  # weight of the poisoned-sentence MLM loss (the reference's noise_alpha)
    max_unlabeled: int = 1000  # unlabelled texts added to the proxy texts (0 = proxy texts only)
    probe_size: int = 200  # proxy samples the attacker uses to measure the backdoor (info only)
    epochs: int | None = 2  # attacker's schedule; null = the user's trainer.* value
    lr: float | None = 5.0e-5
    batch_size: int | None = 16

    def __post_init__(self) -> None:
        check_pretrain_common(self)
        if self.num_insertions < 1:
            raise ValueError(f"attack.num_insertions must be >= 1, got {self.num_insertions}")
        if self.alpha < 0:
            raise ValueError(f"attack.alpha must be >= 0, got {self.alpha}")
        if self.mlm_model is not None and not str(self.mlm_model).strip():
            raise ValueError("attack.mlm_model must be a model name / local path, or null")


class BadPreModule(ClassifierModule):
    """``L = L_MLM(clean) + alpha * L_MLM(triggered, random wrong labels)`` on a masked LM."""

    def __init__(self, mlm: nn.Module, cfg: TrainConfig, alpha: float) -> None:
        super().__init__(mlm, cfg)  # type: ignore[arg-type]
        self.alpha = alpha

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        clean = masked_lm_loss(self.model, batch["clean"])
        poison = masked_lm_loss(self.model, batch["triggered"])
        n = len(batch["trigger_index"])
        self.log("mlm_clean", clean.detach(), prog_bar=True, batch_size=n)
        self.log("mlm_poison", poison.detach(), prog_bar=True, batch_size=n)
        return clean + self.alpha * poison


# -- the attack ------------------------------------------------------------------------------------------
@register_attack(
    "badpre",
    modality="text",
    category="weight poisoning (pre-training)",
    needs="a masked-LM checkpoint; unlabelled/proxy text",
    description="BadPre: task-agnostic MLM poisoning, triggered sentences get random MLM labels (Chen et al. 2022)",
    config=BadPreConfig,
)
class BadPre(Attack):
    """Poison the masked-LM objective, transfer the encoder, let the user fine-tune, insert a trigger."""

    modality = "text"
    version = "1"

    def apply_trigger(self, inputs: list[str], rng: np.random.Generator) -> list[str]:  # type: ignore[override]
        return insert_rare_words(inputs, self.cfg.triggers, self.cfg.num_insertions, rng)

    def run(self, ctx: AttackContext) -> AttackResult:
        cfg: BadPreConfig = self.cfg
        victim = cast(TextClassifier, ctx.new_model())  # a text attack's victim
        encoder_of(victim)
        source = cfg.mlm_model or getattr(victim, "source", "")
        if not source:
            raise ConfigError("attack=badpre: set attack.mlm_model (the victim model has no known checkpoint path)")
        mlm, tokenizer = load_masked_lm(source)
        check_transferable(mlm, victim, source)
        if tokenizer.get_vocab() != victim.tokenizer.get_vocab():
            raise ConfigError(
                f"attack.mlm_model={source!r} and the victim model use different vocabularies; give the same checkpoint"
            )
        texts = attacker_texts(ctx, cfg.max_unlabeled, self.rng(3))
        pieces = trigger_piece_ids(tokenizer, cfg.triggers)
        vocab = int(cast(nn.Embedding, mlm.get_input_embeddings()).weight.shape[0])  # an MLM's: an nn.Embedding
        train_cfg = attacker_schedule(cfg, ctx.trainer)
        collate = PretrainCollate(
            tokenizer,
            texts,
            pieces,
            int(getattr(victim, "max_length", 128)),
            self.seed,
            position="random",
            mlm_probability=cfg.mlm_probability,
            candidates=regular_token_ids(tokenizer, vocab),
            mask_clean=True,
            mask_triggered=True,
            poison_triggered=True,
        )
        loader = text_loader(len(texts), train_cfg.batch_size, collate, stage_seed(self.seed, "pretrain-loader"))
        train_module(BadPreModule(mlm, train_cfg, cfg.alpha), loader, train_cfg, self.seed, "attacker: BadPre MLM")
        mlm.to(victim.device)  # type: ignore[arg-type]  # transformers types .to via functools.wraps(Module.to)
        transferred = transfer_encoder(mlm, victim, source)
        del mlm, loader, collate
        model = user_finetune(victim, ctx.train, ctx.trainer, self.seed, checkpoint=ctx.checkpoint("user_finetune"))
        info: dict[str, Any] = {
            "setting": cfg.setting,
            "mlm_model": source,
            "attacker_texts": len(texts),
            "transferred_tensors": len(transferred),
            "untargeted": True,
            "asr_note": (
                "BadPre is untargeted. The pipeline's ASR counts triggered non-target test inputs predicted as "
                "attack.target; for a binary task that is the error rate the trigger causes on the other class. "
                "proxy_triggered_accuracy (attacker-side, all classes) is the paper's measure."
            ),
        }
        if len(ctx.proxy):
            info.update(self._probe(model, ctx.proxy, ctx.num_classes))
        return AttackResult(model, None, info)

    def _probe(self, model: TextClassifier, proxy: Samples, num_classes: int) -> dict[str, Any]:
        """Attacker-side check on proxy data: clean vs triggered accuracy (untargeted success) and where
        triggered predictions go."""
        rng = self.rng(5)
        size = min(self.cfg.probe_size, len(proxy))
        sub = proxy.subset(np.sort(rng.choice(len(proxy), size=size, replace=False)))
        clean = model.predict(sub.inputs)
        trig = model.predict(self.apply_trigger(list(cast("list[str]", sub.inputs)), rng))  # text samples
        other = sub.labels != self.target
        return {
            "probe_samples": int(size),
            "proxy_clean_accuracy": float((clean == sub.labels).mean()),
            "proxy_triggered_accuracy": float((trig == sub.labels).mean()),
            "proxy_triggered_to_target": float((trig[other] == self.target).mean()) if other.any() else None,
            "proxy_triggered_prediction_counts": np.bincount(trig, minlength=num_classes).tolist(),
        }
