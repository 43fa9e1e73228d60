"""``defense=clp``: Channel Lipschitzness-based Pruning (Zheng, Tang, Li & Liu, ECCV 2022; reference
``rkteddy/channel-Lipschitzness-based-pruning``, ``defense.py``). Data-free: it reads the weights only.

For a convolution followed by BatchNorm, output channel ``k`` computes ``γ_k / σ_k · (W_k ∗ x) + const``
(σ_k = the running standard deviation), so its Lipschitz constant in ``x`` is at most the **UCLC**
``‖W_k‖₂ · |γ_k / σ_k|``, ``‖W_k‖₂`` the spectral norm of the kernel reshaped to ``[in_channels, k_h · k_w]``
(as the reference). Backdoor channels, which a small trigger must drive hard, have outlying UCLCs: in each layer,
the channels with ``UCLC > mean + u · std`` (u = 3) are pruned — their BatchNorm weight *and* bias set to zero
(the reference's).

**Which convolution feeds which BatchNorm.** The reference pairs each ``BatchNorm2d`` with the ``Conv2d`` last
seen in module order, right for ResNet's ``conv → bn`` but not for pre-activation nets (its README: "change the
code ... e.g. Preact ResNet"): in a WRN, ``bn1`` of a block normalises the residual sum, not a convolution.
Here a BatchNorm is paired with a convolution when, in one forward pass of a blank image batch (eval mode, no
data), its input *is* that convolution's output tensor; BatchNorms fed by anything else (a sum, an
activation) are left alone. On ResNets both rules give the same pairs (tests).

Transformers: refused. The bound needs a fixed per-channel affine after a linear map (BatchNorm in eval
mode); LayerNorm divides each token by its own input-dependent standard deviation over all features, so no
per-feature constant bounds it from the weights alone (docs/defenses/clp.md).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from backdoorbench.data.base import Samples
from backdoorbench.defenses.base import DefenseConfig, RepairDefense
from backdoorbench.defenses.repair.common import clone
from backdoorbench.defenses.repair.units import prune_units
from backdoorbench.errors import ModelError
from backdoorbench.modality.base import Classifier, to_device
from backdoorbench.registry import register_defense

log = logging.getLogger(__name__)


@dataclass
class CLPConfig(DefenseConfig):
    name: str = "clp"
    u: float = 3.0  # prune channels with UCLC > mean + u * std of their layer (the paper's default)
    batch_size: int = 128  # evaluation batch (CLP itself reads no data)
    curve_min: float = 0.0  # values of u on the reported curve: curve_min, +curve_step, ..., curve_max
    curve_max: float = 5.0
    curve_step: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.curve_step > 0 and self.curve_max >= self.curve_min, "curve_step > 0 and curve_max >= curve_min"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"defense (clp): {msg}")


def conv_bn_pairs(model: Classifier) -> list[tuple[str, nn.Conv2d, str, nn.BatchNorm2d]]:
    """``(conv name, conv, bn name, bn)`` for every ``BatchNorm2d`` whose input is a ``Conv2d``'s output, found by
    one eval-mode forward pass of two blank images (``model`` must be a vision classifier with an ``image``
    spec); in module order of the BatchNorms."""
    image = getattr(model, "image", None)
    if model.modality != "vision" or image is None:
        raise ModelError(
            f"CLP: {type(model).__name__} is a {model.modality} model; CLP's channel Lipschitz bound needs "
            "convolutions followed by BatchNorm (a CNN), see docs/defenses/clp.md"
        )
    modules = dict(model.named_modules())
    made: dict[int, str] = {}  # id of a conv's output tensor -> the conv's name
    keep: list[torch.Tensor] = []  # the outputs stay alive during the pass, so their ids stay unique
    fed: dict[str, str] = {}  # bn name -> conv name
    hooks = []
    for name, m in modules.items():
        if isinstance(m, nn.Conv2d):
            def after_conv(_m: nn.Module, _i: object, out: torch.Tensor, name: str = name) -> None:
                made[id(out)] = name
                keep.append(out)

            hooks.append(m.register_forward_hook(after_conv))
        elif isinstance(m, nn.BatchNorm2d):
            def before_bn(_m: nn.Module, inputs: tuple[torch.Tensor, ...], name: str = name) -> None:
                if id(inputs[0]) in made:
                    fed.setdefault(name, made[id(inputs[0])])

            hooks.append(m.register_forward_pre_hook(before_bn))
    was_training = model.training
    model.eval()
    try:
        blank = torch.zeros(2, image.channels, image.height, image.width, dtype=torch.uint8)
        with torch.no_grad():
            model(to_device(model.collate(blank), model.device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    pairs = [(fed[b], modules[fed[b]], b, modules[b]) for b in modules if b in fed]
    return [p for p in pairs if p[3].running_var is not None]


def channel_lipschitz(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """The UCLC of each output channel: ``‖W_k.reshape(in, -1)‖₂ · |γ_k / sqrt(running_var_k)|`` (as the
    reference: the running variance without BatchNorm's eps), float64 on the CPU."""
    w = conv.weight.detach().to("cpu", torch.float64)
    spectral = torch.linalg.matrix_norm(w.reshape(w.shape[0], w.shape[1], -1), ord=2)
    gamma = bn.weight.detach().to("cpu", torch.float64) if bn.weight is not None else torch.ones_like(spectral)
    std = bn.running_var.detach().to("cpu", torch.float64).sqrt()  # type: ignore[union-attr]
    return spectral * (gamma / std).abs()


def outliers(uclc: torch.Tensor, u: float) -> list[int]:
    """Channels with ``UCLC > mean + u · std`` (the unbiased std, as ``torch.Tensor.std``) of their layer."""
    return torch.nonzero(uclc > uclc.mean() + u * uclc.std()).flatten().tolist()


@register_defense(
    "clp",
    modality=("vision",),
    needs="the backdoored model only (data-free); a CNN with convolutions followed by BatchNorm",
    description="channel Lipschitzness-based pruning: prune channels whose Lipschitz upper bound is an outlier",
    config=CLPConfig,
)
class CLP(RepairDefense):
    sweep_name = "u (prune UCLC > mean + u·std)"
    data_free = True

    def __init__(self, cfg: CLPConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self.uclc: dict[str, torch.Tensor] = {}  # bn name -> the UCLC of its channels
        self.pruned: list[tuple[str, int]] = []
        self._original: Classifier | None = None

    def selected(self, u: float | None = None) -> list[tuple[str, int]]:
        """``(bn name, channel)`` pruned at ``u`` (default: the configured one)."""
        u = self.cfg.u if u is None else u
        return [(name, i) for name, values in self.uclc.items() for i in outliers(values, u)]

    def repair(self, model: Classifier, clean: Samples | None = None) -> Classifier:
        """Prune a copy of ``model``; ``clean`` is ignored (the pipeline hands a data-free defense none)."""
        pairs = conv_bn_pairs(model)
        if not pairs:
            raise ModelError(
                f"CLP: {type(model).__name__} has no Conv2d whose output goes straight into a BatchNorm2d "
                "(with running statistics); CLP's bound is defined for conv -> BatchNorm channels only"
            )
        self.uclc = {bn_name: channel_lipschitz(conv, bn) for _, conv, bn_name, bn in pairs}
        self._original = model
        self.pruned = self.selected()
        repaired = clone(model)
        prune_units(repaired, self.pruned, bias=True)
        repaired.eval()
        total = sum(len(v) for v in self.uclc.values())
        log.info("CLP: %d conv -> BatchNorm layers, pruned %d of %d channels at u=%g", len(pairs),
                 len(self.pruned), total, self.cfg.u)
        self.sweep_info = {u: {"units_pruned": float(len(self.selected(u)))} for u in self.settings()}
        self.write_channels()
        return repaired

    @property
    def chosen_setting(self) -> float | None:
        return self.cfg.u

    def settings(self) -> list[float]:
        n = int(np.floor((self.cfg.curve_max - self.cfg.curve_min) / self.cfg.curve_step + 1e-9))
        return [round(self.cfg.curve_min + k * self.cfg.curve_step, 4) for k in range(n + 1)]

    def sweep(self) -> Iterator[tuple[float, Classifier]]:
        if self._original is None:
            return
        for u in self.settings():
            model = clone(self._original)
            prune_units(model, self.selected(u), bias=True)
            model.eval()
            yield u, model

    def write_channels(self) -> None:
        if self.run_dir is None:
            return
        pruned = set(self.pruned)
        with (self.run_dir / "clp_channels.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["module", "channel", "uclc", "layer_threshold", "pruned"])
            for name, values in self.uclc.items():
                limit = float(values.mean() + self.cfg.u * values.std())
                for i, v in enumerate(values.tolist()):
                    w.writerow([name, i, f"{v:.6g}", f"{limit:.6g}", int((name, i) in pruned)])
