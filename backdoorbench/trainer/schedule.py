"""Learning-rate schedules of ``trainer.scheduler``, stepped once per optimiser step (per batch).

* ``linear`` (default): linear warm-up over ``warmup_ratio`` of the steps, then linear decay to 0
  (``transformers.get_linear_schedule_with_warmup``, exactly as before this option existed);
* ``cosine``: the same warm-up, then a half cosine to 0 (``transformers.get_cosine_schedule_with_warmup``,
  the BackdoorBench recipe's ``CosineAnnealingLR`` stepped per batch);
* ``multistep``: the same warm-up, then the lr is multiplied by ``gamma`` at each of ``milestones``
  (epochs, as in ``torch.optim.lr_scheduler.MultiStepLR``: the step ``milestone × steps_per_epoch``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

SCHEDULERS = ("linear", "cosine", "multistep")


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    total_steps: int,
    warmup_steps: int,
    steps_per_epoch: int = 1,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-step schedule ``name`` over ``total_steps`` optimiser steps (see the module docstring)."""
    total_steps = max(int(total_steps), 1)
    if name == "linear":
        from transformers import get_linear_schedule_with_warmup

        return get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    if name == "cosine":
        from transformers import get_cosine_schedule_with_warmup

        return get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    if name == "multistep":
        bounds = sorted(int(m) * max(int(steps_per_epoch), 1) for m in milestones)

        def factor(step: int) -> float:
            warm = step / warmup_steps if step < warmup_steps else 1.0
            return warm * gamma ** sum(step >= b for b in bounds)

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {name!r}")
