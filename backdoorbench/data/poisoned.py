"""A poisoned dataset stored as a *delta* over the clean one, with per-sample provenance.

Only the poisoned positions, their new inputs and their new labels are stored; the clean base is
re-derived from the data config. ``provenance()`` tells for every sample its index, whether it was
poisoned, its original label and its training label: the attack's bookkeeping, never shown to a
defense.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch

from backdoorbench.data.base import Samples
from backdoorbench.data.images import ImageArray, image_tensor


@dataclass
class PoisonedDataset:
    clean: Samples
    indices: np.ndarray  # positions in ``clean`` that were poisoned (sorted, unique)
    inputs: list[str] | torch.Tensor  # the poisoned inputs at those positions
    labels: np.ndarray  # the (possibly flipped) labels at those positions
    target: int

    def __post_init__(self) -> None:
        self.indices = np.asarray(self.indices, dtype=np.int64)
        self.inputs = image_tensor(self.inputs)  # the delta's own rows live in memory (they are few)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.indices) != len(self.inputs) or len(self.indices) != len(self.labels):
            raise ValueError("indices, inputs and labels of a poison delta must have equal length")
        if len(np.unique(self.indices)) != len(self.indices):
            raise ValueError("poisoned indices must be unique")
        if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= len(self.clean)):
            raise ValueError("poisoned index out of range")

    def __len__(self) -> int:
        return len(self.clean)

    @property
    def rate(self) -> float:
        return len(self.indices) / max(len(self.clean), 1)

    def materialize(self) -> Samples:
        """The training set the victim sees: the clean set with the delta applied. Images read from a file
        (:class:`~backdoorbench.data.images.ImageArray`) stay a view with the delta applied per index: the
        poisoned set costs the poisoned rows, not a second copy of the clean ones."""
        labels = self.clean.labels.copy()
        labels[self.indices] = self.labels
        if isinstance(self.clean.inputs, ImageArray):
            patch = cast(torch.Tensor, self.inputs)  # images: the poisoned rows are a tensor
            inputs: list[str] | torch.Tensor | ImageArray = self.clean.inputs.with_patch(self.indices, patch)
        elif isinstance(self.clean.inputs, torch.Tensor):
            inputs = self.clean.inputs.clone()
            if len(self.indices):
                inputs[torch.from_numpy(self.indices)] = cast(torch.Tensor, self.inputs)  # images: a tensor
        else:
            inputs = list(self.clean.inputs)
            for pos, new in zip(self.indices.tolist(), self.inputs):
                inputs[pos] = new
        return Samples(inputs, labels, self.clean.modality)

    def is_poisoned(self) -> np.ndarray:
        mask = np.zeros(len(self.clean), dtype=bool)
        mask[self.indices] = True
        return mask

    def provenance(self) -> dict[str, np.ndarray]:
        labels = self.clean.labels.copy()
        labels[self.indices] = self.labels
        return {
            "index": np.arange(len(self.clean)),
            "poisoned": self.is_poisoned(),
            "original_label": self.clean.labels.copy(),
            "label": labels,
        }

    # -- storage (delta only) ---------------------------------------------------------------
    def delta_dict(self) -> dict:
        if isinstance(self.inputs, torch.Tensor):
            raise TypeError("tensor deltas are stored with save_delta()")
        return {
            "target": int(self.target),
            "n_clean": len(self.clean),
            "indices": self.indices.tolist(),
            "inputs": list(self.inputs),
            "labels": self.labels.tolist(),
        }

    def save_delta(self, path: Path) -> None:
        path = Path(path)
        if isinstance(self.inputs, torch.Tensor):
            from safetensors.torch import save_file

            save_file(
                {
                    "indices": torch.from_numpy(self.indices),
                    "inputs": self.inputs.contiguous(),
                    "labels": torch.from_numpy(self.labels),
                    "meta": torch.tensor([self.target, len(self.clean)]),
                },
                str(path),
            )
        else:
            path.write_text(json.dumps(self.delta_dict()))

    @classmethod
    def load_delta(cls, clean: Samples, path: Path) -> PoisonedDataset:
        path = Path(path)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            d = load_file(str(path))
            target, n_clean = (int(x) for x in d["meta"].tolist())
            parts = (d["indices"].numpy(), d["inputs"], d["labels"].numpy())
        else:
            d = json.loads(path.read_text())
            target, n_clean = int(d["target"]), int(d["n_clean"])
            parts = (np.array(d["indices"]), d["inputs"], np.array(d["labels"]))
        if n_clean != len(clean):
            raise ValueError(f"poison delta was made for {n_clean} samples, the clean base has {len(clean)}")
        out = cls(clean, *parts, target)
        return out
