"""Vision attacks: each trigger's exact effect on pixels and labels, the clean-label properties, WaNet's warp,
Trojan's trigger generation and restore, and a tiny end-to-end ``run()`` of every attack (16×16 images, a
two-layer conv net, one epoch)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from backdoorbench.attacks.base import AttackContext
from backdoorbench.attacks.vision.badnets import BadNets, BadNetsConfig
from backdoorbench.attacks.vision.blended import Blended, BlendedConfig, noise_pattern
from backdoorbench.attacks.vision.common import SALT_POISON, VisionAttackConfig, choose_clean_label
from backdoorbench.attacks.vision.label_consistent import (
    CORNER_PATTERNS,
    LabelConsistent,
    LabelConsistentConfig,
    pgd_linf,
)
from backdoorbench.attacks.vision.sig import SIG, SIGConfig
from backdoorbench.attacks.vision.trojan import (
    Trojan,
    TrojanConfig,
    default_size,
    layer_activation,
    optimise_trigger,
    select_neurons,
)
from backdoorbench.attacks.vision.wanet import WaNet, WaNetConfig, identity_grid, noise_field, warp_grid
from backdoorbench.config import to_dataclass
from backdoorbench.data.base import Samples
from backdoorbench.data.poisoned import PoisonedDataset
from backdoorbench.metrics import attack_success_rate
from backdoorbench.modality.vision import ImageSpec, VisionClassifier
from backdoorbench.registry import REGISTRY
from backdoorbench.trainer.lit import TrainConfig

REPO = Path(__file__).resolve().parents[1]
K = 4  # classes of the synthetic data
SIZE = 16
ATTACKS = ["badnets", "blended", "wanet", "label_consistent", "sig", "trojan"]


# -- tiny data and model -----------------------------------------------------------------------------
def tiny_images(n: int = 48, channels: int = 1, seed: int = 0) -> Samples:
    """Random grey-level images whose class ``y = i % K`` sets their brightness (pixels in ``[20 + 30y, 120 + 30y]``),
    which a small conv net with global pooling learns in a few epochs."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % K
    x = rng.integers(20, 121, size=(n, channels, SIZE, SIZE)) + 30 * labels[:, None, None, None]
    return Samples(torch.from_numpy(x.astype(np.uint8)), labels, "vision")


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = K, channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def tiny_model(seed: int = 0, channels: int = 1) -> VisionClassifier:
    torch.manual_seed(seed)
    spec = ImageSpec(channels=channels, height=SIZE, width=SIZE, mean=(0.5,) * channels, std=(0.5,) * channels,
                     flip=False)
    return VisionClassifier(TinyNet(K, channels), K, spec, stages=["conv1", "conv2"])


TRAINER = TrainConfig(max_epochs=1, batch_size=16, lr=0.05, optimizer="sgd", weight_decay=0.0, warmup_ratio=0.0,
                      accelerator="cpu", grad_clip=0.0)


def tiny_ctx(train: Samples | None = None, seed: int = 0) -> AttackContext:
    train = train if train is not None else tiny_images()
    empty = Samples(torch.zeros(0, 1, SIZE, SIZE, dtype=torch.uint8), np.zeros(0, dtype=np.int64), "vision")
    return AttackContext(train=train, proxy=empty, num_classes=K, new_model=tiny_model, trainer=TRAINER, seed=seed)


def outside(mask_rows: slice, mask_cols: slice) -> torch.Tensor:
    m = torch.ones(SIZE, SIZE, dtype=torch.bool)
    m[mask_rows, mask_cols] = False
    return m


# -- registry and configs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ATTACKS)
def test_registered_as_vision_with_yaml_matching_the_defaults(name: str) -> None:
    entry = REGISTRY.get("attack", name)
    assert entry.modality == ("vision",) and entry.obj.modality == "vision"
    assert issubclass(entry.config, VisionAttackConfig)
    node = yaml.safe_load((REPO / "configs" / "attack" / f"{name}.yaml").read_text())
    assert "defaults" not in node  # the vision defaults come from the registered modality (test_attack_defaults.py)
    assert to_dataclass(entry.config, node, "attack") == entry.config()  # every YAML value is the default


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (BadNetsConfig, {"target": -1}, "target"),
        (BadNetsConfig, {"poison_rate": 1.5}, "poison_rate"),
        (BadNetsConfig, {"epochs": 0}, "epochs"),
        (BadNetsConfig, {"lr": 0.0}, "lr"),
        (BadNetsConfig, {"pattern": "star"}, "pattern"),
        (BadNetsConfig, {"size": 0}, "size"),
        (BadNetsConfig, {"position": "middle"}, "position"),
        (BadNetsConfig, {"offset": [1]}, "offset"),
        (BlendedConfig, {"alpha": 0.0}, "alpha"),
        (BlendedConfig, {"test_alpha": 1.5}, "test_alpha"),
        (BlendedConfig, {"pattern_path": "/no/such/file.png"}, "pattern_path"),
        (WaNetConfig, {"k": 0}, "k"),
        (WaNetConfig, {"s": -0.1}, "strength"),
        (WaNetConfig, {"poison_rate": 0.4, "cross_ratio": 2.0}, "exceeds 1"),
        (LabelConsistentConfig, {"eps": -1.0}, "eps"),
        (LabelConsistentConfig, {"trigger": "top"}, "trigger"),
        (LabelConsistentConfig, {"amplitude": 0.0}, "amplitude"),
        (SIGConfig, {"delta": 0.0}, "delta"),
        (SIGConfig, {"frequency": -1.0}, "frequency"),
        (TrojanConfig, {"neuron_selection": "random"}, "neuron_selection"),
        (TrojanConfig, {"num_neurons": 0}, "num_neurons"),
        (TrojanConfig, {"size": 0}, "size"),
    ],
)
def test_config_validation(cls: type, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_triggers_reject_non_uint8_images() -> None:
    with pytest.raises(TypeError, match="uint8"):
        BadNets(BadNetsConfig()).apply_trigger(torch.zeros(2, 1, SIZE, SIZE))


# -- BadNets -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [1, 3])
def test_badnets_grid_sets_the_patch_exactly_and_nothing_else(channels: int) -> None:
    x = tiny_images(8, channels).inputs
    out = BadNets(BadNetsConfig()).apply_trigger(x)
    grid = torch.tensor([[255, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=torch.uint8)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert torch.equal(out[:, :, -3:, -3:], grid.expand(8, channels, 3, 3))  # bottom-right, every channel
    keep = outside(slice(-3, None), slice(-3, None))
    assert torch.equal(out[:, :, keep], x[:, :, keep])
    assert not torch.equal(out, x) and torch.equal(x, tiny_images(8, channels).inputs)  # input not modified


def test_badnets_square_position_margin_and_offset() -> None:
    x = tiny_images(4).inputs
    out = BadNets(BadNetsConfig(pattern="square", size=4, position="top_left", margin=1)).apply_trigger(x)
    assert (out[:, :, 1:5, 1:5] == 255).all()
    keep = outside(slice(1, 5), slice(1, 5))
    assert torch.equal(out[:, :, keep], x[:, :, keep])
    out = BadNets(BadNetsConfig(pattern="square", size=2, offset=[5, 7])).apply_trigger(x)
    assert (out[:, :, 5:7, 7:9] == 255).all()
    keep = outside(slice(5, 7), slice(7, 9))
    assert torch.equal(out[:, :, keep], x[:, :, keep])
    with pytest.raises(ValueError, match="does not fit"):
        BadNets(BadNetsConfig(size=3, offset=[14, 0])).apply_trigger(x)


def test_badnets_dirty_label_poisoning_relabels_exactly_the_rate() -> None:
    train = tiny_images(48)
    attack = BadNets(BadNetsConfig(poison_rate=0.25, target=2), seed=3)
    pd = attack.poison_dataset(tiny_ctx(train))
    assert len(pd.indices) == 12 == round(0.25 * 48) and list(pd.indices) == sorted(set(pd.indices.tolist()))
    assert (pd.labels == 2).all() and pd.target == 2
    assert torch.equal(pd.inputs, attack.apply_trigger(train.inputs[torch.from_numpy(pd.indices)]))
    mat = pd.materialize()
    clean = ~pd.is_poisoned()
    assert torch.equal(mat.inputs[torch.from_numpy(clean)], train.inputs[torch.from_numpy(clean)])
    assert np.array_equal(mat.labels[clean], train.labels[clean]) and (mat.labels[pd.indices] == 2).all()
    prov = pd.provenance()
    assert np.array_equal(prov["original_label"], train.labels) and prov["poisoned"].sum() == 12
    again = BadNets(BadNetsConfig(poison_rate=0.25, target=2), seed=3).poison_dataset(tiny_ctx(train))
    assert np.array_equal(again.indices, pd.indices)  # deterministic given the seed
    other = BadNets(BadNetsConfig(poison_rate=0.25, target=2), seed=4).poison_dataset(tiny_ctx(train))
    assert not np.array_equal(other.indices, pd.indices)


def test_badnets_all_to_all_labels_and_asr_targets() -> None:
    train, test = tiny_images(48), tiny_images(20, seed=9)
    attack = BadNets(BadNetsConfig(all_to_all=True, poison_rate=0.5))
    attack.check(K)
    pd = attack.poison_dataset(tiny_ctx(train))
    assert len(pd.indices) == 24
    assert np.array_equal(pd.labels, (train.labels[pd.indices] + 1) % K)  # y -> (y + 1) mod K
    triggered, idx = attack.triggered_test(test)
    assert np.array_equal(idx, np.arange(20))  # every test sample, target class included
    assert np.array_equal(triggered.labels, test.labels)  # true labels kept
    assert torch.equal(triggered.inputs, attack.apply_trigger(test.inputs))
    tgt = attack.target_labels(triggered.labels)
    assert np.array_equal(tgt, (test.labels + 1) % K) and (tgt != test.labels).all()
    assert attack_success_rate((test.labels + 1) % K, tgt) == 1.0
    assert attack_success_rate(np.zeros(20, dtype=np.int64), tgt) == pytest.approx(np.mean(tgt == 0))
    one = BadNets(BadNetsConfig(target=1))  # all-to-one: non-target test samples, target for all
    triggered, idx = one.triggered_test(test)
    assert np.array_equal(idx, np.flatnonzero(test.labels != 1))
    assert (one.target_labels(triggered.labels) == 1).all()
    fresh = BadNets(BadNetsConfig(all_to_all=True))
    with pytest.raises(RuntimeError, match="classes"):
        fresh.target_labels(test.labels)
    fresh.restore({"num_classes": K})
    assert np.array_equal(fresh.target_labels(test.labels), (test.labels + 1) % K)


# -- Blended -----------------------------------------------------------------------------------------------
def test_blended_formula_and_fixed_pattern() -> None:
    x = tiny_images(6, channels=3).inputs
    attack = Blended(BlendedConfig(alpha=0.2), seed=0)
    out = attack.apply_trigger(x)
    pattern = noise_pattern(3, SIZE, SIZE, 0)
    expected = np.clip(np.round(0.8 * x.numpy().astype(np.float64) + 0.2 * pattern.numpy()[None]), 0, 255)
    assert np.array_equal(out.numpy(), expected.astype(np.uint8))
    assert pattern.min() < 10 and pattern.max() > 245  # uniform noise over 0..255
    assert torch.equal(Blended(BlendedConfig(), seed=5).apply_trigger(x), out)  # fixed pattern, any run seed
    assert not torch.equal(Blended(BlendedConfig(pattern_seed=1)).apply_trigger(x), out)
    test = tiny_images(12, channels=3, seed=4)
    strong = Blended(BlendedConfig(alpha=0.2, test_alpha=0.5))
    triggered, idx = strong.triggered_test(test)
    assert np.array_equal(idx, np.flatnonzero(test.labels != 0))
    expected = np.round(0.5 * test.inputs[torch.from_numpy(idx)].numpy().astype(np.float64) + 0.5 * pattern.numpy())
    assert np.array_equal(triggered.inputs.numpy(), expected.astype(np.uint8))


def test_blended_pattern_from_an_image_file(tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "key.png"
    Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8)).save(path)
    attack = Blended(BlendedConfig(alpha=0.5, pattern_path=str(path)))
    x = torch.full((2, 1, SIZE, SIZE), 100, dtype=torch.uint8)
    assert (attack.apply_trigger(x) == 150).all()  # grey 200 resized to 16x16, blended half-half with 100


# -- SIG ---------------------------------------------------------------------------------------------------
def test_sig_adds_the_horizontal_sinusoid() -> None:
    x = torch.full((3, 3, SIZE, SIZE), 128, dtype=torch.uint8)
    out = SIG(SIGConfig(delta=20, frequency=6)).apply_trigger(x)
    v = np.array([20 * math.sin(2 * math.pi * j * 6 / SIZE) for j in range(SIZE)])
    assert np.array_equal(out.numpy().astype(int) - 128, np.broadcast_to(np.round(v), (3, 3, SIZE, SIZE)))
    assert np.abs(out.numpy().astype(int) - 128).max() == 20  # Δ = 20 is reached (j = 2: sin(1.5π) = −1)
    clipped = SIG(SIGConfig(delta=20)).apply_trigger(torch.full((1, 1, SIZE, SIZE), 250, dtype=torch.uint8))
    assert clipped.max() == 255  # clipped, not wrapped
    test = tiny_images(12, seed=2)
    strong = SIG(SIGConfig(delta=20, test_delta=40))
    triggered, idx = strong.triggered_test(test)
    assert torch.equal(triggered.inputs, SIG(SIGConfig(delta=40)).apply_trigger(test.inputs[torch.from_numpy(idx)]))


def test_sig_is_clean_label_on_target_class_samples_only() -> None:
    train = tiny_images(48)
    attack = SIG(SIGConfig(poison_rate=0.2, target=1))
    pd = attack.poison_dataset(tiny_ctx(train))
    assert len(pd.indices) == round(0.2 * 48)
    assert (train.labels[pd.indices] == 1).all()  # only target-class images
    assert np.array_equal(pd.labels, train.labels[pd.indices])  # labels unchanged
    assert torch.equal(pd.inputs, attack.apply_trigger(train.inputs[torch.from_numpy(pd.indices)]))
    assert np.array_equal(pd.materialize().labels, train.labels)
    with pytest.raises(ValueError, match="target class 1"):  # the target class holds 12 / 48 = 25%
        SIG(SIGConfig(poison_rate=0.3, target=1)).poison_dataset(tiny_ctx(train))
    assert len(choose_clean_label(train.labels, 1, 0.25, np.random.default_rng(0), "x")) == 12


# -- WaNet -------------------------------------------------------------------------------------------------
def test_wanet_identity_at_zero_strength_and_deterministic_field() -> None:
    x = tiny_images(10, channels=3).inputs
    assert torch.equal(WaNet(WaNetConfig(s=0.0)).apply_trigger(x), x)
    warped = WaNet(WaNetConfig(), seed=0).apply_trigger(x)
    assert warped.dtype == torch.uint8 and not torch.equal(warped, x)
    assert torch.equal(WaNet(WaNetConfig(), seed=0).apply_trigger(x), warped)  # same seed, same field
    assert not torch.equal(WaNet(WaNetConfig(), seed=1).apply_trigger(x), warped)


def test_wanet_grid_matches_the_reference_construction() -> None:
    k, s, h = 4, 0.5, SIZE
    gen = torch.Generator().manual_seed(123)
    noise = noise_field(k, h, h, gen)
    # the reference (VinAIResearch train.py), same random numbers
    ins = torch.rand(1, 2, k, k, generator=torch.Generator().manual_seed(123)) * 2 - 1
    ins = ins / torch.mean(torch.abs(ins))
    ref_noise = F.interpolate(ins, size=h, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    array1d = torch.linspace(-1, 1, steps=h)
    xx, yy = torch.meshgrid(array1d, array1d, indexing="ij")
    ref_identity = torch.stack((yy, xx), 2)[None]
    ref_grid = torch.clamp((ref_identity + s * ref_noise / h) * 1, -1, 1)
    assert torch.allclose(noise, ref_noise) and torch.allclose(identity_grid(h, h), ref_identity)
    assert torch.allclose(warp_grid(noise, s, 1.0), ref_grid)


def test_wanet_noise_mode_samples_keep_their_labels() -> None:
    train = tiny_images(48)
    attack = WaNet(WaNetConfig(poison_rate=0.125, cross_ratio=2.0, target=3), seed=0)
    pd = attack.poison_dataset(tiny_ctx(train))
    noise = attack.noise_indices
    backdoor = np.setdiff1d(pd.indices, noise)
    assert len(backdoor) == 6 and len(noise) == 12 and len(pd.indices) == 18  # ρ_a n and ρ_a · cross_ratio · n
    assert not set(backdoor) & set(noise)
    pos = {int(i): p for p, i in enumerate(pd.indices)}
    for i in noise:  # warped + noise, label kept
        assert pd.labels[pos[int(i)]] == train.labels[i]
        assert not torch.equal(pd.inputs[pos[int(i)]], train.inputs[i])
    for i in backdoor:  # warped exactly, relabelled
        assert pd.labels[pos[int(i)]] == 3
        assert torch.equal(pd.inputs[pos[int(i)]], attack.apply_trigger(train.inputs[i : i + 1])[0])
    noisy = torch.stack([pd.inputs[pos[int(i)]] for i in noise])
    assert not torch.equal(noisy, attack.apply_trigger(train.inputs[torch.from_numpy(noise)]))  # noise differs
    off = WaNet(WaNetConfig(poison_rate=0.125, noise_mode=False)).poison_dataset(tiny_ctx(train))
    assert len(off.indices) == 6


# -- label-consistent --------------------------------------------------------------------------------------
def test_lc_corner_patterns_full_and_reduced_amplitude() -> None:
    x = torch.full((2, 3, SIZE, SIZE), 128, dtype=torch.uint8)
    out = LabelConsistent(LabelConsistentConfig()).apply_trigger(x)
    corners = {"top_left": (0, 0), "top_right": (0, SIZE - 3), "bottom_left": (SIZE - 3, 0),
               "bottom_right": (SIZE - 3, SIZE - 3)}
    touched = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    for name, (r, c) in corners.items():
        expected = (torch.tensor(CORNER_PATTERNS[name]) > 0).to(torch.uint8) * 255  # +1 white, -1 black
        assert torch.equal(out[:, :, r : r + 3, c : c + 3], expected.expand(2, 3, 3, 3)), name
        touched[r : r + 3, c : c + 3] = True
    assert (out[:, :, ~touched] == 128).all()
    # the reference's bottom-right pattern, cell by cell: ((-1,-1), 1), ((-1,-2), -1), ((-3,-3), -1), ...
    assert out[0, 0, -1, -1] == 255 and out[0, 0, -1, -2] == 0 and out[0, 0, -3, -3] == 0 and out[0, 0, -2, -2] == 255
    reduced = LabelConsistent(LabelConsistentConfig(amplitude=0.25, trigger="bottom_right")).apply_trigger(x)
    assert reduced[0, 0, -1, -1] == round(128 + 0.25 * 255) and reduced[0, 0, -1, -2] == round(128 - 0.25 * 255)
    assert (reduced[:, :, :-3, :] == 128).all() and (reduced[:, :, :, :-3] == 128).all()


def test_pgd_stays_within_eps_and_raises_the_loss() -> None:
    model = tiny_model()
    data = tiny_images(16)
    adv = pgd_linf(model, data.inputs, data.labels, eps=8.0, step_size=1.5, steps=10)
    diff = adv.to(torch.int16) - data.inputs.to(torch.int16)
    assert diff.abs().max() <= 8 and diff.abs().max() > 0

    def loss(images: torch.Tensor) -> float:
        with torch.no_grad():
            return float(F.cross_entropy(model.predict_logits(images), torch.as_tensor(data.labels)))

    assert loss(adv) > loss(data.inputs)


def test_label_consistent_run_is_clean_label_and_within_eps() -> None:
    train = tiny_images(48)
    cfg = LabelConsistentConfig(poison_rate=0.25, target=2, steps=3, eps=8.0)
    result = LabelConsistent(cfg).run(tiny_ctx(train))
    pd = result.poisoned
    assert len(pd.indices) == 12 and (train.labels[pd.indices] == 2).all()
    assert np.array_equal(pd.labels, train.labels[pd.indices])  # labels unchanged
    clean = train.inputs[torch.from_numpy(pd.indices)].to(torch.int16)
    diff = (pd.inputs.to(torch.int16) - clean).abs()
    trigger_mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    for r in (slice(0, 3), slice(-3, None)):
        for c in (slice(0, 3), slice(-3, None)):
            trigger_mask[r, c] = True
    assert diff[:, :, ~trigger_mask].max() <= 8  # the perturbation is within eps outside the trigger
    assert diff[:, :, ~trigger_mask].max() > 0  # and there is one
    assert set(pd.inputs[:, :, trigger_mask].unique().tolist()) <= {0, 255}  # full-amplitude trigger
    assert np.array_equal(pd.materialize().labels, train.labels)
    assert json.dumps(result.info) and result.info["clean_label"] is True
    with pytest.raises(ValueError, match="target class"):
        LabelConsistent(LabelConsistentConfig(poison_rate=0.3)).run(tiny_ctx(train))


# -- Trojan ------------------------------------------------------------------------------------------------
def test_trojan_neuron_selection_incoming_and_outgoing() -> None:
    model = tiny_model()
    w2, fc = model.net.conv2.weight.detach().abs(), model.net.fc.weight.detach().abs()
    inc = select_neurons(model, "conv2", 3, "incoming", (1, SIZE, SIZE))
    assert inc == torch.argsort(w2.sum(dim=(1, 2, 3)), descending=True)[:3].tolist()
    out = select_neurons(model, "conv2", 3, "outgoing", (1, SIZE, SIZE))
    assert out == torch.argsort(fc.sum(dim=0), descending=True)[:3].tolist()
    with pytest.raises(ValueError, match="channels"):
        select_neurons(model, "conv2", 17, "incoming", (1, SIZE, SIZE))


def test_trojan_trigger_raises_selected_activations_above_random_triggers() -> None:
    model = tiny_model()
    neurons = select_neurons(model, "conv2", 2, "incoming", (1, SIZE, SIZE))
    size = default_size(SIZE, SIZE)
    assert size == round(math.sqrt(0.07 * SIZE * SIZE)) == 4
    box = (SIZE - size, SIZE - size, size)
    patch = optimise_trigger(model, "conv2", neurons, torch.zeros(1, 1, SIZE, SIZE), box, 100.0, 60, 0.1,
                             torch.Generator().manual_seed(0))
    assert patch.shape == (1, size, size) and 0 <= patch.min() and patch.max() <= 1

    def activation(p: torch.Tensor, images: torch.Tensor) -> float:
        x = images.float() / 255
        x[:, :, -size:, -size:] = p
        with torch.no_grad():
            return float(layer_activation(model, "conv2", x)[:, neurons].sum(1).mean())

    black, data = torch.zeros(1, 1, SIZE, SIZE), tiny_images(16).inputs
    gen = torch.Generator().manual_seed(1)
    randoms = [torch.rand(1, size, size, generator=gen) for _ in range(10)]
    for images in (black, data):  # on the canvas it was optimised on, and stamped on real images
        assert activation(patch, images) > max(activation(r, images) for r in randoms)


def test_trojan_run_saves_the_trigger_and_restore_reinstates_it() -> None:
    train = tiny_images(48)
    cfg = TrojanConfig(poison_rate=0.25, trigger_steps=20, target=1)
    attack = Trojan(cfg, seed=0)
    with pytest.raises(RuntimeError, match="restore"):
        attack.apply_trigger(train.inputs)
    result = attack.run(tiny_ctx(train))
    info = json.loads(json.dumps(result.info))  # JSON-serialisable, as the cache stores it
    trigger = torch.tensor(info["trigger"], dtype=torch.uint8)
    assert trigger.shape == (1, 4, 4) and info["trigger_box"] == [12, 12, 4] and info["layer"] == "conv2"
    assert len(info["neurons"]) == 2
    assert sum(info["activation_trigger"]) > sum(info["activation_initial"])
    pd = result.poisoned
    assert len(pd.indices) == 12 and (pd.labels == 1).all()
    assert torch.equal(pd.inputs[:, :, -4:, -4:], trigger.expand(12, 1, 4, 4))
    assert torch.equal(pd.inputs[:, :, :-4, :], train.inputs[torch.from_numpy(pd.indices)][:, :, :-4, :])
    restored = Trojan(cfg, seed=0)  # a cache hit: a new attack object, the info from the cache
    restored.restore(info)
    test = tiny_images(12, seed=5)
    assert torch.equal(restored.apply_trigger(test.inputs), attack.apply_trigger(test.inputs))
    assert torch.equal(restored.triggered_test(test)[0].inputs, attack.triggered_test(test)[0].inputs)
    with pytest.raises(ValueError, match="trigger"):
        Trojan(cfg).restore({})


# -- dirty-label rate, all dirty-label attacks ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["badnets", "blended", "wanet", "trojan"])
def test_dirty_label_attacks_relabel_exactly_the_rate_to_the_target(name: str) -> None:
    train = tiny_images(48)
    entry = REGISTRY.get("attack", name)
    attack = entry.obj(entry.config(poison_rate=0.25, target=3), 0)
    if name == "trojan":  # a given trigger instead of the surrogate's, as after a cache hit
        attack.restore({"trigger": torch.full((1, 4, 4), 77, dtype=torch.uint8).tolist()})
    pd = attack.poison_dataset(tiny_ctx(train))
    noise = attack.noise_indices if name == "wanet" else np.zeros(0, dtype=np.int64)  # WaNet's keep their labels
    rows = np.flatnonzero(~np.isin(pd.indices, noise))
    backdoor = pd.indices[rows]
    assert len(backdoor) == 12 == round(0.25 * 48)
    assert (pd.labels[rows] == 3).all()
    chosen = train.inputs[torch.from_numpy(backdoor)]
    assert torch.equal(pd.inputs[torch.from_numpy(rows)], attack.apply_trigger(chosen))
    mat = pd.materialize()
    assert (mat.labels[backdoor] == 3).all()
    untouched = ~pd.is_poisoned()
    assert np.array_equal(mat.labels[untouched], train.labels[untouched])


# -- end to end --------------------------------------------------------------------------------------------
E2E = {
    "badnets": BadNetsConfig(poison_rate=0.25),
    "badnets_all_to_all": BadNetsConfig(poison_rate=0.25, all_to_all=True),
    "blended": BlendedConfig(poison_rate=0.25),
    "wanet": WaNetConfig(poison_rate=0.125),
    "label_consistent": LabelConsistentConfig(poison_rate=0.2, steps=2),
    "sig": SIGConfig(poison_rate=0.2),
    "trojan": TrojanConfig(poison_rate=0.25, trigger_steps=5),
}


@pytest.mark.parametrize("key", list(E2E))
def test_run_end_to_end(key: str, tmp_path: Path) -> None:
    cfg = E2E[key]
    attack = REGISTRY.get("attack", cfg.name).obj(cfg, 0)
    attack.check(K)
    train, test = tiny_images(48), tiny_images(16, seed=7)
    result = attack.run(tiny_ctx(train))
    assert isinstance(result.model, VisionClassifier) and not result.model.training
    pd = result.poisoned
    assert isinstance(pd, PoisonedDataset) and pd.clean is train and len(pd.indices) > 0
    assert pd.inputs.dtype == torch.uint8 and pd.inputs.shape[1:] == train.inputs.shape[1:]
    assert json.dumps(result.info) and result.info["poisoned_samples"] == len(pd.indices)
    pd.save_delta(tmp_path / "poison.safetensors")  # stored as a delta over the clean set
    back = PoisonedDataset.load_delta(train, tmp_path / "poison.safetensors")
    assert torch.equal(back.inputs, pd.inputs) and np.array_equal(back.labels, pd.labels)
    triggered, idx = attack.triggered_test(test)
    preds = result.model.predict(triggered.inputs)
    tgt = attack.target_labels(triggered.labels)
    assert len(preds) == len(idx) == len(tgt) and 0.0 <= attack_success_rate(preds, tgt) <= 1.0
    again = REGISTRY.get("attack", cfg.name).obj(cfg, 0)
    again.restore(result.info)
    again.check(K)
    assert torch.equal(again.triggered_test(test)[0].inputs, triggered.inputs)  # deterministic test trigger
    rerun = again.poison_dataset(tiny_ctx(train)) if key not in ("label_consistent", "trojan") else None
    if rerun is not None:  # poisoning is deterministic given the config and the seed
        assert np.array_equal(rerun.indices, pd.indices) and torch.equal(rerun.inputs, pd.inputs)


def test_poison_selection_streams_are_seeded() -> None:
    a = BadNets(BadNetsConfig(), seed=0).rng(SALT_POISON).integers(1 << 30)
    b = BadNets(BadNetsConfig(), seed=0).rng(SALT_POISON).integers(1 << 30)
    assert a == b


def test_trigger_size_is_checked_against_the_images() -> None:
    """A patch or corner trigger that cannot fit the data's images is a ConfigError (exit 2), checked before training
    (the pipeline calls check_image_size; the CLI side is in tests/test_errors.py)."""
    from backdoorbench.config import ConfigError

    BadNets(BadNetsConfig(size=28)).check_image_size(28, 28)
    with pytest.raises(ConfigError, match=r"attack.size=29 does not fit this dataset's 28x28 images .* at most 28"):
        BadNets(BadNetsConfig(size=29)).check_image_size(28, 28)
    with pytest.raises(ConfigError, match=r"at most 3 fits at attack.offset=\[1, 25\]"):
        BadNets(BadNetsConfig(size=4, offset=[1, 25])).check_image_size(28, 28)
    Trojan(TrojanConfig()).check_image_size(28, 28)
    with pytest.raises(ConfigError, match=r"attack.size=null \(7% of the image area: 7 pixels\) does not fit"):
        Trojan(TrojanConfig(margin=22)).check_image_size(28, 28)
    LabelConsistent(LabelConsistentConfig()).check_image_size(6, 6)
    with pytest.raises(ConfigError, match=r"attack.trigger=all_corners: .* at least 6x6, got 5x5"):
        LabelConsistent(LabelConsistentConfig()).check_image_size(5, 5)
