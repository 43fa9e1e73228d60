"""Peak memory of a run on an ImageNet-style folder: bounded by the batch, not by the dataset.

Writes a synthetic ImageNet-style folder (``train/<class>/*.JPEG``; default 100 classes x 100 images at 224 px,
random-ish textures tinted per class) into a temporary folder, then runs ``python -m backdoorbench run
data=imagenet_subset attack=badnets defense=none`` on it through the real pipeline, two training steps
(``data.max_train`` = 2 batches, one epoch; ``data.max_test=16`` on both folders, so that evaluation runs the
same batch shapes), in a child process, and prints the child's peak RSS
(``ru_maxrss``) and its peak anonymous memory (``RssAnon``, sampled every 50 ms) next to the decoded dataset
size (N x 3 x 224 x 224 bytes). The same command on a small folder (160 images) gives the process's own
footprint (Python, torch, the model, the activations of a batch); the difference is what the dataset costs.
Every run has ``cache.enabled=false``: it trains its own victim (no cache hit) and decodes the images into an
anonymous temporary store, so each figure is a whole cold run.

Then the small folder is run with ``data.options.in_memory=true`` (every image decoded into one tensor, the old
path) and with the store, and their metrics (BA, ASR) must be equal. ``--in-memory-big`` also runs the big folder
the old way, for the comparison (needs several times the decoded size in RAM).

    nice -n 10 python benchmarks/imagenet_memory.py            # 10,000 JPEGs at 224 px
    python benchmarks/imagenet_memory.py --classes 10 --per-class 20 --size 64   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def write_folder(root: Path, classes: int, per_class: int, size: int, seed: int = 0) -> int:
    """``root/train/n<k>/<i>.JPEG``: smooth random textures (noise upsampled) tinted by class, plus fine noise."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / "train" / f"n{c:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        tint = rng.integers(0, 256, 3)
        for i in range(per_class):
            coarse = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
            img = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR), dtype=np.int16)
            img = (img + tint) // 2 + rng.integers(-12, 13, img.shape)
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{c}_{i}.JPEG", quality=85)
    return classes * per_class


def _rss_anon_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run(root: Path, run_dir: Path, size: int, batch: int, in_memory: bool) -> dict:
    """One pipeline run in a child process: its peak RSS, peak anonymous memory, wall time and metrics."""
    cmd = [
        sys.executable, "-m", "backdoorbench", "run", "attack=badnets", "defense=none", "data=imagenet_subset",
        f"data.root={root}", f"data.options.image_size={size}", f"data.options.in_memory={str(in_memory).lower()}",
        f"data.max_train={2 * batch}", "data.max_test=16", "data.holdout_size=32", "trainer.max_epochs=1",
        f"trainer.batch_size={batch}", "cache.enabled=false", f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "BACKDOORBENCH_PROGRESS": "0", "PYTHONHASHSEED": "0"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_anon, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], _rss_anon_kb(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    err = proc.stderr.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    sampler.join()
    if status != 0:
        raise SystemExit(f"run failed ({status}):\n{err[-3000:]}")
    results = json.loads((run_dir / "results.json").read_text())
    return {"peak_rss": usage.ru_maxrss * 1024, "peak_anon": peak_anon[0] * 1024,
            "wall_s": time.perf_counter() - t0, "metrics": results["metrics"]}


def gb(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--small", type=int, default=160, help="images in the small folder (10 classes)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--in-memory-big", action="store_true", help="also run the big folder the old way (in RAM)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="imagenet_memory-"))
    try:
        t0 = time.perf_counter()
        n = write_folder(tmp / "big", args.classes, args.per_class, args.size)
        n_small = write_folder(tmp / "small", 10, args.small // 10, args.size, seed=1)
        print(f"wrote {n} + {n_small} JPEGs at {args.size} px in {time.perf_counter() - t0:.0f} s ({tmp})")
        decoded = n * 3 * args.size * args.size
        rows = {}
        rows["small, store"] = run(tmp / "small", tmp / "r-small-store", args.size, args.batch, False)
        rows["small, in memory"] = run(tmp / "small", tmp / "r-small-mem", args.size, args.batch, True)
        rows["big, store"] = run(tmp / "big", tmp / "r-big-store", args.size, args.batch, False)
        if args.in_memory_big:
            rows["big, in memory"] = run(tmp / "big", tmp / "r-big-mem", args.size, args.batch, True)
        base = rows["small, store"]
        print(f"\nbig folder: {n} images, decoded size {gb(decoded)}; two training steps of batch {args.batch}, "
              f"defense=none\n")
        print(f"{'run':20} {'peak RSS':>11} {'peak anon':>11} {'anon - small':>13} {'/ decoded':>10} {'wall':>7}")
        for name, r in rows.items():
            extra = r["peak_anon"] - base["peak_anon"]
            ratio = f"{extra / decoded:.3f}" if name.startswith("big") else ""
            print(f"{name:20} {gb(r['peak_rss']):>11} {gb(r['peak_anon']):>11} {gb(extra):>13} {ratio:>10} "
                  f"{r['wall_s']:6.0f}s")
        big = rows["big, store"]
        print(f"\npeak RSS / decoded size (store): {big['peak_rss'] / decoded:.3f}; "
              f"anonymous memory above the small-folder run / decoded size: "
              f"{(big['peak_anon'] - base['peak_anon']) / decoded:.3f}")
        a, b = rows["small, store"]["metrics"], rows["small, in memory"]["metrics"]
        same = {k: (a.get(k), b.get(k)) for k in ("ba", "asr")}
        print(f"small folder, store vs in memory: {same} -> {'EQUAL' if a == b else 'DIFFERENT'}")
        if a != b:
            raise SystemExit("the store and the in-memory decode gave different metrics")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
