"""Sweeps that survive: a failed job leaves ``failed.json`` and the sweep goes on; a re-submitted sweep skips
the jobs that are already done.

- **Job folders are found again.** The job sub-directory (``hydra.sweep.subdir`` in ``configs/config.yaml``)
  is ``<attack>_<defense>_<hash>``, where ``<hash>`` (:func:`job_hash`, the ``${bb.job_hash:...}`` resolver)
  is a short hash of the job's own overrides (``hydra.job.override_dirname``: sorted, launcher settings
  excluded). The same sweep command with the same ``hydra.sweep.dir`` gives every job the folder it had
  before, whatever the launcher and the job's position in the sweep.
- **Done jobs are skipped** (:func:`previous_results`): a job folder that holds ``results.json`` and a
  ``config.yaml`` equal to the job's resolved config is done; the job logs one line and writes nothing.
  A folder whose ``results.json`` came from a *different* config is never overwritten: the job fails, and
  its ``failed.json`` says so.
- **Failures are recorded** (:func:`write_failed`): the job's ``failed.json`` holds the one-line reason,
  the exception type, the job's overrides and config, and the traceback file of an unexpected failure. A
  later successful run of the job removes it.
- **The submitting process learns what failed** (:class:`SweepStatus`, a Hydra callback registered in
  ``configs/config.yaml``): it notes the sweep folder and start time in the process that submits the jobs,
  which may differ from the processes that run them (joblib workers, submitit, SLURM). Afterwards
  :func:`failures_since` reads the ``failed.json`` files written since then.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from backdoorbench.engine.rundir import RESULTS, register_resolvers
from backdoorbench.store import atomic_write_text
from backdoorbench.trainer.config import NEVER_HASHED

log = logging.getLogger(__name__)

FAILED = "failed.json"
CONFIG = "config.yaml"
JOB_HASH_RESOLVER = "bb.job_hash"


def job_hash(overrides: Any = "") -> str:
    """Eight hex digits of SHA-256 over a job's overrides (``hydra.job.override_dirname``)."""
    return hashlib.sha256(str(overrides).encode()).hexdigest()[:8]


def register_sweep_resolvers() -> None:
    """``${bb.unique:}`` and ``${bb.job_hash:...}`` (idempotent). Runs on import of this module, so that a
    worker process that unpickles the callback below can resolve the sweep folder names too."""
    register_resolvers()
    OmegaConf.register_new_resolver(JOB_HASH_RESOLVER, job_hash, replace=True)


register_sweep_resolvers()


def _resolved(cfg: DictConfig) -> dict[str, Any] | None:
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except Exception:  # an interpolation that does not resolve: the run itself will report it
        return None


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def previous_results(out: Path, cfg: DictConfig) -> list[str] | None:
    """None when ``out`` holds no ``results.json``; else the config keys that differ between the run that wrote
    it (its ``config.yaml``) and ``cfg`` resolved: ``[]`` means the job is done."""
    if not (out / RESULTS).is_file():
        return None
    current = _resolved(cfg)
    try:
        previous = OmegaConf.to_container(OmegaConf.load(out / CONFIG), resolve=False)
    except Exception:  # no or unreadable config.yaml: not known to be the same run
        return ["<config.yaml missing or unreadable>"]
    if current is None:
        return ["<config does not resolve>"]
    # trainer settings that never change results (loader workers, pinning, the logger; whose defaults became
    # `auto`) do not make a finished job a different one
    for cfg_dict in (previous, current):
        trainer = cfg_dict.get("trainer") if isinstance(cfg_dict, dict) else None
        if isinstance(trainer, dict):
            for key in NEVER_HASHED:
                trainer.pop(key, None)
    return _differences(previous, current)


def write_failed(
    out: Path, exc: BaseException, reason: str, expected: bool, overrides: list[str], cfg: DictConfig
) -> Path | None:
    """Write ``<out>/failed.json`` (atomically). Next to a ``results.json`` only when that came from a
    different config: the job was refused, and its folder says why."""
    resolved = _resolved(cfg)
    record = {
        "reason": reason,
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "expected": expected,
        "overrides": list(overrides),
        "config": resolved if resolved is not None else OmegaConf.to_container(cfg, resolve=False),
        "traceback": getattr(exc, "error_log", None),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = out / FAILED
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record, indent=2, default=str))
    except OSError as e:  # an unwritable job folder must not hide the job's own error
        log.warning("could not write %s: %s", path, e)
        return None
    return path


def clear_failed(out: Path) -> None:
    """Remove a ``failed.json`` left by an earlier attempt of a job that has now succeeded (or found its own
    results)."""
    (out / FAILED).unlink(missing_ok=True)


@dataclass
class SweepState:
    """What the submitting process knows about the sweep it started (set by :class:`SweepStatus`)."""

    dir: Path | None = None
    started: float = 0.0
    history: list[Path] = field(default_factory=list)


STATE = SweepState()


class SweepStatus(Callback):
    """Hydra callback (``hydra.callbacks`` in ``configs/config.yaml``): notes the sweep folder and start time in
    the submitting process; see :func:`failures_since`."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        STATE.dir = Path(str(config.hydra.sweep.dir))
        STATE.started = time.time()
        STATE.history.append(STATE.dir)


def failures_since(sweep_dir: Path, started: float) -> list[dict[str, Any]]:
    """The ``failed.json`` records under ``sweep_dir`` written at or after ``started`` (this submission's),
    each with its ``job_dir``."""
    out = []
    for path in sorted(sweep_dir.rglob(FAILED)):
        try:
            if path.stat().st_mtime < started - 1.0:
                continue
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        record["job_dir"] = str(path.parent)
        out.append(record)
    return out
