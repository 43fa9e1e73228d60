"""What the end-to-end component tests (``test_e2e_text_components.py``, ``test_e2e_vision_components.py``)
check on every run, recomputed from what the run wrote and from the detector it used: ``scores.csv`` against
the test split, BA / ASR to the last bit, and for detectors the threshold, FRR, FAR, FAR at the FRR grid,
AUROC, the rejections and BA / ASR after rejection."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from backdoorbench.data.split import Splits, threat_model_split
from backdoorbench.engine.pipeline import run_experiment, validate
from backdoorbench.metrics import FRR_GRID
from backdoorbench.registry import REGISTRY

RESULT_KEYS = {"run", "metrics", "timing", "cost", "data", "cache", "out_dir", "frr_target"}
DETECTOR_METRICS = {"ba", "asr", "threshold", "frr", "far", "far_at_frr", "auroc", "ba_after_rejection",
                    "asr_after_rejection", "clean_size"}



def splits_of(cfg) -> Splits:
    """The run's threat-model split, derived again from its config."""
    spec = validate(cfg)
    bundle = spec.dataset.obj(root=spec.data_cfg.root, **spec.data_cfg.options)
    return threat_model_split(bundle, spec.data_cfg, spec.seed)


def read_delta(results: dict) -> tuple[np.ndarray, np.ndarray, Any]:
    """(indices, labels, inputs) of the poisoned delta the run stored with its victim."""
    entry = Path(results["cache"]["path"])
    if (entry / "poison.safetensors").is_file():
        from safetensors.torch import load_file

        d = load_file(str(entry / "poison.safetensors"))
        return d["indices"].numpy(), d["labels"].numpy(), d["inputs"]
    d = json.loads((entry / "poison.json").read_text())
    return np.array(d["indices"]), np.array(d["labels"]), d["inputs"]


class ScoringSpy:
    """Records the pipeline's ``score_and_classify`` calls on a detector class (the instance, scores, preds)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        cls = REGISTRY.get("defense", name).obj
        original = cls.score_and_classify
        self.calls: list[tuple[Any, np.ndarray, np.ndarray]] = []
        self.inputs: list[Any] = []
        self.active = False

        def spy(det, inputs):
            self.active = True
            self.inputs.append(inputs)
            try:
                scores, preds = original(det, inputs)
            finally:
                self.active = False
            self.calls.append((det, np.asarray(scores, dtype=np.float64), np.asarray(preds)))
            return scores, preds

        monkeypatch.setattr(cls, "score_and_classify", spy)


def run(cfg, out: Path) -> tuple[dict, list[dict[str, str]]]:
    results = run_experiment(cfg, out)
    saved = json.loads((out / "results.json").read_text())
    assert RESULT_KEYS <= set(saved) and saved["run"] == results["run"] and saved["data"] == results["data"]
    assert saved["cache"]["key"] == results["cache"]["key"] and saved["metrics"]["ba"] == results["metrics"]["ba"]
    with (out / "scores.csv").open(newline="") as f:
        return results, list(csv.DictReader(f))


def check_plain(results: dict, rows: list[dict[str, str]], splits: Splits, target: int, sizes: dict,
                triggered: int) -> None:
    """The rows of scores.csv are the test split and its triggered non-target samples; BA and ASR are their
    accuracy and attack success, to the last bit."""
    assert results["data"] == sizes
    clean = [r for r in rows if r["split"] == "clean"]
    poisoned = [r for r in rows if r["split"] == "poisoned"]
    assert len(rows) == len(clean) + len(poisoned)
    assert [int(r["index"]) for r in clean] == list(range(sizes["test"]))
    assert [int(r["label"]) for r in clean] == splits.test.labels.tolist()
    non_target = np.flatnonzero(splits.test.labels != target)
    assert [int(r["index"]) for r in poisoned] == non_target.tolist() and len(non_target) == triggered
    assert [int(r["label"]) for r in poisoned] == splits.test.labels[non_target].tolist()
    preds = np.array([int(r["pred"]) for r in poisoned])
    success = np.array([int(r["attack_success"]) for r in poisoned])
    assert np.array_equal(success, preds == target)
    m = results["metrics"]
    assert m["ba"] == np.mean([r["pred"] == r["label"] for r in clean])
    assert m["asr"] == success.mean()
    assert len({r["pred"] for r in clean}) > 1, "a constant victim would make these checks vacuous"


def check_detector(results: dict, rows: list[dict[str, str]], spy: ScoringSpy, frr: float) -> Any:
    """Threshold, FRR, FAR, FAR at the FRR grid, AUROC, rejections and BA/ASR after rejection, recomputed from
    the detector's calibration scores and the scores it gave the test inputs."""
    assert len(spy.calls) == 2  # the clean test set, then the triggered inputs
    (det, c_scores, c_preds), (det2, p_scores, p_preds) = spy.calls
    assert det is det2
    clean = [r for r in rows if r["split"] == "clean"]
    poisoned = [r for r in rows if r["split"] == "poisoned"]
    assert [int(r["pred"]) for r in clean] == c_preds.tolist()
    assert [int(r["pred"]) for r in poisoned] == p_preds.tolist()
    assert [r["score"] for r in clean + poisoned] == [f"{s:.6g}" for s in np.concatenate([c_scores, p_scores])]
    m = results["metrics"]
    assert set(m) == DETECTOR_METRICS | ({"ba_after_correction", "asr_after_correction"} if det.corrects_inputs
                                         else set())
    assert results["frr_target"] == frr
    # the threshold: the (1 - frr) quantile of the calibration scores, "higher" method = sorted[ceil(q·(n-1))]
    cal = np.sort(det.calibration_scores)
    k = math.ceil((1 - frr) * (len(cal) - 1))
    assert m["threshold"] == det.threshold == cal[k]
    assert (cal[k + 1 :] > cal[k]).all()  # no tie above it: the calibration FRR is what the quantile implies
    assert np.mean(det.calibration_scores > det.threshold) == (len(cal) - 1 - k) / len(cal) <= frr
    rejected = c_scores > det.threshold
    assert [r["rejected"] for r in clean] == [str(int(x)) for x in rejected]
    assert [r["rejected"] for r in poisoned] == [str(int(x)) for x in p_scores > det.threshold]
    assert m["frr"] == rejected.mean()
    success = np.array([r["attack_success"] == "1" for r in poisoned])
    hits = p_scores[success]
    if not success.any():  # no successful poisoned input: FAR and AUROC are undefined (null in results.json)
        assert all(math.isnan(v) for v in (m["far"], m["auroc"], *m["far_at_frr"].values()))
    else:
        assert m["far"] == (hits <= det.threshold).mean()
        for g in FRR_GRID:
            assert m["far_at_frr"][f"{g:g}"] == (hits <= cal[math.ceil((1 - g) * (len(cal) - 1))]).mean()
        above = (hits[:, None] > c_scores[None, :]).mean() + 0.5 * (hits[:, None] == c_scores[None, :]).mean()
        assert m["auroc"] == pytest.approx(above, abs=1e-12)
    labels = np.array([int(r["label"]) for r in clean])
    assert m["ba_after_rejection"] == ((c_preds == labels) & ~rejected).mean()
    assert m["asr_after_rejection"] == (success & (p_scores <= det.threshold)).mean()
    return det
