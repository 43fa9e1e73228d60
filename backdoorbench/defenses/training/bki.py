"""BKI -- Backdoor Keyword Identification (Chen and Dai, "Mitigating backdoor attacks in LSTM-based text
classification systems by Backdoor Keyword Identification", Neurocomputing 2021, arXiv 2007.12070; reference:
OpenBackdoor's ``BKIDefender``). Text only.

With a model trained on the (possibly poisoned) training set: for every training sentence and every word in it,
the change of the sentence representation (the last layer's ``[CLS]``) when that word is removed,
``‖h(sentence) − h(sentence without the word)‖_∞``. Each sentence contributes its ``top_k`` = 5 most influential
words to a dictionary ``word → (count, mean change)``; the backdoor keyword is the word maximising
``log10(count) · mean change``, and every training sentence that has it among its top-5 words is removed. A fresh
model is trained on the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import numpy as np

from backdoorbench.config import ConfigError
from backdoorbench.data.base import Samples
from backdoorbench.defenses.training.inspection import (
    DataInspectionDefense,
    Inspection,
    InspectionConfig,
    extract_features,
)
from backdoorbench.modality.base import Classifier
from backdoorbench.registry import register_defense


@dataclass
class BKIConfig(InspectionConfig):
    name: str = "bki"
    top_k: int = 5  # each sentence's most influential words entered in the dictionary (reference: 5)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top_k < 1:
            raise ValueError(f"defense.top_k must be >= 1, got {self.top_k}")


def word_deltas(reprs: np.ndarray) -> np.ndarray:
    """Rows: the full sentence's representation, then one per removed word → the ∞-norm change per word."""
    return np.abs(reprs[1:] - reprs[0]).max(axis=1) if len(reprs) > 1 else np.zeros(0)


def keyword_ranking(top_words: list[list[tuple[str, float]]]) -> list[tuple[str, float]]:
    """The reference's dictionary: ``word → log10(count) · mean change`` over the sentences' top words, best first
    (ties: the word entered first)."""
    stats: dict[str, tuple[int, float]] = {}
    for words in top_words:
        for word, val in words:
            n, mean = stats.get(word, (0, 0.0))
            stats[word] = (n + 1, (n * mean + val) / (n + 1))
    ranked = [(w, math.log10(n) * mean) for w, (n, mean) in stats.items()]
    return sorted(ranked, key=lambda item: item[1], reverse=True)  # sorted() is stable


@register_defense(
    "bki",
    modality="text",
    needs="the (possibly poisoned) training set without provenance, a model trained on it, a fresh-model factory",
    description="Backdoor Keyword Identification: the word whose removal moves [CLS] most; drop its sentences",
    config=BKIConfig,
)
class BKI(DataInspectionDefense):
    """Finds the backdoor keyword from representation changes; removes the sentences where it ranks top-k."""

    def __init__(self, cfg: BKIConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self.keyword: str | None = None  # the identified backdoor keyword
        self.ranking: list[tuple[str, float]] = []

    def inspect(self, model: Classifier, train: Samples) -> Inspection:
        texts = train.inputs
        if isinstance(texts, np.ndarray) or not all(isinstance(t, str) for t in texts):
            raise ConfigError("bki works on text only (a list of strings)")
        variants: list[str] = []
        splits: list[list[str]] = []
        for sent in cast("list[str]", texts):  # checked just above: all strings
            words = sent.strip().split()
            splits.append(words)
            variants.append(sent)
            variants.extend(" ".join(words[:i] + words[i + 1 :]) for i in range(len(words)))
        cfg = self.cfg
        reprs = extract_features(model, variants, cfg.batch_size, cfg.layer, cfg.pooling, "bki: sentences")
        deltas: list[np.ndarray] = []
        top_words: list[list[tuple[str, float]]] = []
        start = 0
        for words in splits:
            d = word_deltas(reprs[start : start + len(words) + 1])
            start += len(words) + 1
            deltas.append(d)
            order = np.argsort(d, kind="stable")[::-1][: cfg.top_k]
            top_words.append([(words[i], float(d[i])) for i in order])
        self.ranking = keyword_ranking(top_words)
        self.keyword = self.ranking[0][0] if self.ranking else None
        removed = np.array([any(w == self.keyword for w, _ in tw) for tw in top_words], dtype=bool)
        scores = np.array([max((float(d[i]) for i, w in enumerate(ws) if w == self.keyword), default=0.0)
                           for d, ws in zip(deltas, splits, strict=True)])
        return Inspection(scores, removed)
