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

import os
import secrets
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from backdoorbench.config import ConfigError
from backdoorbench.store import default_cache_dir

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
