"""The vision side of the modality interface.

Images travel through the framework as ``uint8`` tensors ``[N, C, H, W]`` (``Samples.inputs``), so
poisoned datasets are stored exactly and triggers are applied in pixel space. A
:class:`VisionClassifier` wraps any ``nn.Module`` image network (CIFAR ResNets, timm models):

* ``collate`` turns uint8 images into ``{"pixels": float [B, C, H, W] in [0, 1]}``; a training loader's batches
  (``collate_host``) keep them uint8 until they are on the device: ``forward`` (and ``augment``, which moves
  pixels only) take uint8 pixels as well, converted there with the very arithmetic of ``collate``;
* ``forward`` normalises with the dataset's mean/std *inside* the model, so attacks and defenses that
  take gradients with respect to the input (label-consistent PGD, Trojan trigger optimisation) work in
  the natural [0, 1] pixel space;
* ``forward_features`` returns the logits and every stage output from the same pass (forward hooks on
  the named stage modules), global-average pooled (``pooling="none"`` keeps the maps, for NAD);
* ``augment`` is the standard training augmentation (random crop with zero padding, horizontal flip
  where the data allows it), applied on the batch by the Lightning module in training steps only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from backdoorbench.data.images import ImageArray
from backdoorbench.errors import DataError
from backdoorbench.modality.base import Batch, BatchTable, Classifier, take_rows


@dataclass(frozen=True)
class ImageSpec:
    """What a vision model needs to know about its data."""

    channels: int = 3
    height: int = 32
    width: int = 32
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    flip: bool = True  # horizontal flips are a valid augmentation (not for digits)
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean/std need {self.channels} values, got {self.mean} / {self.std}")


def to_float(images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """uint8 ``[B, C, H, W]`` (or a list of ``[C, H, W]``) → float32 in [0, 1]; float input is kept."""
    x = images if isinstance(images, torch.Tensor) else torch.stack(list(images))
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.float()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float in [0, 1] → uint8 (rounded, clamped)."""
    return images.clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)


def random_crop_flip(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image random crop after zero padding by ``pad`` pixels, and a random horizontal flip.

    Vectorised (one gather for the whole batch, on the batch's device); the random draws — the row offsets,
    the column offsets, then the flips, on the CPU generator — are the ones the per-image loop made, so the
    result is the same, bit for bit (``tests/test_trainer_settings.py``)."""
    b, _, h, w = x.shape
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
        c = x.shape[1]
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # [B, 1, h, 1]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # [B, 1, 1, w]
        batch = torch.arange(b, device=x.device)[:, None, None, None]
        chans = torch.arange(c, device=x.device)[None, :, None, None]
        # one gather; the result has the loop's plain strides (a permuted view would have other strides, and
        # a convolution may then take another kernel, with other rounding)
        x = padded[batch, chans, rows, cols]  # [B, C, h, w]
    if flip:
        mask = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return x


class VisionClassifier(Classifier):
    """An image network behind the modality interface; ``stages`` name the modules whose outputs are the
    per-layer features (in order, e.g. ``["layer1", "layer2", "layer3", "layer4"]``)."""

    modality = "vision"
    mean: torch.Tensor  # buffers [1, C, 1, 1]
    std: torch.Tensor

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        image: ImageSpec,
        stages: Sequence[str],
        augment: bool = True,
        crop_padding: int | None = None,
    ) -> None:
        super().__init__(num_classes)
        self.net = net
        self.image = image
        self.stage_names = list(stages)
        modules = dict(net.named_modules())
        missing = [s for s in self.stage_names if s not in modules]
        if missing:
            raise ValueError(f"stage module(s) {missing} not found in {type(net).__name__}")
        self.use_augment = augment
        # the usual CIFAR recipe pads 32×32 images by 4 pixels: scale with the image size
        self.crop_padding = crop_padding if crop_padding is not None else max(1, round(image.height / 8))
        self.register_buffer("mean", torch.tensor(image.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image.std).view(1, -1, 1, 1), persistent=False)

    def stage_modules(self) -> list[nn.Module]:
        modules = dict(self.net.named_modules())
        return [modules[s] for s in self.stage_names]

    def layer_names(self) -> list[str]:
        return list(self.stage_names)

    def collate(self, inputs: Sequence[torch.Tensor] | torch.Tensor) -> Batch:
        return {"pixels": to_float(inputs)}

    def collate_host(self, inputs: Sequence[torch.Tensor] | torch.Tensor) -> Batch:
        """The images as they are (uint8 stays uint8: a quarter of float32's bytes to copy to the device)."""
        return {"pixels": inputs if isinstance(inputs, torch.Tensor) else torch.stack(list(inputs))}

    def batch_table(self, inputs: Sequence[torch.Tensor] | torch.Tensor | ImageArray) -> BatchTable:
        """The images themselves: a batch is one gather of uint8 rows (:class:`ImageTable`)."""
        return ImageTable(inputs)

    def finish_batch(self, batch: Batch) -> Batch:
        return {**batch, "pixels": self.pixels(batch)}

    def pixels(self, batch: Batch) -> torch.Tensor:
        """The batch's pixels as floats in [0, 1]: uint8 pixels converted where they are (``x / 255`` as
        :func:`to_float`, in the model's own float type when it was cast, e.g. ``bf16-true``)."""
        x = batch["pixels"]
        if x.dtype == torch.uint8:
            dtype = self.mean.dtype if self.mean.dtype.is_floating_point else torch.float32
            return x.to(dtype).div_(255.0)
        return x

    def augment(self, batch: Batch) -> Batch:
        if not self.use_augment:
            return batch
        return {**batch, "pixels": random_crop_flip(batch["pixels"], self.crop_padding, self.image.flip)}

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dim() != 4 or pixels.shape[1] != self.mean.shape[1]:  # never broadcast 1 channel to 3
            raise DataError(
                f"the model takes images [N, {self.image.channels}, H, W] ({self.image.channels} channel(s), its "
                f"ImageSpec) but got a batch of shape {list(pixels.shape)}: convert the images (grey to RGB: "
                "x.expand(-1, 3, -1, -1)) or wrap the model with an ImageSpec of their channels"
            )
        return (pixels - self.mean) / self.std

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.net(self.normalize(self.pixels(batch)))

    def forward_features(self, batch: Batch, pooling: str = "avg") -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and every stage output of one pass: ``[B, C_l]`` (global average) or the raw maps
        (``pooling="none"``). Text pooling names (``cls``, ``mean``) mean the global average here."""
        captured: list[torch.Tensor] = []
        hooks = [
            m.register_forward_hook(lambda _m, _i, out: captured.append(_first(out))) for m in self.stage_modules()
        ]
        try:
            logits = self.forward(batch)
        finally:
            for h in hooks:
                h.remove()
        if pooling == "none":
            return logits, captured
        return logits, [f.mean(dim=(2, 3)) if f.dim() == 4 else f.flatten(1) for f in captured]


class ImageTable(BatchTable):
    """uint8 images (a tensor ``[N, C, H, W]``, or an array-like store that gathers an index tensor) whose
    batches are ``{"pixels": uint8 [B, C, H, W]}``, gathered at once; no model held (workers copy the table)."""

    def __init__(self, images: Sequence[torch.Tensor] | torch.Tensor | ImageArray) -> None:
        super().__init__(None, images)

    def take(self, index: torch.Tensor) -> Batch:
        rows = take_rows(self.inputs, index)
        return {"pixels": rows if isinstance(rows, torch.Tensor) else torch.stack([torch.as_tensor(r) for r in rows])}


def _first(out: object) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        return out[0]
    return out  # type: ignore[return-value]


def image_spec(bundle: object) -> ImageSpec:
    """The :class:`ImageSpec` of a vision :class:`~backdoorbench.data.base.DatasetBundle`: shape from its
    images, ``mean``/``std``/``flip`` from ``bundle.info`` (defaults 0.5 / 0.5 / True)."""
    images = bundle.train.inputs  # type: ignore[attr-defined]
    if not isinstance(images, (torch.Tensor, ImageArray)) or images.dim() != 4:
        raise ValueError("a vision dataset holds uint8 images [N, C, H, W]")
    _, c, h, w = images.shape
    info = getattr(bundle, "info", {}) or {}
    mean = tuple(float(v) for v in info.get("mean", (0.5,) * c))
    std = tuple(float(v) for v in info.get("std", (0.5,) * c))
    return ImageSpec(channels=c, height=h, width=w, mean=mean, std=std, flip=bool(info.get("flip", True)))
