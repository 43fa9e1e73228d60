"""The attack-artifact cache.

An attack's products (the backdoored model's weights as safetensors, the poisoned-data delta, JSON
metadata) are stored once under a key that hashes everything that determines them: attack config,
data config, model config, the user's training config, seed, and the attack's code version. Running
ten defenses against one attack trains the victim once.

Writes are atomic: an entry is assembled in a temporary folder next to the cache and renamed into
place in one step, so an interrupted write leaves no entry (only a ``.tmp-*`` folder, cleaned later)
and a reader never sees half an entry.

Entries are verified: ``meta.json`` records the SHA-256 and size of every file of the entry, computed
in the temporary folder before the rename, and :meth:`ArtifactStore.lookup` checks them before the
entry is used. The metadata itself is covered too: ``meta.json`` holds ``meta_sha256``, the SHA-256 of its
own canonical JSON (sorted keys, no whitespace) without that key, so an edit of any key or value (a renamed
``poison_file``, a deleted ``files``) breaks it. Every file an entry names must lie inside the entry. A
missing, truncated or changed file, a changed, unreadable or foreign ``meta.json``, or a file name that points
outside raises :class:`CacheError`, naming the entry and how to rebuild it. The format is versioned
(:data:`CACHE_FORMAT`): entries written before format 2 (no ``meta_sha256``) cannot be verified and are
refused with the rebuild command, never used unverified.

Entries are built under a lock: :func:`key_lock` (``<root>/<key>.lock``, a ``filelock`` lock) lets concurrent
jobs that need the same entry build it once; the others wait and then load it. The lock is an ``flock`` on the
file, which the operating system releases when its holder dies, so a killed job never blocks the others.

This module also holds the atomic file writers used for every result file (:func:`atomic_path`,
:func:`atomic_write_text`): a file appears complete under its name, or not at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from backdoorbench.config import ConfigError

log = logging.getLogger(__name__)

META = "meta.json"
HASH = "sha256"
META_DIGEST = "meta_sha256"  # the key of meta.json that holds the digest of the rest of it
#: the on-disk format of an entry. 1: files' hashes in meta.json (or none, before that); 2: meta.json's own digest,
#: the format number, and always the keys the victim loader needs. Entries of another format are refused.
CACHE_FORMAT = 2
_CHUNK = 1 << 20


class CacheError(ConfigError):
    """A cache entry that cannot be trusted (missing, truncated or changed file, unreadable ``meta.json``).

    A :class:`ConfigError`, so the command line prints it in one line and exits with status 2."""

    def __init__(self, entry: Path, problem: str, state: str = "is damaged") -> None:
        self.entry, self.problem, self.state = Path(entry), problem, state
        super().__init__(
            f"cache entry {entry} {state}: {problem}. Rebuild it: rerun with cache.rebuild=true, "
            f"or delete the folder {entry}"
        )

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (multirun launchers send errors between processes)
        return (type(self), (self.entry, self.problem, self.state))


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def cache_key(spec: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()[:20]


def default_cache_dir() -> Path:
    env = os.environ.get("BACKDOORBENCH_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "backdoorbench"


def file_digest(path: str | Path) -> str:
    """The SHA-256 of a file's content (hex), read in 1 MiB chunks."""
    h = hashlib.new(HASH)
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def meta_digest(record: dict[str, Any]) -> str:
    """The SHA-256 (hex) of ``record``'s canonical JSON without its :data:`META_DIGEST` key."""
    body = {k: v for k, v in record.items() if k != META_DIGEST}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def file_records(folder: Path) -> dict[str, dict[str, Any]]:
    """``{relative name: {"sha256": hex, "bytes": size}}`` for every file under ``folder`` but ``meta.json``."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != META:
            out[p.relative_to(folder).as_posix()] = {HASH: file_digest(p), "bytes": p.stat().st_size}
    return out


class ArtifactStore:
    """A folder of cache entries, one sub-folder per key (``<root>/<key>/meta.json`` + files)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root else default_cache_dir()

    def path(self, key: str) -> Path:
        return self.root / key

    def has(self, key: str) -> bool:
        return (self.path(key) / META).is_file()

    def meta(self, key: str) -> dict[str, Any]:
        """The entry's ``meta.json`` as written (not checked: :meth:`lookup` checks it); :class:`CacheError` when it
        is missing or unreadable."""
        path = self.path(key) / META
        try:
            meta = json.loads(path.read_text())
        except FileNotFoundError:
            raise CacheError(self.path(key), f"{META} is missing") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CacheError(self.path(key), f"{META} is unreadable ({_first_line(exc)})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("files", {}), dict):
            raise CacheError(self.path(key), f"{META} is not an entry record")
        return meta

    def lookup(self, key: str, required: Iterable[str] = (), verify: bool = True) -> dict[str, Any] | None:
        """The entry's metadata after checking it and its files, or None when there is no entry.

        Always (``verify`` or not): ``meta.json`` must match its own digest (:data:`META_DIGEST`), be of
        :data:`CACHE_FORMAT` and belong to ``key``; every file it records must lie inside the entry, exist and have
        its recorded size; ``required`` names files that must be among them. With ``verify``, each file's
        SHA-256 is checked too (the only costly step). Raises :class:`CacheError` naming the entry otherwise."""
        entry = self.path(key)
        if not entry.is_dir():
            if entry.exists():
                raise CacheError(entry, "it is not a folder")
            return None
        meta = self.meta(key)
        self._check_meta(entry, key, meta)
        files: dict[str, Any] = meta["files"]
        for name in required:
            self.member(key, meta, name)
        for name, rec in files.items():
            self._check_file(entry, name, rec, verify)
        return meta

    def _check_meta(self, entry: Path, key: str, meta: dict[str, Any]) -> None:
        digest = meta.get(META_DIGEST)
        if digest is None:
            raise CacheError(
                entry, f"its {META} has no {META_DIGEST} (written by a backdoorbench before cache format "
                f"{CACHE_FORMAT}, or edited), so neither it nor the files it lists can be verified",
                state="cannot be verified",
            )
        if digest != meta_digest(meta):
            raise CacheError(entry, f"{META} changed since it was written ({META_DIGEST} mismatch)")
        if meta.get("format") != CACHE_FORMAT:
            raise CacheError(entry, f"{META} is of cache format {meta.get('format')!r}; this backdoorbench reads "
                             f"format {CACHE_FORMAT}", state="cannot be used")
        if meta.get("key") != key:
            raise CacheError(entry, f"{META} belongs to the entry {meta.get('key')!r}, not to {key!r}")
        if not isinstance(meta.get("files"), dict):
            raise CacheError(entry, f"{META} has no 'files' record")
        for name in meta["files"]:
            self._inside(entry, name)

    @staticmethod
    def _inside(entry: Path, name: Any) -> Path:
        """``entry / name`` when ``name`` is a relative path that stays inside the entry (symbolic links
        resolved); :class:`CacheError` naming it otherwise."""
        if not isinstance(name, str) or not name or "\\" in name:
            raise CacheError(entry, f"{META} names a file {name!r} that is not a relative path inside the entry")
        parts = PurePosixPath(name).parts
        path = entry / name
        if PurePosixPath(name).is_absolute() or ".." in parts or not path.resolve().is_relative_to(entry.resolve()):
            raise CacheError(entry, f"{META} names the file {name!r}, which lies outside the entry")
        return path

    def member(self, key: str, meta: dict[str, Any], name: Any) -> Path:
        """The path of file ``name`` of entry ``key`` (whose checked metadata is ``meta``): it must lie inside the
        entry and be one of the files ``meta.json`` records (so that its size and hash are checked);
        :class:`CacheError` naming it otherwise."""
        entry = self.path(key)
        path = self._inside(entry, name)
        if name not in meta.get("files", {}):
            raise CacheError(entry, f"{name} is missing" if not path.exists() else f"{META} records no {name}")
        return path

    def _check_file(self, entry: Path, name: str, rec: Any, verify: bool) -> None:
        path = entry / name
        if not isinstance(rec, dict) or not isinstance(rec.get(HASH), str) or not isinstance(rec.get("bytes"), int):
            raise CacheError(entry, f"{META} has no valid record for {name}")
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CacheError(entry, f"{name} is missing") from None
        if size != rec["bytes"]:
            raise CacheError(entry, f"{name} has {size} bytes, {rec['bytes']} were written (truncated or replaced)")
        if verify:
            try:
                digest = file_digest(path)
            except OSError as exc:
                raise CacheError(entry, f"{name} is unreadable ({_first_line(exc)})") from None
            if digest != rec[HASH]:
                raise CacheError(entry, f"{name} changed since it was written ({HASH} mismatch)")

    def save(self, key: str, meta: dict[str, Any], writers: dict[str, Callable[[Path], None]]) -> Path:
        """Write an entry atomically. ``writers`` maps a file name to a function writing that file.

        ``meta.json`` gets the key, the cache format, the creation time, ``files`` (the SHA-256 and size of each
        file) and last :data:`META_DIGEST`, the digest of all the rest."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.clean_stale()
        tmp = self.root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            for name, write in writers.items():
                write(tmp / name)
            record = {**meta, "key": key, "format": CACHE_FORMAT, "created": time.time(), "files": file_records(tmp)}
            record = json.loads(json.dumps(record, default=str))  # the digest is of what a reader will see
            record[META_DIGEST] = meta_digest(record)
            (tmp / META).write_text(json.dumps(record, indent=2))
            final = self.path(key)
            try:
                os.rename(tmp, final)  # atomic; fails if another run already created the entry
            except OSError:
                if not (final / META).is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another run finished first: keep theirs
            return final
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def clean_stale(self, older_than_s: float = 24 * 3600) -> None:
        """Remove temporary folders that interrupted writes left behind."""
        if not self.root.is_dir():
            return
        now = time.time()
        for p in self.root.glob(".tmp-*"):
            try:
                if now - p.stat().st_mtime > older_than_s:
                    shutil.rmtree(p, ignore_errors=True)
            except FileNotFoundError:
                pass

    def lock_path(self, name: str) -> Path:
        """The lock file of entry (or work folder) ``name``: ``<root>/<name>.lock``."""
        return self.root / f"{name}.lock"

    def remove(self, key: str) -> None:
        path = self.path(key)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()


# -- locks -----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def key_lock(path: str | Path, what: str, report_every_s: float = 60.0, poll_s: float = 0.5) -> Iterator[None]:
    """Hold the file lock ``path`` for the block; while another process holds it, wait (without limit: the holder
    may be training for hours), logging one line when the wait starts and one every ``report_every_s`` seconds.

    ``filelock.FileLock`` is an ``flock`` on Unix: the kernel drops it when the holding process exits or is
    killed, so a lock left by a killed job is free at once. On a file system without ``flock`` (some network
    mounts) filelock falls back to a marker file with the holder's PID and host, which another process on the same
    host reclaims once that PID is gone; a marker from a job that died on another host stays until it is deleted
    (the log line names the file)."""
    from filelock import FileLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    if not _try_acquire(lock):
        t0 = last = time.monotonic()
        log.info("waiting for another job to finish %s (lock %s)", what, path)

        def progress() -> bool:
            nonlocal last
            now = time.monotonic()
            if now - last >= report_every_s:
                last = now
                log.info("still waiting for %s: %.0f s so far (lock %s)", what, now - t0, path)
            return False  # never give up

        lock.acquire(timeout=-1, poll_interval=poll_s, cancel_check=progress)
        log.info("lock %s acquired after %.1f s", path, time.monotonic() - t0)
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def shared_checkpoint(path: str | Path, what: str) -> Iterator[Path]:
    """A training checkpoint that several jobs or stages share (``fit(..., checkpoint=path)`` inside the block),
    under its lock ``<path>.lock`` (:func:`key_lock`) for the block: the first trains into it, the next ones load the
    finished one, and a killed one's successor resumes it. Logs when one is found (the fit logs which of the two)."""
    path = Path(path)
    with key_lock(path.with_suffix(".lock"), f"{what} ({path.name})"):
        if path.is_file():
            log.info("%s: a checkpoint with the same inputs exists (loaded if finished, else resumed): %s", what, path)
        yield path


def _try_acquire(lock: Any) -> bool:
    from filelock import Timeout

    try:
        lock.acquire(blocking=False)
    except Timeout:
        return False
    return True


# -- atomic files ----------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same suffix, so writers that infer the format from it
    work); when the block ends without an exception the file is flushed to disk and renamed onto
    ``path`` in one step. On an exception the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
