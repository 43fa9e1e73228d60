"""Vision victims: the hand-written CIFAR nets (shapes, parameter counts, per-stage features from one
pass, augmentation), their configs, and timm models through ``timm:<name>`` (registry resolver, automatic
stages, channels-last and token stage outputs, clear errors)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from backdoorbench.config import ConfigError, component_config
from backdoorbench.modality.vision import ImageSpec, VisionClassifier
from backdoorbench.models.vision import (
    TimmModelConfig,
    TimmVisionClassifier,
    UnknownTimmModelError,
    VisionModelConfig,
    create_preact_resnet18,
    create_resnet18,
    create_timm,
    create_wrn16_1,
    create_wrn16_2,
    to_nchw,
)
from backdoorbench.registry import REGISTRY, UnknownNameError

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"
CNN_STAGES = {
    "resnet18": (["layer1", "layer2", "layer3", "layer4"], [64, 128, 256, 512]),
    "preact_resnet18": (["layer1", "layer2", "layer3", "layer4"], [64, 128, 256, 512]),
    "wrn16_1": (["block1", "block2", "block3"], [16, 32, 64]),
    "wrn16_2": (["block1", "block2", "block3"], [32, 64, 128]),
}
# parameters with 10 classes and 3 input channels (the published CIFAR-10 figures)
PARAMS = {"resnet18": 11_173_962, "preact_resnet18": 11_171_146, "wrn16_1": 175_066, "wrn16_2": 691_674}


def spec(channels: int = 3, size: int = 32, flip: bool = True) -> ImageSpec:
    return ImageSpec(channels, size, size, (0.5,) * channels, (0.25,) * channels, flip=flip)


def build(name: str, num_classes: int = 10, image: ImageSpec | None = None, **cfg) -> VisionClassifier:
    entry = REGISTRY.get("model", name)
    config = entry.config(name=name, **cfg)
    return entry.obj(config, num_classes, image=image or spec())


def pixels(model: VisionClassifier, n: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = model.image
    return model.collate(
        torch.randint(0, 256, (n, img.channels, img.height, img.width), dtype=torch.uint8, generator=g)
    )


class CallCounter:
    """Counts forward calls of a module."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, *_: object) -> None:
        self.calls += 1


# -- the hand-written CIFAR nets ------------------------------------------------------------------------
def test_registered_with_metadata() -> None:
    for name, factory in (
        ("resnet18", create_resnet18),
        ("preact_resnet18", create_preact_resnet18),
        ("wrn16_1", create_wrn16_1),
        ("wrn16_2", create_wrn16_2),
        ("timm", create_timm),
    ):
        e = REGISTRY.get("model", name)
        assert e.obj is factory and e.modality == ("vision",) and e.source == "builtin"
        assert e.config is (TimmModelConfig if name == "timm" else VisionModelConfig)
        assert name in REGISTRY.names("model")
    assert not REGISTRY.get("model", "resnet18").supports("text")


@pytest.mark.parametrize("name", list(CNN_STAGES))
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32), (3, 28), (1, 32)])
def test_factories_build_and_give_logits(name: str, channels: int, size: int) -> None:
    model = build(name, num_classes=7, image=spec(channels, size))
    assert isinstance(model, VisionClassifier) and model.modality == "vision" and model.num_classes == 7
    assert model.net.conv1.in_channels == channels
    logits = model(pixels(model, n=2))
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    assert model.layer_names() == CNN_STAGES[name][0]


def test_larger_images_work() -> None:
    model = build("wrn16_1", image=spec(3, 64))
    assert model(pixels(model)).shape == (2, 10)


@pytest.mark.parametrize("name", list(CNN_STAGES))
def test_parameter_counts(name: str) -> None:
    model = build(name, num_classes=10)
    n = sum(p.numel() for p in model.parameters())
    assert n == PARAMS[name]
    # the head follows the class count; a 1-channel stem has a third of the 3x3 stem filters' inputs
    assert sum(p.numel() for p in build(name, num_classes=43).parameters()) - n == 33 * (model.net.num_features + 1)
    gray = sum(p.numel() for p in build(name, image=spec(1, 28)).parameters())
    assert n - gray == 2 * 9 * model.net.conv1.out_channels


@pytest.mark.parametrize("name", list(CNN_STAGES))
def test_forward_features_one_pass(name: str) -> None:
    stages, widths = CNN_STAGES[name]
    model = build(name).eval()
    batch = pixels(model, n=3)
    counter = CallCounter(model.net)
    stage_counters = [CallCounter(m) for m in model.stage_modules()]
    logits, feats = model.forward_features(batch)
    assert counter.calls == 1 and all(c.calls == 1 for c in stage_counters)
    assert [tuple(f.shape) for f in feats] == [(3, w) for w in widths]
    torch.testing.assert_close(logits, model(batch))
    # raw maps: channels and halving resolutions, pooled = their spatial mean; hooks are removed afterwards
    _, maps = model.forward_features(batch, pooling="none")
    assert [m.shape[1] for m in maps] == widths
    assert [m.shape[-1] for m in maps] == [32 // 2**i for i in range(len(widths))]
    for m, f in zip(maps, feats, strict=True):
        torch.testing.assert_close(m.mean(dim=(2, 3)), f)
    counter.calls = 0
    model(batch)
    assert counter.calls == 1 and all(len(m._forward_hooks) == 0 for m in model.stage_modules())


def test_features_carry_gradients_for_nad() -> None:
    model = build("wrn16_1").train()
    batch = pixels(model)
    batch["pixels"].requires_grad_(True)
    logits, maps = model.forward_features(batch, pooling="none")
    (sum(m.pow(2).mean() for m in maps) + logits.sum()).backward()
    assert batch["pixels"].grad is not None and batch["pixels"].grad.abs().sum() > 0
    assert model.net.block1.layer[0].conv1.weight.grad is not None


def test_timm_like_backbone_interface() -> None:
    for name, head in (("resnet18", "linear"), ("preact_resnet18", "linear"), ("wrn16_1", "fc")):
        model = build(name).eval()
        x = model.normalize(pixels(model)["pixels"])
        net = model.net
        assert net.get_classifier() is getattr(net, head)
        emb = net.forward_head(net.forward_features(x), pre_logits=True)
        assert emb.shape == (2, net.num_features)
        torch.testing.assert_close(net.get_classifier()(emb), net(x))
        net.reset_classifier(3)
        assert net(x).shape == (2, 3)


def test_wrn_rejects_bad_depth() -> None:
    from backdoorbench.models.cifar_nets import WideResNet

    with pytest.raises(ValueError, match="6n \\+ 4"):
        WideResNet(depth=15)


def test_normalisation_inside_the_model() -> None:
    model = build("resnet18").eval()
    batch = pixels(model)
    shifted = ImageSpec(3, 32, 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    other = VisionClassifier(model.net, 10, shifted, ["layer1"])
    assert not torch.allclose(model(batch), other(batch))
    torch.testing.assert_close(model(batch), model.net((batch["pixels"] - 0.5) / 0.25))


# -- augmentation and configs --------------------------------------------------------------------------
def test_augmentation_keeps_shape_and_changes_images() -> None:
    torch.manual_seed(0)
    model = build("resnet18")
    batch = pixels(model, n=8)
    out = model.augment(batch)["pixels"]
    assert out.shape == batch["pixels"].shape and out.dtype == batch["pixels"].dtype
    assert not torch.equal(out, batch["pixels"])
    assert model.crop_padding == 4  # 32 / 8
    assert build("resnet18", image=spec(1, 28)).crop_padding == 4  # round(28 / 8)
    # the config switches it off, or changes the padding
    plain = build("resnet18", augment=False)
    assert plain.augment(batch)["pixels"] is batch["pixels"]
    assert build("wrn16_1", crop_padding=2).crop_padding == 2


@pytest.mark.parametrize("file", ["resnet18", "preact_resnet18", "wrn16_1", "wrn16_2", "timm"])
def test_config_files_match_their_dataclass(file: str) -> None:
    node = OmegaConf.load(CONFIGS / f"{file}.yaml")
    entry = REGISTRY.get("model", str(node.name))
    cfg = component_config(entry, node, "model")
    assert cfg == entry.config(name=str(node.name))  # the YAML states the defaults
    if file == "timm":
        assert cfg.name == "timm:resnet18" and cfg.stages == [] and cfg.pretrained is False


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="crop_padding"):
        VisionModelConfig(crop_padding=-1)
    with pytest.raises(ValueError, match="model.name"):
        VisionModelConfig(name="")
    with pytest.raises(ValueError, match="timm:<timm model name>"):
        TimmModelConfig(name="timm:")
    with pytest.raises(ValueError, match="model.stages"):
        TimmModelConfig(stages=[""])
    entry = REGISTRY.get("model", "wrn16_1")
    with pytest.raises(ConfigError, match="unknown key.*'depth'.*Valid keys: name, augment, crop_padding"):
        component_config(entry, {"name": "wrn16_1", "depth": 28}, "model")
    with pytest.raises(ConfigError, match="augment"):
        component_config(entry, {"name": "wrn16_1", "augment": "sometimes"}, "model")


# -- timm ----------------------------------------------------------------------------------------------
def test_timm_resolver_builds_the_named_model() -> None:
    entry = REGISTRY.get("model", "timm:resnet18")
    assert entry.name == "timm:resnet18" and entry.obj is create_timm and entry.config is TimmModelConfig
    assert entry.modality == ("vision",)
    assert "timm:resnet18" not in REGISTRY.names("model")  # resolved, not registered
    assert "timm:<any timm model name>" in REGISTRY.patterns("model")
    model = entry.obj(entry.config(name=entry.name), 5, image=spec(1, 28))
    assert isinstance(model, TimmVisionClassifier) and type(model.net).__name__ == "ResNet"
    assert model.net.conv1.in_channels == 1 and model.net.fc.out_features == 5
    assert model.stage_names == ["layer1", "layer2", "layer3", "layer4"]  # the stem (act1) left out
    assert model.stage_layouts == ["NCHW"] * 4
    batch = pixels(model.eval())
    counter = CallCounter(model.net)
    logits, feats = model.forward_features(batch)
    assert counter.calls == 1 and logits.shape == (2, 5)
    assert [f.shape[1] for f in feats] == [64, 128, 256, 512]
    torch.testing.assert_close(logits, model(batch))


def test_timm_vit_gets_the_image_size_and_token_features() -> None:
    model = build("timm:test_vit", num_classes=4, image=spec(3, 32)).eval()
    assert model.net.patch_embed.img_size == (32, 32)
    assert model.stage_names == [f"blocks.{i}" for i in range(6)] and set(model.stage_layouts) == {"NLC"}
    batch = pixels(model)
    logits, feats = model.forward_features(batch)
    _, maps = model.forward_features(batch, pooling="none")
    torch.testing.assert_close(logits, model(batch))
    assert logits.shape == (2, 4) and len(feats) == 6
    tokens = 1 + (32 // 16) ** 2  # class token + 2x2 patches
    assert all(m.shape == (2, 64, 1, tokens) for m in maps) and all(f.shape == (2, 64) for f in feats)
    torch.testing.assert_close(feats[0], maps[0].mean(dim=(2, 3)))


def test_timm_non_resnet_and_channels_last_stages() -> None:
    mobile = build("timm:mobilenetv3_small_050", num_classes=3, image=spec(1, 32))
    assert mobile.stage_names[0] != "bn1" and mobile.stage_layouts == ["NCHW"] * len(mobile.stage_names)
    assert mobile(pixels(mobile)).shape == (2, 3)
    # MambaOut's stages return [B, H, W, C]: features are channels-first all the same
    nhwc = build("timm:test_mambaout", image=spec(3, 32)).eval()
    assert set(nhwc.stage_layouts) == {"NHWC"}
    batch = pixels(nhwc)
    logits, feats = nhwc.forward_features(batch)
    _, maps = nhwc.forward_features(batch, pooling="none")
    widths = [d["num_chs"] for d in nhwc.net.feature_info]
    assert [f.shape for f in feats] == [(2, w) for w in widths]
    assert [m.shape[1] for m in maps] == widths and [m.shape[-1] for m in maps] == [8, 4, 2, 1]
    torch.testing.assert_close(logits, nhwc(batch))


def test_timm_explicit_stages_and_their_errors() -> None:
    model = build("timm:test_vit", stages=["blocks.1", "blocks.3"])
    assert model.layer_names() == ["blocks.1", "blocks.3"]
    with pytest.raises(ValueError, match="no module.*blocks.99"):
        build("timm:test_vit", stages=["blocks.99"])


def test_to_nchw() -> None:
    x = torch.arange(2 * 3 * 4 * 5.0).view(2, 3, 4, 5)
    assert to_nchw(x, "NCHW") is x
    assert torch.equal(to_nchw(x.permute(0, 2, 3, 1), "NHWC"), x)
    tokens = torch.randn(2, 7, 16)
    assert torch.equal(to_nchw(tokens, "NLC")[:, :, 0, :], tokens.transpose(1, 2))


def test_unknown_timm_name_lists_close_matches() -> None:
    with pytest.raises(UnknownTimmModelError, match=r"unknown timm model 'resnet1999'.*timm:resnet18") as info:
        REGISTRY.get("model", "timm:resnet1999")
    assert isinstance(info.value, UnknownNameError) and isinstance(info.value, ValueError)
    assert "list_models('*resnet*')" in str(info.value)
    with pytest.raises(UnknownTimmModelError, match="vit_tiny_patch16_224"):
        create_timm(TimmModelConfig(name="timm:vit_tiny_patch16_22"), 10, spec())
    # pretrained tags are timm names too
    assert REGISTRY.get("model", "timm:resnet18.a1_in1k").name == "timm:resnet18.a1_in1k"


def test_pretrained_offline_is_a_clear_error() -> None:
    with pytest.raises(FileNotFoundError, match="model.pretrained=false"):
        build("timm:test_vit", pretrained=True)


def test_cli_model_override_and_list(capsys: pytest.CaptureFixture[str]) -> None:
    from backdoorbench.cli import cmd_list, config_dir, rewrite_model_override

    cdir = config_dir()
    assert rewrite_model_override(["model=timm:test_vit", "model=wrn16_1"], cdir) == [
        "model=timm",
        "model.name='timm:test_vit'",
        "model=wrn16_1",
    ]
    assert cmd_list(["models"]) == 0
    out = capsys.readouterr().out
    for text in ("timm:<any timm model name>", "resnet18", "preact_resnet18", "wrn16_1", "timm"):
        assert text in out
