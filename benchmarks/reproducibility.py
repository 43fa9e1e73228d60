"""Run-to-run and thread-count reproducibility of each component on the embedded data (issue 39).

For every component (an attack's victim, ``victim:<attack>``, or a defense against one attack) the same command
runs three times: twice with ``threads=2`` (tags ``threads2_a``, ``threads2_b``) and once with ``threads=1``
(``threads1``). Per component it prints the largest difference of any rate in ``results.json`` (percentage
points) between the two 2-thread runs (same command, same machine) and between 1 and 2 threads, next to the
seed-to-seed standard deviation of the published tables (docs/results.md, 3 seeds, full embedded schedule), and
whether the runs recorded a nondeterministic operation. The schedules are reduced (``--scale``), so absolute
metrics are not the tables'.

Each tag has its own artifact cache per attack, empty when the tag's first run of that attack starts
(``<out>/victim_<attack>/<tag>/cache``): the victim row trains its victim there, as on a fresh install, and every
defense row of that attack and tag loads it from there (checked: ``cache.hit``) instead of training it again.
Only runs at the tag's thread count ever write into a tag's cache, so this gives the same figures as a fresh
cache per run; a defense row compares the defense's own metrics, the victim's are its victim row.

    python benchmarks/reproducibility.py                          # every component, --scale tiny
    python benchmarks/reproducibility.py --only victim:badnets dbd --out /tmp/repro_bench
    python benchmarks/reproducibility.py --list
    python benchmarks/reproducibility.py --no-run --out docs/experiments/runs/repro_bench_tiny   # the kept records

Runs go to ``--out`` (kept: a rerun reuses finished runs and only prints the table); progress goes to stderr.
docs/reproducibility.md gives the measured table and its CPU time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VISION_ATTACKS = {"badnets", "blended", "wanet", "label_consistent", "sig", "trojan"}
TAGS = (("threads2_a", 2), ("threads2_b", 2), ("threads1", 1))

#: scale -> modality -> data/trainer overrides (victim and defense rows alike: the victim's cache key)
SCALES: dict[str, dict[str, list[str]]] = {
    "tiny": {
        "vision": ["data.max_train=500", "data.max_test=200", "data.holdout_size=200", "trainer.max_epochs=3",
                   "trainer.batch_size=32"],
        "text": ["data.max_train=200", "data.max_test=100", "data.holdout_size=200", "data.proxy_size=200",
                 "model.max_length=32", "trainer.max_epochs=1"],
    },
    # the scale of the first rows measured (docs/reproducibility.md): victims 15 epochs on 1,000 digits
    "reduced": {
        "vision": ["data.max_train=1000", "data.max_test=300", "data.holdout_size=300"],
        "text": ["data.max_train=300", "data.max_test=150", "data.holdout_size=200", "data.proxy_size=200",
                 "trainer.max_epochs=1"],
    },
}
#: --scale tiny only: the attacks' own long schedules cut (applied to the victim and to every defense row)
ATTACK_TINY: dict[str, list[str]] = {
    "label_consistent": ["attack.steps=10"],
    "trojan": ["attack.trigger_steps=100"],
    "lwp": ["attack.epochs=1"],
    "ep": ["attack.epochs=5"],
    "dfep": ["attack.num_samples=200"],
    "neuba": ["attack.max_unlabeled=100", "attack.epochs=1", "attack.probe_size=50"],
    "badpre": ["attack.max_unlabeled=100", "attack.epochs=1", "attack.probe_size=50"],
}
DBD = ["defense.ssl_epochs=1", "defense.head_epochs=1", "defense.mixmatch_epochs=1"]
ABL = ("defense.isolation_epochs=1", "defense.unlearning_epochs=1", "defense.finetune_epochs=1")
NO_TABLE = "no 3-seed table"


@dataclass(frozen=True)
class Component:
    attack: str
    defense: str  # "none": the victim's row
    extra: tuple[str, ...]  # the defense's shortened schedule (every scale)
    std: str  # the published seed-to-seed std, in points, and its table

    @property
    def modality(self) -> str:
        return "vision" if self.attack in VISION_ATTACKS else "text"


def _victim(attack: str, std: str) -> tuple[str, Component]:
    return f"victim:{attack}", Component(attack, "none", (), std)


COMPONENTS: dict[str, Component] = dict([
    _victim("badnets", "BA 0.5 / ASR 0.2 (vision_detect)"),
    _victim("blended", "BA 0.2 / ASR 0.0 (vision_detect)"),
    _victim("wanet", "BA 0.6 / ASR 1.2 (vision_detect)"),
    _victim("label_consistent", "BA 0.3 / ASR 0.6 (vision_detect)"),
    _victim("sig", "BA 0.3 / ASR 13.7 (vision_detect)"),
    _victim("trojan", "BA 0.4 / ASR 0.0 (vision_detect)"),
    _victim("badnet_rw", "BA 2.1 / ASR 0.0 (text_detect)"),
    _victim("addsent", "BA 2.1 / ASR 0.0 (text_detect)"),
    _victim("ripples", "BA 1.1 / ASR 28.5 (text_detect)"),
    _victim("lwp", "BA 1.7 / ASR 0.0 (text_detect)"),
    _victim("ep", "BA 1.3 / ASR 0.3 (text_detect)"),
    _victim("dfep", "BA 1.3 / ASR 0.8 (text_detect)"),
    _victim("neuba", "BA 1.2 / ASR 0.0 (dan_task_agnostic)"),
    _victim("badpre", NO_TABLE + " (needs a masked-LM checkpoint)"),
    ("dan (text)", Component("ripples", "dan", (), "FAR@5% 37.5 (text_detect, ripples)")),
    ("dan (vision)", Component("badnets", "dan", (), "FAR@5% 1.0 (vision_detect, badnets)")),
    ("strip (text)", Component("badnet_rw", "strip", (), "FAR@5% 18.6 (text_detect, badnet_rw)")),
    ("strip (vision)", Component("badnets", "strip", ("defense.num_copies=20",), "FAR@5% 0.8 (vision_detect)")),
    ("onion", Component("badnet_rw", "onion", (), "FAR@5% 3.6 (text_detect, badnet_rw)")),
    ("rap", Component("badnet_rw", "rap", ("defense.epochs=1",), "FAR@5% 30.4 (text_detect, badnet_rw)")),
    ("bki", Component("badnet_rw", "bki", (), NO_TABLE)),
    ("neural_cleanse", Component("badnets", "neural_cleanse", ("defense.steps=3",), NO_TABLE)),
    ("nc_unlearn", Component("badnets", "nc_unlearn", ("defense.nc.steps=3", "defense.epochs=1"), NO_TABLE)),
    ("dbs", Component("badnet_rw", "dbs", ("defense.epochs=20",), NO_TABLE)),
    ("finetune", Component("badnets", "finetune", ("defense.epochs=1",), "BA 0.6 / ASR 22.2 (repair, badnets)")),
    ("nad", Component("badnets", "nad", ("defense.teacher_epochs=1", "defense.epochs=1"),
                      "BA 5.7 / ASR 5.1 (repair, badnets)")),
    ("rnp", Component("badnets", "rnp", ("defense.unlearn_epochs=1", "defense.recover_epochs=1"),
                      "BA 16.8 / ASR 2.4 (repair, badnets)")),
    ("anp", Component("badnets", "anp", ("defense.iterations=20", "defense.steps_per_epoch=10"), NO_TABLE)),
    ("clp", Component("badnets", "clp", (), NO_TABLE)),
    ("dbd", Component("badnets", "dbd", tuple(DBD), "BA 0.1 / ASR 0.1 (dbd, badnets)")),
    ("dbd (defense.threads=null)", Component("badnets", "dbd", (*DBD, "defense.threads=null"),
                                             "BA 0.1 / ASR 0.1 (dbd, badnets)")),
    ("abl", Component("badnets", "abl", ABL, NO_TABLE)),
    ("abl (defense.threads=null)", Component("badnets", "abl", (*ABL, "defense.threads=null"), NO_TABLE)),
    ("spectral", Component("badnets", "spectral", (), NO_TABLE)),
    ("activation_clustering", Component("badnets", "activation_clustering", (), NO_TABLE)),
    ("spectre", Component("badnets", "spectre", (), NO_TABLE)),
    ("cube", Component("badnets", "cube", (), NO_TABLE)),
])


def overrides(c: Component, scale: str) -> list[str]:
    """The run's command-line overrides (without ``threads`` and the folders)."""
    tiny = ATTACK_TINY.get(c.attack, []) if scale == "tiny" else []
    return [f"attack={c.attack}", f"defense={c.defense}", *SCALES[scale][c.modality], *tiny, *c.extra]


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")


def run_dir(out: Path, name: str, tag: str) -> Path:
    return out / _slug(name) / tag


def cache_dir(out: Path, attack: str, tag: str) -> Path:
    """The artifact cache of ``tag``'s runs of ``attack``: the victim row's, shared by every defense row."""
    return run_dir(out, f"victim:{attack}", tag) / "cache"


def flat_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Every numeric metric (nested dicts such as ``far_at_frr`` flattened), NaN dropped."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update(flat_metrics(v, f"{prefix}{k}."))
        elif isinstance(v, int | float) and not isinstance(v, bool) and not math.isnan(float(v)):
            out[prefix + k] = float(v)
    return out


#: the rates among the metrics (0-1; nested keys such as ``far_at_frr.0.05`` match by their whole name)
RATE_LIKE = ("ba", "asr", "far", "frr", "auroc", "r_acc", "der", "fraction", "recall", "rejection")


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


def published_keys(c: Component) -> tuple[str, ...]:
    """The metrics the published std is of: a victim's BA / ASR, a detector's FAR at 5% FRR, a defense's BA / ASR
    after; none without a 3-seed table."""
    if c.std.startswith(NO_TABLE):
        return ()
    if c.std.startswith("FAR"):
        return ("far_at_frr.0.05",)
    return ("ba", "asr") if c.defense == "none" else ("ba_after", "asr_after")


def differences(a: dict[str, Any], b: dict[str, Any], keys: tuple[str, ...]) -> str:
    """``key d / key d`` (points) for the given metrics, ``—`` for none."""
    fa, fb = flat_metrics(a), flat_metrics(b)
    label = {"far_at_frr.0.05": "FAR@5%", "ba": "BA", "asr": "ASR", "ba_after": "BA", "asr_after": "ASR"}
    parts = [f"{label[k]} {abs(fa[k] - fb[k]) * 100:.2f}" for k in keys if k in fa and k in fb]
    return " / ".join(parts) or "—"


def differing(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The metrics whose values differ at all (rates or not, e.g. a detector's threshold)."""
    fa, fb = flat_metrics(a), flat_metrics(b)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))


def run_once(name: str, c: Component, scale: str, threads: int, tag: str, out: Path,
             run: bool = True) -> dict[str, Any]:
    rdir = run_dir(out, name, tag)
    results = rdir / "results.json"
    if not results.is_file() and not run:
        raise RuntimeError(f"{name} {tag}: no results.json in {rdir} (--no-run)")
    if not results.is_file():
        env = {**os.environ, "BACKDOORBENCH_PROGRESS": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "PYTHONHASHSEED": "0"}
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle threads sleep (shared cores; same sums)
        cmd = [sys.executable, "-m", "backdoorbench", "run", *overrides(c, scale), f"threads={threads}",
               f"cache.dir={cache_dir(out, c.attack, tag)}", f"hydra.run.dir={rdir}"]
        print(f"  {name} {tag} ...", file=sys.stderr, flush=True)
        rdir.mkdir(parents=True, exist_ok=True)
        t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cost = {"wall_s": time.perf_counter() - t0,
                "cpu_s": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)}
        (rdir / "log.txt").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} {tag} failed (exit {proc.returncode}); see {rdir / 'log.txt'}")
        (rdir / "bench.json").write_text(json.dumps(cost))
        print(f"  {name} {tag}: {cost['wall_s']:.0f} s wall, {cost['cpu_s']:.0f} s CPU", file=sys.stderr,
              flush=True)
    return json.loads(results.read_text())


def run_cost(out: Path, name: str, tag: str) -> dict[str, float]:
    """What ``run_once`` measured for a run (wall and CPU seconds); zeros for a run of an older version."""
    f = run_dir(out, name, tag) / "bench.json"
    return json.loads(f.read_text()) if f.is_file() else {"wall_s": 0.0, "cpu_s": 0.0}


def measure(name: str, c: Component, scale: str, out: Path, run: bool = True) -> dict[str, Any]:
    a, b, d = (run_once(name, c, scale, threads, tag, out, run) for tag, threads in TAGS)
    victim = c.defense == "none"  # a defense's row: its own metrics (the victim's are its victim row)
    same, same_where = largest_difference(a["metrics"], b["metrics"], victim)
    cross, cross_where = largest_difference(a["metrics"], d["metrics"], victim)
    ops = sorted({op for r in (a, b, d) for op in r.get("reproducibility", {}).get("nondeterministic_ops", [])})
    costs = [run_cost(out, name, tag) for tag, _ in TAGS]
    return {"name": name, "published": differences(a["metrics"], d["metrics"], published_keys(c)), "same": same,
            "same_where": same_where, "cross": cross, "cross_where": cross_where,
            "identical": not differing(a["metrics"], b["metrics"]), "ops": ops,
            "cross_differing": [k for k in differing(a["metrics"], d["metrics"]) if victim or k not in ("ba", "asr")],
            "retrained": not victim and not all(r.get("cache", {}).get("hit") for r in (a, b, d)),
            "wall2": costs[0]["wall_s"], "wall1": costs[2]["wall_s"], "cpu": sum(x["cpu_s"] for x in costs)}


def table(rows: list[dict[str, Any]], scale: str) -> str:
    lines = [f"scale {scale}; largest metric difference in points (the metric), 3 runs per component", "",
             "| component | same command twice, 2 threads | 1 vs 2 threads: largest | 1 vs 2 threads: the published "
             "metrics | published seed-to-seed std (3 seeds) | nondeterministic ops | wall s (2 thr / 1 thr) "
             "| CPU s (3 runs) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        std = COMPONENTS[r["name"]].std
        if "error" in r:
            lines.append(f"| {r['name']} | failed | | | {std} | | | |")
            continue
        same = "0 (bit-identical metrics)" if r["identical"] else f"{r['same']:.2f} ({r['same_where']})"
        cross = f"{r['cross']:.2f} ({r['cross_where']})" if r["cross"] else (
            f"0 (rates; {', '.join(r['cross_differing'])} "
            f"differ{'s' if len(r['cross_differing']) == 1 else ''})" if r["cross_differing"] else "0 (bit-identical)")
        note = " (victim retrained: not cached)" if r["retrained"] else ""
        lines.append(f"| {r['name']}{note} | {same} | {cross} | {r['published']} | {std} "
                     f"| {', '.join(r['ops']) or 'none'} | {r['wall2']:.0f} / {r['wall1']:.0f} | {r['cpu']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--only", nargs="*", help="component names (see --list); default: all")
    p.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    p.add_argument("--out", type=Path, default=Path("runs/reproducibility"))
    p.add_argument("--list", action="store_true", help="the components, their commands and published std")
    p.add_argument("--no-run", action="store_true", help="only the table from the runs in --out (kept records)")
    args = p.parse_args(argv)
    if args.list:
        for name, c in COMPONENTS.items():
            print(f"{name}: {' '.join(overrides(c, args.scale))}  [{c.std}]")
        return
    names = args.only or list(COMPONENTS)
    unknown = [n for n in names if n not in COMPONENTS]
    if unknown:
        p.error(f"unknown component(s) {unknown}; --list shows them")
    out = args.out.resolve()
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    rows = []
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name} ({time.perf_counter() - t0:.0f} s so far)", file=sys.stderr, flush=True)
        try:
            rows.append(measure(name, COMPONENTS[name], args.scale, out, not args.no_run))
        except RuntimeError as exc:
            print(f"  {exc}", file=sys.stderr, flush=True)
            rows.append({"name": name, "error": str(exc)})
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    print("\n" + table(rows, args.scale))
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    print(f"\nwall time {time.perf_counter() - t0:.0f} s, CPU time of the runs started now {cpu:.0f} s")


if __name__ == "__main__":
    main()
