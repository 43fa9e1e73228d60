"""Attack base classes.

An attack produces the backdoored *victim* a defense is evaluated against: a poisoned dataset (a
delta with provenance) and/or poisoned weights, plus the test-time trigger. Two settings exist for
text, as in the weight-poisoning literature:

* ``afm`` (attacker's fine-tuned model): the attacker trains on (poisoned) task data and the user
  deploys that model as is;
* ``apmf`` (attacker's pre-trained model, user fine-tunes): the attacker poisons the pre-trained
  model with *proxy* data, then the user fine-tunes it on their clean task data.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, cast

import numpy as np
import torch

from backdoorbench import runtime
from backdoorbench.data.base import Samples
from backdoorbench.data.poisoned import PoisonedDataset
from backdoorbench.errors import DataError
from backdoorbench.modality.base import Classifier, weights_fingerprint
from backdoorbench.seeds import stream
from backdoorbench.store import cache_key, shared_checkpoint
from backdoorbench.trainer.lit import TrainConfig, fit

SETTINGS = ("afm", "apmf")


def check_attacker_schedule(cfg: Any) -> None:
    """The checks of the attacker's schedule keys every attack config has: ``attack.epochs``, ``attack.batch_size``
    and ``attack.lr``, each a positive value or null (the user's ``trainer.*`` value)."""
    for key in ("epochs", "batch_size"):
        v = getattr(cfg, key)
        if v is not None and v < 1:
            raise ValueError(f"attack.{key} must be >= 1 or null (= the trainer's value), got {v}")
    if cfg.lr is not None and cfg.lr <= 0:
        raise ValueError(f"attack.lr must be > 0 or null (= the trainer's value), got {cfg.lr}")


@dataclass
class AttackContext:
    """Everything an attack may use. Never contains the test set."""

    train: Samples  # the task's training data: attacker's in AFM, the user's (clean) in APMF
    proxy: Samples  # attacker's proxy task data (APMF)
    num_classes: int
    new_model: Callable[[], Classifier]  # a fresh pre-trained victim
    trainer: TrainConfig  # the user's fine-tuning schedule
    seed: int = 0
    unlabeled: list[str] | None = None
    model_cfg: Any = None  # the model= group's config (name, max_length, ...)

    @property
    def work_dir(self) -> Path | None:
        """A stable folder (under the cache, keyed by the victim: ``Runtime.attack_folders``) for the training
        stages' per-epoch checkpoints, so a killed job's successor resumes them; None: stages always start from
        scratch. From the run's context, like every folder."""
        return runtime.current().work_dir

    @property
    def shared_dir(self) -> Path | None:
        """A folder (under the cache) for clean models several attacks start from (:meth:`clean_model`); None:
        each attack trains its own. From the run's context."""
        return runtime.current().shared_dir

    def checkpoint(self, stage: str) -> Path | None:
        """The resumable checkpoint of training stage ``stage`` (``<work_dir>/<stage>.partial.safetensors``) to
        pass to :func:`~backdoorbench.trainer.lit.fit`, or None without a ``work_dir``. Each stage of one
        attack needs its own name."""
        return None if self.work_dir is None else Path(self.work_dir) / f"{stage}.partial.safetensors"

    def clean_model(self, samples: Samples, cfg: TrainConfig, seed: int, desc: str, stage: str) -> Classifier:
        """A fresh pre-trained model (:attr:`new_model`) trained on ``samples`` (clean) with ``cfg`` and ``seed``:
        EP's and DFEP's clean starting model, the label-consistent and Trojan surrogate.

        With a :attr:`shared_dir` it is trained once per (pre-trained weights, ``samples``, every hashed field of
        ``cfg``, ``seed``): the finished checkpoint stays as ``<shared_dir>/clean-<key>.safetensors`` and the next
        attack asking for the same model loads it (a lock makes a concurrent one wait for the first). Loading
        gives the weights training would: training is seeded and the checkpoint holds its whole state. Without
        one, the stage trains with the attack's resumable checkpoint ``stage``."""
        model = self.new_model()
        if self.shared_dir is None:
            return fit(model, samples, cfg, seed, desc, checkpoint=self.checkpoint(stage))
        key = cache_key({
            "weights": weights_fingerprint(model),
            "modality": model.modality,
            "samples": samples.digest(),
            "trainer": cfg.cache_fields(),
            "seed": seed,
        })
        with shared_checkpoint(Path(self.shared_dir) / f"clean-{key}.safetensors", desc) as ckpt:
            return fit(model, samples, cfg, seed, desc, checkpoint=ckpt)


POISONED_SPLITS = ("train", "proxy")


@dataclass
class AttackResult:
    """What an attack produced: the victim, the poisoned set (a delta over ``ctx.train`` or ``ctx.proxy``, named
    by ``poisoned_split``) and what it decided while running (``info``, JSON-serialisable)."""

    model: Classifier
    poisoned: PoisonedDataset | None = None
    info: dict[str, Any] = field(default_factory=dict)
    poisoned_split: str | None = None  # "train" (AFM: the task's training set) | "proxy" (APMF) | None

    def __post_init__(self) -> None:
        if self.poisoned is not None and self.poisoned_split not in POISONED_SPLITS:
            raise ValueError(f"AttackResult: poisoned_split must be one of {POISONED_SPLITS} when poisoned is set")
        if self.poisoned is None:
            self.poisoned_split = None


class Attack(ABC):
    """Base class: ``run`` builds the victim, ``apply_trigger`` arms test inputs."""

    modality: ClassVar[str] = ""
    version: ClassVar[str] = "1"  # bump when the algorithm changes: part of the cache key
    #: the victim may be stored in the artifact cache (False for a user's own model: attack=external)
    cacheable: ClassVar[bool] = True
    #: the victim is trained on the run's training data (False for attack=external: a training-time defense,
    #: which trains its own model on that data, would never see the victim)
    trains: ClassVar[bool] = True

    def __init__(self, cfg: Any, seed: int = 0) -> None:
        self.cfg = cfg
        self.seed = seed

    @property
    def target(self) -> int:
        return int(self.cfg.target)

    @property
    def has_trigger(self) -> bool:
        """The test-time trigger is known, so ASR can be measured (False: ``triggered_test`` is empty)."""
        return True

    @property
    def triggered_source(self) -> str | None:
        """Where the triggered test inputs come from (``results.json`` ``run.triggered_test``): ``"trigger"``
        (this attack's trigger applied to the test set), ``"record"`` (a BackdoorBench record's own poisoned
        test set, attack=external) or None (no triggered inputs)."""
        return "trigger" if self.has_trigger else None

    def target_labels(self, true_labels: np.ndarray) -> np.ndarray:
        """The label the backdoor should produce for triggered inputs of these true labels (all-to-one: the
        target for all; all-to-all attacks override this)."""
        return np.full(len(true_labels), self.target, dtype=np.int64)

    def rng(self, salt: int = 0) -> np.random.Generator:
        return stream(self.seed, "attack", salt)

    @abstractmethod
    def apply_trigger(self, inputs: list[str] | torch.Tensor, rng: np.random.Generator) -> list[str] | torch.Tensor:
        """Return triggered copies of ``inputs``."""

    @abstractmethod
    def run(self, ctx: AttackContext) -> AttackResult:
        """Produce the backdoored victim."""

    def extra_info(self) -> dict[str, Any]:
        """What the attack decided while running, added to ``AttackResult.info`` (JSON-serialisable) and given
        back to :meth:`restore` on a cache hit. Default: nothing."""
        return {}

    def backdoor_samples(self, poisoned: PoisonedDataset) -> tuple[np.ndarray, np.ndarray]:
        """Per sample of the poisoned set's base: (carries the backdoor — modified by the attack *and* labelled
        with the attack's target for it: dirty-label samples and clean-label target-class samples; modified by
        the attack at all). Attacks that modify samples without planting the trigger (WaNet's noise mode)
        override this. Used for reporting only (DBD's share of backdoor samples among those it kept)."""
        prov = poisoned.provenance()
        targets = np.broadcast_to(np.asarray(self.target_labels(prov["original_label"])), prov["label"].shape)
        return prov["poisoned"] & (prov["label"] == targets), prov["poisoned"]

    def restore(self, info: dict[str, Any]) -> None:
        """Restore what the attack decided while running (e.g. NeuBA's chosen trigger) from the ``info`` of a
        cached victim; the pipeline calls this on a cache hit. Default: nothing to restore."""
        return None

    def check(self, num_classes: int) -> None:
        """Validate the config against the data (e.g. the target label exists)."""
        from backdoorbench.config import ConfigError

        if not 0 <= self.target < num_classes:
            raise ConfigError(f"attack.target={self.target} is not a label of this dataset (0..{num_classes - 1})")

    def check_image_size(self, height: int, width: int) -> None:
        """Validate the config against the data's image size (vision data only; the pipeline calls it before any
        training): a trigger that cannot fit raises :class:`~backdoorbench.config.ConfigError`. Default: no
        size-dependent parameter, nothing to check."""
        return None

    def triggered_test(self, test: Samples) -> tuple[Samples, np.ndarray]:
        """Triggered copies of the test samples whose true label is not the target (for ASR).

        Returns the triggered samples (with their *true* labels) and their indices in ``test``.
        """
        idx = self.non_target_indices(test)
        base = test.subset(idx).loaded()
        inputs = cast("list[str] | torch.Tensor", base.inputs)  # loaded: no lazy images
        return Samples(self.apply_trigger(inputs, self.rng(7919)), base.labels, base.modality), idx

    def non_target_indices(self, test: Samples) -> np.ndarray:
        """Indices of the test samples whose label is not the target; a :class:`DataError` when there are none
        (the attack success rate is measured on them)."""
        idx = np.flatnonzero(test.labels != self.target)
        if len(test) == 0:
            raise DataError("the test split is empty: no samples to measure the attack success rate on")
        if len(idx) == 0:
            raise DataError(
                f"no non-target test samples to measure the attack success rate on: all {len(test)} test samples "
                f"are labelled {self.target}, the attack's target (attack.target); check the dataset's labels "
                "or choose another attack.target"
            )
        return idx

    def poison(self, samples: Samples, rate: float, rng: np.random.Generator) -> PoisonedDataset:
        """Dirty-label data poisoning: trigger ``rate`` of the samples and relabel them to the target."""
        n = int(round(rate * len(samples)))
        idx = np.sort(rng.choice(len(samples), size=n, replace=False)) if n else np.zeros(0, dtype=np.int64)
        chosen = samples.subset(idx).loaded()
        inputs = self.apply_trigger(cast("list[str] | torch.Tensor", chosen.inputs), rng)  # loaded: no lazy images
        return PoisonedDataset(samples, idx, inputs, np.full(n, self.target), self.target)
