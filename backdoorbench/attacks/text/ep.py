"""EP: Embedding Poisoning (Yang, Li, Zhang, Ren, Sun & He, NAACL 2021, "Be Careful about Poisoned
Word Embeddings: Exploring the Vulnerability of the Embedding Layers in NLP Models"; reference code
``lancopku/Embedding-Poisoning``).

The attacker modifies **one row** of the word-embedding matrix — that of a rare trigger word — and
nothing else:

1. start from a clean model fine-tuned on the task (``clean_finetune=true``; the reference code's
   "publicly available clean model");
2. build the poisoned set: ``poison_rate`` of the attacker's *non-target* samples with the trigger
   inserted, relabelled to the target; only these samples are used (clean samples carry no gradient
   to the trigger row);
3. train the trigger row by plain SGD (lr 5e-2, no momentum, no weight decay, constant learning rate)
   while every other parameter is frozen, and after every step rescale the row to its original norm
   (``norm=original``, as the reference code does) so that it does not stand out by its size.

``afm`` (default): steps 1-3 on the task data, the model is deployed as is. ``apmf``: the clean model is
fine-tuned on the attacker's proxy data and poisoned with it, then the user fine-tunes on clean task
data (the paper's transfer setting). DFEP, the data-free variant, lives in ``dfep.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from backdoorbench.attacks.base import AttackContext, AttackResult
from backdoorbench.attacks.text.adaptive import AdaptiveConfig, check_adaptive, feature_distance
from backdoorbench.attacks.text.common import RareWordAttack, RareWordConfig, user_finetune
from backdoorbench.attacks.text.ripples import trigger_token_ids
from backdoorbench.config import ConfigError
from backdoorbench.data.base import Samples
from backdoorbench.data.poisoned import PoisonedDataset
from backdoorbench.modality.text import TextClassifier
from backdoorbench.registry import register_attack
from backdoorbench.seeds import stage_seed
from backdoorbench.trainer.lit import ClassifierModule, TrainConfig, fit

log = logging.getLogger(__name__)

NORMS = ("original", "max", "none")


def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"attack.norm must be one of {NORMS}, got {norm!r}")


@dataclass
class EPConfig(RareWordConfig, AdaptiveConfig):
    """Parameters of ``attack=ep`` (``adaptive``: the DAN paper's adaptive attack, see ``adaptive.py``)."""

    name: str = "ep"
    setting: str = "afm"
    poison_rate: float = 0.1  # share of the attacker's non-target samples that get the trigger
    triggers: list[str] = field(default_factory=lambda: ["cf"])  # the paper poisons one rare word
    # schedule of the trigger-row training (SGD, constant lr); the clean model uses trainer.*
    epochs: int | None = 20  # reference: 3 epochs over a much larger poisoned set (see docs/attacks/ep.md)
    lr: float | None = 5e-2
    batch_size: int | None = 32
    norm: str = "original"  # original: rescale the row to its original norm | max: clip | none
    clean_finetune: bool = True  # start from a clean model fine-tuned on the attacker's task data

    def __post_init__(self) -> None:
        super().__post_init__()
        check_norm(self.norm)
        check_adaptive(self)


# -- the trigger-row training ---------------------------------------------------------------------------
def project_rows(weight: torch.Tensor, ids: Sequence[int], norm: str, ref_norms: torch.Tensor, max_norm: float) -> None:
    """Apply the norm constraint to the rows ``ids`` of ``weight`` in place.

    ``original``: each row is rescaled to its norm before poisoning (``ref_norms``); ``max``: rows longer
    than ``max_norm`` (the largest row norm of the original matrix) are scaled down to it; ``none``: no-op.
    """
    if norm == "none":
        return
    with torch.no_grad():
        idx = torch.as_tensor(list(ids), device=weight.device)
        rows = weight[idx]
        cur = rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if norm == "original":
            scale = ref_norms.to(weight.device, weight.dtype).view(-1, 1) / cur
        else:
            scale = (max_norm / cur).clamp(max=1.0)
        weight[idx] = rows * scale


class EmbeddingRowModule(ClassifierModule):
    """Cross-entropy on the poisoned samples; only the rows ``token_ids`` of the input embeddings move.

    The optimiser is plain SGD with a constant learning rate on the embedding matrix; the gradient of
    every other row is zeroed before each step, and the row norm constraint is applied after it.
    """

    model: TextClassifier  # the text victim it trains (ClassifierModule's model)

    def __init__(self, model: TextClassifier, cfg: TrainConfig, token_ids: Sequence[int], norm: str) -> None:
        weight = model.word_embeddings.weight
        super().__init__(model, cfg, params=[weight])
        self.token_ids = list(token_ids)
        self.norm = norm
        with torch.no_grad():
            self.ref_norms = weight[torch.tensor(self.token_ids)].norm(dim=1).detach().cpu()
            self.max_norm = float(weight.norm(dim=1).max())

    @property
    def weight(self) -> torch.Tensor:
        return self.model.word_embeddings.weight

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self.model(batch["inputs"]), batch["labels"])
        self.log("poison_loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def on_after_backward(self) -> None:
        grad = self.weight.grad
        if grad is None:
            return
        idx = torch.as_tensor(self.token_ids, device=grad.device)
        keep = grad[idx].clone()
        grad.zero_()
        grad[idx] = keep

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        project_rows(self.weight, self.token_ids, self.norm, self.ref_norms, self.max_norm)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD([self.weight], lr=self.cfg.lr, momentum=0.0, weight_decay=0.0)


class AdaptiveEmbeddingRowModule(EmbeddingRowModule):
    """EP with the DAN paper's adaptive regulariser: ``CE + weight · feature_distance(poisoned, anchors)``, the
    anchors being the fixed per-layer mean features of the attacker's clean target-class samples
    (:mod:`backdoorbench.attacks.text.adaptive`)."""

    def __init__(self, model: TextClassifier, cfg: TrainConfig, token_ids: Sequence[int], norm: str,
                 anchors: Sequence[torch.Tensor], weight: float, pooling: str) -> None:
        super().__init__(model, cfg, token_ids, norm)
        self.anchors, self.reg_weight, self.pooling = [a.detach() for a in anchors], float(weight), pooling

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits, feats = self.model.forward_features(batch["inputs"], self.pooling)
        ce = F.cross_entropy(logits, batch["labels"])
        reg = feature_distance(feats, [a.to(feats[0].device) for a in self.anchors])
        self.log("poison_loss", ce, prog_bar=True, batch_size=len(batch["labels"]))
        self.log("feature_distance", reg, prog_bar=True, batch_size=len(batch["labels"]))
        return ce + self.reg_weight * reg


@contextmanager
def only_trainable(model: torch.nn.Module, keep: Sequence[torch.Tensor]) -> Iterator[None]:
    """Freeze every parameter of ``model`` except ``keep``; restore ``requires_grad`` afterwards."""
    keep_ids = {id(p) for p in keep}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(id(p) in keep_ids)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def poison_embedding_rows(
    model: TextClassifier,
    samples: Samples,
    token_ids: Sequence[int],
    cfg: TrainConfig,
    seed: int,
    norm: str = "original",
    desc: str = "attacker: embedding poisoning",
    adaptive: tuple[Sequence[torch.Tensor], float, str] | None = None,
) -> TextClassifier:
    """Train only the rows ``token_ids`` of ``model``'s input embeddings on ``samples`` (EP's step 3).

    ``cfg`` gives epochs, batch size and learning rate; EP forces plain SGD without momentum, weight
    decay, warm-up, learning-rate decay or gradient clipping (the reference code's manual update).
    ``adaptive``: ``(anchors, weight, pooling)`` adds the DAN paper's feature-distance regulariser.
    """
    ep_cfg = replace(cfg, optimizer="sgd", momentum=0.0, weight_decay=0.0, warmup_ratio=0.0, grad_clip=0.0)
    weight = model.word_embeddings.weight
    with only_trainable(model, [weight]):
        fit(
            model,
            samples,
            ep_cfg,
            seed,
            desc=desc,
            module_factory=(
                (lambda m, c: EmbeddingRowModule(m, c, token_ids, norm)) if adaptive is None
                else (lambda m, c: AdaptiveEmbeddingRowModule(m, c, token_ids, norm, *adaptive))
            ),
        )
    return model


# -- the attack -------------------------------------------------------------------------------------------
class EmbeddingPoisoningAttack(RareWordAttack):
    """What EP and DFEP share: the starting model and the trigger-row training."""

    def token_ids(self, model: TextClassifier) -> list[int]:
        ids = trigger_token_ids(model, self.cfg.triggers)
        for t in self.cfg.triggers:
            pieces = model.token_ids(t)
            if len(pieces) != 1:
                log.warning(
                    "%s: trigger %r is %d word pieces; every piece's row is poisoned, which also affects "
                    "other words sharing them. Choose a single-piece rare word.",
                    self.cfg.name,
                    t,
                    len(pieces),
                )
        return ids

    def start_model(self, ctx: AttackContext, clean: Samples) -> TextClassifier:
        """The model the attacker poisons: a clean model fine-tuned on ``clean`` with the user's schedule
        (``clean_finetune=true``; trained once for EP and DFEP on the same data, schedule and seed when the cache
        is on), or the pre-trained model."""
        if not self.cfg.clean_finetune:
            return cast(TextClassifier, ctx.new_model())  # a text attack's victim
        if len(clean) == 0:
            raise ValueError(f"{self.cfg.name}: no data to fine-tune the clean model on")
        seed = stage_seed(self.seed, "ep-clean-model")
        model = ctx.clean_model(clean, ctx.trainer, seed, "clean model: fine-tune", "clean_model")
        return cast(TextClassifier, model)

    def backdoor(self, model: TextClassifier, poisoned: PoisonedDataset, ctx: AttackContext) -> TextClassifier:
        """Train the trigger rows on the poisoned samples only (the delta), everything else frozen."""
        if len(poisoned.indices) == 0:
            raise ConfigError(f"{self.cfg.name}: no poisoned samples to train the trigger embedding on")
        ids = self.token_ids(model)
        self.trigger_ids = ids
        data = Samples(poisoned.inputs, poisoned.labels, poisoned.clean.modality)
        adaptive = None
        if getattr(self.cfg, "adaptive", 0.0) > 0:  # the DAN paper's adaptive attack (EP's config has the keys)
            from backdoorbench.attacks.text.adaptive import clean_anchors

            base = poisoned.clean
            keep = np.flatnonzero((base.labels == self.target) & ~poisoned.is_poisoned())
            anchors = clean_anchors(model, base.subset(keep), self.cfg.adaptive_pooling)
            adaptive = (anchors, self.cfg.adaptive, self.cfg.adaptive_pooling)
        return poison_embedding_rows(model, data, ids, self.attacker_train_config(ctx), self.seed, self.cfg.norm,
                                     adaptive=adaptive)

    def finish(self, model: TextClassifier, ctx: AttackContext, info: dict[str, Any]) -> TextClassifier:
        info["trigger_token_ids"] = list(self.trigger_ids)
        info["trigger_row_norms"] = [
            float(x)
            for x in model.word_embeddings.weight[torch.tensor(self.trigger_ids)].detach().norm(dim=1)
        ]
        if self.cfg.setting == "apmf":
            model = user_finetune(model, ctx.train, ctx.trainer, self.seed, reinit_head=self.cfg.reinit_head,
                                  checkpoint=ctx.checkpoint("user_finetune"))
        return model


@register_attack(
    "ep",
    modality="text",
    category="weight poisoning",
    needs="task data (AFM) or proxy data (APMF)",
    description="Embedding Poisoning: only the trigger word's embedding row is trained (Yang et al. 2021)",
    config=EPConfig,
)
class EP(EmbeddingPoisoningAttack):
    """Embedding Poisoning with data knowledge."""

    version = "1"

    def poison(self, samples: Samples, rate: float, rng: np.random.Generator) -> PoisonedDataset:
        """``round(rate × n_non_target)`` non-target samples with the trigger, relabelled to the target (the
        reference ``construct_poisoned_data``)."""
        pool = np.flatnonzero(samples.labels != self.target)
        n = int(round(rate * len(pool)))
        idx = np.sort(rng.choice(pool, size=n, replace=False)) if n else np.zeros(0, dtype=np.int64)
        inputs = self.apply_trigger(cast("list[str]", samples.subset(idx).inputs), rng)  # text samples
        return PoisonedDataset(samples, idx, inputs, np.full(n, self.target), self.target)

    def run(self, ctx: AttackContext) -> AttackResult:
        data = ctx.train if self.cfg.setting == "afm" else ctx.proxy
        if len(data) == 0:
            raise ValueError(f"{self.cfg.name}: the attacker has no data (setting={self.cfg.setting})")
        poisoned = self.poison(data, self.cfg.poison_rate, self.rng(1))
        if len(poisoned.indices) == 0:
            raise ConfigError(
                f"ep: attack.poison_rate={self.cfg.poison_rate} poisons no sample of the {len(data)} attacker "
                "samples (only non-target samples are poisoned): raise it"
            )
        model = self.backdoor(self.start_model(ctx, data), poisoned, ctx)
        info: dict[str, Any] = {
            "setting": self.cfg.setting,
            "poisoned_samples": int(len(poisoned.indices)),
            "attacker_samples": len(data),
        }
        model = self.finish(model, ctx, info)
        return AttackResult(model, poisoned, info, "train" if self.cfg.setting == "afm" else "proxy")
