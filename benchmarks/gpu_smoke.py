"""GPU smoke test: every stage of every paper preset (``configs/experiment/*.yaml``) at a reduced scale, with a table
of what each stage actually ran on.

    python benchmarks/gpu_smoke.py                       # on the GPU (the reduced scale; estimate: see below)
    python benchmarks/gpu_smoke.py --device cpu --tiny   # the same table on the CPU, one step of everything
    python benchmarks/gpu_smoke.py --only rnp_cifar10 --only dan_sst2 --out smoke/
    python benchmarks/gpu_smoke.py --device cpu --tiny --skip-runs 36 --out smoke_zoo/   # the cover's last 2 runs

It checks the pipeline's device use, NOT the papers' numbers. The presets' datasets (CIFAR-10, SST-2) and BERT-base
need downloads, so every preset runs on embedded offline data of its modality instead: MNIST-5k for the vision
presets (with the preset's architecture, attacks, defenses and sweep keys), the Rotten Tomatoes snippets with the
embedded MiniLM for the text presets, ONION's language model the offline SmolLM2 (``dan_sst2`` names GPT-2).

**Runs.** Each preset sweeps attacks x defenses (other sweep keys: their first value). By default the script
runs a cover (``cover``): one run per distinct attack stage and per distinct defense stage over all presets, a
stage's identity being its component, model, data and trainer config with numbers reduced to their sign
(``shape``; ``--exact-stages``: full values), so a stage two presets share runs once. Every attack stage (victim
training, PGD, trigger search, EP, LWP, RIPPLe, NeuBA, ...) and every defense stage (DAN, STRIP, ONION and its LM,
RAP, fine-tuning, NAD, RNP, DBD's three stages, the repair curves, Neural Cleanse, DBS) of every preset runs.
``--all-points``: the whole product. All runs share one process and one fresh cache folder under ``--out`` (each
victim trains once).

**Per stage**, measured by ``backdoorbench/trainer/tracking.py``, never taken from ``--device``: the device and
dtype of parameters and inputs at every module forward, the device of every torch call (``ops``), the peak GPU
memory, the share of wall time with the GPU idle (``CPU share``), and the model calls with their CPU time. A
stage of a ``--device cuda`` run with parameters or inputs on the CPU, or more than 10% of its torch calls, is
listed under "CPU stages". Writes ``smoke.json`` and ``smoke.md`` into ``--out``.

**Time on one H100.** On the CPU (``--tiny``) the script prints an ESTIMATE (``estimate``) against the 8-minute
budget: the measured fixed costs (CPU time outside model arithmetic), assumed the same on a GPU host, plus CUDA's
start-up, plus the model work: the ``--tiny`` model calls x ``--scale-ratio`` x ``--call-ms``, both assumptions.
docs/scale.md explains them; only a run on the GPU measures the time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's package and configs, not an installed copy
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("BACKDOORBENCH_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BUDGET_S = 8 * 60  # one H100
# the estimate's assumptions (see the docstring): model calls at the reduced GPU scale per --tiny call, seconds per
# model call (forward or backward of these small models, launch-bound) on an H100, CUDA's start-up
SCALE_RATIO, CALL_MS, CUDA_START_S = 32.0, 10.0, 10.0

from gpu_smoke_plan import PRESETS, cover, forced_from, plan, sweep_params  # noqa: E402

__all__ = ["PRESETS", "cover", "plan", "sweep_params"]


def install(tracker: Any) -> None:
    """Open a tracker stage for every pipeline stage, every Lightning fit, DBD's stages and the repair curve."""
    import lightning.pytorch as pl

    from backdoorbench.defenses.training.dbd import DBD
    from backdoorbench.engine import protocols

    enter, exit_ = protocols._Stage.__enter__, protocols._Stage.__exit__

    def _enter(self):  # type: ignore[no-untyped-def]
        self._track = ExitStack()
        self._track.enter_context(tracker.stage(self.name))
        return enter(self)

    def _exit(self, *exc):  # type: ignore[no-untyped-def]
        try:
            return exit_(self, *exc)
        finally:
            self._track.close()

    fit, timed, curve = pl.Trainer.fit, DBD._timed, protocols.repair_curve

    def _fit(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        desc = next((c.desc for c in self.callbacks if isinstance(getattr(c, "desc", None), str)), "train")
        with tracker.stage(f"fit: {desc}"):
            return fit(self, *args, **kwargs)

    def _timed(self, stage, fn):  # type: ignore[no-untyped-def]
        with tracker.stage(f"DBD {stage}"):
            return timed(self, stage, fn)

    def _curve(defense, ctx):  # type: ignore[no-untyped-def]
        with tracker.stage("repair curve"):
            return curve(defense, ctx)

    protocols._Stage.__enter__, protocols._Stage.__exit__ = _enter, _exit  # type: ignore[method-assign]
    pl.Trainer.fit, DBD._timed, protocols.repair_curve = _fit, _timed, _curve  # type: ignore[method-assign]


def cpu_stage(row: dict[str, Any]) -> bool:
    """A stage of a CUDA run that used the CPU: parameters or inputs there, or >10% of its torch calls."""
    def cpu_part(text: str) -> float:
        if text == "-":
            return 0.0
        parts = [p.strip() for p in text.split(",")]
        if len(parts) == 1:
            return 1.0 if parts[0].startswith("cpu") else 0.0
        return sum(float(p.rsplit(" ", 1)[1].rstrip("%")) / 100 for p in parts if p.startswith("cpu"))

    return cpu_part(row["params"]) > 0 or cpu_part(row["inputs"]) > 0 or cpu_part(row["ops"]) > 0.1


def estimate(runs: list[dict[str, Any]], setup_cpu_s: float, ratio: float, call_ms: float) -> dict[str, float]:
    """Seconds on one H100 for the same runs at the reduced GPU scale, from a ``--device cpu --tiny`` run: fixed
    costs (``setup_cpu_s``: imports and planning; per run its CPU time outside model arithmetic) as measured, plus
    CUDA's start, plus the model work: the run's model calls x ``ratio`` (GPU scale / --tiny) x ``call_ms``."""
    fixed = setup_cpu_s + sum(r["cpu_s"] - r["compute_cpu_s"] for r in runs)
    calls = sum(r["calls"] for r in runs)
    work = calls * ratio * call_ms / 1000
    return {"fixed_s": fixed, "cuda_start_s": CUDA_START_S, "calls": calls, "work_s": work,
            "total_s": fixed + CUDA_START_S + work}


def report(table: list[dict[str, Any]], runs: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The stage table, the run table, the time (measured, and on the CPU the H100 estimate) and the failures."""
    lines = ["| preset | attack | defense | stage | s | params | inputs | ops | peak GPU MiB | CPU share |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['preset']} | {r['attack']} | {r['defense']} | {r['stage']} | {r['seconds']:.2f} | {r['params']} | "
              f"{r['inputs']} | {r['ops']} | {r['peak_gpu_mib']:.0f} | {100 * r['cpu_share']:.0f}% |" for r in table]
    lines += ["", "| preset | attack | defense | covers | wall s | CPU s | of it model CPU s | model calls |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['preset']} | {r['attack']} | {r['defense']} | {', '.join(r['covers'])} | {r['wall_s']:.1f} | "
              f"{r['cpu_s']:.1f} | {r['compute_cpu_s']:.1f} | {r['calls']} |" for r in runs]
    cpu = meta["setup_cpu_s"] + sum(r["cpu_s"] for r in runs)
    lines.append(f"\n{len(runs)} runs, {len(table)} stage rows: {meta['wall_s']:.0f} s wall on {meta['device']} "
                 f"(GPU: {meta['gpu']}; torch {meta['torch']}); process CPU time {cpu:.0f} s (all threads), of it "
                 f"{meta['setup_cpu_s']:.0f} s imports and planning")
    if meta["device"] == "cpu":
        e = estimate(runs, meta["setup_cpu_s"], meta["ratio"], meta["call_ms"])
        verdict = "fits" if e["total_s"] <= BUDGET_S else f"OVER by {e['total_s'] - BUDGET_S:.0f} s"
        lines.append(
            f"ESTIMATE (not a measurement) for one H100 at the reduced GPU scale: {e['total_s']:.0f} s against the "
            f"{BUDGET_S} s budget: {verdict}. = fixed costs {e['fixed_s']:.0f} s (CPU time here outside model "
            f"arithmetic, assumed the same on the GPU host) + CUDA start {e['cuda_start_s']:.0f} s (assumed) + model "
            f"work {e['work_s']:.0f} s ({e['calls']} model calls here x {meta['ratio']:g} (--scale-ratio, assumed "
            f"GPU scale / --tiny) x {meta['call_ms']:g} ms (--call-ms, assumed per call on an H100)). Only a run "
            f"on a GPU measures the time." if meta.get("tiny", True) else "no H100 estimate: it needs a --tiny run")
    else:
        total = meta["wall_s"]
        lines.append(f"measured: {total:.0f} s; budget {BUDGET_S} s: {'fits' if total <= BUDGET_S else 'OVER'}")
        flagged = [r for r in table if cpu_stage(r)]
        lines.append(f"CPU stages: {len(flagged)}" + "".join(
            f"\n- {r['preset']} {r['attack']} x {r['defense']}: {r['stage']} (params {r['params']}; inputs "
            f"{r['inputs']}; ops {r['ops']})" for r in flagged))
    lines += [f"FAILED {f}" for f in meta["failed"]]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="one step of everything on a few dozen samples (CPU check)")
    p.add_argument("--only", action="append", choices=PRESETS, help="run only this preset (repeatable)")
    p.add_argument("--all-points", action="store_true", help="every attack x defense of each preset, not a cover")
    p.add_argument("--exact-stages", action="store_true", help="stages differing only in numbers are distinct")
    p.add_argument("--max-runs", type=int, help="run only the first N runs of the plan (a quick check)")
    p.add_argument("--skip-runs", type=int, default=0, help="leave out the first N runs of the plan (before "
                   "--max-runs): e.g. measure only the runs a new preset adds to the cover")
    p.add_argument("--list", action="store_true", help="validate and print the runs' overrides, run nothing")
    p.add_argument("--no-ops", action="store_true", help="do not count torch calls (faster; no ops column)")
    p.add_argument("--scale-ratio", type=float, default=SCALE_RATIO, help="model calls, GPU scale / --tiny (estimate)")
    p.add_argument("--call-ms", type=float, default=CALL_MS, help="ms per model call on one H100 (estimate)")
    p.add_argument("--report", metavar="SMOKE_JSON", nargs="+",
                   help="print the tables and the estimate of earlier runs' smoke.json (several: one report)")
    p.add_argument("--out", default="gpu_smoke_out", help="folder for the run directories, smoke.json, smoke.md")
    args = p.parse_args()

    if args.report:  # several processes' files (side by side: wall time the longest, imports and planning summed)
        saved = [json.loads(Path(f).read_text()) for f in args.report]
        meta = {**saved[0]["meta"], "ratio": args.scale_ratio, "call_ms": args.call_ms,
                "setup_cpu_s": sum(s["meta"]["setup_cpu_s"] for s in saved),
                "wall_s": max(s["meta"]["wall_s"] for s in saved),
                "failed": [f for s in saved for f in s["meta"]["failed"]]}
        print(report([r for s in saved for r in s["stages"]], [r for s in saved for r in s["runs"]], meta))
        return 0
    import torch

    from backdoorbench.api import run
    from backdoorbench.trainer.tracking import DeviceTracker

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU (use --device cpu --tiny)", file=sys.stderr)
        return 2
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / f"cache_{int(time.time())}"  # fresh: every attack stage runs; one cache: each victim trains once
    t_all = time.perf_counter()
    runs = plan(args.only or PRESETS, args.tiny, args.all_points, accelerator, cache,
                args.exact_stages)[args.skip_runs:][: args.max_runs]
    if args.list:
        for r in runs:
            print(f"# {r['preset']} {r['attack']} x {r['defense']}: {', '.join(r['covers'])}")
            print(" ".join(r["overrides"]))
        print(f"{len(runs)} runs")
        return 0
    import backdoorbench.config as bb_config

    table: list[dict[str, Any]] = []
    failed: list[str] = []
    done: list[dict[str, Any]] = []
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "none"
    meta: dict[str, Any] = {"device": args.device, "gpu": gpu, "torch": torch.__version__, "failed": failed,
                            "setup_cpu_s": time.process_time(), "tiny": args.tiny, "ratio": args.scale_ratio,
                            "call_ms": args.call_ms}
    tracker = DeviceTracker(ops=not args.no_ops)
    install(tracker)
    for r in runs:
        name, attack, defense, overrides = r["preset"], r["attack"], r["defense"], r["overrides"]
        forced = forced_from(overrides)
        bb_config.forced_keys = lambda forced=forced: forced  # type: ignore[assignment]
        tracker.records.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            with tracker:
                run(overrides=overrides, out_dir=out / f"{name}_{attack}_{defense}_{int(time.time())}")
        except Exception as e:  # noqa: BLE001 - a smoke test reports every failure and goes on
            failed.append(f"{name} {attack} x {defense}: {type(e).__name__}: {e}")
            print(f"FAILED {failed[-1]}", file=sys.stderr, flush=True)
        stages = [rec.summary() for rec in tracker.records.values()]
        done.append({"preset": name, "attack": attack, "defense": defense, "covers": r["covers"],
                     "wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(time.process_time() - c0, 1),
                     "compute_cpu_s": round(sum(s["compute_cpu_s"] for s in stages), 1),
                     "calls": sum(s["calls"] for s in stages)})
        table += [{"preset": name, "attack": attack, "defense": defense, **s} for s in stages]
        meta["wall_s"] = time.perf_counter() - t_all
        (out / "smoke.json").write_text(json.dumps({"meta": meta, "runs": done, "stages": table}, indent=1))
        d = done[-1]
        print(f"[{len(done)}/{len(runs)}] {name} {attack} x {defense}: {d['wall_s']:.1f} s ({d['cpu_s']:.1f} s CPU, "
              f"{d['compute_cpu_s']:.1f} s of it model arithmetic, {d['calls']} model calls)", file=sys.stderr,
              flush=True)
    meta["wall_s"] = time.perf_counter() - t_all
    text_out = report(table, done, meta)
    print(text_out)
    (out / "smoke.json").write_text(json.dumps({"meta": meta, "runs": done, "stages": table}, indent=1))
    (out / "smoke.md").write_text(text_out + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
