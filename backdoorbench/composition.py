"""Composing a run's config: the step the command line (:mod:`backdoorbench.cli`) and the Python API
(:mod:`backdoorbench.api`) share, below both.

:func:`config_dir` finds the config folder; :func:`prepared_overrides` makes command-line overrides ready for
Hydra (the registry and plugin configs loaded, retired keys refused, ``model=<HF name, path or timm:name>``
rewritten); :func:`compose` gives the resolved config of one run; :func:`yaml_defaults` a component's
``configs/<group>/<name>.yaml``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from backdoorbench.registry import REGISTRY

GROUP_OF_KIND = {"attack": "attack", "defense": "defense", "dataset": "data", "model": "model"}
# config.yaml's `attack_modality: ${attack}` selects the node attack_modality/<attack>, which selects
# configs/modality/<modality>.yaml: the data/model/trainer defaults of the attack's registered modality
MODALITY_GROUP = "attack_modality"


def config_dir() -> Path:
    """``$BACKDOORBENCH_CONFIG_DIR``, else the repository's ``configs/``, else the packaged copy."""
    env = os.environ.get("BACKDOORBENCH_CONFIG_DIR")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve().parent
    candidates += [here.parent / "configs", here / "configs"]
    for c in candidates:
        if (c / "config.yaml").is_file():
            return c
    raise FileNotFoundError(f"no configs/config.yaml found (looked in {', '.join(map(str, candidates))})")


def _group_options(cdir: Path, group: str) -> set[str]:
    return {p.stem for p in (cdir / group).glob("*.yaml")}


def rewrite_model_override(args: list[str], cdir: Path) -> list[str]:
    """``model=<HF name or path>`` / ``model=timm:<name>`` → the generic group option + ``model.name``.

    A sweep list (``model=resnet18,timm:resnet10t,bert-base-uncased``) is rewritten element-wise: each value
    that is not a config file becomes a config option of its own (:func:`register_model_option`), so that
    Hydra can sweep over them (``model=resnet18,timm_resnet10t,bert-base-uncased``)."""
    options = _group_options(cdir, "model")
    out = []
    for a in args:
        value = a[len("model=") :] if a.startswith("model=") else None
        if value is None or value in options or "(" in value:  # not model=, a config file, or sweep syntax
            out.append(a)
            continue
        items = [v.strip().strip("'\"") for v in value.split(",")]
        if len(items) == 1:
            out += [f"model={_generic_model_option(items[0], options)}", f"model.name='{items[0]}'"]
        else:
            out.append("model=" + ",".join(v if v in options else register_model_option(v, cdir) for v in items))
    return out


def _generic_model_option(value: str, options: set[str]) -> str:
    return "timm" if value.startswith("timm:") and "timm" in options else "hf"


def register_model_option(value: str, cdir: Path) -> str:
    """Store a ``model`` config option for an HF name/path or ``timm:<name>`` (the generic ``hf.yaml`` or
    ``timm.yaml`` with ``name: <value>``) and return its option name: ``value`` with every character outside
    ``[A-Za-z0-9_-]`` replaced by ``_`` (a short hash added where that name is taken)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from backdoorbench.engine.sweep import job_hash

    options = _group_options(cdir, "model")
    node = OmegaConf.load(cdir / "model" / f"{_generic_model_option(value, options)}.yaml")
    node.name = value
    cs = ConfigStore.instance()
    alias = re.sub(r"[^A-Za-z0-9_-]+", "_", value).strip("_") or "model"
    taken = cs.repo.get("model", {}).get(f"{alias}.yaml")
    if alias in options or (taken is not None and taken.node.get("name") != value):
        alias = f"{alias}_{job_hash(value)[:6]}"
    cs.store(group="model", name=alias, node=node)
    return alias


def register_plugin_configs(cdir: Path) -> None:
    """Give every registered component without a YAML file a config node built from its dataclass, so
    that ``defense=<plugin>`` works for pip-installed plugins; and give every attack, with a YAML or without, the
    node ``attack_modality/<name>`` that config.yaml's defaults select by ``${attack}``: it selects
    ``configs/modality/<text|vision>.yaml``, the data/model/trainer defaults of the attack's registered modality
    (``vision`` for an attack registered for vision only; ``text`` for text attacks, attacks for both modalities
    such as ``external``, and a YAML the registry does not know, which validation refuses later)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for kind, group in GROUP_OF_KIND.items():
        existing = _group_options(cdir, group)
        for entry in REGISTRY.entries(kind):
            if entry.name in existing:
                continue
            node: dict[str, Any] = {}
            if entry.config is not None and is_dataclass(entry.config):
                node = asdict(entry.config())
            node["name"] = entry.name
            cs.store(group=group, name=entry.name, node=node)
    modality = {e.name: "vision" if tuple(e.modality) == ("vision",) else "text" for e in REGISTRY.entries("attack")}
    for name in _group_options(cdir, "attack") | set(modality):
        # package _global_: the nested `/modality` default keeps the override key `modality` (modality=vision works)
        node = {"defaults": [{"/modality": modality.get(name, "text")}]}
        cs.store(group=MODALITY_GROUP, name=name, node=node, package="_global_")


def prepared_overrides(args: list[str]) -> tuple[Path, list[str]]:
    """The config folder and the command-line overrides ready for Hydra: the registry and plugin configs loaded,
    ``model=<HF name, path or timm:name>`` rewritten (shared by the CLI's ``run`` and :func:`compose`)."""
    cdir = config_dir()
    REGISTRY.load()
    refuse_retired_keys(args)
    register_plugin_configs(cdir)
    return cdir, rewrite_model_override(args, cdir)


def refuse_retired_keys(args: list[str]) -> None:
    """A :class:`ConfigError` for an override of a key a component's config had in earlier versions (its
    ``RETIRED`` map, e.g. ``defense.precision``), naming the run-wide key to set instead; Hydra itself would
    only say that the key is not in the config."""
    from backdoorbench.config import ConfigError, retired_key_message

    for arg in args:
        key = arg.lstrip("+~").split("=", 1)[0]
        group, _, name = key.partition(".")
        kinds = [k for k, g in GROUP_OF_KIND.items() if g == group]
        for entry in (e for kind in kinds for e in REGISTRY.entries(kind)):
            if name in getattr(entry.config, "RETIRED", {}):
                raise ConfigError(retired_key_message(entry.config, group, name))


def compose(overrides: Sequence[str] = ()) -> Any:
    """The resolved config of one run from command-line style overrides (``["attack=badnets", "seed=1"]``),
    composed from the same ``configs/`` as the CLI (``model=<HF name or path>`` is rewritten as there)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    cdir, args = prepared_overrides(list(overrides))
    was_initialized = GlobalHydra.instance().is_initialized()
    if was_initialized:  # e.g. inside a user's own Hydra app: compose in a fresh context, then give it back
        saved = GlobalHydra.instance().hydra
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(cdir), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=args)
    finally:
        if was_initialized:
            GlobalHydra.instance().initialize(saved)  # type: ignore[arg-type]


def yaml_defaults(group: str, name: str) -> dict[str, Any]:
    """The keys of ``configs/<group>/<name>.yaml`` (without ``defaults`` and ``_``-prefixed keys), what the CLI
    starts a component's config from; empty where there is no such file or no config folder."""
    from omegaconf import OmegaConf

    try:
        path = config_dir() / group / f"{name}.yaml"
    except FileNotFoundError:
        return {}
    if not path.is_file():
        return {}
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    assert isinstance(node, dict)
    return {str(k): v for k, v in node.items() if k != "defaults" and not str(k).startswith("_")}
