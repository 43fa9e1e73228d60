"""One registry for attacks, defenses, datasets and models.

Components register themselves with a decorator::

    @register_defense("dan", modality=("text", "vision"), needs="clean validation data", config=DANConfig)
    class DAN(Detector): ...

Third-party packages add components without touching this repository through the entry-point group
``backdoorbench.plugins``: each entry point names a module (imported, so its decorators run) or a
callable (called with the registry). ``python -m backdoorbench list`` shows everything registered.
"""

from __future__ import annotations

import difflib
import importlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, TypeVar

from backdoorbench.errors import UserError

log = logging.getLogger(__name__)

KINDS = ("attack", "defense", "dataset", "model")
MODALITIES = ("text", "vision")
ENTRY_POINT_GROUP = "backdoorbench.plugins"

T = TypeVar("T")


class UnknownNameError(UserError, KeyError):
    """Raised for an unregistered name; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0])


@dataclass(frozen=True)
class Entry:
    """A registered component and its metadata."""

    kind: str
    name: str
    obj: Any
    modality: tuple[str, ...]
    #: defense: its class's ``kind`` (detector|training|repair|inspection|none); attack: data|weights poisoning; ...
    category: str = ""
    needs: str = ""  # what the component needs from the run (e.g. "defender clean data")
    description: str = ""
    config: type | None = None  # dataclass with the component's parameters and their defaults
    source: str = "builtin"
    extra: dict[str, Any] = field(default_factory=dict)

    def supports(self, modality: str) -> bool:
        return modality in self.modality


class Registry:
    """Name → component tables, one per kind."""

    def __init__(self) -> None:
        self._tables: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}
        self._resolvers: dict[str, list[tuple[str, Callable[[str], Entry | None]]]] = {k: [] for k in KINDS}
        self._plugins_loaded = False
        self._builtins_loaded = False

    # -- registration -------------------------------------------------------------------------
    def register(
        self,
        kind: str,
        name: str,
        *,
        modality: str | tuple[str, ...] | list[str],
        category: str = "",
        needs: str = "",
        description: str = "",
        config: type | None = None,
        **extra: Any,
    ) -> Callable[[T], T]:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
        mods = (modality,) if isinstance(modality, str) else tuple(modality)
        bad = [m for m in mods if m not in MODALITIES]
        if bad or not mods:
            raise ValueError(f"{kind} {name!r}: modality must be among {MODALITIES}, got {mods}")

        def deco(obj: T) -> T:
            existing = self._tables[kind].get(name)
            if existing is not None and existing.obj is not obj:
                raise ValueError(f"{kind} {name!r} is already registered by {existing.source} ({existing.obj!r})")
            cat = _category(kind, name, obj, category)
            doc = description or (getattr(obj, "__doc__", None) or "").strip().split("\n")[0]
            module = getattr(obj, "__module__", "") or ""
            source = "builtin" if module.startswith("backdoorbench.") else module
            self._tables[kind][name] = Entry(kind, name, obj, mods, cat, needs, doc, config, source, dict(extra))
            return obj

        return deco

    def add_resolver(self, kind: str, pattern: str, resolver: Callable[[str], Entry | None]) -> None:
        """Resolve names that are not table keys (e.g. ``timm:<name>``, any HF model path).

        ``pattern`` is what ``list`` shows for it.
        """
        self._resolvers[kind].append((pattern, resolver))

    # -- lookup -----------------------------------------------------------------------------
    def get(self, kind: str, name: str) -> Entry:
        self.load()
        table = self._tables[kind]
        if name in table:
            return table[name]
        for _, resolver in self._resolvers[kind]:
            entry = resolver(name)
            if entry is not None:
                return entry
        valid = sorted(table) + [p for p, _ in self._resolvers[kind]]
        close = difflib.get_close_matches(name, sorted(table), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownNameError(f"unknown {kind} {name!r}.{hint} Valid {kind}s: {', '.join(valid)}")

    def entries(self, kind: str) -> list[Entry]:
        self.load()
        return [self._tables[kind][n] for n in sorted(self._tables[kind])]

    def names(self, kind: str) -> list[str]:
        return [e.name for e in self.entries(kind)]

    def patterns(self, kind: str) -> list[str]:
        self.load()
        return [p for p, _ in self._resolvers[kind]]

    def __iter__(self) -> Iterator[Entry]:
        for kind in KINDS:
            yield from self.entries(kind)

    # -- loading ----------------------------------------------------------------------------
    def load(self) -> None:
        """Import the built-in components and the installed plugins (once)."""
        if not self._builtins_loaded:
            self._builtins_loaded = True
            importlib.import_module("backdoorbench.components")
        if not self._plugins_loaded:
            self._plugins_loaded = True
            self.load_plugins()

    def load_plugins(self) -> list[str]:
        loaded = []
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plugin must not take the CLI down
                log.warning("could not load backdoorbench plugin %r (%s): %s", ep.name, ep.value, exc)
                continue
            if callable(obj) and not isinstance(obj, type):
                obj(self)
            loaded.append(ep.name)
        return loaded


def _category(kind: str, name: str, obj: Any, category: str) -> str:
    """The entry's category: for a defense class, its ``kind`` (``detector``, ``training``, ``repair``,
    ``inspection``, ``none``: the protocol the pipeline runs it with), so that the two are one fact; a
    ``category=`` that says otherwise is an error. Other components (and defense factories) keep the one given."""
    declared = getattr(obj, "kind", "") if kind == "defense" and isinstance(obj, type) else ""
    if not isinstance(declared, str) or not declared:
        return category
    if category and category != declared:
        raise ValueError(
            f"defense {name!r}: category={category!r}, but {obj.__name__}.kind is {declared!r}; leave category= "
            "out (a defense class's category is its kind)"
        )
    return declared


REGISTRY = Registry()


def _registrar(kind: str) -> Callable[..., Callable[[T], T]]:
    def register(name: str, **kwargs: Any) -> Callable[[T], T]:
        return REGISTRY.register(kind, name, **kwargs)

    register.__name__ = f"register_{kind}"
    register.__doc__ = f"Decorator registering a {kind} under ``name`` (see :meth:`Registry.register`)."
    return register


register_attack = _registrar("attack")
register_defense = _registrar("defense")
register_dataset = _registrar("dataset")
register_model = _registrar("model")


def get(kind: str, name: str) -> Entry:
    return REGISTRY.get(kind, name)
