"""The victim: a backdoored model and its poisoned training data, from the verified artifact cache or by
running the attack (then stored once, so that every defense meets the same victim)."""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from backdoorbench.attacks.base import Attack, AttackContext, AttackResult
from backdoorbench.data.base import DatasetBundle
from backdoorbench.data.poisoned import PoisonedDataset
from backdoorbench.data.split import Splits
from backdoorbench.engine.determinism import environment
from backdoorbench.engine.spec import RunSpec, versions
from backdoorbench.modality.base import Classifier
from backdoorbench.runtime import Runtime, current, run_scope
from backdoorbench.store import ArtifactStore, CacheError, cache_key, key_lock

log = logging.getLogger(__name__)

SPLIT_VERSION = "1"
#: the keys of a cache entry's meta.json the victim loader reads (the writer always writes them, null when unused)
REQUIRED_KEYS = ("poison_file", "poisoned_split", "info")


@dataclass
class Victim:
    """The model a defense is evaluated against, and what the attack poisoned (never shown to defenses)."""

    model: Classifier
    poisoned: PoisonedDataset | None
    poisoned_split: str | None  # "train" (the task's training set: AFM) | "proxy" (APMF) | None
    cache: dict[str, Any] = field(default_factory=dict)

    def poisoned_training_set(self) -> PoisonedDataset | None:
        """The poisoned delta when it is over the task's training set (what a training-time defense gets)."""
        return self.poisoned if self.poisoned_split == "train" else None


def _data_key(spec: RunSpec) -> dict[str, Any]:
    """The data config without ``options.in_memory`` (where decoded images live never changes them)."""
    data = asdict(spec.data_cfg)
    if isinstance(data.get("options"), dict) and "in_memory" in data["options"]:
        data["options"] = {k: v for k, v in data["options"].items() if k != "in_memory"}
    return data


def attack_cache_spec(spec: RunSpec, attack: Attack) -> dict[str, Any]:
    """What the attack cache key hashes. The trainer part is ``TrainConfig.cache_fields()``: execution-only
    settings (workers, logger) never, settings added later (devices, strategy, scheduler, ...) only when
    they are not their defaults, so that the keys of existing configs are what they were."""
    return {
        "attack": asdict(spec.attack_cfg) if hasattr(spec.attack_cfg, "__dataclass_fields__") else spec.attack_cfg,
        "attack_version": attack.version,
        "attack_class": f"{type(attack).__module__}.{type(attack).__qualname__}",
        "data": _data_key(spec),
        "model": asdict(spec.model_cfg) if hasattr(spec.model_cfg, "__dataclass_fields__") else spec.model_cfg,
        "trainer": spec.trainer_cfg.cache_fields(),
        "seed": spec.seed,
        "split_version": SPLIT_VERSION,
    }


def obtain_victim(spec: RunSpec, attack: Attack, splits: Splits, bundle: DatasetBundle, new_model: Any) -> Victim:
    """Load the backdoored victim from the run's artifact cache (verified; ``runtime.current().store``, None:
    the cache is off), or run the attack and store its products. Either way the victim is returned on the run's
    device (``runtime.current().device``).

    Concurrent jobs that need the same victim train it once: the attack runs under the entry's file lock
    (``<cache>/<key>.lock``), and the cache is checked again once the lock is held, so a job that waited loads
    what the holder stored. The attack's training stages checkpoint every epoch under
    ``<cache>/partial-<key>/`` (``AttackContext.work_dir``, from ``Runtime.attack_folders``), so a killed
    job's successor resumes them; the folder is removed once the entry is stored. Clean models an attack starts
    from (EP/DFEP, the label-consistent/Trojan surrogate) are kept under ``<cache>/clean-models/``
    (``AttackContext.shared_dir``) and shared between attacks.

    A damaged entry raises :class:`~backdoorbench.store.CacheError`, or with ``cache.rebuild=true`` is
    removed and built again (under the lock); it is never silently replaced by something else."""
    key = cache_key(attack_cache_spec(spec, attack))
    store = current().store
    if not attack.cacheable:  # a user's own model (attack=external) is never copied into the artifact cache
        store = None
    if store is None:
        return _run_attack(spec, attack, splits, bundle, new_model, None, key)
    try:  # a finished entry needs no lock: it appears in one rename, complete
        cached = _load_victim(spec, attack, splits, new_model, store, key)
    except CacheError:
        cached = None  # judged (raised, or rebuilt) below, under the lock
    if cached is not None:
        return cached
    with key_lock(store.lock_path(key), f"victim {key}"):
        cached = _cached_victim(spec, attack, splits, new_model, store, key)
        if cached is not None:  # another job stored it while this one waited
            return cached
        return _run_attack(spec, attack, splits, bundle, new_model, store, key)


def _cached_victim(
    spec: RunSpec, attack: Attack, splits: Splits, new_model: Any, store: ArtifactStore, key: str
) -> Victim | None:
    try:
        return _load_victim(spec, attack, splits, new_model, store, key)
    except CacheError as exc:
        if not spec.cache_rebuild:
            raise
        log.warning("%s -- cache.rebuild=true: removing the entry and running the attack again", exc)
        store.remove(key)
        return None


def _run_attack(
    spec: RunSpec, attack: Attack, splits: Splits, bundle: DatasetBundle, new_model: Any,
    store: ArtifactStore | None, key: str,
) -> Victim:
    """Run the attack (its stages resuming from ``partial-<key>/`` when a cache is used) and store its products."""
    from safetensors.torch import save_model

    rt = current()
    scope = rt.attack_folders(key) if store is not None else replace(rt, work_dir=None, shared_dir=None)
    work_dir = scope.work_dir
    resumed = work_dir is not None and any(work_dir.glob("*.partial.safetensors"))
    if resumed:
        log.info("victim %s: resuming the interrupted attack's training stages from %s", key, work_dir)
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
    with run_scope(scope):  # the attack's stage folders (AttackContext.work_dir / shared_dir)
        result: AttackResult = attack.run(ctx)
    result.model.eval()
    info = dict(result.info)
    env = environment(current().device)  # where the victim was trained: kept with it in meta.json
    entry: dict[str, Any] = {"key": key, "hit": False, "info": info, "resumed": resumed, "environment": env}
    if not attack.cacheable:  # no cache entry: nothing to key a defense's stage checkpoints on (defense_work_dir)
        entry.update(key=None, stored=False)
    if store is not None:
        poisoned = result.poisoned
        suffix = ".safetensors" if poisoned is not None and isinstance(poisoned.inputs, torch.Tensor) else ".json"
        writers = {"model.safetensors": lambda p: save_model(result.model, str(p))}
        meta: dict[str, Any] = {"spec": attack_cache_spec(spec, attack), "info": info, "versions": versions(),
                                "environment": env,
                                "poison_file": None, "poisoned_split": None}  # every key _load_victim requires
        if poisoned is not None:
            writers["poison" + suffix] = poisoned.save_delta
            meta.update(poison_file="poison" + suffix, poisoned_split=result.poisoned_split)
        path = store.save(key, meta, writers)
        entry["path"] = str(path)
        if work_dir is not None:
            shutil.rmtree(work_dir, ignore_errors=True)  # the stored entry replaces the stage checkpoints
    _to_run_device(result.model)  # the run's device, whatever the attack's last step left it on
    return Victim(result.model, result.poisoned, result.poisoned_split, entry)


def _load_victim(
    spec: RunSpec, attack: Attack, splits: Splits, new_model: Any, store: ArtifactStore, key: str
) -> Victim | None:
    """The cached victim and poisoned set, or None on a miss; :class:`CacheError` naming the entry when
    the entry is damaged (a missing, truncated or changed file, changed or unreadable metadata, a file outside
    the entry, a key the metadata lacks) or fails to load."""
    from safetensors.torch import load_model

    t0 = time.perf_counter()
    meta = store.lookup(key, required=["model.safetensors"], verify=spec.cache_verify)
    if meta is None:
        return None
    verify_s = round(time.perf_counter() - t0, 3)
    entry = store.path(key)
    for required in REQUIRED_KEYS:  # never a silent default: without poison_file, DBD would train on the clean set
        if required not in meta:
            raise CacheError(entry, f"meta.json has no key {required!r}")
    poison_file = meta["poison_file"]
    stray = [n for n in meta["files"] if n.startswith("poison.")]
    if poison_file is None and stray:
        raise CacheError(entry, f"meta.json's poison_file is null, but the entry holds {stray[0]}")
    if poison_file is not None:
        store.member(key, meta, poison_file)  # inside the entry, and among the files whose hashes were checked
        if meta["poisoned_split"] not in ("train", "proxy"):
            raise CacheError(entry, f"meta.json's poisoned_split is {meta['poisoned_split']!r}, not train or proxy")
    if not isinstance(meta["info"], dict):
        raise CacheError(entry, "meta.json's info is not a record")
    name = "model.safetensors"
    try:
        model = new_model()
        load_model(model, str(entry / name), strict=True, device=str(model.device))
        _to_run_device(model)  # the run's device (a factory may build the model elsewhere)
        model.eval()
        poisoned, poisoned_split = None, None
        if poison_file:
            name = poison_file
            poisoned_split = meta["poisoned_split"]
            base = splits.train if poisoned_split == "train" else splits.proxy
            poisoned = PoisonedDataset.load_delta(base, entry / poison_file)
    except Exception as exc:  # a file that passed the checks but does not load: still this entry's fault
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CacheError(entry, f"{name} does not load ({first})") from exc
    attack.restore(meta["info"])
    verified = bool(spec.cache_verify)  # False: sizes and meta.json's digest only (store.lookup)
    log.info("attack artifacts loaded from cache %s (verified: %s, %.3f s)", entry, verified, verify_s)
    return Victim(model, poisoned, poisoned_split, {
        "key": key,
        "hit": True,
        "path": str(entry),
        "info": meta["info"],
        "verified": verified,
        "verify_s": verify_s,
        "environment": meta.get("environment"),  # None: an entry cached before environments were recorded
    })


def _to_run_device(model: Classifier) -> None:
    device = current().device
    if device is not None:  # outside a run: where the model is
        model.to(device)


def defense_stage_key(spec: RunSpec, victim_key: str) -> str:
    """The key of a training/repair defense's stage folder (``Runtime.defense_folders``): the victim (attack,
    data, model, trainer, seed), the defense and its config, the seed, so that re-running an interrupted run
    resumes there."""
    cfg = asdict(spec.defense_cfg) if hasattr(spec.defense_cfg, "__dataclass_fields__") else spec.defense_cfg
    # keys a config no longer has, with the values every earlier key held (DBD's accelerator / precision): the
    # folders of earlier runs keep their keys
    cfg = {**cfg, **getattr(spec.defense_cfg, "STAGE_KEY_COMPAT", {})} if isinstance(cfg, dict) else cfg
    return cache_key({"victim": victim_key, "defense": spec.defense.name, "cfg": cfg, "seed": spec.seed})


def defense_context(spec: RunSpec, cache_entry: dict[str, Any]) -> Runtime:
    """The run's context with the stage folders of the run's training/repair defense against the victim of
    ``cache_entry`` (``Runtime.defense_folders``: under the cache, keyed by :func:`defense_stage_key`, and the
    victim's shared folder; inside the run directory when the cache is off or the victim has no key)."""
    rt = current()
    victim = cache_entry.get("key") if rt.store is not None else None
    return rt.defense_folders(victim, defense_stage_key(spec, victim) if victim is not None else "")


def defense_lock(rt: Runtime) -> contextlib.AbstractContextManager[None]:
    """The lock of a defense's stage folder under the cache (``<work_dir>.lock``), held for the defense's whole
    run, so that two identical jobs never write the same stage files: the second waits, then loads the stages
    the first finished. No lock when the folder is inside the run directory (cache off)."""
    if not rt.stage_folder_locked or rt.work_dir is None:
        return contextlib.nullcontext()
    work_dir = rt.work_dir
    return key_lock(work_dir.with_name(work_dir.name + ".lock"), f"defense stage folder {work_dir.name}")
