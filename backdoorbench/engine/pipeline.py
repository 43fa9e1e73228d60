"""The run pipeline: config → data split → attack (cached) → defense → metrics → run directory."""

from __future__ import annotations

import csv
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from backdoorbench import __version__
from backdoorbench.attacks.base import Attack, AttackContext, AttackResult
from backdoorbench.config import ConfigError, DataConfig, component_config, to_dataclass
from backdoorbench.data.base import DatasetBundle, Samples
from backdoorbench.data.poisoned import PoisonedDataset
from backdoorbench.data.split import Splits, threat_model_split
from backdoorbench.defenses.base import Defense, Detector, RepairDefense, TrainingDefense, clean_count
from backdoorbench.engine.lit import TrainConfig
from backdoorbench.engine.rundir import check_locations
from backdoorbench.metrics import (
    FRR_GRID,
    accuracy,
    attack_success_rate,
    der,
    detection_metrics,
    robust_accuracy,
)
from backdoorbench.modality.base import Classifier
from backdoorbench.registry import REGISTRY, Entry
from backdoorbench.store import ArtifactStore, CacheError, atomic_path, atomic_write_text, cache_key

log = logging.getLogger(__name__)

SPLIT_VERSION = "1"


@dataclass
class RunSpec:
    """A validated run: registry entries and typed configs."""

    attack: Entry
    defense: Entry
    dataset: Entry
    model: Entry
    attack_cfg: Any
    defense_cfg: Any
    data_cfg: DataConfig
    model_cfg: Any
    trainer_cfg: TrainConfig
    seed: int
    modality: str
    cache_dir: str | None
    cache_enabled: bool
    threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    cache_verify: bool = True  # check the content hashes of a cache entry before using it
    cache_rebuild: bool = False  # remove a damaged cache entry and train the victim again


def validate(cfg: DictConfig) -> RunSpec:
    """Resolve names in the registry, check modalities agree, and type-check every config group."""
    for group in ("attack", "defense", "data", "model", "trainer"):
        if group not in cfg or cfg[group] is None:
            raise ConfigError(f"missing config group {group!r}")
        if group != "trainer" and not cfg[group].get("name"):
            raise ConfigError(f"{group}.name is not set")
    attack = REGISTRY.get("attack", str(cfg.attack.name))
    defense = REGISTRY.get("defense", str(cfg.defense.name))
    dataset = REGISTRY.get("dataset", str(cfg.data.name))
    model = REGISTRY.get("model", str(cfg.model.name))
    modality = dataset.modality[0]
    for entry in (attack, defense, model):
        if not entry.supports(modality):
            raise ConfigError(
                f"{entry.kind} {entry.name!r} supports {'/'.join(entry.modality)} only, but the dataset "
                f"{dataset.name!r} is {modality}. Choose a {modality} {entry.kind}: "
                + ", ".join(e.name for e in REGISTRY.entries(entry.kind) if e.supports(modality))
            )
    seed = cfg.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    threads = cfg.get("threads")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads must be a positive integer or null, got {threads!r}")
    if defense.category == "training" and not getattr(attack.obj, "trains", True):
        raise ConfigError(
            f"defense {defense.name!r} trains its own model from the training data, so it never sees the victim of "
            f"attack={attack.name}; choose a detector or a repair defense"
        )
    cache = cfg.get("cache") or {}
    for flag in ("enabled", "verify", "rebuild"):
        if not isinstance(cache.get(flag, True), bool):
            raise ConfigError(f"cache.{flag} must be true or false, got {cache.get(flag)!r}")
    return RunSpec(
        attack=attack,
        defense=defense,
        dataset=dataset,
        model=model,
        attack_cfg=component_config(attack, cfg.attack, "attack"),
        defense_cfg=component_config(defense, cfg.defense, "defense"),
        data_cfg=to_dataclass(DataConfig, cfg.data, "data"),
        model_cfg=component_config(model, cfg.model, "model"),
        trainer_cfg=to_dataclass(TrainConfig, cfg.trainer, "trainer"),
        seed=seed,
        modality=modality,
        cache_dir=cache.get("dir"),
        cache_enabled=bool(cache.get("enabled", True)),
        threads=threads,
        cache_verify=bool(cache.get("verify", True)),
        cache_rebuild=bool(cache.get("rebuild", False)),
    )


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"backdoorbench": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for pkg in (
        "torch",
        "torchvision",
        "transformers",
        "lightning",
        "timm",
        "scikit-learn",
        "hydra-core",
        "omegaconf",
        "numpy",
        "safetensors",
        "lightly",
    ):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    out["cuda"] = str(torch.version.cuda) if torch.cuda.is_available() else "none"
    return out


def set_determinism(seed: int, threads: int | None) -> None:
    import lightning as L

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    L.seed_everything(seed, workers=True, verbose=False)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if threads:
        torch.set_num_threads(threads)


class Timer:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    def __call__(self, name: str) -> _Stage:
        return _Stage(self, name)


class _Stage:
    def __init__(self, timer: Timer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timer.times[self.name] = round(self.timer.times.get(self.name, 0.0) + time.perf_counter() - self.t0, 3)


# -- attack artifacts ------------------------------------------------------------------------------
def attack_cache_spec(spec: RunSpec, attack: Attack) -> dict[str, Any]:
    return {
        "attack": asdict(spec.attack_cfg) if hasattr(spec.attack_cfg, "__dataclass_fields__") else spec.attack_cfg,
        "attack_version": attack.version,
        "attack_class": f"{type(attack).__module__}.{type(attack).__qualname__}",
        "data": asdict(spec.data_cfg),
        "model": asdict(spec.model_cfg) if hasattr(spec.model_cfg, "__dataclass_fields__") else spec.model_cfg,
        "trainer": asdict(spec.trainer_cfg),
        "seed": spec.seed,
        "split_version": SPLIT_VERSION,
    }


def obtain_victim(
    spec: RunSpec, attack: Attack, splits: Splits, bundle: DatasetBundle, new_model: Any, store: ArtifactStore | None
) -> tuple[Classifier, PoisonedDataset | None, dict[str, Any]]:
    """Load the backdoored victim from the cache (verified), or run the attack and store its products.

    A damaged entry raises :class:`~backdoorbench.store.CacheError`, or with ``cache.rebuild=true`` is
    removed and built again; it is never silently replaced by something else."""
    from safetensors.torch import save_model

    key = cache_key(attack_cache_spec(spec, attack))
    if not attack.cacheable:  # a user's own model (attack=external) is never copied into the artifact cache
        store = None
    if store is not None:
        try:
            cached = _load_victim(spec, attack, splits, new_model, store, key)
        except CacheError as exc:
            if not spec.cache_rebuild:
                raise
            log.warning("%s -- cache.rebuild=true: removing the entry and running the attack again", exc)
            store.remove(key)
            cached = None
        if cached is not None:
            return cached

    ctx = AttackContext(
        train=splits.train,
        proxy=splits.proxy,
        num_classes=bundle.num_classes,
        new_model=new_model,
        trainer=spec.trainer_cfg,
        seed=spec.seed,
        unlabeled=bundle.unlabeled,
        model_cfg=spec.model_cfg,
    )
    result: AttackResult = attack.run(ctx)
    result.model.eval()
    info = dict(result.info)
    if hasattr(attack, "surgery_words"):
        info["surgery_words"] = list(attack.surgery_words)
    entry: dict[str, Any] = {"key": key, "hit": False, "info": info}
    if not attack.cacheable:  # no cache entry: nothing to key a defense's stage checkpoints on (defense_work_dir)
        entry.update(key=None, stored=False)
    if store is not None:
        poisoned = result.poisoned
        poisoned_split = "train" if poisoned is not None and poisoned.clean is splits.train else "proxy"
        suffix = ".safetensors" if poisoned is not None and isinstance(poisoned.inputs, torch.Tensor) else ".json"
        writers = {"model.safetensors": lambda p: save_model(result.model, str(p))}
        meta: dict[str, Any] = {"spec": attack_cache_spec(spec, attack), "info": info, "versions": versions()}
        if poisoned is not None:
            writers["poison" + suffix] = poisoned.save_delta
            meta.update(poison_file="poison" + suffix, poisoned_split=poisoned_split)
        path = store.save(key, meta, writers)
        entry["path"] = str(path)
    return result.model, result.poisoned, entry


def _load_victim(
    spec: RunSpec, attack: Attack, splits: Splits, new_model: Any, store: ArtifactStore, key: str
) -> tuple[Classifier, PoisonedDataset | None, dict[str, Any]] | None:
    """The cached victim and poisoned set, or None on a miss; :class:`CacheError` naming the entry when
    the entry is damaged (a missing, truncated or changed file, unreadable metadata) or fails to load."""
    from safetensors.torch import load_model

    t0 = time.perf_counter()
    meta = store.lookup(key, required=["model.safetensors"], verify=spec.cache_verify)
    if meta is None:
        return None
    verify_s = round(time.perf_counter() - t0, 3)
    entry = store.path(key)
    poison_file = meta.get("poison_file")
    if poison_file and not (entry / poison_file).is_file():  # entries from before content hashes
        raise CacheError(entry, f"{poison_file} is missing")
    name = "model.safetensors"
    try:
        model = new_model()
        load_model(model, str(entry / name), strict=True, device=str(model.device))
        model.eval()
        poisoned = None
        if poison_file:
            name = poison_file
            base = splits.train if meta.get("poisoned_split") == "train" else splits.proxy
            poisoned = PoisonedDataset.load_delta(base, entry / poison_file)
    except Exception as exc:  # a file that passed the checks but does not load: still this entry's fault
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CacheError(entry, f"{name} does not load ({first})") from exc
    attack.restore(meta.get("info", {}))
    verified = "legacy" if "files" not in meta else bool(spec.cache_verify)
    log.info("attack artifacts loaded from cache %s (verified: %s, %.3f s)", entry, verified, verify_s)
    return model, poisoned, {
        "key": key,
        "hit": True,
        "path": str(entry),
        "info": meta.get("info", {}),
        "verified": verified,
        "verify_s": verify_s,
    }


# -- evaluation ------------------------------------------------------------------------------------
@dataclass
class Scored:
    split: str
    index: np.ndarray
    labels: np.ndarray
    preds: np.ndarray
    scores: np.ndarray | None = None


def evaluate_plain(
    model: Classifier, clean: Samples, triggered: Samples, idx: np.ndarray, batch_size: int
) -> list[Scored]:
    return [
        Scored(
            "clean", np.arange(len(clean)), clean.labels, model.predict(clean.inputs, batch_size, "eval: clean test")
        ),
        Scored("poisoned", idx, triggered.labels, model.predict(triggered.inputs, batch_size, "eval: triggered test")),
    ]


def run_experiment(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Run one experiment and write its run directory. Returns the results dict."""
    t_start = time.perf_counter()
    out = Path(out_dir)
    spec = validate(cfg)
    check_locations(out, spec.cache_dir, spec.cache_enabled)  # before any work: unwritable folders fail now
    set_determinism(spec.seed, spec.threads)
    timer = Timer()
    atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    atomic_write_text(out / "versions.json", json.dumps(versions(), indent=2))

    with timer("data"):
        bundle: DatasetBundle = spec.dataset.obj(root=spec.data_cfg.root, **spec.data_cfg.options)
        splits = threat_model_split(bundle, spec.data_cfg, spec.seed)
    log.info("data %s: %s", spec.dataset.name, splits.sizes())

    attack: Attack = spec.attack.obj(spec.attack_cfg, spec.seed)
    attack.check(bundle.num_classes)

    model_kwargs: dict[str, Any] = {}
    if spec.modality == "vision":  # channels, size and normalisation come from the data
        from backdoorbench.modality.vision import image_spec

        model_kwargs["image"] = image_spec(bundle)

    def new_model() -> Classifier:
        torch.manual_seed(spec.seed)
        return spec.model.obj(spec.model_cfg, bundle.num_classes, **model_kwargs)

    store = ArtifactStore(spec.cache_dir) if spec.cache_enabled else None
    with timer("attack"):
        model, poisoned, cache_entry = obtain_victim(spec, attack, splits, bundle, new_model, store)

    triggered, trig_idx = attack.triggered_test(splits.test)
    tgt = attack.target_labels(triggered.labels)  # what each triggered input should become (ASR)
    defense: Defense = spec.defense.obj(spec.defense_cfg, spec.seed)
    metrics: dict[str, Any] = {}
    cost: dict[str, Any] = {}
    extra: dict[str, Any] = {}  # further result sections (a repair defense's curve)
    batch = int(getattr(spec.defense_cfg, "batch_size", 64))

    if isinstance(defense, Detector):
        clean_def = splits.defender_clean(clean_count(spec.defense_cfg, len(splits.train)))
        with timer("defense_fit"):
            defense.fit(model, clean_def)
        model.reset_forward_count()
        lm0 = getattr(defense, "lm_forward_count", None)  # detectors with an auxiliary LM (ONION)
        hits0 = getattr(defense, "cache_hits", None)  # detectors that reuse scores of inputs seen before
        with timer("scoring"):
            c_scores, c_preds = defense.score_and_predict(splits.test.inputs)
            if len(triggered):
                p_scores, p_preds = defense.score_and_predict(triggered.inputs)
            else:  # no known trigger (attack=external): only the user's clean inputs are scored
                p_scores, p_preds = np.zeros(0), np.zeros(0, dtype=np.int64)
        n_scored = len(splits.test) + len(triggered)
        cost = {
            "forward_passes_per_input": model.forward_count / max(n_scored, 1),
            "seconds_per_100_inputs": timer.times["scoring"] / max(n_scored, 1) * 100,
        }
        if lm0 is not None:
            cost["lm_passes_per_input"] = (defense.lm_forward_count - lm0) / max(n_scored, 1)
        if hits0 is not None:  # the cost figures above are then averaged over partly free inputs
            cost["cached_inputs"] = int(defense.cache_hits - hits0)
        scored = [
            Scored("clean", np.arange(len(splits.test)), splits.test.labels, c_preds, c_scores),
            Scored("poisoned", trig_idx, triggered.labels, p_preds, p_scores),
        ]
        success = p_preds == tgt
        det = detection_metrics(defense.calibration_scores, c_scores, p_scores[success], spec.defense_cfg.frr, FRR_GRID)
        c_rej, p_rej = defense.reject(c_scores), defense.reject(p_scores)
        metrics.update(det)
        metrics["ba_after_rejection"] = float(((c_preds == splits.test.labels) & ~c_rej).mean())
        metrics["asr_after_rejection"] = float(((p_preds == tgt) & ~p_rej).mean()) if len(p_preds) else float("nan")
        metrics["clean_size"] = len(clean_def)
        if not attack.has_trigger:  # what a user without a trigger learns: how many of their inputs are rejected
            metrics["rejection_rate"] = float(c_rej.mean()) if len(c_rej) else float("nan")
        if defense.corrects_inputs:
            with timer("correction"):
                c_fixed = model.predict(defense.correct(splits.test.inputs), batch, "eval: corrected clean")
                p_fixed = model.predict(defense.correct(triggered.inputs), batch, "eval: corrected triggered")
            metrics["ba_after_correction"] = accuracy(c_fixed, splits.test.labels)
            metrics["asr_after_correction"] = attack_success_rate(p_fixed, tgt)
    elif isinstance(defense, (RepairDefense, TrainingDefense)):
        with timer("evaluation"):
            before = evaluate_plain(model, splits.test, triggered, trig_idx, batch)
        defense.run_dir = out
        defense.work_dir = defense_work_dir(spec, cache_entry, out)
        with timer("defense"):
            if isinstance(defense, RepairDefense):
                clean_def = splits.defender_clean(clean_count(spec.defense_cfg, len(splits.train)))
                metrics["clean_size"] = len(clean_def)
                defended = defense.repair(model, clean_def)
            else:  # trained from scratch on the (possibly poisoned) training set, provenance withheld
                train_set = (
                    poisoned.materialize() if poisoned is not None and poisoned.clean is splits.train else splits.train
                )
                defended = defense.train(Samples(train_set.inputs, train_set.labels, train_set.modality), new_model)
        for stage, seconds in (getattr(defense, "stage_times", None) or {}).items():  # per-stage wall time
            timer.times[f"defense_{stage}"] = seconds
        with timer("evaluation"):
            scored = evaluate_plain(defended, splits.test, triggered, trig_idx, batch)
        ba_b, asr_b = accuracy(before[0].preds, before[0].labels), attack_success_rate(before[1].preds, tgt)
        ba_a, asr_a = accuracy(scored[0].preds, scored[0].labels), attack_success_rate(scored[1].preds, tgt)
        metrics.update(
            ba=ba_b,
            asr=asr_b,
            ba_after=ba_a,
            asr_after=asr_a,
            r_acc_after=robust_accuracy(scored[1].preds, scored[1].labels),
            der=der(ba_b, asr_b, ba_a, asr_a),
        )
        if not attack.has_trigger:  # no known trigger (attack=external): BA before/after only
            metrics.update(asr=None, asr_after=None, r_acc_after=None, der=None)
        if isinstance(defense, TrainingDefense) and defense.labelled_indices is not None:
            kept = np.asarray(defense.labelled_indices, dtype=np.int64)
            metrics["labelled_fraction"] = len(kept) / max(len(splits.train), 1)
            if poisoned is not None and poisoned.clean is splits.train:
                backdoor, modified = backdoor_samples(poisoned, attack)
                metrics["labelled_poisoned_fraction"] = float(backdoor[kept].mean()) if len(kept) else float("nan")
                metrics["labelled_modified_fraction"] = float(modified[kept].mean()) if len(kept) else float("nan")
        if isinstance(defense, RepairDefense):
            with timer("evaluation"):
                curve = repair_curve(defense, splits.test, triggered, tgt, batch)
            if curve:
                extra["curve"] = curve
                _write_curve(out / "repair_curve.csv", curve)
                _draw(plots_repair_curve, out / "repair_curve.png", curve, defense, spec)
            if spec.modality == "vision" and len(triggered):
                _draw(plots_attention, out / "attention_maps.png", model, defended, triggered, spec)
    else:
        with timer("evaluation"):
            scored = evaluate_plain(model, splits.test, triggered, trig_idx, batch)
    if "ba" not in metrics:
        metrics = {
            "ba": accuracy(scored[0].preds, scored[0].labels),
            "asr": attack_success_rate(scored[1].preds, tgt) if attack.has_trigger else None,  # None: no known trigger
            **metrics,
        }
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
        },
        "metrics": metrics,
        "timing": timer.times,
        "cost": cost,
        "data": splits.sizes(),
        "cache": cache_entry,
        "out_dir": str(out),
        "frr_target": getattr(spec.defense_cfg, "frr", None),
        **extra,
    }
    atomic_write_text(
        out / "results.json", json.dumps(_finite(results), indent=2, default=_json_default, allow_nan=False)
    )
    write_scores(out / "scores.csv", scored, tgt, defense)
    if isinstance(defense, Detector):
        try:
            from backdoorbench.plots import detector_figure

            with atomic_path(out / "detection.png") as tmp:
                detector_figure(
                    tmp,
                    defense.calibration_scores,
                    scored,
                    tgt,
                    defense.threshold,
                    title=f"{spec.defense.name} vs {spec.attack.name}",
                )
        except Exception as exc:  # a plot must never lose a run's results
            log.warning("could not draw the detection figure: %s", exc)
    return results


def backdoor_samples(poisoned: PoisonedDataset, attack: Attack) -> tuple[np.ndarray, np.ndarray]:
    """Per training sample: (carries the backdoor — modified by the attack *and* labelled with the attack's
    target for it, i.e. dirty-label samples and clean-label target-class samples; modified by the attack at
    all — also WaNet's noise-mode samples, which keep their true labels and carry no trigger)."""
    prov = poisoned.provenance()
    targets = np.broadcast_to(np.asarray(attack.target_labels(prov["original_label"])), prov["label"].shape)
    backdoor = prov["poisoned"] & (prov["label"] == targets)
    backdoor[np.asarray(getattr(attack, "noise_indices", []), dtype=np.int64)] = False  # WaNet's noise mode
    return backdoor, prov["poisoned"]


def defense_work_dir(spec: RunSpec, cache_entry: dict[str, Any], out: Path) -> Path:
    """A stable folder for a training/repair defense's stage checkpoints: under the artifact cache, keyed by
    the victim (attack, data, model, trainer, seed) and the defense's config, so that re-running an
    interrupted run resumes; inside the run directory when the cache is off."""
    if not spec.cache_enabled or cache_entry.get("key") is None:  # no cache, or a victim outside it
        return out / "defense_work"
    cfg = asdict(spec.defense_cfg) if hasattr(spec.defense_cfg, "__dataclass_fields__") else spec.defense_cfg
    key = cache_key({"victim": cache_entry.get("key"), "defense": spec.defense.name, "cfg": cfg, "seed": spec.seed})
    return Path(ArtifactStore(spec.cache_dir).path("defense-" + key))


def repair_curve(
    defense: RepairDefense, test: Samples, triggered: Samples, tgt: np.ndarray | int, batch: int
) -> list[dict[str, float]]:
    """BA / ASR on the test set at every setting of the defense's :meth:`~RepairDefense.sweep` (reporting
    only: the defense chose its setting on its clean data before this runs)."""
    rows = []
    for setting, m in defense.sweep():
        rows.append(
            {
                "setting": float(setting),
                "ba": accuracy(m.predict(test.inputs, batch), test.labels),
                "asr": attack_success_rate(m.predict(triggered.inputs, batch), tgt),
                **{k: float(v) for k, v in defense.sweep_info.get(float(setting), {}).items()},
            }
        )
    return rows


def plots_repair_curve(path: Path, curve: list[dict[str, float]], defense: RepairDefense, spec: RunSpec) -> None:
    from backdoorbench.plots import repair_curve_figure

    repair_curve_figure(
        path,
        curve,
        defense.sweep_name or "setting",
        title=f"{spec.defense.name} vs {spec.attack.name}",
        chosen=defense.chosen_setting,
    )


def plots_attention(path: Path, before: Classifier, after: Classifier, triggered: Samples, spec: RunSpec) -> None:
    from backdoorbench.plots import attention_figure

    attention_figure(path, before, after, triggered, title=f"{spec.defense.name} vs {spec.attack.name}")


def _write_curve(path: Path, curve: list[dict[str, float]]) -> None:
    keys = list(dict.fromkeys(k for row in curve for k in row))
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(curve)


def _draw(fn: Callable[..., None], path: Path, *args: Any) -> None:
    try:
        with atomic_path(path) as tmp:
            fn(tmp, *args)
    except Exception as exc:  # a plot must never lose a run's results
        log.warning("could not draw %s: %s", path, exc)


def write_scores(path: Path, scored: list[Scored], target: int | np.ndarray, defense: Defense) -> None:
    """One row per scored input; ``target``: the target label, or one per poisoned input (all-to-all)."""
    target = np.broadcast_to(np.asarray(target), (len(scored[-1].labels),)) if scored else np.asarray(target)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["split", "index", "label", "pred", "score", "rejected", "attack_success"])
        for s in scored:
            rejected = defense.reject(s.scores) if s.scores is not None and isinstance(defense, Detector) else None
            for j in range(len(s.labels)):
                w.writerow(
                    [
                        s.split,
                        int(s.index[j]),
                        int(s.labels[j]),
                        int(s.preds[j]),
                        "" if s.scores is None else f"{float(s.scores[j]):.6g}",
                        "" if rejected is None else int(rejected[j]),
                        int(s.preds[j] == target[j]) if s.split == "poisoned" else "",
                    ]
                )


def _finite(o: Any) -> Any:
    """NaN / inf → None, so results.json is strict JSON (an undefined rate is null, not NaN)."""
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, (float, np.floating)):
        return float(o) if np.isfinite(o) else None
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
