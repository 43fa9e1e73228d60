"""Run directories: names that cannot collide, and folders checked before any work starts.

The default run directory (``configs/config.yaml``) is
``runs/<YYYY-MM-DD_HH-MM-SS>_<attack>_<defense>_<unique>`` and the sweep directory
``multirun/<YYYY-MM-DD_HH-MM-SS>_<unique>``, where ``<unique>`` comes from the ``bb.unique`` resolver:
the process id and four random hex digits. Two runs started in the same second, on one machine or on
two sharing a file system, get different folders. The value is cached per config, so every mention of
``${bb.unique:}`` in one run (or one sweep) gives the same string.

The files in a run directory are written atomically (:func:`backdoorbench.store.atomic_path`).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import secrets
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from backdoorbench.config import ConfigError
from backdoorbench.store import atomic_path, atomic_write_text, default_cache_dir

log = logging.getLogger(__name__)

UNIQUE_RESOLVER = "bb.unique"
RESULTS = "results.json"


def unique_suffix() -> str:
    """``<pid>-<4 random hex digits>``: distinct for runs started at the same time."""
    return f"{os.getpid()}-{secrets.token_hex(2)}"


def register_resolvers() -> None:
    """Register ``${bb.unique:}`` with OmegaConf (idempotent; call before Hydra composes the config)."""
    OmegaConf.register_new_resolver(UNIQUE_RESOLVER, unique_suffix, use_cache=True, replace=True)


def check_writable_folder(path: Path, what: str) -> None:
    """Create ``path`` (and its parents) and check that a file can be created in it; a one-line
    :class:`ConfigError` naming ``what`` (the setting it came from) otherwise."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what}={path} is a file; point it at a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{what}={path}: cannot create the folder ({exc.strerror or exc})") from None
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        reason = exc.strerror or exc
        raise ConfigError(f"{what}={path} is not writable ({reason}); point it at a folder you can write") from None


def check_locations(out: Path, cache_dir: str | None, cache_enabled: bool) -> None:
    """Refuse, before any training, a run directory or a cache folder that cannot be written, and a run
    directory that already holds another run's ``results.json``."""
    check_writable_folder(out, "run directory")
    if (out / RESULTS).exists():
        raise ConfigError(
            f"run directory {out} already holds the {RESULTS} of an earlier run; "
            "choose another one (hydra.run.dir=...) or delete it"
        )
    if not cache_enabled:
        return
    if cache_dir:
        where = "cache.dir"
    elif os.environ.get("BACKDOORBENCH_CACHE"):
        where = "$BACKDOORBENCH_CACHE"
    else:
        where = "the cache folder (cache.dir)"
    check_writable_folder(Path(cache_dir) if cache_dir else default_cache_dir(), where)


# -- the run's files (each written atomically) ------------------------------------------------------------
@dataclass
class Scored:
    """Predictions (and detector scores) on one split of the test inputs: ``clean`` or ``poisoned``."""

    split: str
    index: np.ndarray
    labels: np.ndarray
    preds: np.ndarray
    scores: np.ndarray | None = None


def write_results(path: Path, results: dict[str, Any]) -> None:
    """``results.json``: strict JSON (NaN/inf as null)."""
    atomic_write_text(path, json.dumps(_finite(results), indent=2, default=_json_default, allow_nan=False))


def write_scores(
    path: Path, scored: list[Scored], target: int | np.ndarray, reject: Callable[[np.ndarray], np.ndarray] | None
) -> None:
    """One row per scored input; ``target``: the target label, or one per poisoned input (all-to-all);
    ``reject``: the detector's rejection rule (None for other defenses)."""
    target = np.broadcast_to(np.asarray(target), (len(scored[-1].labels),)) if scored else np.asarray(target)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["split", "index", "label", "pred", "score", "rejected", "attack_success"])
        for s in scored:
            rejected = reject(s.scores) if s.scores is not None and reject is not None else None
            for j in range(len(s.labels)):
                w.writerow(
                    [
                        s.split,
                        int(s.index[j]),
                        int(s.labels[j]),
                        int(s.preds[j]),
                        "" if s.scores is None else f"{float(s.scores[j]):.6g}",
                        "" if rejected is None else int(rejected[j]),
                        int(s.preds[j] == target[j]) if s.split == "poisoned" else "",
                    ]
                )


def write_sample_scores(
    path: Path, labels: np.ndarray, scores: np.ndarray, removed: np.ndarray, poisoned: np.ndarray | None
) -> None:
    """A data-inspection defense's verdict on every training sample: ``index, label`` (the training label),
    ``score`` (higher = more suspicious), ``removed`` (0/1) and ``poisoned`` (0/1 from the provenance, empty
    when the training set has none)."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "label", "score", "removed", "poisoned"])
        for i in range(len(scores)):
            w.writerow([i, int(labels[i]), f"{float(scores[i]):.8g}", int(removed[i]),
                        "" if poisoned is None else int(poisoned[i])])


def write_curve(path: Path, curve: list[dict[str, float]]) -> None:
    keys = list(dict.fromkeys(k for row in curve for k in row))
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(curve)


def draw(fn: Callable[..., None], path: Path, *args: Any) -> None:
    """``fn(tmp_path, *args)`` draws a figure, renamed into ``path``; a failing plot never loses a run."""
    try:
        with atomic_path(path) as tmp:
            fn(tmp, *args)
    except Exception as exc:  # a plot must never lose a run's results
        log.warning("could not draw %s: %s", path, exc)


def _finite(o: Any) -> Any:
    """NaN / inf → None, so results.json is strict JSON (an undefined rate is null, not NaN)."""
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, (float, np.floating)):
        return float(o) if np.isfinite(o) else None
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
