"""ONION — backdOor defeNse with outlIer wOrd detectioN (Qi, Chen, Yang, Liu and Sun, EMNLP 2021,
"ONION: A Simple and Effective Defense Against Textual Backdoor Attacks"; reference code ``thunlp/ONION``).

Inserted trigger words (``cf``, ``mb``, ...) break a sentence's fluency. ONION measures each word's
contribution to the sentence's perplexity under a causal language model:

    f_i = p_0 − p_i

with ``p_0`` the perplexity of the sentence and ``p_i`` that of the sentence with word ``i`` removed (words
= whitespace-separated tokens). A large ``f_i`` means the sentence is much more fluent without word ``i``.

* **Detector score** = ``max_i f_i`` (higher = more suspicious); the threshold is calibrated by the
  :class:`~backdoorbench.defenses.base.Detector` base on held-out clean data.
* **Input corrector** (``corrects_inputs``): ``correct`` removes every word with ``f_i > bar``. The paper
  chooses the bar on clean validation data; by default the bar here is the ``bar_quantile`` quantile of
  ``f_i`` over all words of the defender's clean fitting data (never test data), as the ONION baseline of
  ``lancopku/RAP`` does. ``bar`` sets it by hand (perplexity units).

The LM (``lm``: ``smollm2``, the offline default, or any HF causal LM name / folder, e.g. ``gpt2``) scores
all ``n + 1`` variants of every sentence of a batch of sentences together, in length-sorted, right-padded
batches with a masked token-level cross-entropy, so batched perplexities equal one-at-a-time ones. A
deletion shares its tokens before the deleted word with the sentence, so the sentences go through the LM
first and each deletion only feeds the tokens after the deleted word, on top of the sentence's cached
keys/values (:meth:`~backdoorbench.models.lm.CausalLM.mean_nll_variants`; same values, about half the
tokens; deleting the last word needs no pass).

A batch of LM sequences holds at most ``lm_batch_size`` sequences and ``lm_batch_tokens`` padded tokens (the
token budget: it bounds the ``[B, T, vocabulary]`` log-probabilities, 2048 tokens × SmolLM2's 49,152-word
vocabulary ≈ 400 MB in float32). The token NLLs of a batch and the first NLL of every deletion are gathered on
the LM's device and copied to the host once per batch, never once per word. The LM runs on the run's device
under the run's ``trainer.inference_precision`` (autocast, as the victim's batched inference; the LM's weights
stay in ``lm_dtype``).

Cost: at most ``n + 1`` LM sequences per sentence of ``n ≥ 2`` words (none for shorter ones, which are left alone,
as in the reference), counted in ``lm_forward_count``; 1 classifier pass per input for the prediction.
Suspicions are cached per sentence, so ``correct`` after ``score`` on the same inputs costs no LM pass;
they depend on the LM and the text only, so runs in one process that load the same LM by name (the
attacks of a ``--multirun`` sweep) share them: the clean sentences are scored once per sweep, and
``cache_hits`` (reported as ``cost.cached_inputs``) counts the scored inputs that were already known.
In a run with the artifact cache on (``cache.enabled``, the default) they are also kept on disk, under
``<cache.dir>/onion/<key of the LM's name, dtype, length, weights and inference precision>/``
(:class:`~backdoorbench.arraycache.ArrayShards`), so separate processes — parallel sweep lanes, the jobs of
a SLURM array, a job started again after it was killed — share them too; the values are the same as
computed afresh, so results do not change.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from backdoorbench.arraycache import ArrayShards
from backdoorbench.config import ConfigError
from backdoorbench.data.base import Samples
from backdoorbench.defenses.base import Detector, DetectorConfig
from backdoorbench.defenses.persist import ModelMismatchError
from backdoorbench.modality.base import Classifier, weights_fingerprint
from backdoorbench.models.lm import DTYPES, CausalLM, load_causal_lm
from backdoorbench.progress import progress
from backdoorbench.registry import register_defense
from backdoorbench.runtime import autocast, current, inference_dtype
from backdoorbench.store import cache_key

log = logging.getLogger(__name__)

CACHE_LIMIT = 100_000  # sentences whose suspicions are kept
# Suspicions depend only on the LM (and its inference precision) and the text, never on the victim: runs in
# one process (a --multirun sweep over attacks) that load the same LM share them, so clean sentences are scored
# once per sweep.
_SHARED_CACHES: dict[tuple[str, str, int, str], dict[str, np.ndarray]] = {}
# ... and, in a run with the artifact cache on, on disk: one shard folder per LM (name, dtype, length, weights,
# inference precision when not 32)
_DISK_CACHES: dict[Path, ArrayShards] = {}


@dataclass
class ONIONConfig(DetectorConfig):
    name: str = "onion"
    lm: str = "smollm2"  # smollm2 (offline) | any HF causal LM name or local folder (gpt2 in the paper)
    lm_batch_size: int = 32  # sequences per LM forward pass
    lm_max_length: int = 256  # LM tokens per sequence (longer ones are truncated)
    lm_batch_tokens: int = 2048  # padded LM tokens per forward pass (bounds the [B, T, vocab] log-probabilities)
    lm_dtype: str = "float32"  # float32 | float16 | bfloat16
    bar: float | None = None  # suspicion bar for correct() (perplexity units); null = calibrate
    bar_quantile: float = 0.95  # bar = this quantile of f_i over the clean fitting words

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.lm:
            raise ValueError("defense.lm must name a causal LM (smollm2, gpt2, a local folder)")
        if self.lm_batch_size < 1:
            raise ValueError(f"defense.lm_batch_size must be >= 1, got {self.lm_batch_size}")
        if self.lm_max_length < 2:
            raise ValueError(f"defense.lm_max_length must be >= 2, got {self.lm_max_length}")
        if self.lm_batch_tokens < 1:
            raise ValueError(f"defense.lm_batch_tokens must be >= 1, got {self.lm_batch_tokens}")
        if self.lm_dtype not in DTYPES:
            raise ValueError(f"defense.lm_dtype must be one of {tuple(DTYPES)}, got {self.lm_dtype!r}")
        if not 0.0 < self.bar_quantile <= 1.0:
            raise ValueError(f"defense.bar_quantile must be in (0, 1], got {self.bar_quantile}")


def deletions(words: Sequence[str]) -> list[str]:
    """The sentence, then the sentence with word 0, 1, ... removed."""
    return [" ".join(words)] + [" ".join([*words[:i], *words[i + 1 :]]) for i in range(len(words))]


@register_defense(
    "onion",
    modality="text",
    needs="defender's clean data and a causal language model (SmolLM2 offline by default)",
    description="per-word perplexity drop under a causal LM; flags and removes outlier words",
    config=ONIONConfig,
)
class ONION(Detector):
    """Outlier-word detector and input corrector (Qi et al. 2021); score = largest perplexity drop."""

    corrects_inputs = True

    def __init__(self, cfg: ONIONConfig, seed: int = 0, lm: CausalLM | None = None) -> None:
        super().__init__(cfg, seed)
        self.lm = lm  # loaded at fit time unless given
        self.bar: float | None = None
        self._cache: dict[str, np.ndarray] = {}
        self._disk: ArrayShards | None = None
        self.cache_hits = 0  # inputs whose suspicions were already known (this run or an earlier one)

    @property
    def lm_forward_count(self) -> int:
        """Sequences sent through the LM so far."""
        return 0 if self.lm is None else self.lm.forward_count

    def cost_counters(self) -> dict[str, int]:
        """LM sequences (reported per scored input) and inputs whose suspicions were already known."""
        return {"lm_passes": self.lm_forward_count, "cached_inputs": self.cache_hits}

    # -- suspicion -------------------------------------------------------------------------------
    def suspicion(self, texts: Sequence[str], desc: str | None = None) -> list[np.ndarray]:
        """``f_i = p_0 − p_i`` for every word of every text (an empty array for texts under 2 words)."""
        if self.lm is None:
            raise RuntimeError("call fit() first (it loads the language model)")
        todo = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if len(self._cache) + len(todo) > CACHE_LIMIT:
            self._cache.clear()
            todo = list(dict.fromkeys(texts))
        if self._disk is not None and todo:
            self._cache.update(self._disk.lookup(todo))
            todo = [t for t in todo if t not in self._cache]
        self.cache_hits += sum(t in self._cache for t in texts)  # known in memory or on disk
        bs = self.cfg.batch_size
        starts = range(0, len(todo), bs)
        for start in progress(starts, desc=desc, total=len(starts)):
            chunk = todo[start : start + bs]
            texts_done: list[str] = []
            bases: list[str] = []
            variants: list[list[str]] = []
            for text in chunk:
                words = text.split()
                if len(words) < 2:
                    self._cache[text] = np.zeros(0)
                    continue
                dels = deletions(words)
                texts_done.append(text)
                bases.append(dels[0])
                variants.append(dels[1:])
            if not bases:
                continue
            # all deletions of the chunk, batched; each deletion reuses its sentence's cached prefix
            with autocast(self.lm.device, inference_dtype()):
                nll = self.lm.mean_nll_variants(bases, variants, self.cfg.lm_batch_size)
            for text, values in zip(texts_done, nll):
                ppl = np.exp(values)
                f = ppl[0] - ppl[1:]
                self._cache[text] = np.nan_to_num(f, nan=0.0, posinf=0.0, neginf=0.0)
                if self._disk is not None:
                    self._disk.put(text, self._cache[text])
        if self._disk is not None:
            self._disk.flush()
        return [self._cache[t] for t in texts]

    # -- detector --------------------------------------------------------------------------------
    def _load_lm(self, model: Classifier) -> None:
        cfg = self.cfg
        if self.lm is None:
            device = current().device or model.device  # the run's device (outside a run: the victim's)
            self.lm = load_causal_lm(cfg.lm, device=device, dtype=cfg.lm_dtype, max_length=cfg.lm_max_length,
                                     max_batch_tokens=cfg.lm_batch_tokens)
            self._cache = _SHARED_CACHES.setdefault(
                (cfg.lm, cfg.lm_dtype, cfg.lm_max_length, current().inference_precision), {}
            )
        if self._disk is None and current().store is not None:
            spec = {"lm": cfg.lm, "dtype": cfg.lm_dtype, "max_length": self.lm.max_length,
                    "weights": weights_fingerprint(self.lm.model)}
            if current().inference_precision != "32":  # in the key only when set: full-precision keys stay
                spec["inference_precision"] = current().inference_precision
            folder = current().cache_folder("onion", cache_key(spec))
            assert folder is not None
            self._disk = _DISK_CACHES.setdefault(folder, ArrayShards(folder))
            self._disk.refresh()
            log.info("ONION: suspicions cached in %s (%d sentences there)", folder, len(self._disk))

    def _fit(self, model: Classifier, clean: Samples) -> None:
        cfg = self.cfg
        self._load_lm(model)
        if cfg.bar is not None:
            self.bar = float(cfg.bar)
            return
        texts = cast("list[str]", clean.inputs)  # text samples
        per_word = [f for f in self.suspicion(list(texts), desc="ONION: clean words") if len(f)]
        if not per_word:
            raise ConfigError("ONION: the defender's clean data has no sentence of two or more words")
        self.bar = float(np.quantile(np.concatenate(per_word), cfg.bar_quantile, method="higher"))
        log.info("ONION bar %.4g (quantile %.3g of clean per-word suspicion)", self.bar, cfg.bar_quantile)

    def fitted_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The bar and a fingerprint of the LM's weights; the LM itself is reloaded by name (``defense.lm``)."""
        if self.bar is None or self.lm is None:
            raise RuntimeError("call fit() first")
        return {}, {"bar": self.bar, "lm_fingerprint": weights_fingerprint(self.lm.model)}

    def load_fitted_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        assert self.model is not None
        self._load_lm(self.model)
        assert self.lm is not None
        actual = weights_fingerprint(self.lm.model)
        if actual != meta["lm_fingerprint"]:
            raise ModelMismatchError(
                f"ONION was fitted with a language model of weights fingerprint {meta['lm_fingerprint']}; "
                f"defense.lm={self.cfg.lm!r} loads one with {actual}: make that name load the same LM, or refit"
            )
        self.bar = float(meta["bar"])

    def score(self, inputs: Sequence[str]) -> np.ndarray:  # type: ignore[override]
        return np.array([float(f.max()) if len(f) else 0.0 for f in self.suspicion(list(inputs), "ONION: scoring")])

    def correct(self, inputs: Sequence[str]) -> list[str]:  # type: ignore[override]
        """Remove the words whose suspicion exceeds the bar (inputs without such words are returned as is)."""
        if self.bar is None:
            raise RuntimeError("call fit() first")
        out = []
        for text, f in zip(inputs, self.suspicion(list(inputs), "ONION: correcting")):
            if not len(f) or not (f > self.bar).any():
                out.append(text)
                continue
            out.append(" ".join(w for w, fi in zip(text.split(), f) if not fi > self.bar))
        return out
