"""RAP — Robustness-Aware Perturbations (Yang, Lin, Li, Zhou and Sun, EMNLP 2021, "RAP:
Robustness-Aware Perturbations for Defending against Backdoor Attacks on NLP Models"; reference code
``lancopku/RAP``).

A backdoored model is far more robust on poisoned inputs than on clean ones: the trigger holds the
prediction on the target class. RAP constructs a perturbation that lowers the protected (target) label's
probability of clean inputs by a controlled amount and measures how much it lowers it on a test input:

1. a rare *RAP trigger* word is inserted at position 0 of every input;
2. only the RAP trigger's word-embedding row(s) are trained, on the defender's clean samples whose label is
   the protected label (``protect_label``, the defender's assumption as in the paper), with the paper's loss
   on ``Δp = p(protect | RAP-trigger + x) − p(protect | x)``::

       L = λ · mean(relu(Δp − (−low))) + mean(relu((−high) − Δp))        (low, high) = (0.1, 0.3)

   i.e. the probability drop ``−Δp`` is pushed into ``[low, high]``; after every step each trained row is
   rescaled to its original norm (reference code);
3. drop(x) = p(protect | x) − p(protect | RAP-trigger + x). Clean inputs of the protected class drop by
   ≥ ``low``; poisoned inputs, held by the backdoor, barely move. Our detectors score "higher = more
   suspicious", so **score = −drop**. As in the reference evaluation, only inputs that the model predicts
   as the protected label can be poisoned ones; the others get the lowest score (``UNPROTECTED_SCORE``) and
   are never rejected (``only_protected=false`` scores every input by −drop).

The model is never modified. The trained rows live in this detector and enter the model only during the
RAP pass, through a forward hook on the word-embedding layer that replaces the embedding output at the
inserted trigger's positions (``trigger_scope=inserted``, default) or at every occurrence of the trigger's
tokens (``trigger_scope=all``, the paper's modified embedding matrix). Predictions without the RAP trigger
are therefore exactly the undefended model's.

Cost: 2 forward passes per scored input (plain and with the RAP trigger); ``score_and_classify`` takes the
predictions from the plain pass.

Precision: the optimisation's forward passes run under the run's ``trainer.precision`` (autocast to float16
for ``16*``, bfloat16 for ``bf16*``, none for ``32*``; the model's weights are not cast, the trained rows, the
probabilities, the loss and the update stay float32). Under float16 the loss is scaled by
``FP16_LOSS_SCALE`` (a power of two, so unscaling is exact) against gradient underflow. Scoring runs under
``trainer.inference_precision`` like every batched inference (``Classifier.iter_batches``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn

from backdoorbench.config import ConfigError
from backdoorbench.data.base import Samples
from backdoorbench.defenses.base import Detector, DetectorConfig
from backdoorbench.modality.base import Classifier
from backdoorbench.registry import register_defense
from backdoorbench.runtime import autocast, current, train_dtype

if TYPE_CHECKING:
    from backdoorbench.modality.text import TextClassifier

log = logging.getLogger(__name__)

TRIGGER_SCOPES = ("inserted", "all")
#: score of inputs not predicted as the protected label (below any −drop, which lies in [−1, 1])
UNPROTECTED_SCORE = -2.0
#: static loss scale of the optimisation under float16 autocast (``trainer.precision=16-mixed``)
FP16_LOSS_SCALE = 2.0**10


@dataclass
class RAPConfig(DetectorConfig):
    name: str = "rap"
    clean_size: int = 1000  # the whole defender reserve (the paper uses the clean validation set)
    # "rq": a single word-piece of the uncased BERT vocabulary, absent from the Rotten Tomatoes data and not
    # one of the attacks' triggers. The paper's "cf" is an attack trigger here (EP, DFEP, LWP, RIPPLe, BadPre).
    trigger: str = "rq"
    protect_label: int = 1  # the label the defender protects (the attack's target, assumed known)
    drop_low: float = 0.1  # lower bound of the clean probability drop (paper: 0.1)
    drop_high: float = 0.3  # upper bound (paper: 0.3)
    scale_factor: float = 1.0  # λ on the lower-bound term (reference: 1)
    lr: float = 1e-2
    epochs: int = 5
    train_batch_size: int = 32
    keep_norm: bool = True  # rescale each trained row to its original norm after every step (reference)
    accumulate_grad: bool = True  # never zero the gradient between steps, as the reference code does
    trigger_scope: str = "inserted"  # inserted | all (see the module docstring)
    only_protected: bool = True  # score only inputs predicted as protect_label (reference evaluation)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.trigger, str) or not self.trigger.strip() or len(self.trigger.split()) != 1:
            raise ValueError(f"defense.trigger must be one word, got {self.trigger!r}")
        if self.protect_label < 0:
            raise ValueError(f"defense.protect_label must be >= 0, got {self.protect_label}")
        if not 0.0 <= self.drop_low < self.drop_high <= 1.0:
            raise ValueError(
                f"defense.drop_low and defense.drop_high must satisfy 0 <= low < high <= 1, "
                f"got {self.drop_low} and {self.drop_high}"
            )
        if self.scale_factor < 0:
            raise ValueError(f"defense.scale_factor must be >= 0, got {self.scale_factor}")
        if self.lr <= 0:
            raise ValueError(f"defense.lr must be > 0, got {self.lr}")
        if self.epochs < 1:
            raise ValueError(f"defense.epochs must be >= 1, got {self.epochs}")
        if self.train_batch_size < 1:
            raise ValueError(f"defense.train_batch_size must be >= 1, got {self.train_batch_size}")
        if self.trigger_scope not in TRIGGER_SCOPES:
            raise ValueError(f"defense.trigger_scope must be one of {TRIGGER_SCOPES}, got {self.trigger_scope!r}")


def insert_rap_trigger(texts: Sequence[str], trigger: str) -> list[str]:
    """The RAP trigger at word position 0 (the reference's ``rap_poison``)."""
    return [f"{trigger} {t}" for t in texts]


def rap_loss(drop: torch.Tensor, low: float, high: float, scale: float = 1.0) -> torch.Tensor:
    """The paper's loss on the protected-label probability drop: zero inside ``[low, high]``."""
    return scale * torch.relu(low - drop).mean() + torch.relu(drop - high).mean()


@register_defense(
    "rap",
    modality="text",
    needs="defender's clean data of the protected label and the model's word embeddings",
    description="probability drop under a trained rare-word perturbation; poisoned inputs barely drop",
    config=RAPConfig,
)
class RAP(Detector):
    """Robustness-aware perturbation detector (Yang et al. 2021); score = −(protected-probability drop)."""

    def __init__(self, cfg: RAPConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self.trigger_ids: list[int] = []  # the RAP trigger's token ids, in order
        self.unique_ids: list[int] = []  # one trained row per distinct id
        self.rows: torch.Tensor | None = None  # trained rows [len(unique_ids), D]
        self.original_rows: torch.Tensor | None = None
        self.history: list[float] = []  # mean training loss per epoch

    # -- the RAP embedding, kept outside the model ---------------------------------------------
    def _positions(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the trained rows go: a mask ``[B, T]`` and the row index at each masked position."""
        ids = torch.tensor(self.trigger_ids, device=input_ids.device)
        uniq = torch.tensor(self.unique_ids, device=input_ids.device)
        slot_of = (input_ids.unsqueeze(-1) == uniq).long().argmax(-1)  # row index of each token (if a trigger id)
        if self.cfg.trigger_scope == "all":
            return torch.isin(input_ids, uniq), slot_of
        k, width = len(self.trigger_ids), input_ids.size(1)
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        if width < k:
            return mask, slot_of
        match = (input_ids.unfold(1, k, 1) == ids).all(-1)  # [B, T-k+1]: the trigger sequence starts here
        found = match.any(1)
        first = match.float().argmax(1)
        for j in range(k):
            mask[found.nonzero(as_tuple=True)[0], (first + j)[found]] = True
        return mask, slot_of

    @contextmanager
    def rap_embeddings(self, rows: torch.Tensor | None = None) -> Iterator[None]:
        """Within this context the model embeds the RAP trigger with the trained (or given) rows."""
        assert self.model is not None
        rows = self.rows if rows is None else rows
        if rows is None:
            raise RuntimeError("call fit() first")
        emb = cast("TextClassifier", self.model).word_embeddings  # a text model: _check_model checked it

        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            mask, slot = self._positions(args[0])
            if not bool(mask.any()):
                return output
            new = rows.to(device=output.device, dtype=output.dtype)[slot]
            return torch.where(mask.unsqueeze(-1), new, output)

        handle = emb.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    # -- fit -------------------------------------------------------------------------------------
    def _check_model(self, model: Classifier) -> nn.Embedding:
        emb = getattr(model, "word_embeddings", None)
        if not isinstance(emb, nn.Embedding) or not callable(getattr(model, "token_ids", None)):
            raise ConfigError(
                "RAP needs a text classifier with word embeddings (word_embeddings, token_ids), "
                f"got {type(model).__name__}"
            )
        if not 0 <= self.cfg.protect_label < model.num_classes:
            raise ConfigError(
                f"defense.protect_label={self.cfg.protect_label} is not a label of this {model.num_classes}-class model"
            )
        return emb

    def _fit(self, model: Classifier, clean: Samples) -> None:
        cfg = self.cfg
        emb = self._check_model(model)
        ids = [int(i) for i in cast("TextClassifier", model).token_ids(cfg.trigger)]  # checked just above
        special = set(getattr(getattr(model, "tokenizer", None), "all_special_ids", None) or [])
        if not ids or any(i in special for i in ids):
            raise ConfigError(
                f"the RAP trigger {cfg.trigger!r} maps to special or unknown tokens {ids}; choose another rare word"
            )
        self.trigger_ids, self.unique_ids = ids, list(dict.fromkeys(ids))
        texts = [t for t, y in zip(clean.inputs, clean.labels) if int(y) == cfg.protect_label]
        if not texts:
            raise ConfigError(
                f"RAP: the defender's clean data has no sample of the protected label {cfg.protect_label}"
            )
        seen = sum(cfg.trigger in t.split() for t in texts)
        if seen:
            log.warning(
                "RAP trigger %r already occurs in %d clean samples; a rarer word works better", cfg.trigger, seen
            )

        self.original_rows = emb.weight.detach()[self.unique_ids].float().cpu().clone()
        norms = self.original_rows.norm(dim=1, keepdim=True)
        rows = self.original_rows.clone().to(emb.weight.device).requires_grad_(True)
        norms = norms.to(rows.device)

        model.eval()  # deterministic (the reference trains with dropout on; see the docs)
        # p(protect | x) does not depend on the trained rows: one plain pass, before training
        with torch.no_grad():
            plain = torch.cat([model(b).float() for b in model.iter_batches(texts, cfg.batch_size, "RAP: clean")])
        p_plain = torch.softmax(plain, 1)[:, cfg.protect_label].to(rows.device)
        triggered = insert_rap_trigger(texts, cfg.trigger)
        order = self.rng(4).permutation(len(texts))  # shuffled once, iterated in this order every epoch
        frozen = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        dtype = train_dtype(rows.device)  # trainer.precision (16-mixed on a CPU: bf16, as Lightning)
        scale = FP16_LOSS_SCALE if dtype == torch.float16 else None
        self.history = []
        try:
            with self.rap_embeddings(rows):
                for _ in range(cfg.epochs):
                    losses: list[torch.Tensor] = []
                    sizes: list[int] = []
                    for start in range(0, len(order), cfg.train_batch_size):
                        idx = order[start : start + cfg.train_batch_size]
                        (batch,) = model.iter_batches([triggered[i] for i in idx], len(idx))
                        with autocast(rows.device, dtype):
                            logits = model(batch)
                        p_rap = torch.softmax(logits.float(), 1)[:, cfg.protect_label]
                        drop = p_plain[torch.as_tensor(idx, device=rows.device)] - p_rap
                        loss = rap_loss(drop, cfg.drop_low, cfg.drop_high, cfg.scale_factor)
                        if not cfg.accumulate_grad:
                            rows.grad = None
                        (loss if scale is None else loss * scale).backward()
                        with torch.no_grad():
                            assert rows.grad is not None
                            rows -= cfg.lr * (rows.grad if scale is None else rows.grad / scale)
                            if cfg.keep_norm:
                                rows *= norms / rows.norm(dim=1, keepdim=True).clamp(min=1e-12)
                        losses.append(loss.detach())
                        sizes.append(len(idx))
                    # one host synchronisation per epoch (the finiteness check and the logged mean loss)
                    if scale is not None and not bool(torch.isfinite(rows).all()):
                        raise ConfigError(
                            "RAP: the trigger optimisation overflowed under trainer.precision="
                            f"{current().precision} (float16); use bf16-mixed or 32-true"
                        )
                    total = 0.0  # summed in float64 on the host, in step order
                    for value, size in zip(torch.stack(losses).double().cpu().tolist(), sizes):
                        total += value * size
                    self.history.append(total / len(order))
        finally:
            for p, flag in frozen:
                p.requires_grad_(flag)
        self.rows = rows.detach().clone()

    def fitted_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if self.rows is None or self.original_rows is None:
            raise RuntimeError("call fit() first")
        meta = {"trigger_ids": self.trigger_ids, "unique_ids": self.unique_ids, "history": self.history}
        return {"rows": self.rows, "original_rows": self.original_rows}, meta

    def load_fitted_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        assert self.model is not None
        self._check_model(self.model)
        self.trigger_ids = [int(i) for i in meta["trigger_ids"]]
        self.unique_ids = [int(i) for i in meta["unique_ids"]]
        self.history = [float(v) for v in meta.get("history", [])]
        self.rows, self.original_rows = tensors["rows"], tensors["original_rows"]

    # -- scoring ---------------------------------------------------------------------------------
    @torch.no_grad()
    def probability_drop(self, inputs: Sequence[str], desc: str | None = None) -> tuple[np.ndarray, torch.Tensor]:
        """Protected-label probability drop ``[N]`` and the plain logits ``[N, C]`` (2 passes per input)."""
        assert self.model is not None
        model, bs, label = self.model, self.cfg.batch_size, self.cfg.protect_label
        model.eval()
        plain = [model(b).float().cpu() for b in model.iter_batches(inputs, bs, desc)]
        with self.rap_embeddings():
            rap = [model(b).float().cpu() for b in model.iter_batches(insert_rap_trigger(inputs, self.cfg.trigger), bs)]
        if not plain:
            return np.zeros(0), torch.empty(0, model.num_classes)
        logits = torch.cat(plain)
        drop = torch.softmax(logits, 1)[:, label] - torch.softmax(torch.cat(rap), 1)[:, label]
        return drop.double().numpy(), logits

    def _scores(self, drop: np.ndarray, logits: torch.Tensor) -> np.ndarray:
        scores = -drop
        if self.cfg.only_protected:
            scores = np.where(logits.argmax(1).numpy() == self.cfg.protect_label, scores, UNPROTECTED_SCORE)
        return scores

    def score(self, inputs: Sequence[str]) -> np.ndarray:  # type: ignore[override]
        return self._scores(*self.probability_drop(inputs))

    def score_and_classify(self, inputs: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[override]
        drop, logits = self.probability_drop(inputs, desc="RAP: scoring")
        return self._scores(drop, logits), logits.argmax(1).numpy()
