"""The modality interface: what differs between text and vision, behind one API.

Every victim model is wrapped in a :class:`Classifier`. Defenses and attacks that make sense for both
modalities (DAN, STRIP, NAD, RNP, ...) are written once against this interface:

* ``collate(inputs)`` turns raw inputs (strings or uint8 images) into a model-ready batch; it is
  ``finish_batch(collate_host(inputs))``: the host part (tokenise, stack uint8 images) and the part that runs on
  the device once the batch is there (uint8 → float), so that the narrow bytes cross the bus;
* ``batch_table(inputs)`` is what a training loader fetches whole batches from (:class:`BatchTable`: one
  gather per batch, no per-sample Python);
* ``forward(batch)`` returns logits;
* ``forward_features(batch, pooling)`` returns logits *and* one pooled feature vector per layer
  (transformer hidden states after each layer; CNN stage outputs, global-average pooled), from a
  single forward pass;
* ``predict`` / ``iter_batches`` are batched, ``torch.no_grad`` helpers with progress bars.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any, TypeAlias

import numpy as np
import torch
from torch import nn

from backdoorbench import runtime
from backdoorbench.data.base import Samples
from backdoorbench.data.images import ImageArray
from backdoorbench.progress import progress

Batch = dict[str, torch.Tensor]
#: Raw inputs as the batched helpers take them: texts (a sequence of ``str``), a uint8 image tensor, or a lazy
#: :class:`~backdoorbench.data.images.ImageArray` (what ``Samples.inputs`` holds).
Inputs: TypeAlias = "Sequence[Any] | torch.Tensor | ImageArray"


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    """The batch's tensors on ``device``; asynchronous host-to-GPU copies (``non_blocking``) on CUDA, where a
    pinned source lets the copy overlap the computation and a pageable one is staged by the driver."""
    non_blocking = torch.device(device).type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def take_rows(inputs: Any, index: torch.Tensor) -> Any:
    """The rows ``index`` of a dataset's inputs, fetched at once: one gather for a tensor (or an array-like
    that takes an index array), a list for a list of strings."""
    if isinstance(inputs, torch.Tensor):
        return inputs[index]
    if isinstance(inputs, np.ndarray):
        return torch.as_tensor(inputs[index.numpy()])
    if isinstance(inputs, (list, tuple)):
        return [inputs[i] for i in index.tolist()]
    return inputs[index]  # an array-like that gathers an index tensor itself (a lazy image store)


class BatchTable:
    """A dataset's inputs as a training loader reads them: :meth:`take` gives the host part of the batch of
    the rows ``index`` (``collate_host``) in one go. Subclasses prepare the inputs once (text: tokenised once,
    :class:`~backdoorbench.modality.text.TokenTable`) and hold no model (loader workers copy the table)."""

    def __init__(self, model: Classifier | None, inputs: Any) -> None:
        self.model, self.inputs = model, inputs

    def __len__(self) -> int:
        return len(self.inputs)

    def take(self, index: torch.Tensor) -> Batch:
        assert self.model is not None
        return self.model.collate_host(take_rows(self.inputs, index))


def attention_map(features: torch.Tensor, p: float = 2.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ_c |F_c|^p`` over the channel axis, flattened over positions and L2-normalised per sample.

    ``features`` is ``[B, C, H, W]`` (channels on axis 1, as CNN stage outputs) → ``[B, H·W]``, or
    ``[B, T, D]`` (transformer hidden states, channels last) → ``[B, T]``; ``mask`` ``[B, T]`` zeroes
    padding tokens. The normalisation is NAD's reference ``am / (‖am‖₂ + 1e-6)``."""
    if features.dim() == 4:
        am = features.abs().pow(p).sum(dim=1).flatten(1)
    elif features.dim() == 3:
        am = features.abs().pow(p).sum(dim=2)
        if mask is not None:
            am = am * mask.to(am.dtype)
    elif features.dim() == 2:  # a pooled vector (e.g. a ViT's pre-logits): one position per unit
        am = features.abs().pow(p)
    else:
        raise ValueError(f"attention_map: expected a 2-, 3- or 4-d feature tensor, got shape {tuple(features.shape)}")
    return am / (am.norm(dim=1, keepdim=True) + 1e-6)


class Classifier(nn.Module, ABC):
    """A classifier of one modality, with the hooks defenses need."""

    modality: str = ""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.forward_count = 0  # inputs sent through iter_batches (cost accounting)

    def reset_forward_count(self) -> None:
        self.forward_count = 0

    @property
    def device(self) -> torch.device:
        for t in (*self.parameters(), *self.buffers()):
            return t.device
        return torch.device("cpu")

    @abstractmethod
    def collate(self, inputs: Sequence[Any] | torch.Tensor) -> Batch:
        """Raw inputs → model-ready tensors (on CPU)."""

    @abstractmethod
    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits ``[B, num_classes]``."""

    @abstractmethod
    def forward_features(self, batch: Batch, pooling: str = "cls") -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and a list of per-layer pooled features ``[B, D_l]`` from one forward pass."""

    def collate_host(self, inputs: Sequence[Any] | torch.Tensor) -> Batch:
        """The part of :meth:`collate` that runs where the data is (a loader worker): default, all of it."""
        return self.collate(inputs)

    def finish_batch(self, batch: Batch) -> Batch:
        """The rest of :meth:`collate`, on the batch's device (images: uint8 → float); default: nothing."""
        return batch

    def batch_table(self, inputs: Inputs) -> BatchTable:
        """What a training loader fetches whole batches of ``inputs`` from (:class:`BatchTable`)."""
        return BatchTable(self, inputs)

    def encode(self, inputs: Inputs) -> list[Any] | None:
        """The per-sample part of :meth:`collate`, done once for a whole dataset (a training loader encodes its
        samples once, then :meth:`collate_encoded` builds each batch); ``None`` (default) when there is nothing
        to do once (images: ``collate`` is a cheap conversion)."""
        return None

    def collate_encoded(self, encoded: Sequence[Any]) -> Batch:
        """A batch from items of :meth:`encode`: the same tensors ``collate`` gives for their raw inputs."""
        raise NotImplementedError(f"{type(self).__name__} does not encode inputs ahead of collate")

    def augment(self, batch: Batch) -> Batch:
        """Training-time augmentation of a collated batch (the Lightning module calls it in training steps
        only). Default: none (text)."""
        return batch

    def layer_names(self) -> list[str]:
        """Names of the layers ``forward_features`` returns, in order."""
        return []

    def attention_maps(self, batch: Batch, p: float = 2.0) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and one L2-normalised attention map per layer (NAD; Zagoruyko & Komodakis 2017), from one
        pass: ``A = Σ_c |F_c|^p`` over the channels of a CNN stage output ``[B, C, H, W]`` → ``[B, H·W]``, or
        over the hidden units of a transformer layer ``[B, T, D]`` → ``[B, T]`` (padding tokens zeroed)."""
        logits, feats = self.forward_features(batch, pooling="none")
        mask = batch.get("attention_mask")
        return logits, [attention_map(f, p, mask) for f in feats]

    # -- batched helpers --------------------------------------------------------------------
    def iter_batches(
        self, inputs: Inputs, batch_size: int, desc: str | None = None
    ) -> Iterator[Batch]:
        """Collated batches of ``inputs``, on the model's device (the run's device once the pipeline placed the
        victim): the host part is collated here and finished there (images cross as uint8). With
        ``trainer.inference_precision`` bf16 / 16 (opt-in), the caller's work on each batch runs
        under ``torch.autocast`` on that device type (the block is entered around each ``yield``)."""
        n = len(inputs)
        starts = range(0, n, batch_size)
        dtype = runtime.inference_dtype()
        for start in progress(starts, desc=desc, total=len(starts)):
            chunk = inputs[start : start + batch_size]
            self.forward_count += len(chunk)
            device = self.device
            batch = self.finish_batch(to_device(self.collate_host(chunk), device))
            if dtype is None:
                yield batch
            else:
                with torch.autocast(device_type=device.type, dtype=dtype):
                    yield batch

    @torch.no_grad()
    def predict_logits(
        self, inputs: Inputs, batch_size: int = 64, desc: str | None = None
    ) -> torch.Tensor:
        was_training = self.training
        self.eval()
        outs = [self(b).float().cpu() for b in self.iter_batches(inputs, batch_size, desc)]
        self.train(was_training)
        if not outs:
            return torch.empty(0, self.num_classes)
        return torch.cat(outs)

    def predict(
        self, inputs: Inputs, batch_size: int = 64, desc: str | None = None
    ) -> np.ndarray:
        return self.predict_logits(inputs, batch_size, desc).argmax(1).numpy()

    def accuracy(self, samples: Samples, batch_size: int = 64, desc: str | None = None) -> float:
        if len(samples) == 0:
            return float("nan")
        return float((self.predict(samples.inputs, batch_size, desc) == samples.labels).mean())


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the model's ``state_dict``: for each entry in sorted key order, its dtype, its shape and
    its raw bytes (weights and buffers, e.g. BatchNorm statistics); then the same for the top-level module's
    own non-persistent buffers (a :class:`~backdoorbench.modality.vision.VisionClassifier`'s input mean and
    std, which normalise inside the model, so the same network with other normalisation does not match).

    The key names themselves are not hashed, so the same weights wrapped under another prefix match; their
    sorted order is. ``sha256:<hex>``. About 0.3 s on the 22.7M-parameter MiniLM on one CPU core.
    """
    h = hashlib.sha256()
    state = model.state_dict()
    own = {f"~{k}": b for k, b in model.named_buffers(recurse=False) if k not in state and b is not None}
    for key in [*sorted(state), *sorted(own)]:
        t = state[key] if key in state else own[key]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach()
        h.update(f"{str(t.dtype).removeprefix('torch.')}{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return "sha256:" + h.hexdigest()
