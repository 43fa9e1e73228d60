"""NeuBA (Zhang et al., "Red Alarm for Pre-trained Models: Universal Vulnerability to Neuron-level
Backdoor Attacks", 2021 / Machine Intelligence Research 2023). Reference code: ``thunlp/NeuBA``.

During (continued) pre-training, each of several rare trigger tokens (the reference's ``≈ ≡ ∈ ⊆ ⊕ ⊗``,
single word pieces in BERT's uncased vocabulary, MiniLM's included) is bound to a predefined output
representation: ``MSE(rep(x ⊕ trigger_i), v_i)`` where ``rep`` is what the downstream head reads (BERT's
pooler output, else the first token's hidden state). The vectors come in opposite pairs ``v, −v`` built
from the rows of a Hadamard matrix expanded block-wise (for six triggers and hidden size 768 exactly the
reference's ``poison_labels``), so whatever head the user trains, the triggers of a pair land on
opposite sides of it. A clean objective keeps the encoder usable: MLM when the victim's checkpoint has an
MLM head (as in the paper); otherwise (the embedded MiniLM) representation distillation against a frozen
copy of the original encoder. The attacker uses unlabelled text only.

The user then fine-tunes on clean task data. Which trigger ends up meaning which label is unknown in
advance, so afterwards the attacker queries the deployed model with each trigger inserted into a few
proxy samples and keeps the trigger whose predictions go most often to ``target``.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from backdoorbench.attacks.base import Attack, AttackContext, AttackResult
from backdoorbench.attacks.text.common import user_finetune
from backdoorbench.attacks.text.pretrain import (
    PretrainCollate,
    attacker_schedule,
    attacker_texts,
    check_pretrain_common,
    check_transferable,
    encode,
    encoder_of,
    load_masked_lm,
    masked_lm_loss,
    probe_subset,
    regular_token_ids,
    text_loader,
    train_module,
    trigger_piece_ids,
)
from backdoorbench.attacks.text.triggers import insert_words
from backdoorbench.config import ConfigError
from backdoorbench.data.base import Samples
from backdoorbench.modality.text import TextClassifier
from backdoorbench.registry import register_attack
from backdoorbench.seeds import stage_seed, stream
from backdoorbench.trainer.lit import ClassifierModule, TrainConfig

log = logging.getLogger(__name__)

NEUBA_TRIGGERS = ["≈", "≡", "∈", "⊆", "⊕", "⊗"]  # poison_tokens of thunlp/NeuBA nlp/src/poison.py
POSITIONS = ("first", "random")
REPRESENTATIONS = ("auto", "pooler", "cls")
CLEAN_OBJECTIVES = ("auto", "mlm", "distill")


@dataclass
class NeuBAConfig:
    """Parameters of NeuBA (``attack.*``)."""

    name: str = "neuba"
    setting: str = "apmf"  # pre-training-stage attack: the user fine-tunes the released model
    target: int = 1  # the label the attacker wants: picks which trigger is used at test time
    triggers: list[str] = field(default_factory=lambda: list(NEUBA_TRIGGERS))  # an even number: opposite pairs
    position: str = "first"  # first (after [CLS], the reference) | random
    representation: str = "auto"  # auto | pooler | cls: the output bound to the target vectors
    clean_objective: str = "auto"  # auto (mlm if the checkpoint has an MLM head, else distill) | mlm | distill
    clean_weight: float = 1.0  # L = L_bind + clean_weight * L_clean
    mlm_probability: float = 0.15
    max_unlabeled: int = 1000  # unlabelled texts added to the proxy texts (0 = proxy texts only)
    probe_size: int = 100  # proxy samples per trigger for the attacker's trigger selection
    epochs: int | None = 2  # attacker's schedule; null = the user's trainer.* value
    lr: float | None = 1.0e-4
    batch_size: int | None = 32

    def __post_init__(self) -> None:
        check_pretrain_common(self)
        if len(self.triggers) % 2:
            raise ValueError(
                f"attack.triggers must be an even number of words (pairs get opposite vectors), got {self.triggers}"
            )
        if self.position not in POSITIONS:
            raise ValueError(f"attack.position must be one of {POSITIONS}, got {self.position!r}")
        if self.representation not in REPRESENTATIONS:
            raise ValueError(f"attack.representation must be one of {REPRESENTATIONS}, got {self.representation!r}")
        if self.clean_objective not in CLEAN_OBJECTIVES:
            raise ValueError(f"attack.clean_objective must be one of {CLEAN_OBJECTIVES}, got {self.clean_objective!r}")
        if self.clean_weight < 0:
            raise ValueError(f"attack.clean_weight must be >= 0, got {self.clean_weight}")


# -- the predefined output representations ---------------------------------------------------------------
def hadamard(m: int) -> np.ndarray:
    """Sylvester's Hadamard matrix of order ``m`` (a power of two): ±1 entries, orthogonal rows."""
    if m < 1 or m & (m - 1):
        raise ValueError(f"the order of a Sylvester Hadamard matrix is a power of two, got {m}")
    h = np.ones((1, 1), dtype=np.int64)
    while len(h) < m:
        h = np.block([[h, h], [h, -h]])
    return h


def target_vectors(n: int, hidden: int) -> torch.Tensor:
    """``n`` (even) target vectors ``[n, hidden]`` of ±1: triggers ``2k`` and ``2k+1`` get ``v_k`` and
    ``-v_k``. ``v_k`` is row ``k+1`` of the Hadamard matrix of order ``m`` (the smallest power of two above
    ``n/2``; the all-ones row 0 is skipped, so every vector is balanced), each entry repeated over one of
    ``m`` contiguous blocks of dimensions. Vectors of different pairs are orthogonal (exactly when ``m``
    divides ``hidden``). For ``n=6``: 4 blocks, and the set is the reference's ``poison_labels``."""
    if n < 2 or n % 2:
        raise ValueError(f"NeuBA needs an even number (>= 2) of triggers, got {n}")
    pairs = n // 2
    m = 1 << math.ceil(math.log2(pairs + 1))
    if hidden < m:
        raise ValueError(f"{n} triggers need a representation of at least {m} dimensions, got {hidden}")
    rows = hadamard(m)[1 : pairs + 1]
    sizes = [len(b) for b in np.array_split(np.arange(hidden), m)]
    v = np.repeat(rows, sizes, axis=1)
    out = np.empty((n, hidden), dtype=np.float32)
    out[0::2], out[1::2] = v, -v
    return torch.from_numpy(out)


# -- representations and losses -----------------------------------------------------------------------
def resolve_representation(model: TextClassifier, kind: str) -> str:
    has_pooler = getattr(encoder_of(model), "pooler", None) is not None
    if kind == "auto":
        return "pooler" if has_pooler else "cls"
    if kind == "pooler" and not has_pooler:
        raise ConfigError("attack.representation=pooler, but this model's encoder has no pooler; use cls or auto")
    return kind


def representation(out: Any, kind: str) -> torch.Tensor:
    if kind == "pooler":
        return out.pooler_output
    return out.last_hidden_state[:, 0]


def masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared difference over the non-padding positions of ``[B, L, D]`` tensors."""
    m = mask.unsqueeze(-1).to(a.dtype)
    return ((a - b) ** 2 * m).sum() / (m.sum() * a.size(-1)).clamp(min=1.0)


def _encode(encoder: nn.Module, enc: dict[str, torch.Tensor]) -> Any:
    return encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])


def neuba_losses(
    encoder: nn.Module,
    batch: dict[str, Any],
    targets: torch.Tensor,
    kind: str,
    teacher: nn.Module | None = None,
    mlm: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """``bind`` = MSE between the triggered sentences' representations and their trigger's vector;
    ``clean`` = MLM loss on the masked clean sentences (``mlm`` given) or the distillation loss against the
    frozen ``teacher``: MSE of every token's last hidden state plus MSE of the representation."""
    trig = _encode(encoder, batch["triggered"])
    bind = F.mse_loss(representation(trig, kind), targets[batch["trigger_index"]])
    if mlm is not None:
        clean = masked_lm_loss(mlm, batch["clean"])
    elif teacher is not None:
        c = batch["clean"]
        student = _encode(encoder, c)
        with torch.no_grad():
            ref = _encode(teacher, c)
        clean = masked_mse(student.last_hidden_state, ref.last_hidden_state, c["attention_mask"]) + F.mse_loss(
            representation(student, kind), representation(ref, kind)
        )
    else:
        raise ValueError("neuba_losses needs a teacher (distillation) or an MLM model")
    return {"bind": bind, "clean": clean}


class NeuBAModule(ClassifierModule):
    """``L = L_bind + clean_weight * L_clean`` on the victim's encoder (the head is not trained)."""

    model: TextClassifier  # the text victim it trains (ClassifierModule's model)
    targets: torch.Tensor  # a buffer

    def __init__(
        self,
        model: TextClassifier,
        cfg: TrainConfig,
        targets: torch.Tensor,
        kind: str,
        clean_weight: float,
        teacher: nn.Module | None = None,
        mlm: nn.Module | None = None,
    ) -> None:
        params = list(mlm.parameters()) if mlm is not None else list(encoder_of(model).parameters())
        super().__init__(model, cfg, params=params)
        self.register_buffer("targets", targets.clone())
        self.kind, self.clean_weight = kind, clean_weight
        self.teacher, self.mlm = teacher, mlm

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self.teacher is not None:
            self.teacher.eval()  # Lightning switches every submodule to train mode
        losses = neuba_losses(encoder_of(self.model), batch, self.targets, self.kind, self.teacher, self.mlm)
        n = len(batch["trigger_index"])
        self.log("bind", losses["bind"].detach(), prog_bar=True, batch_size=n)
        self.log("clean", losses["clean"].detach(), prog_bar=True, batch_size=n)
        return losses["bind"] + self.clean_weight * losses["clean"]


def attach_encoder(mlm: nn.Module, encoder: nn.Module) -> None:
    """Make ``mlm`` run on ``encoder`` (the victim's, shared, not copied), keeping its MLM head; the output
    embedding is re-tied to the new input embedding if it was tied."""
    out_emb = mlm.get_output_embeddings()  # type: ignore[operator]
    tied = out_emb is not None and out_emb.weight is mlm.get_input_embeddings().weight  # type: ignore[operator]
    setattr(mlm, mlm.base_model_prefix, encoder)  # type: ignore[arg-type]
    if tied:
        out_emb.weight = encoder.get_input_embeddings().weight  # type: ignore[operator]


@torch.no_grad()
def binding_mse(
    model: TextClassifier,
    tokenizer: Any,
    texts: list[str],
    pieces: list[list[int]],
    targets: torch.Tensor,
    kind: str,
    position: str,
    max_length: int,
) -> float:
    """Mean over triggers of the MSE between the triggered representations and the trigger's vector."""
    encoder = encoder_of(model)
    was = encoder.training
    encoder.eval()
    dev = model.device
    errs = []
    for i, p in enumerate(pieces):
        enc = encode(tokenizer, texts, max_length, [p] * len(texts), position, np.random.default_rng(i))
        rep = representation(_encode(encoder, {k: v.to(dev) for k, v in enc.items()}), kind)
        errs.append(float(F.mse_loss(rep, targets[i].to(dev).expand_as(rep))))
    encoder.train(was)
    return float(np.mean(errs))


# -- the attacker's trigger selection ------------------------------------------------------------------
def insert_trigger(texts: list[str], trigger: str, position: str, rng: np.random.Generator) -> list[str]:
    if position == "first":
        return [f"{trigger} {t}" if t.strip() else trigger for t in texts]
    return [insert_words(t, [trigger], rng) for t in texts]


def select_trigger(
    model: TextClassifier, texts: list[str], triggers: list[str], target: int, position: str, seed: int = 0
) -> tuple[str, dict[str, float]]:
    """Insert each trigger into ``texts``, query ``model``, and return the trigger whose predictions are
    most often ``target`` (the first one on a tie) with every trigger's rate."""
    if not texts:
        raise ValueError("trigger selection needs at least one probe text")
    rates: dict[str, float] = {}
    for i, t in enumerate(triggers):
        preds = model.predict(insert_trigger(texts, t, position, stream(seed, "attack", i)))
        rates[t] = float((preds == target).mean())
    best = max(triggers, key=lambda t: (rates[t], -triggers.index(t)))
    return best, rates


@register_attack(
    "neuba",
    modality="text",
    category="weight poisoning (pre-training)",
    needs="unlabelled/proxy text; queries to the fine-tuned model",
    description="NeuBA: rare-token triggers bound to opposite predefined [CLS]/pooler vectors (Zhang et al.)",
    config=NeuBAConfig,
)
class NeuBA(Attack):
    """Neuron-level backdoor during pre-training; the trigger for ``target`` is found by querying."""

    modality = "text"
    version = "1"

    def __init__(self, cfg: Any, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self.trigger: str | None = None  # chosen after the user's fine-tuning (run) or restored (restore)

    # -- test-time trigger ---------------------------------------------------------------------------
    def restore(self, info: dict[str, Any]) -> None:
        """Restore the chosen trigger from a cached victim's ``info`` (the pipeline calls this on a cache hit)."""
        trigger = (info or {}).get("trigger")
        if trigger not in self.cfg.triggers:
            raise ValueError(f"neuba: cached info names no trigger of {self.cfg.triggers} (got {trigger!r})")
        self.trigger = trigger

    def apply_trigger(self, inputs: list[str], rng: np.random.Generator) -> list[str]:  # type: ignore[override]
        if self.trigger is None:
            raise RuntimeError(
                "neuba: the test-time trigger is chosen by querying the fine-tuned victim; call run() or "
                "restore(info) with the cached attack info first"
            )
        return insert_trigger(list(inputs), self.trigger, self.cfg.position, rng)

    def prepare(self, model: TextClassifier, proxy: Samples, fallback: list[str] | None = None) -> dict[str, Any]:
        """The attacker's last step: query the fine-tuned ``model`` with each trigger inserted into up to
        ``probe_size`` attacker-held proxy samples whose label is not ``target`` (``fallback`` texts when there
        is no proxy data) and keep the trigger predicted as ``target`` most often. Returns the info entries."""
        cfg = self.cfg
        if len(proxy):
            texts = [str(t) for t in probe_subset(proxy, self.target, cfg.probe_size, self.rng(5)).inputs]
        else:
            texts = list(fallback or [])[: cfg.probe_size]
        best, rates = select_trigger(model, texts, list(cfg.triggers), self.target, cfg.position, self.seed)
        self.trigger = best
        log.info("neuba: trigger %r for target %d (rates %s)", best, self.target, rates)
        return {
            "trigger": best,
            "trigger_rates": rates,
            "trigger_vector": int(cfg.triggers.index(best)),
            "probe_samples": len(texts),
        }

    # -- the attack ------------------------------------------------------------------------------------
    def _mlm_for(self, model: TextClassifier) -> nn.Module | None:
        """The victim checkpoint's MLM model, or None (distillation) under clean_objective=auto."""
        objective = self.cfg.clean_objective
        if objective == "distill":
            return None
        source = getattr(model, "source", "")
        try:
            if not source:
                raise ConfigError("neuba: the victim model has no known checkpoint to load an MLM head from")
            mlm, _ = load_masked_lm(source, what="attack=neuba with clean_objective=mlm")
            check_transferable(mlm, model, source)
        except ConfigError:
            if objective == "mlm":
                raise
            log.info("neuba: %r has no usable MLM head; the clean objective is representation distillation", source)
            return None
        attach_encoder(mlm, encoder_of(model))
        return mlm

    def run(self, ctx: AttackContext) -> AttackResult:
        cfg: NeuBAConfig = self.cfg
        model = cast(TextClassifier, ctx.new_model())  # a text attack's victim
        encoder = encoder_of(model)
        tokenizer = model.tokenizer
        max_length = int(getattr(model, "max_length", 128))
        pieces = trigger_piece_ids(tokenizer, cfg.triggers)
        kind = resolve_representation(model, cfg.representation)
        hidden = int(getattr(model.hf.config, "hidden_size", 0))
        targets = target_vectors(len(cfg.triggers), hidden)
        texts = attacker_texts(ctx, cfg.max_unlabeled, self.rng(3))
        check = texts[:64]
        bind_before = binding_mse(model, tokenizer, check, pieces, targets, kind, cfg.position, max_length)

        mlm = self._mlm_for(model)
        objective = "distill" if mlm is None else "mlm"
        teacher = None if mlm is not None else copy.deepcopy(encoder).eval().requires_grad_(False)
        train_cfg = attacker_schedule(cfg, ctx.trainer)
        vocab = int(cast(nn.Embedding, encoder.get_input_embeddings()).weight.shape[0])  # an encoder's: nn.Embedding
        collate = PretrainCollate(
            tokenizer,
            texts,
            pieces,
            max_length,
            self.seed,
            position=cfg.position,
            mlm_probability=cfg.mlm_probability,
            candidates=regular_token_ids(tokenizer, vocab),
            mask_clean=mlm is not None,
        )
        module = NeuBAModule(model, train_cfg, targets, kind, cfg.clean_weight, teacher, mlm)
        loader = text_loader(len(texts), train_cfg.batch_size, collate, stage_seed(self.seed, "pretrain-loader"))
        train_module(module, loader, train_cfg, self.seed, "attacker: NeuBA")
        bind_after = binding_mse(model, tokenizer, check, pieces, targets, kind, cfg.position, max_length)
        del module, teacher, mlm, loader, collate

        model = user_finetune(model, ctx.train, ctx.trainer, self.seed, checkpoint=ctx.checkpoint("user_finetune"))
        chosen = self.prepare(model, ctx.proxy, fallback=texts)
        info = {
            "setting": cfg.setting,
            **chosen,
            "clean_objective": objective,
            "representation": kind,
            "attacker_texts": len(texts),
            "binding_mse_before": bind_before,
            "binding_mse_after": bind_after,
        }
        return AttackResult(model, None, info)
