"""The public Python API: ``import backdoorbench as bb``.

In the spirit of timm (``list_models`` / ``create_model``) and PyOD (``fit`` / ``decision_function`` /
threshold): list and create every registered component by name with keyword overrides, validated exactly as
on the command line; wrap your own model as a :class:`~backdoorbench.modality.base.Classifier`; run one
experiment and get a typed result back::

    import backdoorbench as bb

    bb.list_defenses()                                 # ['dan', 'dbd', ...]
    dan = bb.create_defense("dan", frr=0.01)           # the DAN detector, defense.frr=0.01
    result = bb.run(attack="badnet_rw", defense="dan", overrides=["trainer.max_epochs=1"])
    result.metrics["far_at_frr"]["5"]

Nothing here changes global state beyond the call: :func:`run` restores torch's global settings (threads,
deterministic algorithms, RNG states) and the environment variables the pipeline sets.
"""

from __future__ import annotations

import fnmatch
import os
import random
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from backdoorbench.composition import compose, yaml_defaults
from backdoorbench.config import ConfigError, DataConfig, component_config, to_dataclass
from backdoorbench.registry import REGISTRY, Entry

__all__ = [
    "RunResult",
    "compose",
    "create_attack",
    "create_dataset",
    "create_defense",
    "create_model",
    "list_attacks",
    "list_datasets",
    "list_defenses",
    "list_models",
    "run",
    "wrap_hf",
    "wrap_image_model",
]


# -- list -------------------------------------------------------------------------------------------------
def _list(kind: str, pattern: str, modality: str | None) -> list[str]:
    return [
        e.name
        for e in REGISTRY.entries(kind)
        if fnmatch.fnmatch(e.name, pattern) and (modality is None or e.supports(modality))
    ]


def list_attacks(pattern: str = "*", modality: str | None = None) -> list[str]:
    """Registered attack names matching the shell-style ``pattern``, optionally of one modality."""
    return _list("attack", pattern, modality)


def list_defenses(pattern: str = "*", modality: str | None = None) -> list[str]:
    """Registered defense names (detectors, training-time and repair defenses, ``none``)."""
    return _list("defense", pattern, modality)


def list_datasets(pattern: str = "*", modality: str | None = None) -> list[str]:
    """Registered dataset names."""
    return _list("dataset", pattern, modality)


def list_models(pattern: str = "*", modality: str | None = None) -> list[str]:
    """Registered model names; any HF name or local path, and ``timm:<name>``, are accepted too."""
    return _list("model", pattern, modality)


# -- create -----------------------------------------------------------------------------------------------
def _config(entry: Entry, overrides: dict[str, Any], group: str) -> Any:
    """The component's config: its dataclass defaults, then the YAML of ``configs/<group>/<name>.yaml`` where
    one exists (what the CLI starts from), then ``overrides``; validated as on the command line."""
    node: dict[str, Any] = dict(yaml_defaults(group, entry.name))
    node.update(overrides)
    node["name"] = entry.name if "name" not in overrides else overrides["name"]
    return component_config(entry, node, group)


def create_attack(name: str, seed: int = 0, **overrides: Any) -> Any:
    """An attack by name, e.g. ``create_attack("badnet_rw", target=0, rate=0.1)``."""
    entry = REGISTRY.get("attack", name)
    return entry.obj(_config(entry, overrides, "attack"), seed)


def create_defense(name: str, seed: int = 0, **overrides: Any) -> Any:
    """A defense by name, e.g. ``create_defense("dan", frr=0.01)``; fit a detector with ``.fit(model, clean)``."""
    entry = REGISTRY.get("defense", name)
    return entry.obj(_config(entry, overrides, "defense"), seed)


def create_dataset(name: str, root: str | None = None, **options: Any) -> Any:
    """A dataset by name as a :class:`~backdoorbench.data.base.DatasetBundle` (``root``: a local copy)."""
    entry = REGISTRY.get("dataset", name)
    yaml = yaml_defaults("data", name)
    node = {**yaml, "name": name, "root": root if root is not None else yaml.get("root")}
    cfg = to_dataclass(DataConfig, node, "data")
    return entry.obj(root=cfg.root, **{**cfg.options, **options})


def create_model(name: str, num_classes: int, image: Any = None, **overrides: Any) -> Any:
    """A victim model by name as a :class:`~backdoorbench.modality.base.Classifier`: a built-in name, any HF
    name or local folder (text), or ``timm:<name>`` (vision). Vision models need ``image``, an
    :class:`~backdoorbench.modality.vision.ImageSpec` (or a vision dataset bundle to read it from)."""
    entry = REGISTRY.get("model", name)
    cfg = _config(entry, overrides, "model")
    if entry.supports("vision") and not entry.supports("text"):
        from backdoorbench.modality.vision import ImageSpec, image_spec

        if image is None:
            raise ConfigError(f"model {name!r} is a vision model: pass image=ImageSpec(...) or a vision dataset")
        spec = image if isinstance(image, ImageSpec) else image_spec(image)
        return entry.obj(cfg, num_classes, image=spec)
    return entry.obj(cfg, num_classes)


# -- wrap -------------------------------------------------------------------------------------------------
def wrap_hf(model: nn.Module, tokenizer: Any, max_length: int = 128) -> Any:
    """Any HF sequence classifier (``AutoModelForSequenceClassification``) with its tokenizer, as a text
    :class:`~backdoorbench.modality.base.Classifier` that every text defense accepts."""
    from backdoorbench.modality.text import TextClassifier

    if not hasattr(getattr(model, "config", None), "num_labels"):
        raise ConfigError(f"wrap_hf needs an HF model with config.num_labels, got {type(model).__name__}")
    return TextClassifier(model, tokenizer, max_length)


_HEAD_NAMES = ("fc", "head", "classifier", "linear", "last_linear")


def wrap_image_model(
    module: nn.Module,
    num_classes: int,
    image: Any,
    stages: Sequence[str] | None = None,
    augment: bool = False,
) -> Any:
    """Any image ``nn.Module`` (float ``[B, C, H, W]`` in, logits out) as a vision
    :class:`~backdoorbench.modality.base.Classifier`.

    ``image`` is an :class:`~backdoorbench.modality.vision.ImageSpec` (channels, height, width and the
    normalisation the module expects: the wrapper feeds it ``(pixels − mean) / std`` with pixels in [0, 1]).
    ``stages`` name the modules whose outputs are the per-layer features (DAN, NAD); by default timm's
    ``feature_info`` stages, else every direct child module except the classifier head.
    """
    from backdoorbench.modality.vision import ImageSpec, VisionClassifier

    if not isinstance(image, ImageSpec):
        raise ConfigError(
            "wrap_image_model needs image=ImageSpec(channels=..., height=..., width=..., mean=..., std=...)"
        )
    if stages is None:
        from backdoorbench.models.vision import _auto_stages

        stages = [name for name, _ in _auto_stages(module)] or [
            n for n, _ in module.named_children() if n not in _HEAD_NAMES
        ]
    return VisionClassifier(module, num_classes, image, stages, augment=augment)


# -- run --------------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """What :func:`run` returns: the run directory and the sections of its ``results.json``."""

    out_dir: Path
    run: dict[str, Any]
    metrics: dict[str, Any]
    timing: dict[str, float] = field(default_factory=dict)
    cost: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def ba(self) -> float:
        return float(self.metrics["ba"])

    @property
    def asr(self) -> float | None:
        v = self.metrics.get("asr")
        return None if v is None else float(v)


_ENV_KEYS = ("CUBLAS_WORKSPACE_CONFIG", "PL_GLOBAL_SEED", "PL_SEED_WORKERS", "HF_HUB_OFFLINE")


@contextmanager
def preserved_global_state() -> Iterator[None]:
    """Restore torch's global settings (threads, deterministic algorithms, default dtype, cuDNN flags), the
    torch / numpy / ``random`` RNG states and the environment variables the pipeline sets, on exit."""
    saved: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "dtype": torch.get_default_dtype(),
        "cudnn": (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark),
        "torch_rng": torch.random.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "np_rng": np.random.get_state(),
        "py_rng": random.getstate(),
        "env": {k: os.environ.get(k) for k in _ENV_KEYS},
    }
    try:
        yield
    finally:
        torch.set_num_threads(saved["threads"])
        torch.use_deterministic_algorithms(saved["deterministic"], warn_only=saved["warn_only"])
        torch.set_default_dtype(saved["dtype"])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved["cudnn"]
        torch.random.set_rng_state(saved["torch_rng"])
        if saved["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        np.random.set_state(saved["np_rng"])
        random.setstate(saved["py_rng"])
        for k, v in saved["env"].items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(
    attack: str | None = None,
    defense: str | None = None,
    overrides: Sequence[str] = (),
    out_dir: str | Path | None = None,
    **groups: str,
) -> RunResult:
    """Run one experiment and return its :class:`RunResult`.

    ``attack``, ``defense`` and the other config groups (``data=``, ``model=``, ``trainer=``) choose options
    by name; ``overrides`` are command-line style ``key=value`` strings (``"defense.frr=0.01"``). The run
    directory is ``out_dir`` (default: a new ``runs/api_<time>_<attack>_<defense>_<id>``), laid out as for the
    CLI. Errors in the config raise :class:`~backdoorbench.config.ConfigError` before any training.
    """
    from backdoorbench.engine.pipeline import run_experiment

    args = [f"{k}={v}" for k, v in (("attack", attack), ("defense", defense)) if v is not None]
    args += [f"{k}={v}" for k, v in groups.items()]
    cfg = compose([*args, *overrides])
    if out_dir is None:
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
        out_dir = Path("runs") / f"api_{stamp}_{cfg.attack.name}_{cfg.defense.name}_{uuid.uuid4().hex[:6]}"
    with preserved_global_state():
        results = run_experiment(cfg, out_dir)
    return RunResult(
        out_dir=Path(out_dir),
        run=results["run"],
        metrics=results["metrics"],
        timing=results.get("timing", {}),
        cost=results.get("cost", {}),
        cache=results.get("cache", {}),
        raw=results,
    )
