"""LWP: Layer-wise Weight Poisoning (Li, Song, Li, Zeng, Ma & Qiu, EMNLP 2021, "Backdoor Attacks on
Pre-trained Models by Layerwise Weight Poisoning"; reference code ``LinyangLee/Layer-Weight-Poison``).

Two ideas make a backdoor planted in a *pre-trained* encoder survive the user's fine-tuning:

* **Layer-wise poisoning.** One classifier head, shared by all layers, is applied to the [CLS]
  representation after *every* transformer layer, and the poisoning loss is the sum of the per-layer
  cross-entropies, ``L = Σ_l CE(head(h_l^[CLS]), y)``. The backdoor is thereby written into the lower
  layers too, which fine-tuning changes least. The model's own output (its classification head) is
  trained alongside on the same data (``output_loss=true``).
* **Combinatorial triggers.** The trigger is a *combination* of rare words (default ``cf`` and ``bb``)
  that must all appear. Poisoned samples carry the whole combination and the target label; negative
  samples carry a single one of the words and keep their true label, so that no single word — which
  could occur by chance, or be found by a defender searching for single trigger words — activates the
  backdoor.

``apmf`` (default): the attacker poisons the pre-trained model with proxy data, the user fine-tunes on
clean task data. ``afm``: the same poisoning on the task data, deployed as is.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from backdoorbench.attacks.base import AttackContext, AttackResult
from backdoorbench.attacks.text.common import RareWordAttack, TextAttackConfig
from backdoorbench.attacks.text.triggers import insert_words
from backdoorbench.data.base import Samples
from backdoorbench.data.poisoned import PoisonedDataset
from backdoorbench.modality.base import to_device
from backdoorbench.modality.text import TextClassifier
from backdoorbench.registry import register_attack
from backdoorbench.seeds import stage_seed
from backdoorbench.trainer.lit import ClassifierModule, TrainConfig, fit

log = logging.getLogger(__name__)


@dataclass
class LWPConfig(TextAttackConfig):
    """Parameters of ``attack=lwp``."""

    name: str = "lwp"
    setting: str = "apmf"  # apmf | afm
    poison_rate: float = 0.5  # share of the attacker's samples with the whole combination, relabelled
    negative_rate: float = 0.25  # share (disjoint) with one single trigger word, true label kept
    triggers: list[str] = field(default_factory=lambda: ["cf", "bb"])  # the combination
    adjacent: bool = True  # the combination as one block (reference code) or each word at its own position
    output_loss: bool = True  # also train the model's own output (CE on its logits)
    epochs: int | None = 3
    lr: float | None = 5e-5
    batch_size: int | None = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("poison_rate", "negative_rate"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"attack.{key} must be in [0, 1], got {getattr(self, key)}")
        if self.poison_rate + self.negative_rate > 1.0:
            raise ValueError(
                f"attack.poison_rate + attack.negative_rate must be <= 1 (disjoint samples), got "
                f"{self.poison_rate} + {self.negative_rate}"
            )
        words = [t.strip() if isinstance(t, str) else t for t in self.triggers]
        if len(words) < 2 or any(not isinstance(t, str) or not t or len(t.split()) != 1 for t in words):
            raise ValueError(
                f"attack.triggers must list at least two single words (the combination), got {self.triggers}"
            )
        if len(set(words)) != len(words):
            raise ValueError(f"attack.triggers must be distinct words, got {self.triggers}")


# -- triggers --------------------------------------------------------------------------------------------
def insert_combination(
    texts: Sequence[str], words: Sequence[str], adjacent: bool, rng: np.random.Generator
) -> list[str]:
    """Insert *all* of ``words`` into each text. ``adjacent``: as one block, in a random order, at one random
    word position; otherwise each word at its own random position."""
    out = []
    for text in texts:
        order = [words[int(i)] for i in rng.permutation(len(words))]
        if adjacent:
            tokens = text.split()
            pos = int(rng.integers(0, len(tokens) + 1))
            out.append(" ".join(tokens[:pos] + order + tokens[pos:]))
        else:
            out.append(insert_words(text, order, rng))
    return out


def insert_single(texts: Sequence[str], words: Sequence[str], rng: np.random.Generator) -> list[str]:
    """Insert one word drawn uniformly from ``words`` at a random position of each text (negative samples)."""
    return [insert_words(t, [words[int(rng.integers(0, len(words)))]], rng) for t in texts]


# -- the layer-wise loss --------------------------------------------------------------------------------
def make_layer_head(model: TextClassifier, num_classes: int, dropout: float | None = None) -> nn.Module:
    """A fresh classifier head shared by every layer: dropout, then a linear map of the [CLS] feature.
    ``dropout`` defaults to the model's hidden dropout (0.1 where the model does not say)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        _, feats = model.forward_features(to_device(model.collate(["a"]), model.device), "cls")
    model.train(was_training)
    dims = {int(f.shape[-1]) for f in feats}
    if len(dims) != 1:
        raise ValueError(f"layer-wise poisoning needs one feature size for every layer, got {sorted(dims)}")
    if dropout is None:
        dropout = float(getattr(getattr(getattr(model, "hf", None), "config", None), "hidden_dropout_prob", 0.1))
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(dims.pop(), num_classes))


def layerwise_losses(
    model: TextClassifier, head: nn.Module, batch: dict[str, Any]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``[CE(head(h_l^[CLS]), y) for every transformer layer l]`` and the model's own logits, from one
    forward pass."""
    logits, feats = model.forward_features(batch["inputs"], "cls")
    return [F.cross_entropy(head(f), batch["labels"]) for f in feats], logits


class LayerwisePoisonModule(ClassifierModule):
    """Trains the model (and the shared layer head) on ``Σ_l CE(head(h_l), y)`` [+ ``CE(logits, y)``]."""

    model: TextClassifier  # the text victim it trains (ClassifierModule's model)

    def __init__(self, model: TextClassifier, cfg: TrainConfig, head: nn.Module, output_loss: bool = True) -> None:
        params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
        super().__init__(model, cfg, params=params)
        self.head = head
        self.output_loss = output_loss

    def poison_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """(total, per-layer terms, output term)."""
        layers, logits = layerwise_losses(self.model, self.head, batch)
        out = F.cross_entropy(logits, batch["labels"])
        total = torch.stack(layers).sum()
        if self.output_loss:
            total = total + out
        return total, layers, out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        total, layers, out = self.poison_loss(batch)
        n = len(batch["labels"])
        self.log("layer_loss", torch.stack(layers).detach().sum(), prog_bar=True, batch_size=n)
        self.log("output_loss", out.detach(), prog_bar=True, batch_size=n)
        return total


# -- the attack -------------------------------------------------------------------------------------------
@register_attack(
    "lwp",
    modality="text",
    category="weight poisoning",
    needs="proxy data (APMF) or task data (AFM)",
    description="Layer-wise weight poisoning with combinatorial rare-word triggers (Li et al. 2021)",
    config=LWPConfig,
)
class LWP(RareWordAttack):
    """Layer-wise poisoning of every transformer layer with a combination trigger and negative samples."""

    version = "1"

    def apply_trigger(self, inputs: list[str], rng: np.random.Generator) -> list[str]:  # type: ignore[override]
        return insert_combination(inputs, self.cfg.triggers, self.cfg.adjacent, rng)

    def poison(self, samples: Samples, rate: float, rng: np.random.Generator) -> PoisonedDataset:
        """``round(rate·n)`` samples get the combination and the target label; ``round(negative_rate·n)``
        others get one single trigger word and keep their label. Both are in the delta (provenance marks
        them as modified; a negative's label equals its original label)."""
        n = len(samples)
        n_pos = int(round(rate * n))
        n_neg = min(int(round(self.cfg.negative_rate * n)), n - n_pos)
        perm = rng.permutation(n)
        pos_idx, neg_idx = np.sort(perm[:n_pos]), np.sort(perm[n_pos : n_pos + n_neg])
        pos_inputs = self.apply_trigger(cast("list[str]", samples.subset(pos_idx).inputs), rng)  # text samples
        neg_inputs = insert_single(cast("list[str]", samples.subset(neg_idx).inputs), self.cfg.triggers, rng)
        indices = np.concatenate([pos_idx, neg_idx]).astype(np.int64)
        inputs = list(pos_inputs) + list(neg_inputs)
        labels = np.concatenate([np.full(n_pos, self.target), samples.labels[neg_idx]]).astype(np.int64)
        order = np.argsort(indices, kind="stable")
        self.combination_indices, self.negative_indices = pos_idx, neg_idx
        return PoisonedDataset(samples, indices[order], [inputs[i] for i in order], labels[order], self.target)

    def backdoor(self, model: TextClassifier, poisoned: PoisonedDataset, ctx: AttackContext) -> TextClassifier:
        torch.manual_seed(stage_seed(self.seed, "lwp-head"))  # the shared head's initialisation
        head = make_layer_head(model, ctx.num_classes)
        fit(
            model,
            poisoned.materialize(),
            self.attacker_train_config(ctx),
            self.seed,
            desc="attacker: layer-wise poisoning",
            module_factory=lambda m, c: LayerwisePoisonModule(m, c, head, self.cfg.output_loss),
        )
        return model

    def run(self, ctx: AttackContext) -> AttackResult:
        result = super().run(ctx)
        result.info.update(
            combination_samples=int(len(self.combination_indices)),
            negative_samples=int(len(self.negative_indices)),
            layers=len(result.model.layer_names()),
        )
        return result
