"""The three kinds of defense, and what each is allowed to see (the threat model).

* :class:`Detector` — online input filtering (DAN, STRIP, ONION, RAP): ``fit(model, clean)`` on the
  defender's clean data, ``score(inputs)`` → one float per input, higher = more suspicious. The base
  class holds out part of the clean data, calibrates the threshold there at the target FRR and rejects
  inputs scoring above it.
* :class:`TrainingDefense` — gets the (possibly poisoned) training set and a model factory, returns a
  trained model (DBD). Never told which samples are poisoned.
* :class:`RepairDefense` — gets the backdoored model and the defender's small clean set, returns a
  repaired model (NAD, RNP, fine-tuning).
* :class:`ModelInspector` — gets the model and the defender's clean data, returns a :class:`Verdict`: is the
  model backdoored (a score, higher = more likely, and a flag), towards which class(es), and the
  reconstructed trigger (Neural Cleanse).

No defense ever receives the test set, the trigger, or the poisoning provenance: the pipeline hands
them only :class:`~backdoorbench.data.base.Samples` of the defender's clean data (or the training
set, for training-time defenses).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from backdoorbench import runtime
from backdoorbench.data.base import Samples, as_samples
from backdoorbench.defenses.persist import save_detector
from backdoorbench.metrics import quantile_threshold
from backdoorbench.modality.base import Classifier, Inputs
from backdoorbench.seeds import stream

DEFENSE_KINDS = ("detector", "training", "repair", "inspection", "none")


@dataclass
class DefenseConfig:
    """Parameters every defense has (``defense.*``)."""

    name: str = ""
    clean_size: int = 500  # how many of the defender's held-out clean training samples it gets
    # or, when set, this fraction of the training-set size (the papers' "5% clean data"); overrides clean_size
    clean_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.clean_size < 1:
            raise ValueError(f"defense.clean_size must be >= 1, got {self.clean_size}")
        if self.clean_fraction is not None and not 0.0 < self.clean_fraction <= 1.0:
            raise ValueError(f"defense.clean_fraction must be in (0, 1] or null, got {self.clean_fraction}")

    def clean_count(self, train_size: int) -> int:
        """How many clean samples the defender gets, for a training set of ``train_size`` samples."""
        return clean_count(self, train_size)


def clean_count(defense_cfg: Any, train_size: int) -> int:
    """``clean_fraction`` × ``train_size`` (at least 1) when the config sets a fraction, else ``clean_size``;
    plugin configs that do not derive from :class:`DefenseConfig` may lack either key."""
    fraction = getattr(defense_cfg, "clean_fraction", None)
    if fraction is not None:
        return max(1, int(round(fraction * train_size)))
    return int(getattr(defense_cfg, "clean_size", DefenseConfig.clean_size))


@dataclass
class DetectorConfig(DefenseConfig):
    frr: float = 0.05  # target false-rejection rate for the threshold
    calibration_fraction: float = 0.2  # share of the clean data held out to calibrate the threshold
    # (detectors with their own held-out split, like DAN, calibrate there and ignore this)
    batch_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.frr < 1.0:
            raise ValueError(f"defense.frr must be in (0, 1), got {self.frr}")
        if not 0.0 < self.calibration_fraction < 1.0:
            raise ValueError(f"defense.calibration_fraction must be in (0, 1), got {self.calibration_fraction}")
        if self.batch_size < 1:
            raise ValueError(f"defense.batch_size must be >= 1, got {self.batch_size}")


class Defense(ABC):  # noqa: B024 - the three kinds below declare the abstract methods
    kind: ClassVar[str] = ""

    def __init__(self, cfg: Any, seed: int = 0) -> None:
        self.cfg = cfg
        self.seed = seed
        #: wall time (s) of each stage of the defense in this run, reported as ``timing.defense_<stage>``
        self.stage_times: dict[str, float] = {}

    def rng(self, salt: int = 0) -> np.random.Generator:
        return stream(self.seed, "defense", salt)

    # -- the folders, from the run's context (backdoorbench.runtime): never set on the defense ------------------
    @property
    def work_dir(self) -> Path | None:
        """The stable folder of this defense's stage checkpoints (``Runtime.defense_folders``: the same for the
        same attack, data, model, defense config and seed, so an interrupted run resumes there); None outside a
        defense's context."""
        return runtime.current().work_dir

    @property
    def run_dir(self) -> Path | None:
        """The run's output folder, for figures and summaries; None outside a run."""
        return runtime.current().run_dir

    @property
    def shared_dir(self) -> Path | None:
        """The victim's folder for stages several defenses share (fine-tuning is NAD's teacher): one per victim
        (attack, data, model, trainer, seed) whatever the defense, when the cache is on; None = share nothing."""
        return runtime.current().shared_dir


class Detector(Defense):
    """Online detector: score inputs; reject those above a threshold calibrated on clean data."""

    kind = "detector"
    #: True for detectors that hold out part of the clean data themselves and set
    #: ``calibration_scores`` from it in ``_fit`` (DAN calibrates on its normalisation split).
    calibrates_itself: ClassVar[bool] = False

    def __init__(self, cfg: Any, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self.model: Classifier | None = None
        self.threshold: float | None = None
        self.calibration_scores: np.ndarray | None = None

    # -- what subclasses implement ----------------------------------------------------------
    @abstractmethod
    def _fit(self, model: Classifier, clean: Samples) -> None:
        """Fit the detector's statistics on clean data (never test or poisoned data)."""

    @abstractmethod
    def score(self, inputs: Inputs) -> np.ndarray:
        """One float per input, higher = more likely poisoned."""

    def cost_counters(self) -> dict[str, int]:
        """Running counts of work beyond the classifier's own forward passes (e.g. ONION's LM sequences). The
        pipeline reports how much each grew while scoring the test inputs: a counter named ``<x>_passes`` as
        ``cost.<x>_passes_per_input``, any other as a total ``cost.<name>``. Default: none."""
        return {}

    def score_and_classify(self, inputs: Inputs) -> tuple[np.ndarray, np.ndarray]:
        """Scores and the model's *classes* (its predictions) for ``inputs``, where :meth:`predict` gives the
        detector's verdicts (True = rejected, as PyOD's ``predict``). Detectors that see the logits anyway
        override this to do both in one forward pass."""
        assert self.model is not None
        return self.score(inputs), self.model.predict(inputs, self.cfg.batch_size)

    # -- shared ------------------------------------------------------------------------------
    def split_clean(self, clean: Samples) -> tuple[Samples, Samples]:
        """Split the defender's clean data into a fitting part and a calibration part (by seed)."""
        n = len(clean)
        n_cal = max(1, int(round(self.cfg.calibration_fraction * n)))
        if n - n_cal < 2:
            raise ValueError(f"{type(self).__name__}: needs more clean data than {n} samples")
        perm = self.rng(1).permutation(n)
        return clean.subset(np.sort(perm[n_cal:])), clean.subset(np.sort(perm[:n_cal]))

    def fit(self, model: Classifier, clean: Samples | tuple[Any, Any]) -> Detector:
        """Fit on part of the clean data and calibrate the threshold on the rest. ``clean``: :class:`Samples`
        (``bb.Samples``) or an ``(inputs, labels)`` pair, converted by :func:`~backdoorbench.data.base.as_samples`."""
        clean = as_samples(clean, f"{type(self).__name__}.fit(model, clean)")
        self.model = model
        model.eval()
        if self.calibrates_itself:
            self.calibration_scores = None
            self._fit(model, clean)
            if self.calibration_scores is None:
                raise RuntimeError(f"{type(self).__name__}._fit must set calibration_scores")
            self.threshold = self.threshold_at(self.cfg.frr)
            return self
        fit_part, cal_part = self.split_clean(clean)
        self._fit(model, fit_part)
        self.calibrate(cal_part)
        return self

    def calibrate(self, clean: Samples, frr: float | None = None) -> float:
        """Score ``clean`` as the calibration scores and set the threshold at ``frr`` (default: ``cfg.frr``)."""
        self.calibration_scores = np.asarray(self.score(clean.inputs), dtype=np.float64)
        self.threshold = self.threshold_at(self.cfg.frr if frr is None else frr)
        return self.threshold

    def threshold_at(self, frr: float) -> float:
        """The threshold at a target FRR: :func:`~backdoorbench.metrics.quantile_threshold` of the calibration
        scores (the one rule; :meth:`fit` sets ``threshold`` with it once, the detection metrics read the grid's
        with it)."""
        if self.calibration_scores is None:
            raise RuntimeError("call fit() first")
        return quantile_threshold(self.calibration_scores, frr)

    def reject(self, scores: np.ndarray) -> np.ndarray:
        if self.threshold is None:
            raise RuntimeError("call fit() first")
        return np.asarray(scores) > self.threshold

    def predict(self, inputs: Inputs) -> np.ndarray:
        """True where an input is rejected as poisoned."""
        return self.reject(self.score(inputs))

    # -- saving (backdoorbench.defenses.persist) -------------------------------------------------
    def fitted_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """What ``_fit`` computed, for :meth:`save`: tensors (written to safetensors) and JSON-ready values
        (numbers, strings, lists, dicts with string keys). The base class saves the threshold, the
        calibration scores, the config and the seed itself; a detector returns only its own statistics.
        Detectors that support saving override this and :meth:`load_fitted_state`."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot be saved: it does not implement fitted_state() and load_fitted_state()"
        )

    def load_fitted_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore what :meth:`fitted_state` returned. Called by :func:`~backdoorbench.defenses.persist.
        load_detector` on a detector built from the saved config and seed, with ``self.model`` already set
        to the (fingerprint-checked) model, so that scores equal the saved detector's."""
        raise NotImplementedError(f"{type(self).__name__} does not implement load_fitted_state()")

    def save(self, folder: str | Path) -> Path:
        """Write the fitted detector to ``folder`` (``detector.safetensors`` + ``detector.json``, atomically)
        with a fingerprint of the model's weights; :func:`backdoorbench.load_detector` loads it back onto
        that model only."""
        return save_detector(self, folder)

    #: Detectors that can also *repair* inputs (ONION removes suspicious words) override ``correct``;
    #: the pipeline then reports BA / ASR on the corrected inputs too.
    corrects_inputs: ClassVar[bool] = False

    def correct(self, inputs: Inputs) -> Sequence[Any] | torch.Tensor:
        """Return corrected copies of ``inputs`` (only for detectors with ``corrects_inputs``)."""
        raise NotImplementedError(f"{type(self).__name__} does not correct inputs")


class TrainingDefense(Defense):
    kind = "training"

    def __init__(self, cfg: Any, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        #: defenses that keep the labels of part of the training set only (DBD) set this to the indices
        #: (into the samples ``train`` got) whose labels they kept; the pipeline, which knows the
        #: provenance the defense never sees, reports the share of poisoned samples among them.
        self.labelled_indices: np.ndarray | None = None

    @abstractmethod
    def train(self, train: Samples, model_factory: Callable[[], Classifier]) -> Classifier:
        """Train a model on the possibly poisoned training set."""


class RepairDefense(Defense):
    kind = "repair"
    #: True for a data-free repair (CLP): the pipeline hands it no clean data (an empty set)
    data_free: ClassVar[bool] = False

    def __init__(self, cfg: Any, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        #: optional extra columns of the :meth:`sweep` curve, ``{setting: {name: value}}``, computed by the
        #: defense on its own clean data (RNP: units pruned, clean accuracy)
        self.sweep_info: dict[float, dict[str, float]] = {}

    @property
    def chosen_setting(self) -> float | None:
        """The setting of the repaired model on the :meth:`sweep` axis, marked on the curve (None: none)."""
        return None

    @abstractmethod
    def repair(self, model: Classifier, clean: Samples) -> Classifier:
        """Return a repaired copy of the backdoored model."""

    def sweep(self) -> Iterator[tuple[float, Classifier]]:
        """After :meth:`repair`: ``(setting, model)`` pairs for a curve over the defense's main knob (RNP:
        the pruning threshold). The pipeline evaluates each model on the test set *for reporting only*;
        the defense chose its own setting on clean data before. Default: no curve."""
        return iter(())

    #: the name of the knob :meth:`sweep` varies (axis label of the curve)
    sweep_name: ClassVar[str] = ""


@dataclass
class Verdict:
    """What a model inspection concludes about one model (written to ``results.json`` by its protocol)."""

    score: float  # higher = more likely backdoored (Neural Cleanse: the anomaly index of the smallest trigger)
    flagged: bool  # the method's own decision rule (Neural Cleanse: anomaly index > 2)
    suspected_targets: list[int]  # the flagged classes, most suspicious first (empty when not flagged)
    top_class: int  # the most suspicious class, flagged or not
    class_scores: list[float]  # one value per class examined (Neural Cleanse: the L1 norm of its mask)
    classes: list[int]  # the classes examined, in the order of class_scores
    #: the reconstructed trigger per class: ``{label: {"mask": [H, W], "pattern": [C, H, W]}}``, in [0, 1]
    triggers: dict[int, dict[str, np.ndarray]]
    extra: dict[str, Any] | None = None  # further JSON-ready values (per-class anomaly indices, median, MAD)


class ModelInspector(Defense):
    """Model inspection: is this model backdoored, and towards which class? Gets the model and the defender's
    clean data only (no training data, no poisoned inputs, no trigger); returns a :class:`Verdict`."""

    kind = "inspection"

    @abstractmethod
    def inspect(self, model: Classifier, clean: Samples) -> Verdict:
        """Inspect ``model`` with the defender's clean data."""
