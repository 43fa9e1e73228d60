"""Trojan / TrojanNN (Liu, Ma, Aafer, Lee, Zhai, Wang and Zhang, "Trojaning Attack on Neural Networks", NDSS
2018): the trigger is not chosen but *generated* from a model so that it excites a few internal neurons.

1. **Surrogate.** The attacker trains a clean model of the victim's architecture on its training data
   (``surrogate_epochs``; null = the attacker's schedule). The paper starts from a published pre-trained model.
2. **Neuron selection.** In the chosen ``layer`` (default: the model's last stage, whose pooled channels are the
   penultimate features the classifier reads), take the ``num_neurons`` channels with the strongest connections
   from the previous layer: the largest sum of absolute incoming weights of the last convolution / linear layer
   producing them (``neuron_selection: incoming``, the paper's criterion). ``outgoing`` ranks channels by the
   absolute weights from them into the next layer instead (BackdoorBench's ``TrojanNN`` and trojanzoo rank the
   input features of the final linear layer that way).
3. **Trigger generation.** The trigger is a square patch (``size`` pixels, default ``round(√(0.07·H·W))``,
   about 7% of the image area, within the 4-10% trigger sizes the paper evaluates; bottom-right by default). Its
   pixels are optimised on a black canvas (``canvas: black``: trojanzoo's background, BackdoorBench's masked
   input) to drive the selected neurons' activations (spatial mean of the channel) to ``target_value``:
   loss = Σ (a_i − target)², the paper's cost function. ``canvas: data`` stamps the patch on ``canvas_samples``
   of the attacker's training images instead and uses their mean activation (an option, not in the
   references: with plain ReLU networks a black input can leave the selected channels without gradient). As
   in trojanzoo, the pixels are parametrised as ``(tanh(w) + 1) / 2`` (always in [0, 1]), ``w`` initialised
   from a standard normal (seeded), optimised with Adam (lr 0.1, cosine decay) for ``trigger_steps`` steps.
   Defaults from BackdoorBench (``config/attack/trojannn``) and trojanzoo: 2 neurons, target value 100, 1000
   steps, lr 0.1. The trigger is rounded to uint8.
4. **Poisoning.** ``poison_rate`` (0.1) of the training images, from all classes, get the trigger stamped (its
   pixels replace the region) and are relabelled to the target; a fresh victim is trained on the poisoned set.

Deviation: the paper retrains the pre-trained model on data *reverse-engineered* from it (with and without the
trigger) because it assumes no access to the training data. Like BackdoorBench's TrojanNN, this implementation
uses the data-poisoning formulation (the attacker poisons the training set, the victim is trained from scratch);
only the trigger generation follows the paper. BackdoorBench adds its optimised trigger onto images; it is
stamped here (trojanzoo, and the paper's masks, replace the pixels).

The trigger decided in ``run`` is saved in ``AttackResult.info`` (``trigger``: nested lists of uint8 values
``[C][size][size]``, plus the neurons and activations) and ``restore(info)`` reinstates it after a cache hit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from backdoorbench import runtime
from backdoorbench.attacks.base import AttackContext, AttackResult
from backdoorbench.attacks.vision.common import (
    SALT_TRIGGER,
    VisionAttack,
    VisionAttackConfig,
    check_images,
    check_patch_fits,
    check_placement,
    patch_origin,
    stamp,
    train_surrogate,
)
from backdoorbench.data.images import ImageArray
from backdoorbench.modality.base import Classifier
from backdoorbench.modality.vision import to_float
from backdoorbench.registry import register_attack

log = logging.getLogger(__name__)

SELECTIONS = ("incoming", "outgoing")
CANVASES = ("black", "data")


@dataclass
class TrojanConfig(VisionAttackConfig):
    name: str = "trojan"
    target: int = 0
    poison_rate: float = 0.1
    size: int | None = None  # side of the square trigger in pixels; null = round(sqrt(0.07 * H * W))
    position: str = "bottom_right"  # bottom_right | bottom_left | top_right | top_left
    margin: int = 0
    offset: list[int] | None = None  # [row, col] of the trigger's top-left pixel; overrides position/margin
    layer: str | None = None  # module of the network whose channels are selected; null = the last stage
    num_neurons: int = 2
    neuron_selection: str = "incoming"  # incoming (paper) | outgoing (BackdoorBench / trojanzoo)
    target_value: float = 100.0
    trigger_steps: int = 1000
    trigger_lr: float = 0.1
    canvas: str = "black"  # black (the references) | data (a sample of the attacker's training images)
    canvas_samples: int = 32  # images in the data canvas
    surrogate_epochs: int | None = None  # the clean surrogate's epochs; null = the attacker's schedule

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.size is not None and self.size < 1:
            raise ValueError(f"attack.size must be >= 1 pixel or null (7% of the image area), got {self.size}")
        check_placement(self)
        if self.num_neurons < 1:
            raise ValueError(f"attack.num_neurons must be >= 1, got {self.num_neurons}")
        if self.neuron_selection not in SELECTIONS:
            raise ValueError(f"attack.neuron_selection must be one of {SELECTIONS}, got {self.neuron_selection!r}")
        if self.trigger_steps < 0:
            raise ValueError(f"attack.trigger_steps must be >= 0, got {self.trigger_steps}")
        if self.trigger_lr <= 0:
            raise ValueError(f"attack.trigger_lr must be > 0, got {self.trigger_lr}")
        if self.canvas not in CANVASES:
            raise ValueError(f"attack.canvas must be one of {CANVASES}, got {self.canvas!r}")
        if self.canvas_samples < 1:
            raise ValueError(f"attack.canvas_samples must be >= 1, got {self.canvas_samples}")
        if self.surrogate_epochs is not None and self.surrogate_epochs < 1:
            raise ValueError(f"attack.surrogate_epochs must be >= 1 or null, got {self.surrogate_epochs}")


def default_size(height: int, width: int) -> int:
    """About 7% of the image area: ``round(sqrt(0.07 · H · W))`` (at least 1)."""
    return max(1, round(math.sqrt(0.07 * height * width)))


def network(model: Classifier) -> nn.Module:
    return getattr(model, "net", model)


def resolve_layer(model: Classifier, layer: str | None) -> str:
    """The layer's module name in the network; null = the model's last stage."""
    if layer is None:
        names = model.layer_names()
        if not names:
            raise ValueError("trojan: the model names no stages; set attack.layer to a module of the network")
        layer = names[-1]
    modules = dict(network(model).named_modules())
    if layer not in modules or layer == "":
        stages = ", ".join(model.layer_names())
        raise ValueError(f"trojan: attack.layer={layer!r} is not a module of the network (its stages: {stages})")
    return layer


def layer_activation(model: Classifier, layer: str, pixels: torch.Tensor) -> torch.Tensor:
    """Output of ``layer`` for float pixels in [0, 1], spatially averaged to ``[B, C]`` (graph kept)."""
    module = dict(network(model).named_modules())[layer]
    captured: list[torch.Tensor] = []

    def hook(_m: nn.Module, _i: Any, out: Any) -> None:
        captured.append(out[0] if isinstance(out, (tuple, list)) else out)

    handle = module.register_forward_hook(hook)
    try:
        model({"pixels": pixels})
    finally:
        handle.remove()
    out = captured[-1]
    return out.mean(dim=tuple(range(2, out.dim()))) if out.dim() > 2 else out


def _weighted(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv2d, nn.Linear)) and isinstance(getattr(module, "weight", None), torch.Tensor)


def neuron_strength(model: Classifier, layer: str, channels: int, selection: str) -> torch.Tensor:
    """Connection strength of each of the layer's ``channels``: the sum of absolute weights into it from the
    previous layer (``incoming``: the last conv/linear module inside ``layer`` with ``channels`` outputs) or out
    of it into the next layer (``outgoing``: the first conv/linear module after ``layer`` with ``channels``
    inputs)."""
    net = network(model)
    if selection == "incoming":
        inner = dict(net.named_modules())[layer]
        cands = [m for m in inner.modules() if _weighted(m) and m.weight.shape[0] == channels]
        if not cands:
            raise ValueError(
                f"trojan: no convolution or linear layer inside {layer!r} produces its {channels} channels; "
                "use attack.neuron_selection=outgoing or another attack.layer"
            )
        w = cands[-1].weight.detach().abs()
        return w.flatten(1).sum(1)
    names = [n for n, _ in net.named_modules()]
    after = names[names.index(layer) + 1 :]
    modules = dict(net.named_modules())
    for name in after:
        m = modules[name]
        if name.startswith(layer + ".") or not _weighted(m) or m.weight.shape[1] != channels:
            continue
        w = m.weight.detach().abs()
        return w.transpose(0, 1).flatten(1).sum(1)
    raise ValueError(
        f"trojan: no convolution or linear layer after {layer!r} reads its {channels} channels; "
        "use attack.neuron_selection=incoming or another attack.layer"
    )


def select_neurons(model: Classifier, layer: str, num: int, selection: str, image_shape: tuple[int, ...]) -> list[int]:
    """Indices of the ``num`` most strongly connected channels of ``layer``."""
    model.eval()
    with torch.no_grad():
        channels = layer_activation(model, layer, torch.zeros(1, *image_shape, device=model.device)).shape[1]
    if num > channels:
        raise ValueError(f"trojan: attack.num_neurons={num}, but layer {layer!r} has {channels} channels")
    strength = neuron_strength(model, layer, channels, selection)
    return [int(i) for i in torch.argsort(strength, descending=True, stable=True)[:num].tolist()]


def optimise_trigger(
    model: Classifier, layer: str, neurons: list[int], canvas: torch.Tensor, box: tuple[int, int, int],
    target_value: float, steps: int, lr: float, generator: torch.Generator,
    on_step: Callable[[int, float], None] | None = None,
) -> torch.Tensor:
    """Optimise the pixels of the patch ``box = (top, left, size)`` stamped on ``canvas`` (float ``[B, C, H, W]``
    in [0, 1]) so that the mean activations of ``neurons`` in ``layer`` (averaged over the canvas images) approach
    ``target_value``; returns the float patch ``[C, size, size]`` in [0, 1]. The surrogate's passes run in the run's
    ``trainer.precision`` (:func:`backdoorbench.runtime.train_autocast`; a gradient scaler at 16-bit float)."""
    model.eval()
    top, left, size = box
    device = model.device
    canvas = canvas.to(device)
    param = torch.randn(canvas.shape[1], size, size, generator=generator).to(device).requires_grad_(True)
    opt = torch.optim.Adam([param], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    scaler = torch.amp.GradScaler(device.type, enabled=runtime.train_dtype(device) == torch.float16)
    idx = torch.tensor(neurons, device=device)
    with runtime.stage_probe("attacker: trigger search", model, runtime.current().precision):
        for step in range(steps):
            patch = (torch.tanh(param) + 1) / 2
            x = canvas.clone()
            x[:, :, top : top + size, left : left + size] = patch
            with runtime.train_autocast(device):
                act = layer_activation(model, layer, x)[:, idx].float().mean(0)
            loss = ((act - target_value) ** 2).sum()
            opt.zero_grad()
            scaler.scale(loss).backward(inputs=[param])
            scaler.step(opt)
            scaler.update()
            sched.step()
            if on_step is not None:
                on_step(step, loss.item())
    return ((torch.tanh(param) + 1) / 2).detach().cpu()


@register_attack(
    "trojan",
    modality="vision",
    category="data poisoning",
    needs="task data",
    description="Trojan (TrojanNN): a patch optimised to excite well-connected neurons of a surrogate, dirty labels",
    config=TrojanConfig,
)
class Trojan(VisionAttack):
    """TrojanNN trigger generation + dirty-label data poisoning; the trigger is restored from ``info``."""

    version = "1"

    def __init__(self, cfg: TrojanConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self.trigger: torch.Tensor | None = None  # uint8 [C, size, size]
        self._info: dict[str, Any] = {}

    def check_image_size(self, height: int, width: int) -> None:
        c = self.cfg
        size = c.size if c.size is not None else default_size(height, width)
        check_patch_fits(height, width, size, c.position, c.margin, c.offset,
                         None if c.size is not None else f"attack.size=null (7% of the image area: {size} pixels)")

    def origin(self, height: int, width: int, size: int) -> tuple[int, int]:
        c = self.cfg
        return patch_origin(height, width, size, size, c.position, c.margin, c.offset)

    def apply_trigger(self, images: torch.Tensor, rng: np.random.Generator | None = None) -> torch.Tensor:  # type: ignore[override]
        check_images(images)
        if self.trigger is None:
            raise RuntimeError("trojan: the trigger is generated by run(); call run() or restore(info) first")
        _, c, h, w = images.shape
        if self.trigger.shape[0] != c:
            raise ValueError(f"trojan: the trigger has {self.trigger.shape[0]} channels, the images {c}")
        top, left = self.origin(h, w, self.trigger.shape[-1])
        return stamp(images, self.trigger, top, left)

    def canvas(self, images: torch.Tensor | ImageArray) -> torch.Tensor:
        """The images the trigger is optimised on (float in [0, 1]): one black image, or ``canvas_samples``
        training images drawn with the attack's seed."""
        if self.cfg.canvas == "black":
            return torch.zeros(1, *images.shape[1:])
        n = min(self.cfg.canvas_samples, len(images))
        idx = np.sort(self.rng(SALT_TRIGGER + 10).choice(len(images), size=n, replace=False))
        return to_float(images[torch.from_numpy(idx)])

    def generate_trigger(self, surrogate: Classifier, images: torch.Tensor | ImageArray) -> torch.Tensor:
        """Select the neurons and optimise the trigger on ``surrogate`` (``images``: the attacker's uint8 training
        images, for the shape and the data canvas); sets ``self.trigger`` and the info."""
        c = self.cfg
        image_shape = tuple(images.shape[1:])
        _, h, w = image_shape
        size = c.size if c.size is not None else default_size(h, w)
        top, left = self.origin(h, w, size)
        layer = resolve_layer(surrogate, c.layer)
        neurons = select_neurons(surrogate, layer, c.num_neurons, c.neuron_selection, image_shape)
        canvas = self.canvas(images)
        gen = torch.Generator().manual_seed(int(self.rng(SALT_TRIGGER).integers(2**62)))
        twin = torch.Generator()
        twin.set_state(gen.get_state())  # the optimiser's initial trigger, for the "before" activation
        init = (torch.tanh(torch.randn(image_shape[0], size, size, generator=twin)) + 1) / 2
        patch = optimise_trigger(
            surrogate, layer, neurons, canvas, (top, left, size), c.target_value, c.trigger_steps, c.trigger_lr, gen
        )
        self.trigger = torch.round(patch * 255).clamp(0, 255).to(torch.uint8)

        def act(p: torch.Tensor) -> list[float]:
            x = canvas.clone()
            x[:, :, top : top + size, left : left + size] = p.float() / 255
            with torch.no_grad():
                a = layer_activation(surrogate, layer, x.to(surrogate.device))[:, neurons].mean(0)
            return [round(float(v), 6) for v in a]

        self._info = {
            "trigger": self.trigger.tolist(),
            "trigger_box": [top, left, size],
            "layer": layer,
            "neurons": neurons,
            "neuron_selection": c.neuron_selection,
            "canvas": c.canvas,
            "activation_initial": act(torch.round(init * 255).to(torch.uint8)),
            "activation_trigger": act(self.trigger),
        }
        log.info("trojan: layer %s neurons %s, activation %s -> %s", layer, neurons,
                 self._info["activation_initial"], self._info["activation_trigger"])
        return self.trigger

    def run(self, ctx: AttackContext) -> AttackResult:
        inputs = check_images(ctx.train.inputs, "training set")
        surrogate = train_surrogate(self, ctx, self.cfg.surrogate_epochs)
        self.generate_trigger(surrogate, inputs)
        del surrogate
        return super().run(ctx)

    def extra_info(self) -> dict[str, Any]:
        return dict(self._info)

    def restore(self, info: dict[str, Any]) -> None:
        if "trigger" not in info:
            raise ValueError("trojan: the cached attack info has no 'trigger'; re-run the attack (cache.enabled=false)")
        self.trigger = torch.tensor(info["trigger"], dtype=torch.uint8)
        self._info = dict(info)
