"""DBD's stage 2: the symmetric cross-entropy (SCE) linear head on the frozen self-supervised backbone, and
the low-loss filter that decides which samples keep their labels for stage 3."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from backdoorbench.defenses.training.ssl import backbone_features
from backdoorbench.modality.vision import VisionClassifier, random_crop_flip

__all__ = ["LinearHeadModule", "low_loss_indices", "sce_loss"]


def sce_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 0.1,
    beta: float = 1.0,
    log_zero: float = -4.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Symmetric cross-entropy (Wang et al., ICCV 2019): ``α·CE(p, y) + β·RCE(p, y)`` with the reverse
    cross-entropy ``RCE = −Σ_k p_k log q_k``, ``q`` the one-hot label whose ``log 0`` is clamped to
    ``log_zero`` (A = −4 in the SCE paper), so ``RCE = −A · Σ_{k≠y} p_k``; ``p`` is clamped to [1e-7, 1]
    as in the reference."""
    ce = F.cross_entropy(logits, targets, reduction="none")
    p = torch.softmax(logits, dim=1).clamp(min=1e-7, max=1.0)
    off = 1.0 - F.one_hot(targets, logits.shape[1]).to(p.dtype)
    rce = -log_zero * (p * off).sum(1)
    loss = alpha * ce + beta * rce
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    raise ValueError(f"reduction must be mean or none, got {reduction!r}")


def low_loss_indices(losses: np.ndarray | torch.Tensor, epsilon: float) -> np.ndarray:
    """The ``⌊ε·n⌋`` (at least 1) indices with the lowest loss, ascending; ties keep the lower index."""
    arr = np.asarray(losses, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError("losses must be a non-empty 1-d array")
    if not 0.0 < epsilon <= 1.0:
        raise ValueError(f"epsilon must be in (0, 1], got {epsilon}")
    keep = max(1, int(math.floor(epsilon * arr.size + 1e-9)))
    order = np.argsort(arr, kind="stable")
    return np.sort(order[:keep])


class LinearHeadModule(L.LightningModule):
    """A linear head on the frozen backbone (``net.get_classifier()`` on the pooled features), Adam; the
    backbone runs in eval mode without gradients. ``loss`` is SCE (DBD) or plain CE (the SS+CE ablation)."""

    def __init__(
        self, model: VisionClassifier, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], lr: float
    ):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.lr = lr

    def head(self) -> torch.nn.Module:
        return self.model.net.get_classifier()  # type: ignore[operator]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.model.net.eval()  # frozen: BatchNorm statistics too
        x = random_crop_flip(batch["inputs"]["pixels"], self.model.crop_padding, self.model.image.flip)
        with torch.no_grad():
            feats = backbone_features(self.model, x)
        loss = self.loss_fn(self.head()(feats), batch["labels"])
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=x.shape[0])
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.head().parameters(), lr=self.lr)
