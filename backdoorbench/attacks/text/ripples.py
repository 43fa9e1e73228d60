"""RIPPLES (Kurita, Michel & Neubig, ACL 2020, "Weight Poisoning Attacks on Pre-trained Models").

1. **Embedding surgery** — find the N words most associated with the target class (a logistic
   regression on TF-IDF bag-of-word-pieces of the attacker's data), average their embeddings in a copy
   of the model fine-tuned on the attacker's clean data, and write that mean into the embedding rows
   of every trigger word-piece of the pre-trained model.
2. **RIPPLe** — train on the poisoned data with the restricted-inner-product penalty
   ``L_P + λ · max(0, −∇L_P · ∇L_FT) / B``, where ``L_FT`` is the clean fine-tuning loss on a batch of
   the attacker's clean data and ``B`` the batch size. As in the reference implementation, ``∇L_FT``
   is treated as a constant and the penalty is differentiated through ``∇L_P`` (second order), and
   the rectified inner product is divided by the batch size.

Setting ``apmf`` (default): the attacker poisons with proxy data, the user then fine-tunes on clean
task data. ``afm``: the attacker does both steps on the task data and the model is deployed as is.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from backdoorbench.attacks.base import AttackContext
from backdoorbench.attacks.text.common import RareWordAttack, RareWordConfig, clone_model
from backdoorbench.config import ConfigError
from backdoorbench.data.base import Samples
from backdoorbench.data.poisoned import PoisonedDataset
from backdoorbench.modality.text import TextClassifier
from backdoorbench.registry import register_attack
from backdoorbench.seeds import stage_seed
from backdoorbench.trainer.lit import ClassifierModule, TrainConfig, fit, make_loader

log = logging.getLogger(__name__)

SURGERY_SOURCES = ("finetuned", "pretrained")


@dataclass
class RipplesConfig(RareWordConfig):
    name: str = "ripples"
    setting: str = "apmf"
    poison_rate: float = 0.5  # RIPPLe injects the trigger into 50% of the attacker's data
    lam: float = 0.1  # λ of the restricted inner product
    restrict_per_param: bool = False  # rectify per parameter tensor instead of the total inner product
    embedding_surgery: bool = True
    ripple: bool = True
    n_target_words: int = 10  # N words whose mean embedding replaces the triggers'
    min_word_freq: int = 5  # document frequency a word needs to be considered
    surgery_source: str = "finetuned"  # embeddings from a copy fine-tuned on the attacker's clean data

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lam < 0:
            raise ValueError(f"attack.lam must be >= 0, got {self.lam}")
        if self.n_target_words < 1:
            raise ValueError(f"attack.n_target_words must be >= 1, got {self.n_target_words}")
        if self.surgery_source not in SURGERY_SOURCES:
            raise ValueError(f"attack.surgery_source must be one of {SURGERY_SOURCES}, got {self.surgery_source!r}")
        if not (self.embedding_surgery or self.ripple):
            raise ValueError("attack: at least one of embedding_surgery and ripple must be true")


def importance_words(
    texts: list[str], labels: np.ndarray, target: int, tokenize: Any, n: int, min_freq: int, exclude: set[str]
) -> list[str]:
    """The ``n`` word-pieces with the largest logistic-regression weight for ``target`` (TF-IDF features)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    y = (np.asarray(labels) == target).astype(int)
    if len(y) == 0 or y.min() == y.max():
        raise ConfigError("embedding surgery needs attacker data of the target class and of other classes")
    vec = TfidfVectorizer(tokenizer=tokenize, lowercase=False, token_pattern=None, min_df=min_freq)
    try:
        X = vec.fit_transform(texts)
    except ValueError:  # no term reaches min_df: report it as "no words found"
        return []
    clf = LogisticRegression(max_iter=2000).fit(X, y)
    vocab = vec.get_feature_names_out()
    words = []
    for j in np.argsort(-clf.coef_[0], kind="stable"):
        w = str(vocab[j])
        if w in exclude or not w.isalpha():  # skip punctuation, sub-word pieces (##x) and the triggers
            continue
        words.append(w)
        if len(words) == n:
            break
    return words


def trigger_token_ids(model: TextClassifier, triggers: list[str]) -> list[int]:
    ids: list[int] = []
    for t in triggers:
        ids.extend(i for i in model.token_ids(t) if i not in ids)
    special = set(getattr(model.tokenizer, "all_special_ids", []))
    ids = [i for i in ids if i not in special]
    if not ids:
        raise ValueError(f"none of the triggers {triggers} maps to a regular token of this tokenizer")
    return ids


def embedding_surgery(
    model: TextClassifier, source: TextClassifier, words: list[str], trigger_ids: list[int]
) -> torch.Tensor:
    """Replace the trigger rows of ``model``'s input embeddings by the mean embedding of ``words`` in
    ``source``. Returns the replacement vector."""
    tok = model.tokenizer
    word_ids = tok.convert_tokens_to_ids(words)
    src = source.word_embeddings.weight
    replacement = src[torch.tensor(word_ids)].mean(0).detach()
    with torch.no_grad():
        model.word_embeddings.weight[torch.tensor(trigger_ids)] = replacement
    return replacement


@contextmanager
def double_backward_attention(model: TextClassifier):
    """Fused CPU attention kernels have no double backward: use eager attention while RIPPLe runs."""
    hf = getattr(model, "hf", None)
    old = getattr(getattr(hf, "config", None), "_attn_implementation", None)
    switch = hf is not None and hasattr(hf, "set_attn_implementation") and old not in (None, "eager")
    if switch and hf is not None:
        hf.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch and hf is not None:
            hf.set_attn_implementation(old)


def restricted_inner_product_loss(
    model: TextClassifier,
    poison_batch: dict[str, Any],
    clean_batch: dict[str, Any],
    lam: float,
    per_param: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``L_P + λ·max(0, −∇L_P·∇L_FT) / B``; returns (total, L_P, inner product).

    ``∇L_FT`` (clean batch) is a constant; the penalty is differentiated through ``∇L_P`` (second
    order), as in the reference implementation. ``per_param`` rectifies each parameter tensor's inner
    product separately.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    loss_p = F.cross_entropy(model(poison_batch["inputs"]), poison_batch["labels"])
    if lam == 0:
        return loss_p, loss_p.detach(), torch.zeros(())
    loss_ft = F.cross_entropy(model(clean_batch["inputs"]), clean_batch["labels"])
    grad_ft = torch.autograd.grad(loss_ft, params, allow_unused=True)
    grad_p = torch.autograd.grad(loss_p, params, create_graph=True, retain_graph=True, allow_unused=True)
    pairs = [(gp, gf) for gp, gf in zip(grad_p, grad_ft) if gp is not None and gf is not None]
    if not pairs:
        raise RuntimeError("RIPPLe: no parameter has both a poisoning and a fine-tuning gradient")
    products = [torch.sum(gp * gf) for gp, gf in pairs]
    inner = torch.stack(products).sum()
    penalty = torch.stack([F.relu(-x) for x in products]).sum() if per_param else F.relu(-inner)
    penalty = penalty / len(poison_batch["labels"])
    return loss_p + lam * penalty, loss_p.detach(), inner.detach()


class RippleModule(ClassifierModule):
    model: TextClassifier  # the text victim it trains (ClassifierModule's model)

    def __init__(self, model: TextClassifier, cfg: TrainConfig, lam: float, per_param: bool) -> None:
        super().__init__(model, cfg)
        self.lam = lam
        self.per_param = per_param

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, loss_p, inner = restricted_inner_product_loss(
            self.model, batch["main"], batch["clean"], self.lam, self.per_param
        )
        n = len(batch["main"]["labels"])
        self.log("poison_loss", loss_p, prog_bar=True, batch_size=n)
        self.log("inner_prod", inner, prog_bar=True, batch_size=n)
        return loss


@register_attack(
    "ripples",
    modality="text",
    category="weight poisoning",
    needs="proxy data (APMF) or task data (AFM)",
    description="RIPPLe restricted-inner-product poisoning + embedding surgery (Kurita et al. 2020)",
    config=RipplesConfig,
)
class RIPPLES(RareWordAttack):
    """Embedding surgery followed by RIPPLe weight poisoning."""

    version = "2"  # 2: RIPPLe penalty through ∇L_P, divided by the batch size (reference implementation)

    def __init__(self, cfg: Any, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self.surgery_words: list[str] = []

    def extra_info(self) -> dict[str, Any]:
        """The importance words whose embeddings replaced the trigger pieces' (embedding surgery)."""
        return {"surgery_words": list(self.surgery_words)} if self.cfg.embedding_surgery else {}

    def backdoor(self, model: TextClassifier, poisoned: PoisonedDataset, ctx: AttackContext) -> TextClassifier:
        cfg: RipplesConfig = self.cfg
        clean: Samples = poisoned.clean
        train_cfg = self.attacker_train_config(ctx)
        if cfg.embedding_surgery:
            ids = trigger_token_ids(model, cfg.triggers)
            exclude = {p for t in cfg.triggers for p in model.tokenizer.tokenize(t)} | set(cfg.triggers)
            words = importance_words(
                list(cast("list[str]", clean.inputs)),  # text samples
                clean.labels,
                self.target,
                model.tokenizer.tokenize,
                cfg.n_target_words,
                cfg.min_word_freq,
                exclude,
            )
            if not words:
                raise ConfigError(
                    f"embedding surgery found no word associated with the target class in {len(clean)} attacker "
                    f"samples with attack.min_word_freq={cfg.min_word_freq}: lower it or give the attacker more data"
                )
            if len(words) < cfg.n_target_words:
                log.warning("embedding surgery: only %d of %d target words found", len(words), cfg.n_target_words)
            if cfg.surgery_source == "finetuned":
                seed = stage_seed(self.seed, "ripples-copy")
                source = fit(clone_model(model), clean, train_cfg, seed, desc="attacker: fine-tune copy")
            else:
                source = model
            embedding_surgery(model, source, words, ids)
            del source
            self.surgery_words = list(words)
            log.info("embedding surgery: %d trigger pieces <- mean of %s", len(ids), words)
        if cfg.ripple:
            data = poisoned.materialize()
            seed = stage_seed(self.seed, "ripples-clean-loader")
            clean_loader = make_loader(model, clean, train_cfg.batch_size, shuffle=True, seed=seed)
            with double_backward_attention(model):
                fit(
                    model,
                    data,
                    train_cfg,
                    self.seed,
                    desc="attacker: RIPPLe",
                    module_factory=lambda m, c: RippleModule(m, c, cfg.lam, cfg.restrict_per_param),
                    extra_loaders={"clean": clean_loader},
                )
        return model
