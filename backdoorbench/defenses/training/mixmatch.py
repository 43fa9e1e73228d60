"""DBD stage 3: MixMatch (Berthelot et al., NeurIPS 2019) over the whole model, with the low-loss samples as
the labelled set and the rest, labels dropped, as the unlabelled set.

Each step, as in the MixMatch reference (``YU1ut/MixMatch-pytorch``, which DBD's ``mixmatch_train`` follows):

1. one augmentation of a labelled batch ``(x, y)``, ``K`` augmentations of an unlabelled batch ``u``;
2. label guess ``q = sharpen(mean_k softmax(f(u_k)), T)`` without gradients;
3. mixup of the concatenation ``[x, u_1..u_K]`` (targets ``[y, q..q]``) with a random permutation of itself,
   ``λ ~ Beta(α, α)``, ``λ' = max(λ, 1 − λ)`` (so each mixed sample stays closer to its first input);
4. ``L = L_x + λ_u · rampup · L_u``: soft cross-entropy on the mixed labelled part, mean squared error
   between probabilities and mixed targets on the mixed unlabelled part; ``rampup`` grows linearly from
   0 to 1 over ``rampup_epochs`` (fractional epochs, per step).

The reference interleaves labelled and unlabelled samples across several forward passes so that every
pass's BatchNorm statistics mix both; here the whole mixed batch goes through one forward pass, which gives
BatchNorm the same mixture at once.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from backdoorbench.modality.vision import VisionClassifier, random_crop_flip
from backdoorbench.seeds import stream


def sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """MixMatch's sharpening: ``p_i^(1/T) / Σ_j p_j^(1/T)`` per row."""
    pt = p.pow(1.0 / temperature)
    return pt / pt.sum(dim=1, keepdim=True)


def mixup_lambda(alpha: float, rng: np.random.Generator) -> float:
    """``λ ~ Beta(α, α)``, then ``λ' = max(λ, 1 − λ)``."""
    lam = float(rng.beta(alpha, alpha))
    return max(lam, 1.0 - lam)


def mixup(x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Convex combinations ``λ·x + (1 − λ)·x[perm]`` of inputs and of (soft) targets alike."""
    return lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]


def linear_rampup(current: float, length: float) -> float:
    """``clip(current / length, 0, 1)``; 1 when ``length`` is 0."""
    if length <= 0:
        return 1.0
    return float(np.clip(current / length, 0.0, 1.0))


def mixmatch_losses(
    logits_x: torch.Tensor, targets_x: torch.Tensor, logits_u: torch.Tensor, targets_u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``L_x`` = soft cross-entropy; ``L_u`` = mean squared error of probabilities (mean over samples and
    classes, as the reference)."""
    lx = -(F.log_softmax(logits_x, dim=1) * targets_x).sum(1).mean()
    lu = ((torch.softmax(logits_u, dim=1) - targets_u) ** 2).mean() if len(logits_u) else logits_x.new_zeros(())
    return lx, lu


class MixMatchModule(L.LightningModule):
    """MixMatch fine-tuning of the whole ``model`` (batches ``{"x": labelled, "u": unlabelled}``), Adam."""

    def __init__(
        self,
        model: VisionClassifier,
        lr: float = 0.002,
        lambda_u: float = 15.0,
        rampup_epochs: float = 0.0,
        temperature: float = 0.5,
        alpha: float = 0.75,
        k: int = 2,
        iterations: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.model = model
        self.lr, self.lambda_u, self.rampup_epochs = lr, lambda_u, rampup_epochs
        self.temperature, self.alpha, self.k, self.iterations = temperature, alpha, k, iterations
        self.rng = stream(seed, "mixmatch")

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        # the reference's training transform: random crop with padding (reflect there) and flip
        return random_crop_flip(x, self.model.crop_padding, self.model.image.flip)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        xb, ub = batch["x"], batch["u"]
        x, u = xb["pixels"], ub["pixels"]
        n_x, n_cls = x.shape[0], self.model.num_classes
        x = self.augment(x)
        y = F.one_hot(xb["labels"], n_cls).float()
        us = [self.augment(u) for _ in range(self.k)]
        with torch.no_grad():
            p = torch.stack([torch.softmax(self.model({"pixels": v}), dim=1) for v in us]).mean(0)
            q = sharpen(p, self.temperature)
        all_x = torch.cat([x, *us])
        all_y = torch.cat([y, *([q] * self.k)])
        lam = mixup_lambda(self.alpha, self.rng)
        perm = torch.from_numpy(self.rng.permutation(all_x.shape[0])).to(all_x.device)
        mixed_x, mixed_y = mixup(all_x, all_y, perm, lam)
        logits = self.model({"pixels": mixed_x})
        lx, lu = mixmatch_losses(logits[:n_x], mixed_y[:n_x], logits[n_x:], mixed_y[n_x:])
        progress = self.current_epoch + batch_idx / max(self.iterations, 1)
        w = self.lambda_u * linear_rampup(progress, self.rampup_epochs)
        loss = lx + w * lu
        self.log_dict(
            {"train_loss": loss, "loss_x": lx, "loss_u": lu},
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            batch_size=n_x,
        )
        return loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the mixing RNG (λ and the permutation), so that a resumed run mixes as the uninterrupted one
        checkpoint["mixmatch_rng"] = self.rng.bit_generator.state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.rng.bit_generator.state = checkpoint["mixmatch_rng"]

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=self.lr)
