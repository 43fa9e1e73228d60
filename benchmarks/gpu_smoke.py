"""GPU smoke test: a reduced version of every paper preset (``configs/experiment/``), one run each, with a
table of the pipeline's stages: the device, wall time and peak GPU memory of each.

    python benchmarks/gpu_smoke.py                       # on the GPU: about 5 minutes on one H100-class GPU
    python benchmarks/gpu_smoke.py --device cpu --tiny   # the same table on the CPU in about a minute
    python benchmarks/gpu_smoke.py --only rnp_cifar10 --out smoke/

It measures the pipeline's device use and speed, NOT the papers' numbers. The presets' datasets (CIFAR-10,
SST-2) and BERT-base need downloads, so every reduced preset runs on embedded offline data of the same modality
instead: MNIST-5k for the vision presets (with the preset's architecture, attack, defense and sweep keys), the
Rotten Tomatoes snippets with the embedded MiniLM for ``dan_sst2``. Each preset runs its sweep's first point
(attack x defense) with every schedule cut to a few epochs (``--tiny``: one step).

Per stage (``results.json`` ``timing``: data, attack, evaluation, defense, scoring, ...): ``device`` is the
accelerator the run asked for (``trainer.accelerator``); ``peak GPU MiB`` is ``torch.cuda.max_memory_allocated``,
reset when the stage starts, so a stage that reports 0 MiB on ``cuda`` did its work on the CPU. Writes
``smoke.json`` (the rows) and ``smoke.md`` (the table) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's package and configs, not an installed copy
os.environ.setdefault("BACKDOORBENCH_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PRESETS = ["dan_sst2", "dbd_cifar10", "nad_cifar10", "rnp_cifar10", "backdoorbench_cifar10"]

# (GPU scale, --tiny scale) overrides per preset, on top of the sweep's first point.
VISION = {
    False: ["data=mnist5k", "data.max_train=3000", "data.max_test=1000", "data.holdout_size=500",
            "trainer.max_epochs=3", "trainer.batch_size=128"],
    True: ["data=mnist5k", "data.max_train=40", "data.max_test=20", "data.holdout_size=20", "trainer.max_epochs=1",
           "trainer.max_steps=1", "trainer.batch_size=20"],
}
TEXT = {
    False: ["data=rotten_tomatoes", "model=minilm", "model.name=minilm", "data.max_train=2000", "data.max_test=500",
            "data.holdout_size=500", "data.proxy_size=0", "model.max_length=64", "trainer.max_epochs=1",
            "attack.epochs=1", "defense.clean_size=500"],
    True: ["data=rotten_tomatoes", "model=minilm", "model.name=minilm", "data.max_train=40", "data.max_test=20",
           "data.holdout_size=20", "data.proxy_size=0", "model.max_length=32", "trainer.max_epochs=1",
           "trainer.max_steps=1", "trainer.batch_size=20", "attack.epochs=1", "defense.clean_size=20"],
}
DEFENSE = {
    "dan": {False: [], True: []},
    "dbd_full": {
        False: ["defense.ssl_epochs=3", "defense.head_epochs=2", "defense.mixmatch_epochs=2",
                "defense.mixmatch_iterations=50", "defense.rampup_epochs=2"],
        True: ["defense.ssl_epochs=1", "defense.ssl_batch_size=20", "defense.head_epochs=1", "defense.batch_size=20",
               "defense.mixmatch_epochs=1", "defense.mixmatch_iterations=1", "defense.mixmatch_batch_size=8",
               "defense.rampup_epochs=1"],
    },
    "nad": {False: ["defense.teacher_epochs=2", "defense.epochs=3"],
            True: ["defense.teacher_epochs=1", "defense.epochs=1", "defense.clean_fraction=null",
                   "defense.clean_size=20"]},
    "rnp": {False: ["defense.unlearn_epochs=5", "defense.recover_epochs=5"],
            True: ["defense.unlearn_epochs=1", "defense.recover_epochs=1", "defense.clean_fraction=null",
                   "defense.clean_size=20", "defense.curve_step=0.45"]},
    "finetune": {False: ["++defense.epochs=3"],
                 True: ["++defense.epochs=1", "defense.clean_fraction=null", "defense.clean_size=20"]},
}


def sweep_params(name: str) -> dict[str, str]:
    """The preset's ``hydra.sweeper.params``."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from backdoorbench.cli import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+experiment={name}"], return_hydra_config=True)
    return {str(k): str(v) for k, v in OmegaConf.to_container(cfg.hydra.sweeper.params).items()}


def reduced_overrides(name: str, params: dict[str, str], tiny: bool, accelerator: str) -> list[str]:
    """The reduced preset: the sweep's first point, offline data of the same modality, short schedules."""
    first = [f"{k}={v.split(',')[0]}" for k, v in params.items()]
    defense = params["defense"].split(",")[0]
    base = TEXT[tiny] if name == "dan_sst2" else VISION[tiny]
    extra = [f"trainer.accelerator={accelerator}"]
    if defense == "dbd_full":
        extra.append(f"defense.accelerator={accelerator}")
    return [f"+experiment={name}", *first, *base, *DEFENSE[defense][tiny], *extra]


def install_stage_memory(rows: list[dict]) -> None:
    """Reset the CUDA peak at the start of each pipeline stage and record it at its end."""
    import torch

    from backdoorbench.engine import protocols

    enter, exit_ = protocols._Stage.__enter__, protocols._Stage.__exit__

    def _enter(self):  # type: ignore[no-untyped-def]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return enter(self)

    def _exit(self, *exc):  # type: ignore[no-untyped-def]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
        rows.append({"stage": self.name, "peak_mib": round(peak, 1)})
        return exit_(self, *exc)

    protocols._Stage.__enter__, protocols._Stage.__exit__ = _enter, _exit  # type: ignore[method-assign]


def forced_from(params: dict[str, str]) -> dict[str, set[str]]:
    """The ``++group.key`` sweep keys, as a Hydra sweep job's ``config.forced_keys()`` would report them."""
    forced: dict[str, set[str]] = {}
    for key in params:
        if key.startswith("++"):
            group, _, sub = key[2:].partition(".")
            forced.setdefault(group, set()).add(sub.split(".")[0])
    return forced


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="one step of everything on a few dozen samples (CPU check)")
    p.add_argument("--only", action="append", choices=PRESETS, help="run only this preset (repeatable)")
    p.add_argument("--out", default="gpu_smoke_out", help="folder for the run directories, smoke.json, smoke.md")
    args = p.parse_args()

    import torch

    import backdoorbench.config as bb_config
    from backdoorbench.api import run

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU (use --device cpu --tiny)", file=sys.stderr)
        return 2
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table: list[dict] = []
    t_all = time.perf_counter()
    for name in args.only or PRESETS:
        params = sweep_params(name)
        stage_mem: list[dict] = []
        install_stage_memory(stage_mem)
        forced = forced_from(params)
        bb_config.forced_keys = lambda forced=forced: forced  # type: ignore[assignment]
        overrides = reduced_overrides(name, params, args.tiny, accelerator)
        result = run(overrides=overrides, out_dir=out / f"{name}_{int(time.time())}")
        peaks: dict[str, float] = {}
        for r in stage_mem:
            peaks[r["stage"]] = max(peaks.get(r["stage"], 0.0), r["peak_mib"])
        for stage, seconds in result.timing.items():
            if stage == "total":
                continue
            table.append({"preset": name, "attack": result.run["attack"], "defense": result.run["defense"],
                          "stage": stage, "device": args.device, "seconds": seconds,
                          "peak_gpu_mib": peaks.get(stage, 0.0)})
        table.append({"preset": name, "attack": result.run["attack"], "defense": result.run["defense"],
                      "stage": "total", "device": args.device, "seconds": result.timing.get("total", 0.0),
                      "peak_gpu_mib": max(peaks.values(), default=0.0)})
    lines = ["| preset | attack | defense | stage | device | wall s | peak GPU MiB |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['preset']} | {r['attack']} | {r['defense']} | {r['stage']} | {r['device']} | "
              f"{r['seconds']:.1f} | {r['peak_gpu_mib']:.0f} |" for r in table]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device == "cuda" else "none"
    lines.append(f"\nall presets: {time.perf_counter() - t_all:.0f} s; GPU: {gpu}; torch {torch.__version__}")
    text = "\n".join(lines)
    print(text)
    (out / "smoke.json").write_text(json.dumps(table, indent=1))
    (out / "smoke.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
