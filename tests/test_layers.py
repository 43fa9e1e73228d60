"""Imports run one way (docs/architecture.md): facade/cli → engine → attacks/defenses → trainer/modality/models →
data → registry/config → metrics/store. A module never imports from a layer above its own."""

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
    "cli": 8,
    "components": 8,
    "api": 9,
    "__main__": 9,
}


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
