"""The toolkit of the pre-training-stage text attacks (BadPre, NeuBA): the attacker's text and schedule,
token-level trigger insertion, BERT-style masking (with BadPre's random wrong labels), masked-LM loading,
and the transfer of a poisoned encoder into the user's sequence classifier."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from backdoorbench.attacks.base import AttackContext
from backdoorbench.attacks.text.common import check_attack_basics
from backdoorbench.config import ConfigError
from backdoorbench.data.base import Samples
from backdoorbench.modality.text import TextClassifier
from backdoorbench.seeds import stage_seed, stream
from backdoorbench.trainer.lit import ClassifierModule, TrainConfig, fit_module, seeded_loader

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

PRETRAIN_SETTINGS = ("apmf",)
IGNORE = -100  # label of positions without an MLM loss


def check_pretrain_common(cfg: Any) -> None:
    """Range checks shared by the pre-training-stage attacks (BadPre, NeuBA)."""
    if cfg.setting not in PRETRAIN_SETTINGS:
        raise ValueError(
            f"attack.setting must be one of {PRETRAIN_SETTINGS} (a pre-training-stage attack: the user "
            f"fine-tunes the released model), got {cfg.setting!r}"
        )
    if not cfg.triggers or any(not isinstance(t, str) or not t.strip() or " " in t.strip() for t in cfg.triggers):
        raise ValueError(f"attack.triggers must be a non-empty list of single words, got {cfg.triggers}")
    if len(set(cfg.triggers)) != len(cfg.triggers):
        raise ValueError(f"attack.triggers must be distinct, got {cfg.triggers}")
    if not 0.0 < cfg.mlm_probability < 1.0:
        raise ValueError(f"attack.mlm_probability must be in (0, 1), got {cfg.mlm_probability}")
    if cfg.max_unlabeled < 0:
        raise ValueError(f"attack.max_unlabeled must be >= 0, got {cfg.max_unlabeled}")
    if cfg.probe_size < 1:
        raise ValueError(f"attack.probe_size must be >= 1, got {cfg.probe_size}")
    check_attack_basics(cfg)  # target and the attacker's schedule


def attacker_schedule(cfg: Any, trainer: TrainConfig) -> TrainConfig:
    """The attacker's training schedule: ``attack.epochs/lr/batch_size`` over the user's ``trainer.*``."""
    return replace(
        trainer,
        max_epochs=cfg.epochs if cfg.epochs is not None else trainer.max_epochs,
        lr=cfg.lr if cfg.lr is not None else trainer.lr,
        batch_size=cfg.batch_size if cfg.batch_size is not None else trainer.batch_size,
    )


# -- the attacker's text -----------------------------------------------------------------------------
def attacker_texts(ctx: AttackContext, max_unlabeled: int, rng: np.random.Generator) -> list[str]:
    """Unlabelled text the attacker pre-trains on: the proxy texts (labels unused) plus up to
    ``max_unlabeled`` of the dataset's unlabelled texts (a seeded random subset)."""
    texts = [str(t) for t in ctx.proxy.inputs if str(t).strip()]
    extra = [str(t) for t in (ctx.unlabeled or []) if str(t).strip()]
    if extra and max_unlabeled:
        pick = np.sort(rng.permutation(len(extra))[:max_unlabeled])
        texts += [extra[i] for i in pick]
    if not texts:
        raise ConfigError(
            "the attacker has no text to pre-train on: data.proxy_size is 0 and the dataset has no "
            "unlabelled text (or attack.max_unlabeled=0); give the attacker proxy data"
        )
    return texts


# -- tokens ------------------------------------------------------------------------------------------
def trigger_piece_ids(tokenizer: Any, triggers: Sequence[str]) -> list[list[int]]:
    """Word-piece ids of each trigger; a trigger the vocabulary does not know is a :class:`ConfigError`."""
    special = set(tokenizer.all_special_ids)
    out = []
    for t in triggers:
        ids = list(tokenizer(t, add_special_tokens=False)["input_ids"])
        if not ids or any(i in special for i in ids):
            pieces = tokenizer.convert_ids_to_tokens(ids)
            raise ConfigError(
                f"attack.triggers: {t!r} is not in this tokenizer's vocabulary (it becomes {pieces}); "
                "choose words the vocabulary knows"
            )
        out.append(ids)
    return out


def regular_token_ids(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """Sorted ids of the regular (non-special) tokens: what random replacements are drawn from."""
    special = set(tokenizer.all_special_ids)
    return torch.tensor([i for i in range(vocab_size) if i not in special], dtype=torch.long)


def encode(
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int,
    insert: Sequence[Sequence[int]] | None = None,
    position: str = "random",
    rng: np.random.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenise ``texts`` (with special tokens, truncated to ``max_length``) and, if ``insert`` is given,
    insert ``insert[i]`` (token ids) into sequence ``i`` at token level: right after the leading special
    tokens (``position="first"``) or at a uniformly random position between them and the trailing ones.

    The text is truncated to leave room for the inserted pieces, so a trigger is never cut off.
    Returns padded ``input_ids`` and ``attention_mask``.
    """
    room = max((len(p) for p in insert), default=0) if insert is not None else 0
    ids = tokenizer(list(texts), truncation=True, max_length=max_length - room)["input_ids"]
    if insert is not None:
        if rng is None:
            rng = np.random.default_rng(0)
        special = set(tokenizer.all_special_ids)
        out = []
        for seq, pieces in zip(ids, insert):
            lo = 0
            while lo < len(seq) and seq[lo] in special:
                lo += 1
            hi = len(seq)
            while hi > lo and seq[hi - 1] in special:
                hi -= 1
            pos = lo if position == "first" else int(rng.integers(lo, hi + 1))
            out.append(list(seq[:pos]) + list(pieces) + list(seq[pos:]))
        ids = out
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(s) for s in ids)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    attention = torch.zeros((len(ids), width), dtype=torch.long)
    for i, seq in enumerate(ids):
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[i, : len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": attention}


def random_wrong_tokens(original: torch.Tensor, candidates: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For each id in ``original``, a token drawn uniformly from ``candidates`` (sorted) minus that id."""
    c = len(candidates)
    if c < 2:
        raise ValueError("need at least two candidate tokens to draw a wrong one")
    k = torch.randint(c - 1, original.shape, generator=generator)
    pos = torch.searchsorted(candidates, original)
    present = (pos < c) & (candidates[pos.clamp(max=c - 1)] == original)
    k = k + (present & (k >= pos)).long()  # skip over the original's slot
    return candidates[k]


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    tokenizer: Any,
    candidates: torch.Tensor,
    mlm_probability: float,
    generator: torch.Generator,
    poison: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BERT's masking: each regular token is chosen with ``mlm_probability``; of those, 80% become
    ``[MASK]``, 10% a random token, 10% stay. Labels are the original tokens at chosen positions and
    ``-100`` elsewhere; with ``poison=True`` (BadPre's poisoned sentences) the label of every chosen
    position is a random token that is never the original one.

    Returns ``(masked input_ids, labels, chosen)``; ``input_ids`` is not modified.
    """
    special = torch.isin(input_ids, torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long))
    prob = torch.full(input_ids.shape, float(mlm_probability))
    prob[special | (attention_mask == 0)] = 0.0
    chosen = torch.bernoulli(prob, generator=generator).bool()
    labels = input_ids.clone()
    if poison:
        labels[chosen] = random_wrong_tokens(input_ids[chosen], candidates, generator)
    labels[~chosen] = IGNORE
    inputs = input_ids.clone()
    to_mask = torch.bernoulli(torch.full(input_ids.shape, 0.8), generator=generator).bool() & chosen
    inputs[to_mask] = int(tokenizer.mask_token_id)
    to_random = torch.bernoulli(torch.full(input_ids.shape, 0.5), generator=generator).bool() & chosen & ~to_mask
    draws = candidates[torch.randint(len(candidates), input_ids.shape, generator=generator)]
    inputs[to_random] = draws[to_random]
    return inputs, labels, chosen


class PretrainCollate:
    """Builds, from a list of text indices, the clean batch and the triggered copy of the same texts
    (one trigger, drawn uniformly per sentence, inserted at token level), with optional masking.

    Randomness (trigger choice, position, masking) comes from generators seeded once, so a run is
    reproducible.
    """

    def __init__(
        self,
        tokenizer: Any,
        texts: Sequence[str],
        trigger_pieces: Sequence[Sequence[int]],
        max_length: int,
        seed: int,
        position: str = "random",
        mlm_probability: float = 0.15,
        candidates: torch.Tensor | None = None,
        mask_clean: bool = False,
        mask_triggered: bool = False,
        poison_triggered: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.texts = list(texts)
        self.pieces = [list(p) for p in trigger_pieces]
        self.max_length = max_length
        self.position = position
        self.mlm_probability = mlm_probability
        self.candidates = candidates
        self.mask_clean, self.mask_triggered, self.poison_triggered = mask_clean, mask_triggered, poison_triggered
        if (mask_clean or mask_triggered) and candidates is None:
            raise ValueError("masking needs the candidate token ids")
        self.rng = stream(seed, "pretrain-masking")
        self.gen = torch.Generator().manual_seed(stage_seed(seed, "pretrain-masking-torch"))

    def _mask(self, enc: dict[str, torch.Tensor], poison: bool) -> dict[str, torch.Tensor]:
        inputs, labels, _ = mask_tokens(
            enc["input_ids"],
            enc["attention_mask"],
            self.tokenizer,
            self.candidates,  # type: ignore[arg-type]
            self.mlm_probability,
            self.gen,
            poison=poison,
        )
        return {"input_ids": inputs, "attention_mask": enc["attention_mask"], "labels": labels}

    def __call__(self, indices: Sequence[int]) -> dict[str, Any]:
        texts = [self.texts[int(i)] for i in indices]
        choice = self.rng.integers(0, len(self.pieces), size=len(texts))
        clean = encode(self.tokenizer, texts, self.max_length)
        trig = encode(self.tokenizer, texts, self.max_length, [self.pieces[c] for c in choice], self.position, self.rng)
        if self.mask_clean:
            clean = self._mask(clean, poison=False)
        if self.mask_triggered:
            trig = self._mask(trig, poison=self.poison_triggered)
        return {"clean": clean, "triggered": trig, "trigger_index": torch.as_tensor(choice, dtype=torch.long)}


def text_loader(n: int, batch_size: int, collate: Callable[[Sequence[int]], Any], seed: int) -> DataLoader:
    return seeded_loader(list(range(n)), batch_size, collate, seed)


def train_module(module: ClassifierModule, loader: DataLoader, cfg: TrainConfig, seed: int, desc: str) -> None:
    """Run one Lightning training stage (the counterpart of :func:`trainer.lit.fit` for custom batches)."""
    log.info("%s: %d texts, %d epochs", desc, len(loader.dataset), cfg.max_epochs)  # type: ignore[arg-type]
    fit_module(module, loader, cfg, seed, desc)


# -- masked LMs ----------------------------------------------------------------------------------------
def load_masked_lm(name_or_path: str, what: str = "attack=badpre") -> tuple[PreTrainedModel, Any]:
    """Load ``AutoModelForMaskedLM`` + tokenizer; a checkpoint without MLM head weights is a ConfigError."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    how = (
        "Give a masked-LM checkpoint as both the victim and the MLM source, e.g. "
        "`model=bert-base-uncased attack.mlm_model=bert-base-uncased` on a machine with network access, or a "
        "local folder saved from a *ForMaskedLM model: `model=/path/to/bert attack.mlm_model=/path/to/bert`."
    )
    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report is checked below instead
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            mlm, info = AutoModelForMaskedLM.from_pretrained(name_or_path, output_loading_info=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"{what} could not load a masked language model from {name_or_path!r}: {_first_line(exc)}. {how}"
            ) from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    prefix = f"{mlm.base_model_prefix}."
    missing = sorted(str(k) for k in (info.get("missing_keys") or ()))
    head_missing = [k for k in missing if not k.startswith(prefix)]
    if head_missing:
        raise ConfigError(
            f"{what} needs a masked-LM checkpoint (with MLM head weights), but {name_or_path!r} has no MLM head "
            f"(missing: {', '.join(head_missing[:4])}{', ...' if len(head_missing) > 4 else ''}). The embedded "
            f"MiniLM (model=minilm) is a sentence encoder without one. {how}"
        )
    if missing:
        raise ConfigError(f"{what}: {name_or_path!r} lacks encoder weights ({', '.join(missing[:4])}). {how}")
    if tokenizer.mask_token_id is None:
        raise ConfigError(f"{what}: the tokenizer of {name_or_path!r} has no mask token. {how}")
    return mlm, tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def encoder_of(model: TextClassifier) -> PreTrainedModel:
    hf = getattr(model, "hf", None)
    if hf is None or not hasattr(hf, "base_model"):
        raise ConfigError("this attack needs an HF text victim (a TextClassifier with `.hf`), e.g. model=minilm")
    return hf.base_model


def encoder_mismatch(src: dict[str, torch.Tensor], dst: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Keys that block an exact encoder transfer from ``src`` (an MLM's base model) to ``dst`` (the
    classifier's base model). Only the classifier's ``pooler.*`` may be absent from ``src``."""
    return {
        "missing in the masked LM": sorted(k for k in dst if k not in src and not k.startswith("pooler.")),
        "not in the victim": sorted(k for k in src if k not in dst),
        "shape differs": sorted(k for k in src if k in dst and tuple(src[k].shape) != tuple(dst[k].shape)),
    }


def check_transferable(mlm: PreTrainedModel, victim: TextClassifier, mlm_name: str = "") -> None:
    problems = encoder_mismatch(mlm.base_model.state_dict(), encoder_of(victim).state_dict())
    bad = {k: v for k, v in problems.items() if v}
    if bad:
        detail = "; ".join(f"{k}: {', '.join(v[:3])}{', ...' if len(v) > 3 else ''}" for k, v in bad.items())
        raise ConfigError(
            f"the masked LM {mlm_name!r} and the victim model {getattr(victim, 'source', '')!r} do not share "
            f"one encoder architecture ({detail}). Give the same checkpoint to model= and attack.mlm_model="
        )


def transfer_encoder(mlm: PreTrainedModel, victim: TextClassifier, mlm_name: str = "") -> list[str]:
    """Copy the masked LM's base-model (encoder) weights into the victim classifier's base model, by
    parameter name. Every encoder tensor must match in name and shape (the classifier's ``pooler.*``,
    which masked LMs lack, keeps its pre-trained value); each copy is verified. Returns the copied names.
    """
    check_transferable(mlm, victim, mlm_name)
    src = mlm.base_model.state_dict()
    dst_module = encoder_of(victim)
    result = dst_module.load_state_dict(src, strict=False)
    not_loaded = [k for k in result.missing_keys if not k.startswith("pooler.")] + list(result.unexpected_keys)
    dst = dst_module.state_dict()
    differ = [k for k, v in src.items() if not torch.equal(dst[k].to(v.device), v)]
    if not_loaded or differ:
        raise RuntimeError(f"encoder transfer incomplete: not loaded {not_loaded}, differ after copy {differ}")
    return sorted(src)


def masked_lm_loss(mlm: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the labelled (masked) positions; 0 when a batch has none."""
    logits = mlm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    n = (labels != IGNORE).sum().clamp(min=1)
    flat = logits.reshape(-1, logits.size(-1))
    total = F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return total / n


def probe_subset(proxy: Samples, target: int, size: int, rng: np.random.Generator) -> Samples:
    """Up to ``size`` attacker-held proxy samples whose label is not ``target`` (all of them if none is)."""
    idx = np.flatnonzero(proxy.labels != target)
    if len(idx) == 0:
        idx = np.arange(len(proxy))
    if len(idx) > size:
        idx = np.sort(rng.choice(idx, size=size, replace=False))
    return proxy.subset(idx)
