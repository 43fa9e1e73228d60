"""DBD stage 1: self-supervised learning of the backbone on the training images with their labels removed.

* :class:`SimCLRAugment` -- SimCLR's augmentations (random resized crop, horizontal flip, colour jitter,
  random grayscale, Gaussian blur) on batches of float image tensors (:mod:`.ssl_augment`).
* :class:`SSLMethod` and its subclasses -- SimCLR (the paper's), BYOL, Barlow Twins and VICReg: each adds
  its projection (and prediction) heads, from ``lightly.models.modules``, and its loss. The loss functions
  come from a *backend*: ``lightly`` (``lightly.loss``, the default) or ``solo`` (solo-learn's
  ``solo.losses.*_loss_func``, where installed with ``pip install --no-deps solo-learn==1.0.2``):
  :func:`pair_loss` in :mod:`.ssl_losses`.
* :class:`SSLModule` -- the Lightning module: two augmented views of each batch, the method's loss, SGD with
  momentum and a per-step cosine learning-rate schedule (the reference's ``CosineAnnealingLR``).

The backbone is the victim architecture's own network up to its pooled features:
``net.forward_head(net.forward_features(normalize(x)), pre_logits=True)``, so the same weights go on to
stages 2 and 3.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn

from backdoorbench.config import ConfigError
from backdoorbench.defenses.training.ssl_augment import SimCLRAugment
from backdoorbench.defenses.training.ssl_losses import (  # noqa: F401 - SOLO_INSTALL ... re-exported here
    SOLO_INSTALL,
    SSL_BACKENDS,
    SSL_METHODS,
    pair_loss,
    solo_available,
)
from backdoorbench.modality.vision import VisionClassifier


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
