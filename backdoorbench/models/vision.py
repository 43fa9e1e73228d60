"""Vision victims: the CIFAR networks of the backdoor literature and any timm model, behind the modality
interface (:class:`~backdoorbench.modality.vision.VisionClassifier`).

Registered names:

* ``resnet18`` -- CIFAR-style ResNet-18 (3×3 stride-1 stem, no max-pool, BasicBlocks [2, 2, 2, 2]) as in
  kuangliu/pytorch-cifar and the DBD code; stages ``layer1`` .. ``layer4`` (64/128/256/512 channels);
* ``preact_resnet18`` -- PreAct-ResNet-18 as in BackdoorBench's ``models/preact_resnet.py`` (no BN/ReLU
  after the last stage, as there); stages ``layer1`` .. ``layer4``;
* ``wrn16_1`` -- WideResNet-16-1 (Zagoruyko & Komodakis 2016) as used by NAD, dropout 0; stages
  ``block1`` .. ``block3`` (16/32/64 channels);
* ``timm`` and, through a resolver, ``timm:<any timm model name>`` -- ``timm.create_model`` with the
  dataset's channels and classes (and its image size for models that take ``img_size``, e.g. ViTs).

The CIFAR variants are written by hand in :mod:`backdoorbench.models.cifar_nets`:
torchvision and timm only ship the ImageNet versions (7×7 stride-2 stem and max-pool, which throw away most
of a 32×32 image). Each net ends with adaptive average pooling, so 28×28 (MNIST), 32×32 (CIFAR) and larger
inputs all work. They also follow timm's small interface (``forward_features`` = last feature map,
``forward_head``, ``num_features``, ``get_classifier``, ``reset_classifier``), so code that needs the backbone
(DBD) treats both alike.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from backdoorbench.modality.base import Batch
from backdoorbench.modality.vision import ImageSpec, VisionClassifier
from backdoorbench.models.cifar_nets import cifar_resnet18, preact_resnet18, wrn16_1, wrn16_2
from backdoorbench.registry import REGISTRY, Entry, UnknownNameError, register_model

TIMM_PREFIX = "timm:"
# timm names that are not in timm's model table but that create_model understands (hub / local weights)
_TIMM_SOURCE_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")


# -- configs ----------------------------------------------------------------------------------------
def _check_crop_padding(crop_padding: int | None) -> None:
    if crop_padding is not None and not 0 <= crop_padding <= 64:
        raise ValueError(
            f"model.crop_padding must be null (image height / 8) or an integer in [0, 64], got {crop_padding}"
        )


@dataclass
class VisionModelConfig:
    """Parameters of a built-in vision victim (``model.*``)."""

    name: str = "resnet18"
    augment: bool = True  # random crop + horizontal flip (where the data allows it) in training steps
    crop_padding: int | None = None  # zero padding of the random crop; null = image height / 8 (4 for 32 px)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("model.name must name a vision model, e.g. resnet18, preact_resnet18 or wrn16_1")
        _check_crop_padding(self.crop_padding)


@dataclass
class TimmModelConfig:
    """Parameters of a timm victim (``model=timm:<name>``)."""

    name: str = "timm:resnet18"  # timm:<any timm model name>
    pretrained: bool = False  # ImageNet weights: needs a network (or a filled HF cache)
    augment: bool = True
    crop_padding: int | None = None
    stages: list[str] = field(default_factory=list)  # modules giving per-layer features; [] = timm's feature_info

    def __post_init__(self) -> None:
        if timm_model_name(self.name) in ("", "timm"):
            raise ValueError(f"model.name must be timm:<timm model name>, e.g. timm:resnet18; got {self.name!r}")
        _check_crop_padding(self.crop_padding)
        bad = [s for s in self.stages if not isinstance(s, str) or not s]
        if bad:
            raise ValueError(f"model.stages must be module names (e.g. layer1, stages.0), got {bad}")


RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")
WRN_STAGES = ("block1", "block2", "block3")


def _wrap(
    net: nn.Module, cfg: VisionModelConfig, num_classes: int, image: ImageSpec, stages: Sequence[str]
) -> VisionClassifier:
    return VisionClassifier(net, num_classes, image, stages, augment=cfg.augment, crop_padding=cfg.crop_padding)


@register_model(
    "resnet18",
    modality="vision",
    category="cnn",
    description="CIFAR ResNet-18 (3x3 stem, no max-pool; 11.2M params), as in DBD / pytorch-cifar",
    config=VisionModelConfig,
)
def create_resnet18(cfg: VisionModelConfig, num_classes: int, image: ImageSpec) -> VisionClassifier:
    return _wrap(cifar_resnet18(num_classes, image.channels), cfg, num_classes, image, RESNET_STAGES)


@register_model(
    "preact_resnet18",
    modality="vision",
    category="cnn",
    description="PreAct-ResNet-18 (11.2M params), as in BackdoorBench",
    config=VisionModelConfig,
)
def create_preact_resnet18(cfg: VisionModelConfig, num_classes: int, image: ImageSpec) -> VisionClassifier:
    return _wrap(preact_resnet18(num_classes, image.channels), cfg, num_classes, image, RESNET_STAGES)


@register_model(
    "wrn16_1",
    modality="vision",
    category="cnn",
    description="WideResNet-16-1 (0.18M params), as in NAD",
    config=VisionModelConfig,
)
def create_wrn16_1(cfg: VisionModelConfig, num_classes: int, image: ImageSpec) -> VisionClassifier:
    return _wrap(wrn16_1(num_classes, image.channels), cfg, num_classes, image, WRN_STAGES)


@register_model(
    "wrn16_2",
    modality="vision",
    category="cnn",
    description="WideResNet-16-2 (0.69M params, 912 BatchNorm channels): the CPU reference net for RNP",
    config=VisionModelConfig,
)
def create_wrn16_2(cfg: VisionModelConfig, num_classes: int, image: ImageSpec) -> VisionClassifier:
    return _wrap(wrn16_2(num_classes, image.channels), cfg, num_classes, image, WRN_STAGES)


# -- timm ---------------------------------------------------------------------------------------------
LAYOUTS = ("NCHW", "NHWC", "NLC", "NC")


class UnknownTimmModelError(UnknownNameError, ValueError):
    """A ``timm:<name>`` that timm does not know; the message lists close matches."""


def timm_model_name(name: str) -> str:
    """``"timm:resnet18"`` → ``"resnet18"`` (a bare name is kept)."""
    return name[len(TIMM_PREFIX) :] if name.startswith(TIMM_PREFIX) else name


def check_timm_name(name: str) -> str:
    """The timm name inside ``name``; raises :class:`UnknownTimmModelError` listing close matches when timm
    has no such model (pretrained tags like ``resnet18.a1_in1k`` and ``hf-hub:`` names are accepted)."""
    import timm

    bare = timm_model_name(name)
    if bare.startswith(_TIMM_SOURCE_PREFIXES) or timm.is_model(bare):
        return bare
    core = bare.split(".")[0]
    close = difflib.get_close_matches(core, timm.list_models(), n=5, cutoff=0.6)
    for m in timm.list_models(f"*{core}*") if core else []:
        if m not in close:
            close.append(m)
    close = close[:10]
    hint = f" Close matches: {', '.join(TIMM_PREFIX + m for m in close)}." if close else ""
    stem = re.match(r"[A-Za-z]*", core).group(0) or "resnet"  # type: ignore[union-attr]
    raise UnknownTimmModelError(
        f"unknown timm model {bare!r}.{hint} List timm models with "
        f"python -c \"import timm; print(timm.list_models('*{stem}*'))\"."
    )


def _stage_layout(t: torch.Tensor, channels: int | None, net_fmt: str) -> str:
    """How a stage output is laid out: NCHW / NHWC maps, NLC tokens or flat NC vectors."""
    if t.dim() == 2:
        return "NC"
    if t.dim() == 3:
        return "NLC"
    if t.dim() != 4:
        raise ValueError(f"a stage output must be 2-, 3- or 4-dimensional, got shape {tuple(t.shape)}")
    c_first, c_last = t.shape[1] == channels, t.shape[-1] == channels
    if channels is None or c_first == c_last:  # unknown width or ambiguous (e.g. [B, 8, 8, 8])
        return "NHWC" if net_fmt == "NHWC" else "NCHW"
    return "NHWC" if c_last else "NCHW"


def to_nchw(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A stage output as a channels-first map: NHWC → NCHW; tokens ``[B, N, D]`` → ``[B, D, 1, N]`` (every
    token, prefix tokens included, is one position); NCHW and flat ``[B, C]`` are kept."""
    if layout == "NHWC":
        return t.permute(0, 3, 1, 2)
    if layout == "NLC":
        return t.transpose(1, 2).unsqueeze(2)
    return t


class TimmVisionClassifier(VisionClassifier):
    """A :class:`VisionClassifier` whose stage outputs may be channels-last maps (Swin, MambaOut, ...)
    or token sequences (ViT, DeiT, ...): ``forward_features`` turns them into channels-first maps
    (``pooling="none"``) before global-average pooling, so defenses see ``[B, C, H, W]`` / ``[B, C]``
    everywhere. ``stage_layouts`` (one of :data:`LAYOUTS` per stage) is found by one probe pass at build
    time."""

    source: str  # the timm model it was built from ("timm/<name>"), set by the builder below

    def __init__(self, *args: Any, stage_layouts: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        layouts = list(stage_layouts) if stage_layouts is not None else ["NCHW"] * len(self.stage_names)
        bad = [x for x in layouts if x not in LAYOUTS]
        if len(layouts) != len(self.stage_names) or bad:
            raise ValueError(f"stage_layouts must give one of {LAYOUTS} per stage, got {layouts}")
        self.stage_layouts = layouts

    def forward_features(self, batch: Batch, pooling: str = "avg") -> tuple[torch.Tensor, list[torch.Tensor]]:
        logits, raw = super().forward_features(batch, pooling="none")
        maps = [to_nchw(f, layout) for f, layout in zip(raw, self.stage_layouts, strict=True)]
        if pooling == "none":
            return logits, maps
        return logits, [f.mean(dim=(2, 3)) if f.dim() == 4 else f.flatten(1) for f in maps]


def _auto_stages(net: nn.Module) -> list[tuple[str, int | None]]:
    """(module name, channels) of timm's ``feature_info`` stages, without the stem outputs (reduction ≤ 2)
    when later stages exist."""
    info = getattr(net, "feature_info", None)
    if info is None:
        return []
    if hasattr(info, "module_name") and hasattr(info, "get_dicts"):  # a FeatureInfo object
        dicts = list(info.get_dicts())
    else:
        dicts = [dict(d) for d in info]
    stages = [(str(d["module"]), d.get("num_chs"), int(d.get("reduction", 0) or 0)) for d in dicts if d.get("module")]
    body = [s for s in stages if s[2] > 2]
    return [(name, chans) for name, chans, _ in (body or stages)]


def _create_timm_net(bare: str, cfg: TimmModelConfig, num_classes: int, image: ImageSpec) -> nn.Module:
    import timm

    kwargs: dict[str, Any] = {"pretrained": cfg.pretrained, "num_classes": num_classes, "in_chans": image.channels}
    try:
        try:
            return timm.create_model(bare, img_size=(image.height, image.width), **kwargs)
        except TypeError as exc:  # the model has no img_size argument (CNNs)
            if "img_size" not in str(exc):
                raise
            return timm.create_model(bare, **kwargs)
    except UnknownNameError:
        raise
    except Exception as exc:
        if cfg.pretrained:
            raise FileNotFoundError(
                f"could not load pretrained weights for timm model {bare!r}: {str(exc).rstrip('.')}. "
                "Pretrained weights need a network (or a filled HuggingFace cache); set model.pretrained=false "
                "to train from scratch."
            ) from exc
        raise ValueError(
            f"timm could not build {bare!r} for {image.channels}x{image.height}x{image.width} images and "
            f"{num_classes} classes: {exc}"
        ) from exc


def build_timm(cfg: TimmModelConfig, num_classes: int, image: ImageSpec) -> TimmVisionClassifier:
    """Any timm model as a vision victim; stages from ``cfg.stages`` or timm's ``feature_info``."""
    bare = check_timm_name(cfg.name)
    net = _create_timm_net(bare, cfg, num_classes, image)
    auto = _auto_stages(net)
    widths = dict(auto)
    stages = list(cfg.stages) or [name for name, _ in auto]
    if not stages:
        raise ValueError(
            f"timm model {bare!r} has no feature_info to take stages from; name them with "
            "model.stages=[...] (module names from model.named_modules())"
        )
    modules = dict(net.named_modules())
    missing = [s for s in stages if s not in modules]
    if missing:
        close = {s: difflib.get_close_matches(s, list(modules), n=3) for s in missing}
        raise ValueError(f"model.stages: no module(s) {missing} in timm model {bare!r}; close names: {close}")

    # one probe pass (eval mode, no gradients) finds each stage's layout and checks the image size works
    captured: list[torch.Tensor] = []
    hooks = [
        modules[s].register_forward_hook(
            lambda _m, _i, out: captured.append(out[0] if isinstance(out, (tuple, list)) else out)
        )
        for s in stages
    ]
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(torch.zeros(1, image.channels, image.height, image.width))
    except Exception as exc:
        raise ValueError(f"timm model {bare!r} cannot run on {image.height}x{image.width} images: {exc}") from exc
    finally:
        for h in hooks:
            h.remove()
        net.train(was_training)
    if len(captured) != len(stages):
        raise ValueError(
            f"timm model {bare!r}: stages {stages} produced {len(captured)} outputs in one pass (each stage "
            "module must run exactly once per forward)"
        )
    net_fmt = getattr(net, "output_fmt", "NCHW")
    net_fmt = str(getattr(net_fmt, "value", net_fmt))  # a string or timm's Format enum
    layouts = [_stage_layout(t, widths.get(s), net_fmt) for t, s in zip(captured, stages, strict=True)]
    model = TimmVisionClassifier(
        net,
        num_classes,
        image,
        stages,
        augment=cfg.augment,
        crop_padding=cfg.crop_padding,
        stage_layouts=layouts,
    )
    model.source = f"{TIMM_PREFIX}{bare}"
    return model


@register_model(
    "timm",
    modality="vision",
    category="timm",
    description="any timm model: model=timm:<name> (e.g. timm:resnet18, timm:vit_tiny_patch16_224)",
    config=TimmModelConfig,
)
def create_timm(cfg: TimmModelConfig, num_classes: int, image: ImageSpec) -> TimmVisionClassifier:
    return build_timm(cfg, num_classes, image)


def _resolve_timm(name: str) -> Entry | None:
    if not name.startswith(TIMM_PREFIX):
        return None
    bare = check_timm_name(name)  # unknown names fail here, with close matches
    return Entry("model", name, create_timm, ("vision",), "timm", "", f"timm model {bare}", TimmModelConfig)


REGISTRY.add_resolver("model", "timm:<any timm model name>", _resolve_timm)
