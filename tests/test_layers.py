"""Imports run one way (docs/architecture.md): facade/cli → composition → engine → attacks/defenses →
trainer/modality/models → data → registry/config → metrics/store. A module never imports from a layer above its
own; the command line (cli) sits on the facade (api) or on the composition step they share (composition), and the
facade never imports the command line; and no two modules import each other, however indirectly."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO_ROOT

#: the package's top-level units, by layer (a unit may import only from lower layers, or from itself)
RANK = {
    "__init__": 0,  # __version__ and the registry re-exports (the public API is imported lazily)
    "_compat": 0,
    "errors": 0,
    "progress": 0,
    "seeds": 0,  # the one derivation of random streams and sub-stage seeds from the run's seed
    "assets": 0,
    "metrics": 0,
    "registry": 1,
    "config": 2,
    "store": 3,
    "runtime": 3,  # the run's context: device, precision, threads, run directory, the artifact store and its folders
    "arraycache": 3,  # on-disk arrays for caches that never change results (ONION suspicions)
    "data": 3,
    "modality": 4,
    "plots": 5,
    "models": 5,
    "trainer": 5,
    "attacks": 6,
    "defenses": 6,
    "engine": 7,
    "report": 7,
    "report_groups": 7,
    "components": 8,
    "composition": 8,  # composing a run's config from overrides: shared by the CLI and the API, below both
    "cli": 9,
    "api": 9,
    "__main__": 10,
}


def _module(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(tree: ast.AST) -> set[int]:
    """The ids of the nodes under ``if TYPE_CHECKING:``: imports for type hints only, never run."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return out


def module_graph() -> dict[str, set[str]]:
    """Module → the package's modules it imports when run (at the top or inside a function; type-only imports
    under ``if TYPE_CHECKING:`` left out)."""
    paths = {_module(p): p for p in sorted((REPO_ROOT / "backdoorbench").rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for me, path in paths.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_only(tree)
        deps: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            deps |= {n for n in names if n in paths and n != me}
        graph[me] = deps
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The cycles of ``graph``: its strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def package_imports() -> list[tuple[str, str, str]]:
    """(importing file, its unit, imported unit) for every ``backdoorbench`` import in the package."""
    root = REPO_ROOT / "backdoorbench"
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(REPO_ROOT).with_suffix("")
        me = _unit(".".join(rel.parts))
        if path.name == "__init__.py" and path.parent == root:
            me = "__init__"
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name == "backdoorbench" or name.startswith("backdoorbench."):
                    out.append((str(Path(*rel.parts)), me, _unit(name)))
    return out


def test_every_unit_has_a_layer() -> None:
    units = {p.stem if p.is_file() else p.name for p in (REPO_ROOT / "backdoorbench").iterdir()}
    units = {u for u in units if not u.startswith(".") and u != "__pycache__"} - {"configs"}
    assert units <= set(RANK), f"put {sorted(units - set(RANK))} into a layer (tests/test_layers.py)"


def test_imports_never_run_back_up_the_layers() -> None:
    imports = package_imports()
    assert imports
    upward = [(f, me, them) for f, me, them in imports if me != them and RANK[them] > RANK[me] and me != "__init__"]
    assert not upward, "imports that run back up the layers: " + "; ".join(f"{f} -> {t}" for f, _, t in upward)


def test_the_api_never_imports_the_cli() -> None:
    """Only ``python -m backdoorbench`` imports the command line; the API composes through composition.py."""
    importers = {me for _, me, them in package_imports() if them == "cli" and me != "cli"}
    assert importers <= {"__main__"}, f"{sorted(importers - {'__main__'})} import cli; import backdoorbench.composition"
    assert "backdoorbench.composition" in module_graph()["backdoorbench.api"]


def test_no_import_cycles() -> None:
    assert import_cycles(module_graph()) == []


def test_import_cycles_are_found() -> None:
    """The check itself can fail: two modules importing each other (as defenses/base.py and
    defenses/persist.py once did), or three in a ring."""
    assert import_cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []
