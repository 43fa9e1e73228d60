"""A run's validated specification: registry entries and typed configs, checked before any work starts."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig

from backdoorbench import __version__
from backdoorbench.config import ConfigError, DataConfig, component_config, to_dataclass
from backdoorbench.engine.gpus import several_devices_problem
from backdoorbench.registry import REGISTRY, Entry
from backdoorbench.trainer.lit import TrainConfig, resolve_device


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
    #: the run's one device (trainer.accelerator / trainer.devices, resolved once): the victim lives there
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


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
        if entry.kind == "model" and entry.modality == ("text",) and modality != "text" and entry.name not in (
            REGISTRY.names("model")
        ):  # an unregistered name, claimed by the HF resolver: for this dataset it is simply unknown
            raise ConfigError(
                f"unknown model {entry.name!r} for the {modality} dataset {dataset.name!r} (a name that is not "
                f"registered loads a HuggingFace text model). Valid {modality} models: "
                + ", ".join([e.name for e in REGISTRY.entries("model") if e.supports(modality)]
                            + [p for p in REGISTRY.patterns("model") if p.startswith("timm")])
            )
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
    from backdoorbench.config import forced_keys

    if defense.category == "training" and not getattr(attack.obj, "trains", True):
        raise ConfigError(
            f"defense {defense.name!r} trains its own model from the training data, so it never sees the victim of "
            f"attack={attack.name}; choose a detector or a repair defense"
        )
    cache = cfg.get("cache") or {}
    for flag in ("enabled", "verify", "rebuild"):
        if not isinstance(cache.get(flag, True), bool):
            raise ConfigError(f"cache.{flag} must be true or false, got {cache.get(flag)!r}")
    forced = forced_keys()  # ++group.key overrides: dropped, with a warning, by components without that key
    trainer_cfg = to_dataclass(TrainConfig, cfg.trainer, "trainer")
    device = resolve_device(trainer_cfg)
    several = several_devices_problem(trainer_cfg.devices, trainer_cfg.strategy, device.type)
    if several:  # one device per run: a multi-process launch would repeat the whole run per rank
        raise ConfigError(several)
    return RunSpec(
        attack=attack,
        defense=defense,
        dataset=dataset,
        model=model,
        attack_cfg=component_config(attack, cfg.attack, "attack", forced.get("attack", ())),
        defense_cfg=component_config(defense, cfg.defense, "defense", forced.get("defense", ())),
        data_cfg=to_dataclass(DataConfig, cfg.data, "data"),
        model_cfg=component_config(model, cfg.model, "model", forced.get("model", ())),
        trainer_cfg=trainer_cfg,
        seed=seed,
        modality=modality,
        cache_dir=cache.get("dir"),
        cache_enabled=bool(cache.get("enabled", True)),
        threads=threads,
        cache_verify=bool(cache.get("verify", True)),
        cache_rebuild=bool(cache.get("rebuild", False)),
        device=device,
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
