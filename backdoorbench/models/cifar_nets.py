"""The hand-written CIFAR networks of the backdoor literature, as plain ``nn.Module`` s.

torchvision and timm only ship the ImageNet versions (7×7 stride-2 stem and max-pool, which throw away most of
a 32×32 image), so these are written here: CIFAR ResNet-18 (kuangliu/pytorch-cifar, DBD), PreAct-ResNet-18
(BackdoorBench) and WideResNet-16-k (Zagoruyko & Komodakis 2016, NAD). Each ends with adaptive average pooling
and follows timm's small backbone/head interface (``forward_features``, ``forward_head``, ``num_features``,
``get_classifier``, ``reset_classifier``). :mod:`backdoorbench.models.vision` registers them as victims.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BasicBlock", "CifarResNet", "PreActBlock", "PreActResNet", "WideBasic", "NetworkBlock", "WideResNet",
    "cifar_resnet18", "preact_resnet18", "wrn16_1", "wrn16_2",
]


# -- CIFAR ResNet-18 (kuangliu/pytorch-cifar, DBD) ----------------------------------------------------
class _TimmLikeHead(nn.Module):
    """timm's small backbone/head interface for the hand-written nets (the head module is ``head_attr``)."""

    head_attr = "linear"
    num_features: int
    in_planes: int  # the next block's input channels, while the stages are built
    avgpool: nn.Module

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else getattr(self, self.head_attr)(x)

    def _stages_and_head(self, block: type[nn.Module], num_blocks: Sequence[int], num_classes: int) -> None:
        """The four stages at 64/128/256/512 channels (strides 1, 2, 2, 2), pooling and the linear head, built
        after the stem in this order (the order of their random initialisation); the ResNets below share it."""
        self.layer1 = self._make_layer(block, 64, num_blocks[0], 1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], 2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], 2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = 512 * block.expansion  # type: ignore[attr-defined]
        self.linear = nn.Linear(self.num_features, num_classes)

    def _make_layer(self, block: type[nn.Module], planes: int, n: int, stride: int) -> nn.Sequential:
        """One stage: ``n`` blocks, the first with ``stride`` (the ResNets below share it)."""
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion  # type: ignore[attr-defined]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return getattr(self, self.head_attr)

    def reset_classifier(self, num_classes: int) -> None:
        setattr(self, self.head_attr, nn.Linear(self.num_features, num_classes))


class BasicBlock(nn.Module):
    """Post-activation residual block: conv-BN-ReLU-conv-BN, plus a 1×1 conv-BN projection shortcut when
    the shape changes, then ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(_TimmLikeHead):
    """ResNet for small images: 3×3 stride-1 stem conv + BN + ReLU, no max-pool, four stages of
    ``block`` at 64/128/256/512 channels (strides 1, 2, 2, 2), global average pooling, linear head."""

    def __init__(
        self, block: type[nn.Module], num_blocks: Sequence[int], num_classes: int = 10, in_channels: int = 3
    ) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self._stages_and_head(block, num_blocks, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(out))))


# -- PreAct-ResNet-18 (BackdoorBench models/preact_resnet.py) -----------------------------------------
class PreActBlock(nn.Module):
    """Pre-activation block (He et al. 2016b): BN-ReLU-conv-BN-ReLU-conv; the projection shortcut (1×1
    conv, no BN) takes the pre-activated input."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class PreActResNet(_TimmLikeHead):
    """PreAct-ResNet as in BackdoorBench: 3×3 stride-1 stem conv (no BN/ReLU: the first block
    pre-activates), four stages, adaptive average pooling, linear head; no final BN-ReLU."""

    def __init__(
        self, block: type[nn.Module], num_blocks: Sequence[int], num_classes: int = 10, in_channels: int = 3
    ) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self._stages_and_head(block, num_blocks, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(out))))


# -- WRN-16-1 (Zagoruyko & Komodakis; NAD's wresnet.py) ----------------------------------------------
class WideBasic(nn.Module):
    """Pre-activation wide block; when the width or stride changes, the pre-activated input feeds both
    the residual branch and a 1×1 conv shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.conv_shortcut = (
            None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(pre)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(pre)
        return shortcut + out


class NetworkBlock(nn.Module):
    """A group of ``n`` wide blocks (``layer``), the first with ``stride``."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasic(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(n)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(_TimmLikeHead):
    """WRN-d-k: 3×3 stem conv (16 channels), three groups of (d-4)/6 wide blocks at 16k/32k/64k channels
    (strides 1, 2, 2), final BN-ReLU, adaptive average pooling, linear head ``fc``. He-normal (fan-out)
    conv init, BN weight 1 / bias 0, zero linear bias, as in NAD's code."""

    head_attr = "fc"

    def __init__(
        self,
        depth: int = 16,
        widen_factor: int = 1,
        num_classes: int = 10,
        in_channels: int = 3,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n + 4 (10, 16, 22, 28, ...), got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, ch[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = ch[3]
        self.fc = nn.Linear(ch[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.relu(self.bn1(out))


def cifar_resnet18(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels)


def preact_resnet18(num_classes: int = 10, in_channels: int = 3) -> PreActResNet:
    return PreActResNet(PreActBlock, (2, 2, 2, 2), num_classes, in_channels)


def wrn16_1(num_classes: int = 10, in_channels: int = 3) -> WideResNet:
    return WideResNet(16, 1, num_classes, in_channels, drop_rate=0.0)


def wrn16_2(num_classes: int = 10, in_channels: int = 3) -> WideResNet:
    return WideResNet(16, 2, num_classes, in_channels, drop_rate=0.0)
