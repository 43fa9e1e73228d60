"""DBD stage 1: self-supervised learning of the backbone on the training images with their labels removed.

* :class:`SimCLRAugment` -- SimCLR's augmentations (random resized crop, horizontal flip, colour jitter,
  random grayscale, Gaussian blur) written for *batches* of float image tensors: every image gets its own
  random parameters, but the work is a handful of batched tensor operations (an affine ``grid_sample``
  for the crop and flip, per-image blends for the jitter, a grouped convolution for the blur) instead of a
  Python loop over PIL images. One-channel images (MNIST) get brightness and contrast jitter only.
* :class:`SSLMethod` and its subclasses -- SimCLR (the paper's), BYOL, Barlow Twins and VICReg: each adds
  its projection (and prediction) heads, from ``lightly.models.modules``, and its loss. The loss functions
  come from a *backend*: ``lightly`` (``lightly.loss``, the default) or ``solo`` (solo-learn's
  ``solo.losses.*_loss_func``, where installed with ``pip install --no-deps solo-learn==1.0.2``).
* :class:`SSLModule` -- the Lightning module: two augmented views of each batch, the method's loss, SGD with
  momentum and a per-step cosine learning-rate schedule (the reference's ``CosineAnnealingLR``).

The backbone is the victim architecture's own network up to its pooled features:
``net.forward_head(net.forward_features(normalize(x)), pre_logits=True)``, so the same weights go on to
stages 2 and 3.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from backdoorbench.config import ConfigError
from backdoorbench.modality.vision import VisionClassifier

SSL_METHODS = ("simclr", "byol", "barlow_twins", "vicreg")
SSL_BACKENDS = ("lightly", "solo")
SOLO_INSTALL = "pip install --no-deps solo-learn==1.0.2"
# solo-learn module and function of each method's loss
_SOLO_FUNCS = {
    "simclr": ("solo.losses.simclr", "simclr_loss_func"),
    "byol": ("solo.losses.byol", "byol_loss_func"),
    "barlow_twins": ("solo.losses.barlow", "barlow_loss_func"),
    "vicreg": ("solo.losses.vicreg", "vicreg_loss_func"),
}


# -- the backbone ----------------------------------------------------------------------------------------
def backbone_features(model: VisionClassifier, pixels: torch.Tensor, net: nn.Module | None = None) -> torch.Tensor:
    """Pooled features ``[B, num_features]`` of ``net`` (default ``model.net``) on float pixels in [0, 1]."""
    net = model.net if net is None else net
    return net.forward_head(net.forward_features(model.normalize(pixels)), pre_logits=True)  # type: ignore[operator]


def num_features(model: VisionClassifier) -> int:
    n = getattr(model.net, "num_features", None)
    if not isinstance(n, int) or n < 1:
        raise ConfigError(
            f"DBD needs a timm-style backbone with num_features/forward_features/forward_head; "
            f"{type(model.net).__name__} has none"
        )
    return n


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


# -- loss backends ---------------------------------------------------------------------------------------
def _solo_function(method: str) -> Callable[..., torch.Tensor]:
    module_name, func_name = _SOLO_FUNCS[method]
    try:
        module = _import_solo_losses(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"defense.ssl_backend=solo needs solo-learn's loss functions ({module_name}.{func_name}), which "
            f"cannot be imported ({exc}). Install them with `{SOLO_INSTALL}` (its declared dependencies pin "
            "torch 1.9, so install without them: only the plain-torch loss functions are used), or use "
            "defense.ssl_backend=lightly"
        ) from None
    func = getattr(module, func_name, None)
    if func is None:
        raise ConfigError(f"defense.ssl_backend=solo: {module_name} has no {func_name}; expected solo-learn 1.0.x")
    return func


def _import_solo_losses(module_name: str) -> Any:
    """Import a solo-learn loss module. ``solo/__init__`` imports solo-learn's whole method zoo, which
    needs pytorch-lightning 1.x and lightning-bolts; the loss modules themselves are plain torch. So when
    the package import fails, load the loss file on its own, without running the package's ``__init__``."""
    try:
        return importlib.import_module(module_name)
    except Exception as exc:  # not installed, or solo/__init__ failed on its own dependencies
        if "solo" in sys.modules and sys.modules["solo"] is None:  # import explicitly blocked
            raise ImportError(f"{module_name}: {exc}") from exc
        try:
            spec = importlib.util.find_spec("solo")
        except (ValueError, AttributeError):
            spec = None
        roots = list(spec.submodule_search_locations or []) if spec is not None else []
        path = Path(roots[0], *module_name.split(".")[1:]).with_suffix(".py") if roots else None
        if path is None or not path.is_file():
            raise ImportError(f"{module_name}: {exc}") from exc
        file_spec = importlib.util.spec_from_file_location(f"backdoorbench._solo.{path.stem}", path)
        module = importlib.util.module_from_spec(file_spec)  # type: ignore[arg-type]
        file_spec.loader.exec_module(module)  # type: ignore[union-attr]
        return module


def solo_available() -> bool:
    """Whether solo-learn's loss package can be found (without importing it)."""
    if "solo.losses" in sys.modules or "solo" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("solo") is not None
    except (ImportError, ValueError):
        return False


def pair_loss(
    method: str, backend: str, temperature: float = 0.5
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss of ``method`` from ``backend`` as ``f(a, b) -> scalar``: for SimCLR, Barlow Twins and VICReg
    ``a, b`` are the two views' projections; for BYOL ``a`` is the online prediction and ``b`` the target
    projection of the other view."""
    if method not in SSL_METHODS:
        raise ConfigError(f"defense.ssl must be one of {SSL_METHODS}, got {method!r}")
    if backend == "lightly":
        from lightly import loss as lightly_loss

        if method == "simclr":
            return lightly_loss.NTXentLoss(temperature=temperature)
        if method == "byol":
            return lightly_loss.NegativeCosineSimilarity()
        if method == "barlow_twins":
            return lightly_loss.BarlowTwinsLoss()
        return lightly_loss.VICRegLoss()
    if backend == "solo":
        func = _solo_function(method)
        if method == "simclr":
            params = list(inspect.signature(func).parameters)
            if params[:2] == ["z1", "z2"]:  # solo-learn 1.0.0-1.0.3
                return lambda z1, z2: func(z1, z2, temperature=temperature)

            def simclr_indexed(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:  # later: (z, indexes)
                idx = torch.arange(z1.shape[0], device=z1.device).repeat(2)
                return func(torch.cat([z1, z2]), idx, temperature=temperature)

            return simclr_indexed
        return lambda a, b: func(a, b)
    raise ConfigError(f"defense.ssl_backend must be one of {SSL_BACKENDS}, got {backend!r}")


# -- methods ---------------------------------------------------------------------------------------------
class SSLMethod(nn.Module):
    """A self-supervised method: its heads and its loss on two augmented views."""

    name = ""

    def __init__(self, feat_dim: int, hidden_dim: int, out_dim: int, loss_fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.loss_fn = loss_fn

    def loss(self, model: VisionClassifier, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self, model: VisionClassifier, progress: float) -> None:
        """Called after each optimiser step with the share of training done (BYOL's momentum update)."""


class SimCLR(SSLMethod):
    """Chen et al. 2020: NT-Xent over the projections of both views (one forward pass of the 2B batch)."""

    name = "simclr"

    def __init__(self, feat_dim: int, hidden_dim: int, out_dim: int, loss_fn: Callable[..., torch.Tensor]) -> None:
        super().__init__(feat_dim, hidden_dim, out_dim, loss_fn)
        from lightly.models.modules import SimCLRProjectionHead

        self.head = SimCLRProjectionHead(feat_dim, hidden_dim, out_dim)

    def loss(self, model: VisionClassifier, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        z1, z2 = self.head(backbone_features(model, torch.cat([x1, x2]))).chunk(2)
        return self.loss_fn(z1, z2)


class BarlowTwins(SSLMethod):
    """Zbontar et al. 2021: cross-correlation of the two views' projections towards the identity."""

    name = "barlow_twins"

    def __init__(self, feat_dim: int, hidden_dim: int, out_dim: int, loss_fn: Callable[..., torch.Tensor]) -> None:
        super().__init__(feat_dim, hidden_dim, out_dim, loss_fn)
        from lightly.models.modules import BarlowTwinsProjectionHead

        self.head = BarlowTwinsProjectionHead(feat_dim, hidden_dim, out_dim)

    def loss(self, model: VisionClassifier, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        # one view per forward pass: the batch-normalised projections are standardised per view
        return self.loss_fn(self.head(backbone_features(model, x1)), self.head(backbone_features(model, x2)))


class VICReg(BarlowTwins):
    """Bardes et al. 2022: invariance + variance + covariance terms (lightly's Barlow Twins projector)."""

    name = "vicreg"


class BYOL(SSLMethod):
    """Grill et al. 2020: an online network predicts a momentum (EMA) target network's projection."""

    name = "byol"

    def __init__(
        self,
        feat_dim: int,
        hidden_dim: int,
        out_dim: int,
        loss_fn: Callable[..., torch.Tensor],
        net: nn.Module | None = None,
        momentum: float = 0.99,
    ) -> None:
        super().__init__(feat_dim, hidden_dim, out_dim, loss_fn)
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        if net is None:
            raise ValueError("BYOL needs the backbone network to copy as its target")
        self.projection = BYOLProjectionHead(feat_dim, hidden_dim, out_dim)
        self.prediction = BYOLPredictionHead(out_dim, hidden_dim, out_dim)
        self.target_net = copy.deepcopy(net)
        self.target_projection = copy.deepcopy(self.projection)
        deactivate_requires_grad(self.target_net)
        deactivate_requires_grad(self.target_projection)
        self.base_momentum = momentum

    def loss(self, model: VisionClassifier, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        p1 = self.prediction(self.projection(backbone_features(model, x1)))
        p2 = self.prediction(self.projection(backbone_features(model, x2)))
        with torch.no_grad():
            t1 = self.target_projection(backbone_features(model, x1, self.target_net))
            t2 = self.target_projection(backbone_features(model, x2, self.target_net))
        return 0.5 * (self.loss_fn(p1, t2) + self.loss_fn(p2, t1))

    def after_step(self, model: VisionClassifier, progress: float) -> None:
        from lightly.models.utils import update_momentum

        # cosine schedule of the EMA momentum from its base value to 1 (the BYOL paper's)
        m = 1 - (1 - self.base_momentum) * (math.cos(math.pi * min(progress, 1.0)) + 1) / 2
        update_momentum(model.net, self.target_net, m)
        update_momentum(self.projection, self.target_projection, m)


METHODS: dict[str, type[SSLMethod]] = {"simclr": SimCLR, "byol": BYOL, "barlow_twins": BarlowTwins, "vicreg": VICReg}


def make_method(
    name: str,
    backend: str,
    model: VisionClassifier,
    hidden_dim: int | None,
    out_dim: int,
    temperature: float = 0.5,
    byol_momentum: float = 0.99,
) -> SSLMethod:
    feat = num_features(model)
    hidden = hidden_dim or feat
    loss_fn = pair_loss(name, backend, temperature)
    if name == "byol":
        return BYOL(feat, hidden, out_dim, loss_fn, net=model.net, momentum=byol_momentum)
    return METHODS[name](feat, hidden, out_dim, loss_fn)


# -- the Lightning module --------------------------------------------------------------------------------
class SSLModule(L.LightningModule):
    """Self-supervised training of ``model.net`` (labels unused): two augmented views per image."""

    def __init__(
        self,
        model: VisionClassifier,
        method: SSLMethod,
        augment: SimCLRAugment,
        lr: float,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
    ) -> None:
        super().__init__()
        self.model = model
        self.method = method
        self.augment = augment
        self.lr, self.weight_decay, self.momentum = lr, weight_decay, momentum

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x = batch["inputs"]["pixels"]
        loss = self.method.loss(self.model, self.augment(x), self.augment(x))
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=x.shape[0])
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        self.method.after_step(self.model, self.trainer.global_step / total)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.net.parameters() if p.requires_grad]
        params += [p for p in self.method.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
