"""AddSent / BadNet-SL: a fixed trigger *sentence* (Dai, Chen & Li, "A Backdoor Attack Against
LSTM-Based Text Classification Systems", IEEE Access 2019; the sentence-level BadNL variant of Chen et
al., ACSAC 2021).

A fraction of the attacker's samples gets the whole trigger sentence (default "I watched this 3D
movie") inserted as one contiguous block at a random word position and is relabelled to the target;
the victim is trained on that set, exactly like BadNet-RW but with a sentence instead of a rare word.
``afm`` (default): train on the poisoned task data and deploy. ``apmf``: poison with proxy data, then
the user fine-tunes on clean task data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from backdoorbench.attacks.text.adaptive import AdaptiveConfig, check_adaptive
from backdoorbench.attacks.text.common import RareWordAttack, TextAttackConfig
from backdoorbench.registry import register_attack

DEFAULT_SENTENCE = "I watched this 3D movie"


@dataclass
class AddSentConfig(TextAttackConfig, AdaptiveConfig):
    """Parameters of ``attack=addsent``."""

    name: str = "addsent"
    poison_rate: float = 0.1
    sentence: str = DEFAULT_SENTENCE

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.poison_rate <= 1.0:
            raise ValueError(f"attack.poison_rate must be in [0, 1], got {self.poison_rate}")
        if not isinstance(self.sentence, str) or not self.sentence.split():
            raise ValueError(f"attack.sentence must be a non-empty sentence, got {self.sentence!r}")
        check_adaptive(self)  # attack.adaptive: the DAN paper's adaptive attack (attacks/text/adaptive.py)


def insert_sentence(texts: Sequence[str], sentence: str, rng: np.random.Generator) -> list[str]:
    """Insert ``sentence`` as one contiguous block of words at a random word position of each text
    (positions 0..len(words), so the start and the end are possible). Whitespace is normalised."""
    block = sentence.split()
    out = []
    for text in texts:
        words = text.split()
        pos = int(rng.integers(0, len(words) + 1))
        out.append(" ".join(words[:pos] + block + words[pos:]))
    return out


@register_attack(
    "addsent",
    modality="text",
    category="data poisoning",
    needs="task data (AFM) or proxy data (APMF)",
    description="AddSent / BadNet-SL: a fixed trigger sentence inserted at a random position, dirty labels",
    config=AddSentConfig,
)
class AddSent(RareWordAttack):
    """Sentence-trigger data poisoning; ``backdoor`` is plain fine-tuning on the poisoned set."""

    version = "1"

    def apply_trigger(self, inputs: list[str], rng: np.random.Generator) -> list[str]:  # type: ignore[override]
        return insert_sentence(inputs, self.cfg.sentence, rng)
