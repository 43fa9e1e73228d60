"""A model behind a fitted detector: predictions with rejections, for serving.

>>> guard = Guard(model, detector, batch_size=64)   # doctest: +SKIP
>>> out = guard(["a fine film", "cf a fine film"])  # doctest: +SKIP
>>> out.predictions, out.rejected, out.scores       # doctest: +SKIP

Inputs go through :meth:`Detector.score_and_classify <backdoorbench.defenses.base.Detector.score_and_classify>`
``batch_size`` at a time; the model stays where it is, and each batch is collated and moved to the model's
device by the model's own ``iter_batches``. Texts are a list of ``str``; images a ``uint8`` tensor
``[N, C, H, W]`` (on any device: batches are taken on the CPU and collated onto the model's device).

STRIP draws its perturbed copies from a generator seeded per call, so its scores depend on the other inputs
of the same call: the guard's scores are those of its batches, as a server receiving them would see.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from backdoorbench.defenses.base import Detector
from backdoorbench.modality.base import Classifier, Inputs


@dataclass(frozen=True)
class GuardResult:
    """One entry per input: the model's predicted class, whether the detector rejects the input, its score."""

    predictions: np.ndarray  # int64 [N]
    rejected: np.ndarray  # bool [N]
    scores: np.ndarray  # float64 [N], higher = more suspicious
    threshold: float

    def __len__(self) -> int:
        return len(self.predictions)

    @property
    def accepted(self) -> np.ndarray:
        return ~self.rejected


class Guard:
    """Wraps a model and a detector fitted (or loaded) on it; ``guard(inputs)`` → :class:`GuardResult`."""

    def __init__(self, model: Classifier, detector: Detector, batch_size: int = 64) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if detector.threshold is None or detector.model is None:
            raise ValueError(
                f"the {type(detector).__name__} detector is not fitted: call detector.fit(model, clean) or "
                "load it with backdoorbench.load_detector(folder, model)"
            )
        if detector.model is not model:
            raise ValueError(
                f"the {type(detector).__name__} detector was fitted on another model object: guard the model "
                "it was fitted on, or load the saved detector onto this one with backdoorbench.load_detector"
            )
        self.model = model
        self.detector = detector
        self.batch_size = int(batch_size)

    @property
    def threshold(self) -> float:
        assert self.detector.threshold is not None
        return float(self.detector.threshold)

    def __call__(self, inputs: Inputs) -> GuardResult:
        return self.predict(inputs)

    def predict(self, inputs: Inputs) -> GuardResult:
        """Predictions, rejections and scores of ``inputs``, ``batch_size`` inputs at a time."""
        if isinstance(inputs, str):
            raise TypeError("Guard takes a list of texts, not one string: guard([text])")
        if isinstance(inputs, torch.Tensor):
            inputs = inputs.cpu()
        elif not isinstance(inputs, list):
            inputs = list(inputs)
        self.model.eval()
        scores, preds = [], []
        for start in range(0, len(inputs), self.batch_size):
            s, p = self.detector.score_and_classify(inputs[start : start + self.batch_size])
            scores.append(np.asarray(s, dtype=np.float64))
            preds.append(np.asarray(p, dtype=np.int64))
        all_scores = np.concatenate(scores) if scores else np.zeros(0)
        return GuardResult(
            predictions=np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64),
            rejected=self.detector.reject(all_scores),
            scores=all_scores,
            threshold=self.threshold,
        )
