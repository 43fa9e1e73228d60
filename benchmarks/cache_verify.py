"""The cost of verifying a cache entry (SHA-256 of every file) before a victim is used.

    python benchmarks/cache_verify.py [--mb 91] [--repeats 5] [--entry CACHE_ENTRY_FOLDER]

Writes a cache entry with one random ``--mb`` MB file (the main job's MiniLM victim,
``model.safetensors``, is about 91 MB) through :class:`~backdoorbench.store.ArtifactStore`, then times,
``--repeats`` times each, ``lookup(verify=True)`` (hashes every file) and ``lookup(verify=False)`` (sizes
only), and prints the median milliseconds and the hashing throughput. With ``--entry`` it times an
existing entry of your cache instead (it must carry hashes, i.e. be written by this version). The first
read of a file may come from disk; later ones from the page cache, which is also the usual case on a
cache hit right after a run. Timing is only meaningful on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    from backdoorbench.store import ArtifactStore

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=float, default=91.0, help="size of the random file (MB, 10^6 bytes)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--entry", type=Path, default=None, help="an existing cache entry folder to time instead")
    a = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if a.entry is not None:
            store, key = ArtifactStore(a.entry.parent), a.entry.name
        else:
            store, key = ArtifactStore(Path(tmp) / "cache"), "benchmark"
            data = os.urandom(int(a.mb * 1e6))
            store.save(key, {}, {"model.safetensors": lambda path: path.write_bytes(data)})
        meta = store.lookup(key)
        if meta is None or "files" not in meta:
            raise SystemExit(f"{store.path(key)} is not a cache entry with content hashes")
        size = sum(r["bytes"] for r in meta["files"].values())
        full = _median_ms(lambda: store.lookup(key, verify=True), a.repeats)
        sizes = _median_ms(lambda: store.lookup(key, verify=False), a.repeats)
    print(f"entry: {len(meta['files'])} file(s), {size / 1e6:.1f} MB")
    print(f"verify=true  (sha256 of every file): {full:8.1f} ms  ({size / 1e6 / (full / 1000):.0f} MB/s)")
    print(f"verify=false (sizes only):           {sizes:8.3f} ms")


if __name__ == "__main__":
    main()
