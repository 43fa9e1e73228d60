"""ANP and CLP, the pruning repairs beside RNP: ANP's perturbed masks (exact scaling, the budget, a planted
backdoor channel that the perturbation exposes and pruning removes), CLP's channel Lipschitz bound against a
direct computation, its conv -> BatchNorm pairs, the channels it prunes, its refusals; both through the
pipeline on tiny MNIST."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_repair import TINY, compose_run, needs_mnist, state, tiny_images, wrn
from torch import nn

from backdoorbench.data.base import Samples
from backdoorbench.defenses.repair.anp import ANP, ANPConfig, ANPModule, add_noisy_masks, set_perturbed
from backdoorbench.defenses.repair.clp import CLP, CLPConfig, channel_lipschitz, conv_bn_pairs, outliers
from backdoorbench.defenses.repair.units import maskable_units
from backdoorbench.engine.pipeline import run_experiment
from backdoorbench.errors import ModelError
from backdoorbench.modality.vision import ImageSpec, VisionClassifier
from backdoorbench.models.vision import VisionModelConfig, create_resnet18


# -- ANP ---------------------------------------------------------------------------------------------------
def test_anp_masks_and_perturbations_scale_weight_and_bias_exactly() -> None:
    model = wrn()
    batch = model.collate(tiny_images(4).inputs)
    masked = copy.deepcopy(model)
    masks, scales = add_noisy_masks(masked, "norm")
    assert set(masks) == {n for n, _ in maskable_units(model, "norm")}
    assert [p for p in masked.parameters() if p.requires_grad] == list(masks.values())
    torch.testing.assert_close(masked(batch), model(batch))  # masks at 1, not perturbed: the same function
    name = "net.block2.layer.0.bn1"
    module = dict(masked.named_modules())[name]
    weight_scale, bias_scale = (module.parametrizations[k][0] for k in ("weight", "bias"))
    with torch.no_grad():
        masks[name][3] = 0.5
        weight_scale.noise[3], bias_scale.noise[3] = 0.25, -0.4
    expected = copy.deepcopy(model)
    bn = dict(expected.named_modules())[name]
    with torch.no_grad():
        bn.weight[3] *= 0.5
    torch.testing.assert_close(masked(batch), expected(batch))  # unperturbed: the mask alone
    set_perturbed(scales, True)
    with torch.no_grad():
        bn.weight[3] *= (0.5 + 0.25) / 0.5  # w (m + delta)
        bn.bias[3] *= 1 - 0.4  # b (1 + xi)
    torch.testing.assert_close(masked(batch), expected(batch))


@pytest.mark.parametrize("project", [True, False])
def test_anp_perturbation_stays_in_budget_and_raises_the_loss(project: bool) -> None:
    model = wrn().train()
    cfg = ANPConfig(anp_eps=0.4, project_noise=project, augment=False)
    masks, scales = add_noisy_masks(model, "norm")
    module = ANPModule(model, cfg, masks, scales)
    data = tiny_images(32)
    inputs, labels = model.collate(data.inputs), torch.as_tensor(data.labels)
    torch.manual_seed(1)
    module.perturb(inputs, labels)
    noise = torch.cat([s.noise for s in scales]).abs()
    # U[-eps, eps] plus one step of eps: the paper projects back to eps; the reference's code can reach 2 eps
    assert float(noise.max()) <= (0.4 if project else 0.8) + 1e-6
    assert float(noise.max()) > 0.4 - 1e-6 and (project or float(noise.max()) > 0.4 + 1e-3)
    with torch.no_grad():
        set_perturbed(scales, True)
        attacked = F.cross_entropy(model(inputs), labels)
        for s in scales:  # the random start only
            s.noise.uniform_(-0.4, 0.4)
        random = F.cross_entropy(model(inputs), labels)
        set_perturbed(scales, False)
        natural = F.cross_entropy(model(inputs), labels)
    assert float(attacked) > max(float(random), float(natural))


class PlantedNet(nn.Module):
    """16 pixels -> 3 channels (BatchNorm1d) -> 2 classes. Channels 0 and 1 carry the clean task (label 0 when
    the first 8 pixels are brighter than the next 7); channel 2 is a planted backdoor: it reads the last pixel
    (dark in clean data) and, once active, adds 20 to class 0's logit. Its BatchNorm bias (-3) keeps it
    silent on clean data; a +40% scale and -40% bias perturbation wake it up."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 3)
        self.bn = nn.BatchNorm1d(3, momentum=None)
        self.head = nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            clean = torch.cat([torch.full((8,), 1 / 8), torch.full((7,), -1 / 7), torch.zeros(1)])
            self.fc.weight.copy_(torch.stack([clean, -clean, torch.full((16,), 0.01)]))
            self.fc.weight[2, 15] = 10.0
            self.fc.bias.zero_()
            self.bn.weight.fill_(1.0)
            self.bn.bias.copy_(torch.tensor([0.0, 0.0, -3.0]))
            self.head.weight.copy_(torch.tensor([[3.0, 0.0, 20.0], [0.0, 3.0, 0.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.fc(x.flatten(1)))))


TOY = ImageSpec(channels=1, height=4, width=4, mean=(0.0,), std=(1.0,), flip=False)


def planted(n: int = 256) -> tuple[VisionClassifier, Samples, Samples]:
    """The planted net (running statistics from its clean data), its clean data, and triggered class-1 inputs."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 200, (n, 1, 4, 4), generator=g, dtype=torch.uint8)
    x[:, 0, 3, 3] = 0  # the trigger pixel is dark in clean data
    flat = x.flatten(1).float()
    labels = (flat[:, :8].mean(1) <= flat[:, 8:15].mean(1)).long().numpy()
    model = VisionClassifier(PlantedNet(), 2, TOY, stages=["bn"], augment=False)
    model.train()
    with torch.no_grad():
        model(model.collate(x))  # cumulative running statistics of the clean data
    model.eval()
    trig = x[labels == 1].clone()
    trig[:, 0, 3, 3] = 255
    return model, Samples(x, labels, "vision"), Samples(trig, np.ones(len(trig), dtype=np.int64), "vision")


@pytest.mark.parametrize("eps", [0.4, 0.0])
def test_anp_exposes_a_planted_backdoor_channel(eps: float) -> None:
    model, clean, triggered = planted()
    assert model.accuracy(clean, 64) > 0.95
    assert float((model.predict(triggered.inputs, 64) == 0).mean()) == 1.0  # the backdoor works
    anp = ANP(ANPConfig(iterations=150, batch_size=64, augment=False, steps_per_epoch=None, anp_eps=eps,
                        curve_max=0.4, curve_step=0.2), seed=0)
    before = state(model)
    repaired = anp.repair(model, clean)
    masks = {i: v for _, i, v in anp.values}
    assert all(0.0 <= v <= 1.0 for v in masks.values())
    if eps == 0:  # without the perturbation nothing singles the silent channel out
        assert anp.pruned == [] and min(masks.values()) > 0.5
        return
    assert anp.max_noise <= 0.4 + 1e-6
    assert masks[2] <= 0.2 < min(masks[0], masks[1])  # the backdoor channel's mask sinks, the clean ones stay
    assert anp.pruned == [("net.bn", 2)]
    for k, v in before.items():  # the backdoored model is untouched; the repaired one lost channel 2's scale
        torch.testing.assert_close(model.state_dict()[k], v, msg=k)
    assert float(repaired.net.bn.weight[2]) == 0.0 and float(repaired.net.bn.bias[2]) == -3.0
    torch.testing.assert_close(repaired.net.bn.weight[:2], model.net.bn.weight[:2])
    assert float((repaired.predict(triggered.inputs, 64) == 0).mean()) == 0.0  # ASR 1 -> 0
    assert repaired.accuracy(clean, 64) > 0.95
    assert [anp.sweep_info[t]["units_pruned"] for t in (0.2, 0.4)] == [1.0, 1.0]


def test_anp_config_checks() -> None:
    for bad, key in (({"anp_eps": -0.1}, "anp_eps"), ({"anp_steps": 0}, "anp_steps"), ({"anp_alpha": 1.5}, "anp_alpha"),
                     ({"iterations": 0}, "iterations"), ({"prune_by": "number"}, "num_units")):
        with pytest.raises(ValueError, match=key):
            ANPConfig(**bad)


def test_anp_on_a_transformer(tiny_text_model) -> None:
    from conftest import tiny_text_samples

    anp = ANP(ANPConfig(iterations=2, batch_size=8, augment=False, curve_max=0.2, curve_step=0.2), 0)
    before = state(tiny_text_model)
    anp.repair(tiny_text_model, tiny_text_samples(16))
    assert {n.rsplit(".", 1)[-1] for n, _, _ in anp.values} >= {"LayerNorm"}
    assert len(anp.values) == sum(m.weight.shape[0] for _, m in maskable_units(tiny_text_model))
    assert 0 < anp.max_noise <= 0.4 + 1e-6
    for k, v in before.items():
        torch.testing.assert_close(tiny_text_model.state_dict()[k], v, msg=k)


# -- CLP ---------------------------------------------------------------------------------------------------
def resnet() -> VisionClassifier:
    torch.manual_seed(0)
    spec = ImageSpec(channels=3, height=16, width=16, mean=(0.5,) * 3, std=(0.5,) * 3, flip=True)
    model = create_resnet18(VisionModelConfig(name="resnet18"), 3, spec).eval()
    with torch.no_grad():  # trained-looking BatchNorms: varied scales and running variances
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(-1.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.2, 3.0)
    return model


def module_order_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """The reference's rule: each BatchNorm2d with the Conv2d last seen before it in module order."""
    pairs, conv = [], None
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            pairs.append((conv, name))
        elif isinstance(m, nn.Conv2d):
            conv = name
    return pairs


def test_clp_bound_is_the_spectral_norm_of_the_bn_scaled_kernel() -> None:
    model = resnet()
    pairs = conv_bn_pairs(model)
    assert len(pairs) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    for _, conv, _, bn in pairs:
        got = channel_lipschitz(conv, bn)
        for k in range(0, conv.out_channels, 7):  # a spread of channels (every one is slow on a ResNet-18)
            w = conv.weight[k].detach().double().reshape(conv.weight.shape[1], -1)
            scaled = w * (bn.weight[k].double() / bn.running_var[k].double().sqrt()).abs()
            direct = torch.linalg.matrix_norm(scaled, ord=2)
            assert float(got[k]) == pytest.approx(float(direct), rel=1e-9)
            assert float(got[k]) == pytest.approx(float(torch.linalg.svdvals(scaled).max()), rel=1e-9)


def test_clp_pairs_follow_the_data_flow() -> None:
    model = resnet()  # conv -> bn everywhere: the reference's module-order rule gives the same pairs
    assert [(c, b) for c, _, b, _ in conv_bn_pairs(model)] == module_order_pairs(model)
    # a pre-activation WRN: a block's bn1 normalises the residual sum, not a convolution; bn2 follows conv1
    pairs = {b: c for c, _, b, _ in conv_bn_pairs(wrn())}
    assert pairs["net.block1.layer.0.bn2"] == "net.block1.layer.0.conv1"
    assert pairs["net.block1.layer.0.bn1"] == "net.conv1"  # the stem's output goes straight in
    assert "net.block1.layer.1.bn1" not in pairs and "net.bn1" not in pairs


def test_clp_prunes_exactly_the_outlying_channels() -> None:
    model = resnet()
    conv = model.net.layer2[0].conv1
    with torch.no_grad():  # a planted outlier: a strong kernel behind a large BatchNorm scale
        conv.weight[5] *= 12.0
        model.net.layer2[0].bn1.weight[5], model.net.layer2[0].bn1.running_var[5] = 1.5, 0.2
    before = state(model)
    clp = CLP(CLPConfig(u=3.0, curve_min=1.0, curve_max=3.0, curve_step=1.0), 0)
    repaired = clp.repair(model)
    expected = set()
    for _, c, name, bn in conv_bn_pairs(model):
        uclc = channel_lipschitz(c, bn)
        expected |= {(name, int(i)) for i in torch.nonzero(uclc > uclc.mean() + 3.0 * uclc.std()).flatten()}
    assert ("net.layer2.0.bn1", 5) in expected and set(clp.pruned) == expected
    after = repaired.state_dict()
    changed = {(k, int(i)) for k, v in before.items() for i in torch.nonzero((after[k] != v).flatten()).flatten()}
    assert changed == {(f"{n}.{p}", i) for n, i in expected for p in ("weight", "bias")}  # scale and bias zeroed
    for k, v in before.items():
        torch.testing.assert_close(model.state_dict()[k], v, msg=k)
    counts = [clp.sweep_info[u]["units_pruned"] for u in (1.0, 2.0, 3.0)]
    assert counts == sorted(counts, reverse=True) and counts[-1] == len(expected)
    assert [u for u, _ in clp.sweep()] == [1.0, 2.0, 3.0] and clp.chosen_setting == 3.0
    assert outliers(torch.tensor([1.0, 1.0, 1.0, 1.0, 9.0]), 1.0) == [4]


def test_clp_refuses_models_without_conv_batchnorm(tiny_text_model) -> None:
    with pytest.raises(ModelError, match="CLP.*text"):
        CLP(CLPConfig(), 0).repair(tiny_text_model)
    mlp = VisionClassifier(nn.Sequential(nn.Flatten(), nn.Linear(16, 2)), 2, TOY, stages=["1"], augment=False)
    with pytest.raises(ModelError, match="no Conv2d"):
        CLP(CLPConfig(), 0).repair(mlp)


# -- through the pipeline ---------------------------------------------------------------------------------
@needs_mnist
def test_anp_and_clp_through_the_pipeline(tmp_path: Path) -> None:
    cache = f"cache.dir={tmp_path / 'cache'}"
    anp = run_experiment(
        compose_run("attack=badnets", "defense=anp", *TINY, cache, "defense.iterations=3", "defense.curve_step=0.3"),
        tmp_path / "anp",
    )
    m = anp["metrics"]
    assert {"ba", "asr", "ba_after", "asr_after", "r_acc_after", "der"} <= set(m)
    assert m["clean_size"] == 3  # 1% of the 300 training digits
    assert [row["setting"] for row in anp["curve"]] == [0.0, 0.3, 0.6, 0.9]
    assert all({"ba", "asr", "clean_acc", "units_pruned"} <= set(row) for row in anp["curve"])
    for f in ("repair_curve.png", "repair_curve.csv", "anp_masks.csv"):
        assert (tmp_path / "anp" / f).is_file(), f
    clp = run_experiment(compose_run("attack=badnets", "defense=clp", *TINY, cache), tmp_path / "clp")
    assert clp["cache"]["hit"] is True and clp["metrics"]["clean_size"] == 0  # data-free
    assert [row["setting"] for row in clp["curve"]][:3] == [0.0, 0.5, 1.0]
    rows = (tmp_path / "clp" / "clp_channels.csv").read_text().splitlines()
    assert rows[0] == "module,channel,uclc,layer_threshold,pruned" and len(rows) > 1
    saved = json.loads((tmp_path / "clp" / "results.json").read_text())
    assert saved["metrics"]["ba_after"] == pytest.approx(clp["metrics"]["ba_after"])
