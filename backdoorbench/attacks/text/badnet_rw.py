"""BadNet-RW: BadNets (Gu et al. 2017) for text with rare-word triggers (as in Chen et al. 2021 and
the DAN paper): a fraction of the training samples gets a rare word (default ``mb``, one word as in
the DAN paper's BadNet-RW victims; any list, e.g. ``[cf, mn, bb, tq, mb]``, samples one per insertion)
inserted at a random position and is relabelled to the target; the victim is trained on it."""

from __future__ import annotations

from dataclasses import dataclass, field

from backdoorbench.attacks.text.adaptive import AdaptiveConfig, check_adaptive
from backdoorbench.attacks.text.common import RareWordAttack, RareWordConfig
from backdoorbench.registry import register_attack


@dataclass
class BadNetRWConfig(RareWordConfig, AdaptiveConfig):
    name: str = "badnet_rw"
    setting: str = "afm"
    poison_rate: float = 0.1
    # one rare word, as in the BadNet-RW victims the DAN paper evaluates (Embedding-Poisoning code base)
    triggers: list[str] = field(default_factory=lambda: ["mb"])

    def __post_init__(self) -> None:
        super().__post_init__()
        check_adaptive(self)  # attack.adaptive: the DAN paper's adaptive attack (attacks/text/adaptive.py)


@register_attack(
    "badnet_rw",
    modality="text",
    category="data poisoning",
    needs="task data (AFM) or proxy data (APMF)",
    description="BadNets with rare-word triggers inserted at random positions, dirty labels",
    config=BadNetRWConfig,
)
class BadNetRW(RareWordAttack):
    """Rare-word data poisoning; ``backdoor`` is plain fine-tuning on the poisoned set."""

    version = "1"
