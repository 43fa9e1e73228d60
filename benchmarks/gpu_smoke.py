"""GPU smoke test: every stage of every paper preset (``configs/experiment/*.yaml``) at a reduced scale, with a table
of what each stage actually ran on.

    python benchmarks/gpu_smoke.py                       # on the GPU (the reduced scale; estimate: see below)
    python benchmarks/gpu_smoke.py --device cpu --tiny   # the same table on the CPU, one step of everything
    python benchmarks/gpu_smoke.py --only rnp_cifar10 --only dan_sst2 --out smoke/

It checks the pipeline's device use, NOT the papers' numbers. The presets' datasets (CIFAR-10, SST-2) and BERT-base
need downloads, so every preset runs on embedded offline data of its modality instead: MNIST-5k for the vision
presets (with the preset's architecture, attacks, defenses and sweep keys), the Rotten Tomatoes snippets with the
embedded MiniLM for the text presets, ONION's language model the offline SmolLM2 (``dan_sst2`` names GPT-2).

**Points.** Each preset sweeps attacks x defenses (seeds and other sweep keys: their first value). The default runs
a covering set: ``max(#attacks, #defenses)`` runs per preset, pairing the i-th attack with the i-th defense
(cycling), so that every attack stage (victim training, PGD, trigger search, EP, LWP, RIPPLe, NeuBA, ...) and every
defense stage (DAN, STRIP, ONION and its LM, RAP, fine-tuning, NAD, RNP, DBD's three stages, the repair curves) of
every preset runs once; ``--all-points`` runs the whole product. The cache is a fresh folder under ``--out``, so no
victim comes from an earlier run.

**Per stage** (the pipeline's stages: data, attack, evaluation, defense_fit, scoring, defense, ...; nested in them
every Lightning fit (``fit: <stage>``), DBD's stages and the repair curve), measured by
``backdoorbench/trainer/tracking.py``, never taken from ``--device``:

- ``params`` / ``inputs``: device and dtype of the parameters and of the first input of every module forward,
  with the share of module calls when mixed;
- ``ops``: device of every torch function call (share of calls), which sees tensor code outside modules too;
- ``peak GPU MiB``: ``torch.cuda.max_memory_allocated``, reset at every stage boundary;
- ``CPU share``: the share of the stage's wall time in which the GPU had no work queued (1 - busy samples of the
  current CUDA stream, polled every ~1 ms); 100% on the CPU.

A stage of a ``--device cuda`` run whose parameters, inputs or more than 10% of its torch calls were on the CPU is
listed under "CPU stages" at the end. Writes ``smoke.json`` (the rows) and ``smoke.md`` (the table) into ``--out``.

**Time on one H100.** On the CPU the script prints an estimate: the process CPU time of the whole run (all
threads; unlike wall time it hardly depends on what else the machine runs) times ``--gpu-factor`` (default 2). The
``--tiny`` CPU time is almost all fixed costs (imports, configs, model construction, Lightning's set-up, figures,
one step) that a GPU host runs at least as fast; the reduced GPU scale multiplies the per-step work by ~100-450,
which an H100 does ~100x faster than two shared CPU cores. That factor is an assumption, not a measurement: run the
script on the GPU to replace the estimate by the measured total.
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
os.environ.setdefault("BACKDOORBENCH_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PRESETS = sorted(p.stem for p in (REPO / "configs" / "experiment").glob("*.yaml"))
BUDGET_S = 8 * 60  # one H100

# (reduced GPU scale, --tiny) overrides by modality, then by defense, attack and preset.
VISION = {
    False: ["data=mnist5k", "data.max_train=2000", "data.max_test=500", "data.holdout_size=500",
            "trainer.max_epochs=2", "trainer.batch_size=128"],
    True: ["data=mnist5k", "data.max_train=40", "data.max_test=20", "data.holdout_size=20", "trainer.max_epochs=1",
           "trainer.max_steps=1", "trainer.batch_size=20"],
}
TEXT = {
    False: ["data=rotten_tomatoes", "model=minilm", "model.name=minilm", "data.max_train=1000", "data.max_test=300",
            "data.holdout_size=300", "data.proxy_size=200", "model.max_length=64", "trainer.max_epochs=1",
            "++attack.epochs=1", "defense.clean_size=300"],
    True: ["data=rotten_tomatoes", "model=minilm", "model.name=minilm", "data.max_train=40", "data.max_test=20",
           "data.holdout_size=20", "data.proxy_size=20", "model.max_length=32", "trainer.max_epochs=1",
           "trainer.max_steps=1", "trainer.batch_size=20", "++attack.epochs=1", "defense.clean_size=20"],
}
DEFENSE = {
    "dbd_full": {
        False: ["defense.ssl_epochs=2", "defense.head_epochs=1", "defense.mixmatch_epochs=1",
                "defense.mixmatch_iterations=20", "defense.rampup_epochs=1"],
        True: ["defense.ssl_epochs=1", "defense.ssl_batch_size=20", "defense.head_epochs=1", "defense.batch_size=20",
               "defense.mixmatch_epochs=1", "defense.mixmatch_iterations=1", "defense.mixmatch_batch_size=8",
               "defense.rampup_epochs=1"],
    },
    "nad": {False: ["defense.teacher_epochs=1", "++defense.epochs=2"],
            True: ["defense.teacher_epochs=1", "++defense.epochs=1", "defense.clean_fraction=null",
                   "defense.clean_size=20"]},
    "rnp": {False: ["defense.unlearn_epochs=3", "defense.recover_epochs=3"],
            True: ["defense.unlearn_epochs=1", "defense.recover_epochs=1", "defense.clean_fraction=null",
                   "defense.clean_size=20", "defense.curve_step=0.45"]},
    "finetune": {False: ["++defense.epochs=2"],
                 True: ["++defense.epochs=1", "defense.clean_fraction=null", "defense.clean_size=20"]},
    "strip": {False: [], True: ["defense.num_copies=4"]},
    "onion": {False: ["defense.lm=smollm2"], True: ["defense.lm=smollm2", "defense.lm_batch_size=8"]},
    "rap": {False: ["defense.epochs=2"], True: ["defense.epochs=1"]},
}
ATTACK = {
    "label_consistent": {False: ["++attack.surrogate_epochs=1", "++attack.steps=20"],
                         True: ["++attack.surrogate_epochs=1", "++attack.steps=2"]},
    "trojan": {False: ["++attack.surrogate_epochs=1", "++attack.trigger_steps=200"],
               True: ["++attack.surrogate_epochs=1", "++attack.trigger_steps=2"]},
    "dfep": {False: ["++attack.num_samples=1000", "++attack.sample_words=30"],
             True: ["++attack.num_samples=20", "++attack.sample_words=10"]},
    "neuba": {False: ["++attack.max_unlabeled=200", "++attack.probe_size=20"],
              True: ["++attack.max_unlabeled=10", "++attack.probe_size=5"]},
}
PRESET = {"cpu_nad": {False: ["defense.steps_per_epoch=5"], True: ["defense.steps_per_epoch=1"]}}


def sweep_params(name: str) -> dict[str, str]:
    """The preset's ``hydra.sweeper.params``."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from backdoorbench.cli import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+experiment={name}"], return_hydra_config=True)
    return {str(k): str(v) for k, v in OmegaConf.to_container(cfg.hydra.sweeper.params).items()}


def is_text(name: str) -> bool:
    from backdoorbench.api import compose
    from backdoorbench.registry import REGISTRY

    return REGISTRY.get("dataset", str(compose([f"+experiment={name}"]).data.name)).modality[0] == "text"


def points(params: dict[str, str], every: bool) -> list[tuple[str, str]]:
    """(attack, defense) pairs: the whole product, or a cover in which each attack and each defense appears."""
    attacks, defenses = params["attack"].split(","), params["defense"].split(",")
    if every:
        return [(a, d) for a in attacks for d in defenses]
    return [(attacks[i % len(attacks)], defenses[i % len(defenses)]) for i in range(max(len(attacks), len(defenses)))]


def merge(*groups: list[str]) -> list[str]:
    """Overrides, a later value of a key replacing an earlier one (``++`` kept when either had it)."""
    out: dict[str, tuple[str, str]] = {}
    for group in groups:
        for item in group:
            key, _, value = item.partition("=")
            bare = key.lstrip("+")
            plus = "++" if key.startswith("++") or out.get(bare, ("", ""))[0] == "++" else key[: len(key) - len(bare)]
            out[bare] = (plus, value)
    return [f"{plus}{k}={v}" for k, (plus, v) in out.items()]


def point_overrides(name: str, params: dict[str, str], attack: str, defense: str, tiny: bool, text: bool,
                    accelerator: str, cache: Path) -> list[str]:
    fixed = [f"{k}={v.split(',')[0]}" for k, v in params.items() if k not in ("attack", "defense")]
    base = (TEXT if text else VISION)[tiny]
    return merge([f"+experiment={name}", f"attack={attack}", f"defense={defense}"], fixed, base,
                 DEFENSE.get(defense, {}).get(tiny, []), ATTACK.get(attack, {}).get(tiny, []),
                 PRESET.get(name, {}).get(tiny, []), [f"trainer.accelerator={accelerator}", f"cache.dir={cache}"])


def forced_from(overrides: list[str]) -> dict[str, set[str]]:
    """The ``++group.key`` overrides, as a Hydra sweep job's ``config.forced_keys()`` would report them."""
    forced: dict[str, set[str]] = {}
    for item in overrides:
        if item.startswith("++"):
            group, _, sub = item[2:].partition("=")[0].partition(".")
            forced.setdefault(group, set()).add(sub.split(".")[0])
    return forced


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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="one step of everything on a few dozen samples (CPU check)")
    p.add_argument("--only", action="append", choices=PRESETS, help="run only this preset (repeatable)")
    p.add_argument("--all-points", action="store_true", help="every attack x defense of each preset, not a cover")
    p.add_argument("--list", action="store_true", help="validate and print the runs' overrides, run nothing")
    p.add_argument("--no-ops", action="store_true", help="do not count torch calls (faster; no ops column)")
    p.add_argument("--gpu-factor", type=float, default=2.0, help="H100 seconds per measured second (estimate)")
    p.add_argument("--out", default="gpu_smoke_out", help="folder for the run directories, smoke.json, smoke.md")
    args = p.parse_args()

    import torch

    import backdoorbench.config as bb_config
    from backdoorbench.api import run
    from backdoorbench.trainer.tracking import DeviceTracker

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU (use --device cpu --tiny)", file=sys.stderr)
        return 2
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / f"cache_{int(time.time())}"  # fresh: every attack stage runs
    table: list[dict[str, Any]] = []
    failed: list[str] = []
    t_all = time.perf_counter()
    tracker = DeviceTracker(ops=not args.no_ops)
    install(tracker)
    for name in args.only or PRESETS:
        params, text = sweep_params(name), is_text(name)
        for attack, defense in points(params, args.all_points):
            overrides = point_overrides(name, params, attack, defense, args.tiny, text, accelerator, cache)
            forced = forced_from(overrides)
            bb_config.forced_keys = lambda forced=forced: forced  # type: ignore[assignment]
            if args.list:
                from backdoorbench.api import compose
                from backdoorbench.engine.spec import validate

                validate(compose(overrides))
                print(" ".join(overrides))
                continue
            tracker.records.clear()
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                with tracker:
                    run(overrides=overrides, out_dir=out / f"{name}_{attack}_{defense}_{int(time.time())}")
            except Exception as e:  # noqa: BLE001 - a smoke test reports every failure and goes on
                failed.append(f"{name} {attack} x {defense}: {type(e).__name__}: {e}")
                print(f"FAILED {failed[-1]}", file=sys.stderr, flush=True)
            run_s, cpu_s = round(time.perf_counter() - t0, 1), round(time.process_time() - c0, 1)
            for rec in tracker.records.values():
                table.append({"preset": name, "attack": attack, "defense": defense, **rec.summary(), "run_s": run_s,
                              "run_cpu_s": cpu_s})
            (out / "smoke.json").write_text(json.dumps(table, indent=1))  # so far: a stopped run keeps its rows
            print(f"{name} {attack} x {defense}: {run_s:.1f} s ({cpu_s:.1f} s CPU)", file=sys.stderr, flush=True)
    total = time.perf_counter() - t_all
    if args.list:
        return 0
    lines = ["| preset | attack | defense | stage | s | params | inputs | ops | peak GPU MiB | CPU share |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['preset']} | {r['attack']} | {r['defense']} | {r['stage']} | {r['seconds']:.2f} | {r['params']} | "
              f"{r['inputs']} | {r['ops']} | {r['peak_gpu_mib']:.0f} | {100 * r['cpu_share']:.0f}% |" for r in table]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device == "cuda" else "none"
    runs = len({(r["preset"], r["attack"], r["defense"]) for r in table})
    lines.append(f"\n{runs} runs, {len(table)} stage rows: {total:.0f} s on {args.device} (GPU: {gpu}; torch "
                 f"{torch.__version__})")
    cpu = time.process_time()
    estimate = cpu * args.gpu_factor
    lines.append(f"process CPU time: {cpu:.0f} s (all threads; wall time depends on what else the machine runs)")
    lines.append(f"one H100, estimated: {estimate:.0f} s = {cpu:.0f} s CPU x {args.gpu_factor:g} (--gpu-factor, an "
                 f"assumption; see the docstring); budget {BUDGET_S} s: {'fits' if estimate <= BUDGET_S else 'OVER'}"
                 if args.device == "cpu" else
                 f"measured: {total:.0f} s; budget {BUDGET_S} s: {'fits' if total <= BUDGET_S else 'OVER'}")
    if args.device == "cuda":
        flagged = [r for r in table if cpu_stage(r)]
        lines.append(f"CPU stages: {len(flagged)}" + "".join(
            f"\n- {r['preset']} {r['attack']} x {r['defense']}: {r['stage']} (params {r['params']}; inputs "
            f"{r['inputs']}; ops {r['ops']})" for r in flagged))
    lines += [f"FAILED {f}" for f in failed]
    text_out = "\n".join(lines)
    print(text_out)
    (out / "smoke.json").write_text(json.dumps(table, indent=1))
    (out / "smoke.md").write_text(text_out + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
