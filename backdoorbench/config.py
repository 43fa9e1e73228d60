"""Config schemas and validation.

Every registered component declares a dataclass with its parameters and defaults. At run start each
config group node is merged into that dataclass: unknown keys, wrong types and out-of-range values
(checked in the dataclass's ``__post_init__``) raise :class:`ConfigError` naming the key, the bad
value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from backdoorbench.errors import UserError
from backdoorbench.registry import Entry

T = TypeVar("T")
log = logging.getLogger(__name__)


class ConfigError(UserError, ValueError):
    """A bad configuration value; the message says what is allowed."""


@dataclass
class DataConfig:
    """The threat-model split of the data (``data.*``); dataset-specific options go in ``options``."""

    name: str = "rotten_tomatoes"
    root: str | None = None  # local copy (file or folder); null = embedded / hub default
    max_train: int | None = 2000  # the task's training set (attacker's in AFM, the user's in APMF)
    max_test: int | None = 1000  # test cap: a random subset of this size, drawn with the split's seed
    holdout_size: int = 1000  # clean training samples reserved for the defender
    proxy_size: int = 1000  # attacker's proxy data (APMF)
    test_fraction: float = 0.1  # held out as test when the source has no labelled test split
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("max_train", "max_test"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ValueError(f"data.{key} must be >= 1 or null (all), got {v}")
        for key in ("holdout_size", "proxy_size"):
            if getattr(self, key) < 0:
                raise ValueError(f"data.{key} must be >= 0, got {getattr(self, key)}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"data.test_fraction must be in (0, 1), got {self.test_fraction}")


def to_dataclass(schema: type[T], node: Any, where: str) -> T:
    """Merge ``node`` into ``schema``'s defaults and build the dataclass; clear errors on bad values."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    node = dict(node or {})
    for k in node:
        if k in getattr(schema, "RETIRED", {}):
            raise ConfigError(retired_key_message(schema, where, k))
    valid = [f.name for f in dataclasses.fields(schema)]  # type: ignore[arg-type]
    unknown = [k for k in node if k not in valid]
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}. Valid keys: {', '.join(valid)}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except ConfigKeyError as exc:
        raise ConfigError(f"{where}: {_first_line(exc)}. Valid keys: {', '.join(valid)}") from None
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "") or ""
        raise ConfigError(f"{where}.{key}: {_first_line(exc)}" if key else f"{where}: {_first_line(exc)}") from None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def retired_key_message(schema: Any, where: str, key: str) -> str:
    """The error for ``<where>.<key>``, a key ``schema`` had in earlier versions (its ``RETIRED`` map names the
    run-wide key that replaced it)."""
    return (
        f"{where}.{key} was removed: {schema.__name__} runs on the run's device and in the run's precision; set "
        f"{schema.RETIRED[key]}=... instead (one place for run-wide settings) and drop {where}.{key}"
    )


def component_config(entry: Entry, node: Any, where: str, forced: Collection[str] = ()) -> Any:
    """``node`` merged into the component's dataclass.

    ``forced``: keys of this group given with ``++`` on the command line. Such a key that this component
    does not declare but another registered component of its kind does (``++defense.num_copies=10`` in a
    sweep over ``defense=dan,strip``) is dropped with a warning naming the key and the component; every
    other unknown key is an error.
    """
    if entry.config is None:
        return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    if forced and dataclasses.is_dataclass(entry.config):
        own = {f.name for f in dataclasses.fields(entry.config)}
        drop = [k for k in forced if k not in own and k in _declared_by_others(entry)]
        if drop:
            if isinstance(node, DictConfig):
                node = OmegaConf.to_container(node, resolve=True)
            node = {k: v for k, v in dict(node or {}).items() if k not in drop}
            for k in drop:
                log.warning("%s %r has no key %r: ignoring ++%s.%s for this run", entry.kind, entry.name, k, where, k)
    return to_dataclass(entry.config, node, where)


def _declared_by_others(entry: Entry) -> set[str]:
    from backdoorbench.registry import REGISTRY

    keys: set[str] = set()
    for other in REGISTRY.entries(entry.kind):
        if other.name != entry.name and other.config is not None and dataclasses.is_dataclass(other.config):
            keys.update(f.name for f in dataclasses.fields(other.config))
    return keys


def forced_keys() -> dict[str, set[str]]:
    """Per config group, the top-level keys the running Hydra job's command line forces in with ``++``
    (``++defense.num_copies=10`` → ``{"defense": {"num_copies"}}``); empty outside a Hydra job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not HydraConfig.initialized():
        return {}
    out: dict[str, set[str]] = {}
    for o in OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task)):
        group, _, key = o.key_or_group.partition(".")
        if o.is_force_add() and key:
            out.setdefault(group, set()).add(key.split(".")[0])
    return out


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
