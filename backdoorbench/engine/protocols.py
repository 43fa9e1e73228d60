"""One protocol per defense kind: what the defense receives (the threat model), how it is run, and what is
measured. The pipeline picks the protocol by ``defense.kind`` (:data:`PROTOCOLS`).

* ``detector`` — fit on the defender's clean data, score the clean and the triggered test inputs, report
  FRR/FAR/AUROC at the calibrated threshold, BA/ASR after rejection (and after correction, for detectors
  that correct inputs);
* ``repair`` — BA/ASR before, repair with the defender's clean data, BA/ASR/R-Acc/DER after, the curve over
  the defense's main knob (reporting only), attention maps for image models;
* ``training`` — train a fresh model on the (possibly poisoned) training set without its provenance, BA/ASR
  after, and the share of backdoor samples among the samples whose labels the defense kept; for data-inspection
  defenses also recall of the poisoned samples, clean samples removed and the per-sample AUROC
  (``train_scores.csv``);
* ``inspection`` — inspect the victim with the defender's clean data only: the verdict score, the flag, the
  suspected target class(es) and whether the attack's true target (known to the pipeline, never to the
  defense) is among them; the reconstructed trigger as PNG files (``trigger/``); the victim's BA/ASR;
* ``none`` — the victim's BA/ASR.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from backdoorbench.attacks.base import Attack
from backdoorbench.data.base import Samples
from backdoorbench.data.poisoned import PoisonedDataset
from backdoorbench.data.split import Splits
from backdoorbench.defenses.base import (
    Defense,
    Detector,
    ModelInspector,
    RepairDefense,
    TrainingDefense,
    clean_count,
)
from backdoorbench.defenses.inspection.common import save_trigger_images
from backdoorbench.defenses.training.inspection import DataInspectionDefense
from backdoorbench.engine.rundir import Scored, draw, write_curve, write_sample_scores
from backdoorbench.engine.spec import RunSpec
from backdoorbench.engine.victim import Victim, defense_context, defense_lock
from backdoorbench.metrics import (
    FRR_GRID,
    accuracy,
    attack_success_rate,
    der,
    detection_metrics,
    inspection_metrics,
    robust_accuracy,
)
from backdoorbench.modality.base import Classifier
from backdoorbench.runtime import inference_probe, run_scope

log = logging.getLogger(__name__)


class Timer:
    """Wall time per named stage (``with timer("attack"): ...``); repeated stages add up."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    def __call__(self, name: str) -> _Stage:
        return _Stage(self, name)


class _Stage:
    def __init__(self, timer: Timer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timer.times[self.name] = round(self.timer.times.get(self.name, 0.0) + time.perf_counter() - self.t0, 3)


@dataclass
class RunContext:
    """Everything a protocol may use. The defense itself only ever gets what its protocol hands it. The device,
    the precisions and the folders are the run's context's (:mod:`backdoorbench.runtime`), not repeated here."""

    spec: RunSpec
    splits: Splits
    victim: Victim
    attack: Attack
    triggered: Samples  # triggered copies of the non-target test inputs (true labels kept)
    triggered_index: np.ndarray  # their indices in the test set
    target: np.ndarray  # the label each triggered input should become (ASR)
    new_model: Callable[[], Classifier]
    timer: Timer
    out: Path

    @property
    def batch(self) -> int:
        return int(getattr(self.spec.defense_cfg, "batch_size", 64))

    def defender_clean(self) -> Samples:
        """The defender's clean data: ``defense.clean_size`` (or ``clean_fraction``) samples of the reserve."""
        return self.splits.defender_clean(clean_count(self.spec.defense_cfg, len(self.splits.train)))

    def evaluate(self, model: Classifier) -> list[Scored]:
        """``model``'s predictions on the clean and on the triggered test inputs."""
        test, trig = self.splits.test, self.triggered
        with inference_probe("evaluation", model):
            return self._evaluate(model, test, trig)

    def _evaluate(self, model: Classifier, test: Samples, trig: Samples) -> list[Scored]:
        return [
            Scored("clean", np.arange(len(test)), test.labels, model.predict(test.inputs, self.batch, "eval: clean")),
            Scored(
                "poisoned",
                self.triggered_index,
                trig.labels,
                model.predict(trig.inputs, self.batch, "eval: triggered"),
            ),
        ]


@dataclass
class Outcome:
    """What a protocol measured: the scored test inputs (``scores.csv``) and the result sections."""

    scored: list[Scored]
    metrics: dict[str, Any]
    cost: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # further results.json sections (a repair curve)


def plain_metrics(scored: list[Scored], target: np.ndarray) -> dict[str, float | None]:
    """BA, and ASR when there are triggered inputs (None without a known trigger: attack=external)."""
    asr = attack_success_rate(scored[1].preds, target) if len(scored[1].labels) else None
    return {"ba": accuracy(scored[0].preds, scored[0].labels), "asr": asr}


# -- the protocols ----------------------------------------------------------------------------------------
def detect(defense: Detector, ctx: RunContext) -> Outcome:
    model, test, trig, tgt, timer = ctx.victim.model, ctx.splits.test, ctx.triggered, ctx.target, ctx.timer
    clean = ctx.defender_clean()
    with timer("defense_fit"), inference_probe("defense_fit", model):
        defense.fit(model, clean)
    model.reset_forward_count()
    counters0 = defense.cost_counters()
    with timer("scoring"), inference_probe("scoring", model):
        c_scores, c_preds = defense.score_and_classify(test.inputs)
        if len(trig):
            p_scores, p_preds = defense.score_and_classify(trig.inputs)
        else:  # no known trigger (attack=external): only the user's clean inputs are scored
            p_scores, p_preds = np.zeros(0), np.zeros(0, dtype=np.int64)
    n_scored = max(len(test) + len(trig), 1)
    cost: dict[str, Any] = {
        "forward_passes_per_input": model.forward_count / n_scored,
        "seconds_per_100_inputs": timer.times["scoring"] / n_scored * 100,
    }
    for name, count in defense.cost_counters().items():  # e.g. ONION's LM passes; partly cached inputs
        grown = count - counters0.get(name, 0)
        if name.endswith("_passes"):
            cost[f"{name}_per_input"] = grown / n_scored
        else:
            cost[name] = int(grown)
    scored = [
        Scored("clean", np.arange(len(test)), test.labels, c_preds, c_scores),
        Scored("poisoned", ctx.triggered_index, trig.labels, p_preds, p_scores),
    ]
    success = p_preds == tgt
    assert defense.calibration_scores is not None and defense.threshold is not None  # fit() set them
    metrics: dict[str, Any] = dict(
        detection_metrics(
            defense.threshold, c_scores, p_scores[success], {frr: defense.threshold_at(frr) for frr in FRR_GRID}
        )
    )
    c_rej, p_rej = defense.reject(c_scores), defense.reject(p_scores)
    metrics["ba_after_rejection"] = float(((c_preds == test.labels) & ~c_rej).mean())
    metrics["asr_after_rejection"] = float(((p_preds == tgt) & ~p_rej).mean()) if len(p_preds) else float("nan")
    metrics["clean_size"] = len(clean)
    if not ctx.attack.has_trigger:  # what a user without a trigger learns: how many of their inputs are rejected
        metrics["rejection_rate"] = float(c_rej.mean()) if len(c_rej) else float("nan")
    if defense.corrects_inputs:
        with timer("correction"):
            c_fixed = model.predict(defense.correct(test.inputs), ctx.batch, "eval: corrected clean")
            p_fixed = model.predict(defense.correct(trig.inputs), ctx.batch, "eval: corrected triggered") if len(
                trig
            ) else np.zeros(0, dtype=np.int64)
        metrics["ba_after_correction"] = accuracy(c_fixed, test.labels)
        metrics["asr_after_correction"] = attack_success_rate(p_fixed, tgt)
    return Outcome(scored, {**plain_metrics(scored, tgt), **metrics}, cost)


def _before_after(defense: Defense, ctx: RunContext, run: Callable[[], Classifier]) -> tuple[Classifier, Outcome]:
    """BA/ASR of the victim, the defense's run (its stage times recorded), BA/ASR/R-Acc/DER after."""
    with ctx.timer("evaluation"):
        before = ctx.evaluate(ctx.victim.model)
    # the defense's stage folders (Defense.work_dir / shared_dir) come with its context
    with run_scope(defense_context(ctx.spec, ctx.victim.cache)) as rt, defense_lock(rt), ctx.timer("defense"):
        defended = run()  # timed once the lock is held
    for stage, seconds in defense.stage_times.items():
        ctx.timer.times[f"defense_{stage}"] = seconds
    with ctx.timer("evaluation"):
        scored = ctx.evaluate(defended)
    b, a = plain_metrics(before, ctx.target), plain_metrics(scored, ctx.target)
    ba, asr, ba_after, asr_after = b["ba"], b["asr"], a["ba"], a["asr"]  # BA: always; ASR: before and after alike
    metrics = {
        **b,
        "ba_after": ba_after,
        "asr_after": asr_after,
        "r_acc_after": robust_accuracy(scored[1].preds, scored[1].labels),
        "der": der(ba, asr, ba_after, asr_after)
        if ba is not None and asr is not None and ba_after is not None and asr_after is not None
        else None,
    }
    if not ctx.attack.has_trigger:  # no known trigger (attack=external): BA before/after only
        metrics.update(asr=None, asr_after=None, r_acc_after=None)
    return defended, Outcome(scored, metrics)


def repair(defense: RepairDefense, ctx: RunContext) -> Outcome:
    clean = ctx.splits.holdout.subset(np.arange(0)) if defense.data_free else ctx.defender_clean()
    defended, outcome = _before_after(defense, ctx, lambda: defense.repair(ctx.victim.model, clean))
    outcome.metrics["clean_size"] = len(clean)
    with ctx.timer("evaluation"):
        curve = repair_curve(defense, ctx)
    if curve:
        outcome.extra["curve"] = curve
        write_curve(ctx.out / "repair_curve.csv", curve)
        draw(_repair_curve_figure, ctx.out / "repair_curve.png", curve, defense, ctx.spec)
    if ctx.spec.modality == "vision" and len(ctx.triggered):
        draw(_attention_figure, ctx.out / "attention_maps.png", ctx.victim.model, defended, ctx.triggered, ctx.spec)
    return outcome


def train(defense: TrainingDefense, ctx: RunContext) -> Outcome:
    poisoned = ctx.victim.poisoned_training_set()
    data = poisoned.materialize() if poisoned is not None else ctx.splits.train
    provenance_withheld = Samples(data.inputs, data.labels, data.modality)
    if isinstance(defense, DataInspectionDefense):  # + the model trained on this set (the victim) and trainer.*
        trained = ctx.victim.model if poisoned is not None else None
        run: Callable[[], Classifier] = lambda: defense.train(  # noqa: E731
            provenance_withheld, ctx.new_model, trained=trained, trainer=ctx.spec.trainer_cfg
        )
    else:
        run = lambda: defense.train(provenance_withheld, ctx.new_model)  # noqa: E731
    _, outcome = _before_after(defense, ctx, run)
    if isinstance(defense, DataInspectionDefense) and defense.sample_scores is not None:
        inspection_outcome(defense, ctx, poisoned, data.labels, outcome)
    if defense.labelled_indices is not None:
        kept = np.asarray(defense.labelled_indices, dtype=np.int64)
        outcome.metrics["labelled_fraction"] = len(kept) / max(len(ctx.splits.train), 1)
        if poisoned is not None:
            backdoor, modified = ctx.attack.backdoor_samples(poisoned)
            outcome.metrics["labelled_poisoned_fraction"] = float(backdoor[kept].mean()) if len(kept) else float("nan")
            outcome.metrics["labelled_modified_fraction"] = float(modified[kept].mean()) if len(kept) else float("nan")
    return outcome


def inspection_outcome(
    defense: DataInspectionDefense, ctx: RunContext, poisoned: PoisonedDataset | None, labels: np.ndarray,
    outcome: Outcome,
) -> None:
    """A data-inspection defense's sample-level metrics (``inspection_metrics``) from the provenance it never saw:
    the positives are the samples that carry the backdoor (``Attack.backdoor_samples``); ``train_scores.csv``
    has one row per training sample (index, training label, score, removed, poisoned)."""
    assert defense.sample_scores is not None and defense.removed is not None
    backdoor = ctx.attack.backdoor_samples(poisoned)[0] if poisoned is not None else None
    outcome.metrics.update(inspection_metrics(defense.sample_scores, defense.removed, backdoor))
    write_sample_scores(ctx.out / "train_scores.csv", labels, defense.sample_scores, defense.removed, backdoor)


def inspect_model(defense: ModelInspector, ctx: RunContext) -> Outcome:
    clean = ctx.defender_clean()
    with ctx.timer("defense"):
        verdict = defense.inspect(ctx.victim.model, clean)
    for stage, seconds in defense.stage_times.items():
        ctx.timer.times[f"defense_{stage}"] = seconds
    with ctx.timer("evaluation"):
        scored = ctx.evaluate(ctx.victim.model)
    true_target = ctx.attack.target if ctx.attack.has_trigger else None  # None: attack=external, all-to-all
    metrics: dict[str, Any] = {
        **plain_metrics(scored, ctx.target),
        "verdict_score": float(verdict.score),
        "flagged": bool(verdict.flagged),
        "suspected_targets": [int(c) for c in verdict.suspected_targets],
        "top_class": int(verdict.top_class),
        "true_target": true_target,
        # the attack's target is the method's most suspicious class / among the classes it flagged
        "top_class_correct": None if true_target is None else int(verdict.top_class) == true_target,
        "target_flagged": None if true_target is None else true_target in verdict.suspected_targets,
        "clean_size": len(clean),
    }
    files = save_trigger_images(verdict, ctx.out / "trigger")
    section = {
        "classes": [int(c) for c in verdict.classes],
        "class_scores": [float(v) for v in verdict.class_scores],
        "trigger_files": [str(f.relative_to(ctx.out)) for f in files],
        **(verdict.extra or {}),
    }
    return Outcome(scored, metrics, extra={"inspection": section})


def no_defense(defense: Defense, ctx: RunContext) -> Outcome:
    with ctx.timer("evaluation"):
        scored = ctx.evaluate(ctx.victim.model)
    return Outcome(scored, plain_metrics(scored, ctx.target))


#: defense kind → its protocol
PROTOCOLS: dict[str, Callable[[Any, RunContext], Outcome]] = {
    "detector": detect,
    "repair": repair,
    "training": train,
    "inspection": inspect_model,
    "none": no_defense,
}


def protocol_for(defense: Defense) -> Callable[[Any, RunContext], Outcome]:
    try:
        return PROTOCOLS[defense.kind]
    except KeyError:
        raise TypeError(
            f"{type(defense).__name__}.kind={defense.kind!r}: a defense derives from Detector, RepairDefense, "
            f"TrainingDefense or ModelInspector (kinds {', '.join(PROTOCOLS)})"
        ) from None


# -- repair reporting -------------------------------------------------------------------------------------
def repair_curve(defense: RepairDefense, ctx: RunContext) -> list[dict[str, float]]:
    """BA / ASR on the test set at every setting of the defense's :meth:`~RepairDefense.sweep` (reporting
    only: the defense chose its setting on its clean data before this runs)."""
    test, trig, batch = ctx.splits.test, ctx.triggered, ctx.batch
    rows = []
    for setting, m in defense.sweep():
        rows.append(
            {
                "setting": float(setting),
                "ba": accuracy(m.predict(test.inputs, batch), test.labels),
                "asr": attack_success_rate(m.predict(trig.inputs, batch), ctx.target),
                **{k: float(v) for k, v in defense.sweep_info.get(float(setting), {}).items()},
            }
        )
    return rows


def _repair_curve_figure(path: Path, curve: list[dict[str, float]], defense: RepairDefense, spec: RunSpec) -> None:
    from backdoorbench.plots import repair_curve_figure

    repair_curve_figure(
        path,
        curve,
        defense.sweep_name or "setting",
        title=f"{spec.defense.name} vs {spec.attack.name}",
        chosen=defense.chosen_setting,
    )


def _attention_figure(path: Path, before: Classifier, after: Classifier, triggered: Samples, spec: RunSpec) -> None:
    from backdoorbench.plots import attention_figure

    attention_figure(path, before, after, triggered, title=f"{spec.defense.name} vs {spec.attack.name}")
