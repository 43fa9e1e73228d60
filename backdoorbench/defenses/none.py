"""``defense=none``: no defense, report the backdoored model's BA and ASR only."""

from __future__ import annotations

from dataclasses import dataclass

from backdoorbench.defenses.base import Defense, DefenseConfig
from backdoorbench.registry import register_defense


@dataclass
class NoDefenseConfig(DefenseConfig):
    name: str = "none"


@register_defense(
    "none",
    modality=("text", "vision"),
    needs="nothing",
    description="no defense: BA and ASR of the backdoored model",
    config=NoDefenseConfig,
)
class NoDefense(Defense):
    kind = "none"
