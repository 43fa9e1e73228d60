"""``defense=dbs``: DBS, Constrained Optimization with Dynamic Bound-scaling (Shen et al., ICML 2022; reference
github:PurduePAML/DBS, ``trojai_r6/scanner.py`` for the optimisation and ``config/config.yaml`` for the defaults).

Text trigger inversion for HF sequence classifiers. For every (source → target) label pair and every insertion
position, ``trigger_len`` (10) trigger tokens are relaxed to a distribution over the vocabulary,
``softmax(θ / T)`` (θ [trigger_len, V], initialised at 0); their embedding, the distribution times the word
embedding matrix, is spliced into the source-class clean texts after ``[CLS]`` (``first_half``) or at
``max_len // 2`` (``second_half``), and Adam (lr 0.5, step decay ×0.5 every 50 epochs) minimises the
cross-entropy towards the target over ``epochs`` (200) full-batch steps. Dynamic bound scaling: once the loss is
below the bound (``loss_barrier`` 0.1), every ``temp_scaling_check_epoch`` (5) epochs the temperature is halved
while the loss stays below the bound, else doubled (at most ``max_temp`` = 2) with uniform noise ×``noise_ratio``
(10) added to θ / T and a rollback counted; after ``rollback_thres`` (5) rollbacks the bound is relaxed to
``min(2 · bound, best_loss - 1e-3)``. Whenever the distribution is one-hot within ``eps_to_one_hot`` (1e-3) and the
loss is below the bound, its argmax tokens become the best trigger and the bound halves.

The verdict: the smallest inversion loss over all pairs and positions; the model is flagged when it is below
``detection_loss_thres`` (reference 0.001); ``verdict_score`` = −log10 of that loss (higher = more likely
backdoored); the suspected targets are the targets of the pairs below the threshold, smallest loss first.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from backdoorbench.config import ConfigError
from backdoorbench.data.base import Samples
from backdoorbench.defenses.base import DefenseConfig, ModelInspector, Verdict
from backdoorbench.modality.base import Classifier
from backdoorbench.registry import register_defense

log = logging.getLogger(__name__)

POSITIONS = ("first_half", "second_half")


@dataclass
class DBSConfig(DefenseConfig):
    name: str = "dbs"
    clean_size: int = 40  # TrojAI round 6 gives 20 clean examples per class (binary tasks)
    init_temp: float = 2.0
    max_temp: float = 2.0
    temp_scaling_check_epoch: int = 5
    temp_scaling_down_multiplier: float = 2.0  # the reference uses it both ways (its up-multiplier 5 is unused)
    loss_barrier: float = 0.1
    noise_ratio: float = 10.0
    rollback_thres: int = 5
    epochs: int = 200
    lr: float = 0.5
    scheduler_step_size: int = 50
    scheduler_gamma: float = 0.5
    trigger_len: int = 10
    max_len: int = 100
    eps_to_one_hot: float = 1e-3
    detection_loss_thres: float = 1e-3
    positions: list[str] = field(default_factory=lambda: list(POSITIONS))

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("epochs", "trigger_len", "temp_scaling_check_epoch", "rollback_thres", "scheduler_step_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"defense.{key} must be >= 1, got {getattr(self, key)}")
        if self.init_temp <= 0 or self.max_temp <= 0 or self.lr <= 0 or self.temp_scaling_down_multiplier <= 1:
            raise ValueError("defense.init_temp, max_temp and lr must be > 0 and temp_scaling_down_multiplier > 1")
        if self.max_len <= self.trigger_len + 2:
            raise ValueError(f"defense.max_len must exceed trigger_len + 2, got {self.max_len}")
        bad = [p for p in self.positions if p not in POSITIONS]
        if bad or not self.positions:
            raise ValueError(f"defense.positions must be a non-empty list of {', '.join(POSITIONS)}: {self.positions}")


@dataclass
class Inversion:
    """One (source → target, position) inversion."""

    source: int
    target: int
    position: str
    loss: float  # the reference's: the relaxed loss when the best trigger was found (the final discrete one if none)
    tokens: list[str]
    token_ids: list[int]
    asr: float  # share of the source texts sent to the target by the discrete tokens
    found: bool  # a near-one-hot trigger under the bound was found (the reference's best_trigger)


class Scanner:
    """The reference ``DBS_Scanner`` for one model: ``generate`` inverts one (source → target, position) option."""

    def __init__(self, model: Any, cfg: DBSConfig, seed: int) -> None:
        self.model, self.cfg, self.seed = model, cfg, seed
        self.tok = model.tokenizer
        self.emb = model.word_embeddings.weight.detach()  # [V, D]
        self.device = self.emb.device
        #: the reference's max_len, capped at the model's own max_length (its position table may be shorter)
        self.max_len = min(cfg.max_len, int(getattr(model, "max_length", cfg.max_len)))
        if self.max_len < 2 * cfg.trigger_len + 2:
            raise ConfigError(f"defense.trigger_len={cfg.trigger_len} does not fit twice in {self.max_len} tokens")

    def stamp(self, texts: list[str], insert: int, content: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise ``texts`` to ``max_len`` (padded) and insert ``content`` (ids, attention 1) at ``insert``,
        truncating back to ``max_len`` (reference ``stamping_placeholder``)."""
        enc = self.tok(texts, max_length=self.max_len, padding="max_length", truncation=True, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        n, k = len(texts), len(content)
        ids = torch.cat([ids[:, :insert], content.expand(n, k), ids[:, insert:]], 1)[:, : self.max_len]
        mask = torch.cat([mask[:, :insert], torch.ones(n, k, dtype=mask.dtype), mask[:, insert:]], 1)
        return ids.to(self.device), mask[:, : self.max_len].to(self.device)

    def logits(self, ids: torch.Tensor, mask: torch.Tensor, insert: int, trigger: torch.Tensor) -> torch.Tensor:
        """The model's logits with the word embeddings at ``insert .. insert + len`` replaced by ``trigger``."""
        e = self.model.word_embeddings(ids)
        k = trigger.shape[0]
        e = torch.cat([e[:, :insert], trigger.unsqueeze(0).expand(len(e), -1, -1), e[:, insert + k :]], 1)
        return self.model.hf(inputs_embeds=e, attention_mask=mask).logits

    def insert_at(self, position: str) -> int:
        return 1 if position == "first_half" else self.max_len // 2  # reference: 1 or 50 of max_len 100

    def generate(self, texts: list[str], source: int, target: int, position: str) -> Inversion:
        cfg = self.cfg
        insert = self.insert_at(position)
        pad = torch.full((cfg.trigger_len,), int(self.tok.pad_token_id), dtype=torch.long)
        ids, mask = self.stamp(texts, insert, pad)
        y = torch.full((len(texts),), target, dtype=torch.long, device=self.device)
        gen = torch.Generator().manual_seed(self.seed)
        theta = torch.zeros(cfg.trigger_len, self.emb.shape[0], device=self.device, requires_grad=True)
        opt = torch.optim.Adam([theta], lr=cfg.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, cfg.scheduler_step_size, gamma=cfg.scheduler_gamma)
        temp, barrier, rollback, scaling = cfg.init_temp, cfg.loss_barrier, 0, False
        best_loss, best_ids = math.inf, None
        ce_loss = math.inf
        for epoch in range(cfg.epochs):
            noise = torch.zeros_like(theta)
            if rollback >= cfg.rollback_thres:
                rollback, barrier = 0, min(barrier * 2, best_loss - 1e-3)
            if epoch % cfg.temp_scaling_check_epoch == 0 and scaling:
                if ce_loss < barrier:
                    temp /= cfg.temp_scaling_down_multiplier
                else:
                    rollback += 1
                    noise = torch.rand(theta.shape, generator=gen).to(self.device) * cfg.noise_ratio
                    temp = min(temp * cfg.temp_scaling_down_multiplier, cfg.max_temp)
            bound = torch.softmax(theta / temp + noise, 1)
            ce = F.cross_entropy(self.logits(ids, mask, insert, bound @ self.emb), y)
            opt.zero_grad(set_to_none=True)
            ce.backward()
            opt.step()
            sched.step()
            ce_loss = float(ce)
            if ce_loss <= barrier:
                scaling = True
            values, dims = bound.detach().max(1)  # dim_check: near one-hot and under the bound
            if cfg.trigger_len - float(values.sum()) < cfg.eps_to_one_hot and ce_loss <= barrier:
                best_loss, best_ids, barrier, rollback = ce_loss, dims.cpu(), ce_loss / 2, 0
        found = best_ids is not None
        if best_ids is None:  # never converged: the final argmax tokens, scored as discrete tokens below
            best_ids = torch.softmax(theta.detach() / temp, 1).argmax(1).cpu()
        with torch.no_grad():
            t_ids, t_mask = self.stamp(texts, insert, best_ids)
            logits = self.model.hf(input_ids=t_ids, attention_mask=t_mask).logits
            discrete = float(F.cross_entropy(logits, y))
            asr = float((logits.argmax(1) == y).float().mean())
        loss = best_loss if found else discrete
        tokens = self.tok.convert_ids_to_tokens(best_ids.tolist())
        return Inversion(source, target, position, loss, list(tokens), best_ids.tolist(), asr, found)


@register_defense(
    "dbs",
    modality="text",
    needs="the model and the defender's clean texts (no trigger, no poisoned data)",
    description="DBS: invert trigger tokens per label pair by dynamic-temperature softmax; a tiny loss = backdoored",
    config=DBSConfig,
)
class DBS(ModelInspector):
    def inspect(self, model: Classifier, clean: Samples) -> Verdict:
        if clean.modality != "text" or not hasattr(model, "hf"):
            raise ConfigError("dbs supports text only (an HF sequence classifier): it inverts tokens of the vocabulary")
        cfg: DBSConfig = self.cfg
        k = model.num_classes
        texts = {c: [str(t) for t, y in zip(clean.inputs, clean.labels) if y == c] for c in range(k)}
        sources = [c for c in range(k) if texts[c]]
        if len(sources) < 1 or k < 2:
            raise ConfigError("dbs needs clean texts of at least one class of a model with >= 2 classes")
        was_training = model.training
        grads = [p.requires_grad for p in model.parameters()]
        model.eval()
        model.requires_grad_(False)
        t0 = time.perf_counter()
        runs: list[Inversion] = []
        try:
            scanner = Scanner(model, cfg, self.seed)
            for s in sources:
                for t in range(k):
                    for pos in ([] if t == s else cfg.positions):
                        inv = scanner.generate(texts[s], s, t, pos)
                        runs.append(inv)
                        log.info("dbs: %d -> %d (%s): loss %.5f, asr %.2f, trigger %s", s, t, pos, inv.loss, inv.asr,
                                 " ".join(inv.tokens))
        finally:
            for p, g in zip(model.parameters(), grads):
                p.requires_grad_(g)
            model.train(was_training)
        self.stage_times["invert"] = round(time.perf_counter() - t0, 3)
        return verdict_of(runs, k, cfg.detection_loss_thres)


def verdict_of(runs: list[Inversion], num_classes: int, threshold: float) -> Verdict:
    """The smallest loss decides (reference ``dbs.py``: the best estimation over all options); per class, the
    smallest loss of the inversions towards it (inf when none targets it); the trigger tokens of that inversion."""
    best = min(runs, key=lambda r: r.loss)
    per_class: dict[int, Inversion] = {}
    for r in runs:
        if r.target not in per_class or r.loss < per_class[r.target].loss:
            per_class[r.target] = r
    classes = list(range(num_classes))
    scores = [per_class[c].loss if c in per_class else math.inf for c in classes]
    suspected = sorted((c for c in per_class if per_class[c].loss < threshold), key=lambda c: per_class[c].loss)
    return Verdict(
        score=-math.log10(max(best.loss, 1e-12)),
        flagged=best.loss < threshold,
        suspected_targets=suspected,
        top_class=best.target,
        class_scores=[s if np.isfinite(s) else 1e12 for s in scores],
        classes=classes,
        triggers={c: {"tokens": np.asarray(r.tokens)} for c, r in per_class.items()},
        extra={
            "score": "inversion_loss",
            "min_loss": best.loss,
            "threshold": threshold,
            "trigger_tokens": best.tokens,
            "inversions": [
                {"source": r.source, "target": r.target, "position": r.position, "loss": r.loss, "asr": r.asr,
                 "found": r.found, "tokens": r.tokens, "token_ids": r.token_ids}
                for r in runs
            ],
        },
    )
