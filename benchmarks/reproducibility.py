"""Run-to-run and thread-count reproducibility of each component on the embedded data (issue 39).

For every component (an attack's victim, or a defense against one attack) the same command runs three times,
each with its own empty artifact cache (so the victim is trained again each time, as on a fresh install):
twice with ``threads=2`` and once with ``threads=1``. Per component it prints the largest difference of any
metric in ``results.json`` (percentage points) between the two 2-thread runs (same command, same machine)
and between 1 and 2 threads, next to the seed-to-seed standard deviation of the published tables
(docs/results.md, 3 seeds, full embedded schedule), and whether the runs recorded a nondeterministic operation.
The schedules are reduced (fewer samples and epochs; ``--scale``), so absolute metrics are not the tables'.

    python benchmarks/reproducibility.py                          # every component, --scale tiny
    python benchmarks/reproducibility.py --only victim:badnets dbd --out /tmp/repro_bench
    python benchmarks/reproducibility.py --list

CPU-heavy: every run trains its victim again (about 3-7 min per run for a vision component on 2 cores shared
with other jobs, longer for text), so all components take hours; docs/reproducibility.md gives the measured
rows and their time. Runs go to ``--out`` (kept: a rerun reuses finished runs and only prints the table).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

VISION = ["data.max_train=1000", "data.max_test=300", "data.holdout_size=300"]  # victims: 15 epochs
TEXT = ["data.max_train=300", "data.max_test=150", "data.holdout_size=200", "data.proxy_size=200",
        "trainer.max_epochs=1"]
DBD = ["defense.ssl_epochs=1", "defense.head_epochs=1", "defense.mixmatch_epochs=1"]

#: component -> (overrides, the published table's seed-to-seed std, in points, and where it comes from)
COMPONENTS: dict[str, tuple[list[str], str]] = {
    "victim:badnets": (["attack=badnets", "defense=none", *VISION], "BA 0.5 / ASR 0.2 (vision victims, badnets)"),
    "victim:blended": (["attack=blended", "defense=none", *VISION], "BA 0.2 / ASR 0.0 (blended)"),
    "victim:wanet": (["attack=wanet", "defense=none", *VISION], "BA 0.6 / ASR 1.2 (wanet)"),
    "victim:sig": (["attack=sig", "defense=none", *VISION], "BA 0.3 / ASR 13.7 (sig)"),
    "victim:ripples": (["attack=ripples", "defense=none", *TEXT], "BA 1.1 / ASR 28.5 (ripples, apmf)"),
    "victim:badnet_rw": (["attack=badnet_rw", "defense=none", *TEXT], "BA 2.1 / ASR 0.0 (badnet_rw, afm)"),
    "dan (text)": (["attack=ripples", "defense=dan", *TEXT], "FAR@5% 37.5 (DAN vs ripples)"),
    "dan (vision)": (["attack=badnets", "defense=dan", *VISION], "FAR@5% 1.0 (DAN vs badnets)"),
    "strip": (["attack=badnets", "defense=strip", "defense.num_copies=20", *VISION],
              "FAR@5% 0.8 (STRIP vs badnets)"),
    "onion": (["attack=badnet_rw", "defense=onion", *TEXT], "FAR@5% 3.6 (ONION vs badnet_rw)"),
    "rap": (["attack=badnet_rw", "defense=rap", "defense.epochs=1", *TEXT], "FAR@5% 30.4 (RAP vs badnet_rw)"),
    "finetune": (["attack=badnets", "defense=finetune", "defense.epochs=2", *VISION],
                 "BA 0.6 / ASR 22.2 (fine-tuning vs badnets)"),
    "nad": (["attack=badnets", "defense=nad", "defense.teacher_epochs=2", "defense.epochs=2", *VISION],
            "BA 5.7 / ASR 5.1 (NAD vs badnets)"),
    "rnp": (["attack=badnets", "defense=rnp", "defense.unlearn_epochs=2", "defense.recover_epochs=2", *VISION],
            "BA 16.8 / ASR 2.4 (RNP vs badnets)"),
    "dbd": (["attack=badnets", "defense=dbd", *DBD, *VISION], "BA 0.1 / ASR 0.1 (DBD vs badnets)"),
    "dbd (defense.threads=null)": (["attack=badnets", "defense=dbd", "defense.threads=null", *DBD, *VISION],
                                   "BA 0.1 / ASR 0.1 (DBD vs badnets)"),
}
SCALES = {"tiny": [], "small": ["data.max_train=1500", "data.max_test=500"]}  # appended (later wins)


def flat_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Every numeric metric (nested dicts such as ``far_at_frr`` flattened), NaN dropped."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update(flat_metrics(v, f"{prefix}{k}."))
        elif isinstance(v, int | float) and not isinstance(v, bool) and not math.isnan(float(v)):
            out[prefix + k] = float(v)
    return out


RATE_LIKE = ("ba", "asr", "far", "frr", "auroc", "r_acc", "der", "labelled", "rejection")


def largest_difference(a: dict[str, Any], b: dict[str, Any], victim: bool = True) -> tuple[float, str]:
    """The largest |difference| of a rate metric (as percentage points) between two results' metrics;
    ``victim=False``: the defense's metrics only (not the victim's ``ba`` / ``asr``)."""
    fa, fb = flat_metrics(a), flat_metrics(b)
    worst, where = 0.0, "—"
    for k in sorted(set(fa) & set(fb)):
        if not any(tag in k for tag in RATE_LIKE) or "threshold" in k or (not victim and k in ("ba", "asr")):
            continue
        d = abs(fa[k] - fb[k]) * 100
        if d > worst:
            worst, where = d, k
    return worst, where


def run_once(name: str, overrides: list[str], threads: int, tag: str, out: Path) -> dict[str, Any]:
    run_dir = out / _slug(name) / tag
    results = run_dir / "results.json"
    if not results.is_file():
        env = {**os.environ, "BACKDOORBENCH_PROGRESS": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "PYTHONHASHSEED": "0"}
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle threads sleep (shared cores; same sums)
        cmd = [sys.executable, "-m", "backdoorbench", "run", *overrides, f"threads={threads}",
               f"cache.dir={run_dir / 'cache'}", f"hydra.run.dir={run_dir}"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        (run_dir / "log.txt").parent.mkdir(parents=True, exist_ok=True)
        (run_dir / "log.txt").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} {tag} failed (exit {proc.returncode}); see {run_dir / 'log.txt'}")
        print(f"  {name} {tag}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return json.loads(results.read_text())


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def measure(name: str, overrides: list[str], out: Path) -> dict[str, Any]:
    a = run_once(name, overrides, 2, "threads2_a", out)
    b = run_once(name, overrides, 2, "threads2_b", out)
    c = run_once(name, overrides, 1, "threads1", out)
    victim = name.startswith("victim:")  # a defense's row: its own metrics (the victim's are its victim row)
    same, same_where = largest_difference(a["metrics"], b["metrics"], victim)
    cross, cross_where = largest_difference(a["metrics"], c["metrics"], victim)
    ops = sorted({op for r in (a, b, c) for op in r.get("reproducibility", {}).get("nondeterministic_ops", [])})
    identical = flat_metrics(a["metrics"]) == flat_metrics(b["metrics"])
    cpu = sum(r.get("timing", {}).get("total", 0.0) for r in (a, b, c))
    return {"name": name, "same": same, "same_where": same_where, "identical": identical, "cross": cross,
            "cross_where": cross_where, "ops": ops, "seconds": cpu}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", help="component names (see --list); default: all")
    p.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    p.add_argument("--out", type=Path, default=Path("runs/reproducibility"))
    p.add_argument("--list", action="store_true")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(COMPONENTS))
        return
    names = args.only or list(COMPONENTS)
    unknown = [n for n in names if n not in COMPONENTS]
    if unknown:
        p.error(f"unknown component(s) {unknown}; --list shows them")
    t0 = time.perf_counter()
    rows = []
    for name in names:
        overrides, _ = COMPONENTS[name]
        try:
            rows.append(measure(name, overrides + SCALES[args.scale], args.out))
        except RuntimeError as exc:
            print(f"  {exc}", file=sys.stderr, flush=True)
            rows.append({"name": name, "error": str(exc)})
    print(f"\nscale {args.scale}; largest metric difference in points (the metric), 3 runs per component\n")
    print("| component | same command twice, 2 threads | 1 vs 2 threads | published seed-to-seed std (3 seeds) "
          "| nondeterministic ops | run seconds (3 runs) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        std = COMPONENTS[r["name"]][1]
        if "error" in r:
            print(f"| {r['name']} | failed | | {std} | | |")
            continue
        same = "0 (bit-identical metrics)" if r["identical"] else f"{r['same']:.2f} ({r['same_where']})"
        cross = f"{r['cross']:.2f} ({r['cross_where']})" if r["cross"] else "0"
        print(f"| {r['name']} | {same} | {cross} | {std} | {', '.join(r['ops']) or 'none'} | {r['seconds']:.0f} |")
    print(f"\nwall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
