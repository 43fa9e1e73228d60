"""SimCLR's augmentations for DBD's self-supervised stage (:mod:`backdoorbench.defenses.training.ssl`), written
for *batches* of float image tensors: every image gets its own random parameters, but the work is a handful of
batched tensor operations (an affine ``grid_sample`` for the crop and flip, per-image blends for the jitter, a
grouped convolution for the blur) instead of a Python loop over PIL images. One-channel images (MNIST) get
brightness and contrast jitter only."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# -- augmentations on batches ----------------------------------------------------------------------------
class SimCLRAugment:
    """SimCLR's augmentation pipeline on a float batch ``[B, C, H, W]`` in [0, 1], per-image randomness.

    Order as in the DBD reference (``config/defense/simclr``): random resized crop (area ``crop_scale``,
    aspect ratio 3/4..4/3, bilinear), horizontal flip (p 0.5, where ``flip``), colour jitter (p
    ``jitter_prob``; brightness/contrast/saturation ``jitter``, hue ``hue``), grayscale (p
    ``grayscale_prob``), Gaussian blur (p ``blur_prob``, sigma 0.1..2, kernel about a tenth of the image).
    Uses the global torch RNG (seeded by Lightning's ``seed_everything``)."""

    def __init__(
        self,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        flip: bool = True,
        jitter_prob: float = 0.8,
        jitter: float = 0.4,
        hue: float = 0.1,
        grayscale_prob: float = 0.2,
        blur_prob: float = 0.5,
    ) -> None:
        self.crop_scale = crop_scale
        self.flip = flip
        self.jitter_prob = jitter_prob
        self.jitter = jitter
        self.hue = hue
        self.grayscale_prob = grayscale_prob
        self.blur_prob = blur_prob

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resized_crop_flip(x)
        if self.jitter_prob > 0 and self.jitter + self.hue > 0:
            x = self.color_jitter(x)
        if self.grayscale_prob > 0 and x.shape[1] == 3:
            x = self._where(self._coin(x, self.grayscale_prob), _gray(x).expand_as(x), x)
        if self.blur_prob > 0:
            x = self.blur(x)
        return x

    @staticmethod
    def _coin(x: torch.Tensor, p: float) -> torch.Tensor:
        return torch.rand(x.shape[0], device=x.device) < p

    @staticmethod
    def _where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(mask[:, None, None, None], a, b)

    @staticmethod
    def _uniform(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        return torch.rand(x.shape[0], device=x.device) * (hi - lo) + lo

    def resized_crop_flip(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        area = self._uniform(x, *self.crop_scale)
        log_ratio = self._uniform(x, math.log(3 / 4), math.log(4 / 3))
        ratio = log_ratio.exp()
        # crop width/height as fractions of the image (torchvision retries out-of-range draws; we clamp)
        w = (area * ratio).sqrt().clamp(max=1.0)
        h = (area / ratio).sqrt().clamp(max=1.0)
        cx = (torch.rand(b, device=x.device) * 2 - 1) * (1 - w)
        cy = (torch.rand(b, device=x.device) * 2 - 1) * (1 - h)
        sx = w
        if self.flip:
            sx = torch.where(torch.rand(b, device=x.device) < 0.5, -w, w)
        theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, h, cy
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def color_jitter(self, x: torch.Tensor) -> torch.Tensor:
        """Brightness, contrast, saturation, hue (fixed order; torchvision draws a random order)."""
        apply = self._coin(x, self.jitter_prob)
        out = x
        s = self.jitter
        if s > 0:
            bright = self._uniform(x, max(0.0, 1 - s), 1 + s)[:, None, None, None]
            out = (out * bright).clamp(0, 1)
            contrast = self._uniform(x, max(0.0, 1 - s), 1 + s)[:, None, None, None]
            mean = _gray(out).mean(dim=(1, 2, 3), keepdim=True)
            out = (contrast * out + (1 - contrast) * mean).clamp(0, 1)
            if x.shape[1] == 3:
                sat = self._uniform(x, max(0.0, 1 - s), 1 + s)[:, None, None, None]
                out = (sat * out + (1 - sat) * _gray(out)).clamp(0, 1)
        if self.hue > 0 and x.shape[1] == 3:
            out = _rotate_hue(out, self._uniform(x, -self.hue, self.hue) * 2 * math.pi)
        return self._where(apply, out, x)

    def blur(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        k = max(3, int(0.1 * min(h, w)) // 2 * 2 + 1)
        sigma = self._uniform(x, 0.1, 2.0)
        r = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
        kern = torch.exp(-(r[None, :] ** 2) / (2 * sigma[:, None] ** 2))
        kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # [B*C, k]
        y = x.reshape(1, b * c, h, w)
        y = F.conv2d(F.pad(y, (k // 2, k // 2, 0, 0), mode="reflect"), kern[:, None, None, :], groups=b * c)
        y = F.conv2d(F.pad(y, (0, 0, k // 2, k // 2), mode="reflect"), kern[:, None, :, None], groups=b * c)
        return self._where(self._coin(x, self.blur_prob), y.reshape(b, c, h, w), x)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] != 3:
        return x.mean(dim=1, keepdim=True)
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).to(x.dtype)


def _rotate_hue(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Hue shift as a rotation of the chroma plane in YIQ space (per-image angle, radians)."""
    to_yiq = torch.tensor(
        [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=x.device, dtype=x.dtype
    )
    yiq = torch.einsum("ij,bjhw->bihw", to_yiq, x)
    cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], dim=1)
    return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(to_yiq), yiq).clamp(0, 1)
