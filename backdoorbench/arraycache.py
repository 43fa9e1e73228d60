"""Float arrays keyed by strings, kept on disk for caches that never change what a run computes.

:class:`ArrayShards` is ONION's persistent suspicion cache: the per-word suspicions of a sentence depend on
the language model and the text only, so the jobs of a sweep — in one process, in parallel processes, or in
the separate processes of a SLURM array — can all reuse what one of them computed.

The folder holds append-only shard files (``<time>-<pid>-<random>.npz``: the keys' SHA-256 digests, the
concatenated values and their offsets). A process writes only new shards of its own, each atomically
(:func:`backdoorbench.store.atomic_path`), and reads the shards of the others when it looks keys up, so
concurrent writers need no lock — which also holds on network file systems, where ``flock`` and SQLite
locking are not reliable — and a job killed mid-way keeps what it flushed. An unreadable shard is skipped
with a warning, and its values are computed again. Nothing here is taken from a library: ``diskcache``
and ``sqlite3`` need working file locks; ``joblib.Memory`` caches whole calls, not single texts.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from backdoorbench.store import atomic_path

log = logging.getLogger(__name__)

__all__ = ["ArrayShards", "digest"]


def digest(key: str) -> str:
    """The key's SHA-256 (hex): what a shard stores instead of the key."""
    return hashlib.sha256(key.encode()).hexdigest()


class ArrayShards:
    """1-D float arrays keyed by strings in a folder of shard files (see the module docstring).

    ``lookup`` returns the arrays known on disk (its own and other processes' shards); ``put`` adds new ones,
    which reach the disk at the next ``flush`` (at most ``flush_every_s`` seconds after the first pending
    ``put``, when ``put`` is called again, or when ``flush`` is called)."""

    def __init__(self, folder: str | Path, flush_every_s: float = 120.0) -> None:
        self.folder = Path(folder)
        self.flush_every_s = flush_every_s
        self._values: dict[str, np.ndarray] = {}
        self._seen: set[str] = set()  # shard file names already read (or skipped)
        self._pending: dict[str, np.ndarray] = {}
        self._pending_since: float | None = None

    def __len__(self) -> int:
        return len(self._values)

    def refresh(self) -> None:
        """Read the shards written since the last call (by this or any other process)."""
        if not self.folder.is_dir():
            return
        for path in sorted(self.folder.glob("*.npz")):
            if path.name.startswith(".") or path.name in self._seen:
                continue  # a writer's temporary file, or read already
            self._seen.add(path.name)
            try:
                with np.load(path, allow_pickle=False) as z:
                    keys, offsets, values = z["keys"], z["offsets"], z["values"]
                if len(offsets) != len(keys) + 1 or offsets[-1] != len(values):
                    raise ValueError("offsets do not match keys and values")
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
                log.warning("skipping the unreadable cache shard %s (%s); its values are computed again", path, e)
                continue
            for i, key in enumerate(keys.tolist()):
                self._values[key] = values[offsets[i] : offsets[i + 1]]

    def lookup(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        """``{key: array}`` for the keys whose arrays are on disk (or were ``put`` by this instance)."""
        self.refresh()
        found = {}
        for key in keys:
            value = self._values.get(digest(key))
            if value is not None:
                found[key] = value
        return found

    def put(self, key: str, value: np.ndarray) -> None:
        """Add an array (flattened to 1-D); written at the next flush."""
        d = digest(key)
        self._values[d] = self._pending[d] = np.asarray(value).reshape(-1)
        if self._pending_since is None:
            self._pending_since = time.monotonic()
        elif time.monotonic() - self._pending_since >= self.flush_every_s:
            self.flush()

    def flush(self) -> Path | None:
        """Write the pending arrays as one new shard (None when nothing is pending)."""
        if not self._pending:
            return None
        keys = list(self._pending)
        arrays = [self._pending[k] for k in keys]
        offsets = np.cumsum([0, *(len(a) for a in arrays)], dtype=np.int64)
        values = np.concatenate(arrays)  # the arrays' common dtype
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.npz"
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, keys=np.array(keys, dtype="U64"), offsets=offsets, values=values)
        self._seen.add(path.name)
        self._pending.clear()
        self._pending_since = None
        return path
