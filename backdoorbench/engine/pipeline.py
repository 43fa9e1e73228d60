"""The run spine: config → data split → victim (cached) → the defense kind's protocol → run directory.

Each step lives in its own module: :mod:`~backdoorbench.engine.spec` (validation),
:mod:`~backdoorbench.engine.victim` (the attack and the verified cache),
:mod:`~backdoorbench.engine.protocols` (one protocol per defense kind) and
:mod:`~backdoorbench.engine.rundir` (folders and atomic result files).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from backdoorbench.attacks.base import Attack
from backdoorbench.data.base import DatasetBundle
from backdoorbench.data.split import threat_model_split
from backdoorbench.defenses.base import Defense, Detector
from backdoorbench.engine.determinism import (
    environment,
    record_nondeterminism,
    reproducibility_record,
    set_determinism,
)
from backdoorbench.engine.protocols import RunContext, Timer, protocol_for
from backdoorbench.engine.rundir import check_locations, draw, write_results, write_scores
from backdoorbench.engine.spec import RunSpec, validate, versions
from backdoorbench.engine.victim import obtain_victim
from backdoorbench.modality.base import Classifier
from backdoorbench.runtime import current, run_scope
from backdoorbench.store import atomic_write_text, default_cache_dir
from backdoorbench.trainer.lit import runtime_for

__all__ = ["run_experiment", "set_determinism", "validate"]

log = logging.getLogger(__name__)


def run_experiment(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Run one experiment and write its run directory. Returns the results dict."""
    t_start = time.perf_counter()
    out = Path(out_dir)
    spec = validate(cfg)
    check_locations(out, spec.cache_dir, spec.cache_enabled)  # before any work: unwritable folders fail now
    # the run's context, the one carrier of its device, precisions, threads, run directory and artifact cache: every
    # stage below reads it (runtime.current()), nothing else carries them
    cache = (spec.cache_dir or default_cache_dir()) if spec.cache_enabled else None
    rt = runtime_for(spec.trainer_cfg, out, spec.device, cache, spec.threads)
    set_determinism(spec.seed, rt.threads, spec.trainer_cfg.deterministic)
    timer = Timer()
    atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    atomic_write_text(out / "versions.json", json.dumps(versions(), indent=2))
    t = spec.trainer_cfg
    log.info(
        "device: %s, %d CPU threads, precision: %s (training), %s (inference)",
        rt.device, torch.get_num_threads(), t.precision, t.inference_precision,
    )
    with (
        run_scope(rt),
        record_nondeterminism() as ops,  # the operations that ran without a deterministic implementation
    ):
        return _run(spec, out, timer, t_start, ops)


def _run(spec: RunSpec, out: Path, timer: Timer, t_start: float, ops: list[str]) -> dict[str, Any]:
    with timer("data"):
        bundle: DatasetBundle = spec.dataset.obj(root=spec.data_cfg.root, **spec.data_cfg.options)
        splits = threat_model_split(bundle, spec.data_cfg, spec.seed)
    log.info("data %s: %s", spec.dataset.name, splits.sizes())
    attack: Attack = spec.attack.obj(spec.attack_cfg, spec.seed)
    attack.check(bundle.num_classes)
    if spec.modality == "vision":  # a trigger that cannot fit the images: a config error, before any training
        from backdoorbench.modality.vision import image_spec

        image = image_spec(bundle)
        attack.check_image_size(image.height, image.width)
    new_model = model_factory(spec, bundle)
    with timer("attack"):
        victim = obtain_victim(spec, attack, splits, bundle, new_model)
    env = {"environment": environment(current().device), "victim_environment": victim.cache.get("environment")}
    atomic_write_text(out / "versions.json", json.dumps({**versions(), **env}, indent=2))  # now with the victim's

    triggered, trig_idx = attack.triggered_test(splits.test)
    target = attack.target_labels(triggered.labels)  # what each triggered input should become (ASR)
    defense: Defense = spec.defense.obj(spec.defense_cfg, spec.seed)
    ctx = RunContext(spec, splits, victim, attack, triggered, trig_idx, target, new_model, timer, out)
    outcome = protocol_for(defense)(defense, ctx)
    timer.times["total"] = round(time.perf_counter() - t_start, 3)

    results = {
        "run": {
            "attack": spec.attack.name,
            "defense": spec.defense.name,
            "defense_kind": defense.kind,
            "modality": spec.modality,
            "data": spec.dataset.name,
            "model": spec.model.name,
            "seed": spec.seed,
            "setting": getattr(spec.attack_cfg, "setting", None),
            "target": attack.target,
            "triggered_test": attack.triggered_source,  # trigger | record (a BackdoorBench bd_test) | null
        },
        "metrics": outcome.metrics,
        "timing": timer.times,
        "cost": outcome.cost,
        "data": splits.sizes(),
        "cache": victim.cache,
        "out_dir": str(out),
        "frr_target": getattr(spec.defense_cfg, "frr", None),
        # what each stage that ran really ran in (measured on its first forward pass; runtime.stage_probe)
        "stages": dict(current().stages),
        # the thread count in force and whether every operation ran deterministically (docs/reproducibility.md)
        "reproducibility": reproducibility_record(current().threads, current().device, ops),
        **outcome.extra,
    }
    write_results(out / "results.json", results)
    is_detector = isinstance(defense, Detector)
    write_scores(out / "scores.csv", outcome.scored, target, defense.reject if isinstance(defense, Detector) else None)
    if is_detector:
        draw(_detection_figure, out / "detection.png", defense, outcome.scored, target, spec)
    return results


def model_factory(spec: RunSpec, bundle: DatasetBundle) -> Any:
    """A function returning a fresh (pre-trained) victim for this run's data, seeded, on the run's device
    (``runtime.current().device``; outside a run: where the model is built)."""
    kwargs: dict[str, Any] = {}
    if spec.modality == "vision":  # channels, size and normalisation come from the data
        from backdoorbench.modality.vision import image_spec

        kwargs["image"] = image_spec(bundle)

    def new_model() -> Classifier:
        torch.manual_seed(spec.seed)
        model = spec.model.obj(spec.model_cfg, bundle.num_classes, **kwargs)
        device = current().device
        return model.to(device) if device is not None else model

    return new_model


def _detection_figure(path: Path, defense: Detector, scored: Any, target: Any, spec: RunSpec) -> None:
    from backdoorbench.plots import detector_figure

    detector_figure(
        path,
        defense.calibration_scores,
        scored,
        target,
        defense.threshold,
        title=f"{spec.defense.name} vs {spec.attack.name}",
    )
