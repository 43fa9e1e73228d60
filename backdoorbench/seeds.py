"""The one way a run's random streams are derived from its seed (``seed``; docs/architecture.md, "Seeds").

Two kinds of derived randomness exist, each with one function and one declared table:

* :func:`stream` — a NumPy generator ``default_rng([seed, *salts of the name, *index])`` for the stream
  ``name`` (:data:`STREAMS`): the data split, an attack's draws (``Attack.rng(salt)``: the name ``attack``, the
  salt as index), a defense's (``Defense.rng(salt)``), MixMatch's, the pre-training attacks' masking;
* :func:`stage_seed` — the integer seed of a sub-stage (a Lightning fit, a loader's shuffling, a torch
  generator): ``seed * scale + offset + index`` with the stage's ``(scale, offset)`` from :data:`STAGE_SEEDS`.

The values are the ones each place used before the table existed (salted ``rng([seed, salt])`` and
``seed + N``), so cached victims keep their keys and every figure stays; a new stage adds its name to the table
(an offset no other stage of the same component uses) rather than writing ``seed + N`` inline.
"""

from __future__ import annotations

import numpy as np

__all__ = ["STAGE_SEEDS", "STREAMS", "stage_seed", "stream"]

#: stream name → the salts after the seed (NumPy ``SeedSequence`` entropy ``[seed, *salts, *index]``)
STREAMS: dict[str, tuple[int, ...]] = {
    "attack": (),  # Attack.rng(salt): [seed, salt]; also NeuBA's trigger selection ([seed, trigger index])
    "defense": (104729,),  # Defense.rng(salt): [seed, 104729, salt]
    "split": (20240601,),  # the threat-model split (data/split.py)
    "mixmatch": (31337,),  # DBD's MixMatch stage: its mixing draws
    "pretrain-masking": (31,),  # the pre-training attacks' (NeuBA, BadPre) MLM masking draws
}

#: stage name → (scale, offset): the stage's integer seed is ``seed * scale + offset + index``
STAGE_SEEDS: dict[str, tuple[int, int]] = {
    "user-finetune": (1, 1),  # APMF: the user's fine-tuning of the attacked pre-trained model
    "ep-clean-model": (1, 2),  # EP / DFEP: the clean model the attack starts from
    "ripples-copy": (1, 2),  # RIPPLES: the attacker's fine-tuned copy (the restricted inner-product's reference)
    "ripples-clean-loader": (1, 3),  # RIPPLES: the shuffling of the clean batches of the inner-product term
    "pretrain-loader": (1, 4),  # NeuBA / BadPre: the shuffling of the pre-training batches
    "lwp-head": (1, 5),  # LWP: the shared classification head's initialisation
    "surrogate": (1, 101),  # label-consistent / Trojan: the attacker's clean surrogate
    "pretrain-masking-torch": (1000, 17),  # NeuBA / BadPre: the torch generator of MLM masking
    "dbd-head-loader": (1, 1),  # DBD stage 2: the linear head's batches
    "dbd-labelled-loader": (1, 2),  # DBD stage 3: the labelled batches
    "dbd-unlabelled-loader": (1, 3),  # DBD stage 3: the unlabelled batches (or, supervised, the second view)
    "neural-cleanse-class": (1000, 0),  # Neural Cleanse: class ``index``'s random mask and pattern
}


def stream(seed: int, name: str, *index: int) -> np.random.Generator:
    """The NumPy generator of stream ``name`` (:data:`STREAMS`) for run seed ``seed``, ``index`` appended to its
    salts (e.g. ``stream(seed, "attack", salt)``)."""
    try:
        salts = STREAMS[name]
    except KeyError:
        raise KeyError(f"no random stream {name!r}; declare it in backdoorbench.seeds.STREAMS") from None
    return np.random.default_rng([int(seed), *salts, *(int(i) for i in index)])


def stage_seed(seed: int, stage: str, index: int = 0) -> int:
    """The integer seed of sub-stage ``stage`` (:data:`STAGE_SEEDS`) for run seed ``seed``."""
    try:
        scale, offset = STAGE_SEEDS[stage]
    except KeyError:
        raise KeyError(f"no stage seed {stage!r}; declare it in backdoorbench.seeds.STAGE_SEEDS") from None
    return int(seed) * scale + offset + int(index)
