"""Saved detectors and the guard: ``Detector.save`` / ``bb.load_detector`` round-trip every built-in detector
(DAN and STRIP on text and images, ONION, RAP) to identical scores, refuse another model, and report broken
folders in one sentence naming them; ``Guard`` batches predictions and rejections.

Tiny models only: a random 2-layer BERT (conftest), a small CNN with BatchNorm, a tiny Llama LM for ONION.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_text_samples
from torch import nn

import backdoorbench as bb
from backdoorbench.data.base import Samples
from backdoorbench.defenses.base import Detector
from backdoorbench.defenses.detectors import onion
from backdoorbench.defenses.detectors.dan import DAN, DANConfig
from backdoorbench.defenses.detectors.onion import ONION, ONIONConfig
from backdoorbench.defenses.detectors.rap import RAP, RAPConfig
from backdoorbench.defenses.detectors.strip import STRIP, STRIPConfig
from backdoorbench.defenses.guard import Guard, GuardResult
from backdoorbench.defenses.persist import (
    META_FILE,
    TENSORS_FILE,
    DetectorLoadError,
    ModelMismatchError,
    weights_fingerprint,
)
from backdoorbench.modality.base import Classifier
from backdoorbench.modality.vision import ImageSpec, VisionClassifier

SPEC = ImageSpec(channels=1, height=8, width=8, mean=(0.5,), std=(0.5,), flip=False)


def tiny_cnn() -> VisionClassifier:
    """The same weights on every call (seeded), BatchNorm statistics included."""
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("stage1", nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()))
    net.add_module("stage2", nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU()))
    net.add_module("head", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)))
    with torch.no_grad():
        net.stage1[1].running_mean.uniform_(-0.1, 0.1)
    return VisionClassifier(net, 2, SPEC, stages=["stage1", "stage2"], augment=False).eval()


def images(n: int, seed: int) -> Samples:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    x = torch.randint(0, 90, (n, 1, 8, 8), generator=g)
    x[labels == 0, :, :4] += 120
    x[labels == 1, :, 4:] += 120
    return Samples(x.clamp(0, 255).to(torch.uint8), labels.numpy(), "vision")


def text_inputs() -> list[str]:
    texts = list(tiny_text_samples(24).inputs)
    return texts[:12] + [f"cf {t}" for t in texts[12:]] + ["one", ""]


@dataclass
class Case:
    make_model: Callable[[], Classifier]
    make_detector: Callable[[], Detector]
    clean: Samples
    inputs: Any


@pytest.fixture(scope="module")
def lm_dir(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with the MiniLM tokenizer, in a folder ONION loads by name."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tiny_bert_dir))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0)
    out = tmp_path_factory.mktemp("tiny_lm")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_case(name: str, tiny_bert_dir: Path, lm_dir: Path) -> Case:
    from backdoorbench.models.text import load_hf_classifier

    def bert() -> Classifier:
        return load_hf_classifier(str(tiny_bert_dir), 2, max_length=32).eval()

    text_clean = tiny_text_samples(40)
    if name == "dan-text":
        return Case(bert, lambda: DAN(DANConfig(), seed=0), text_clean, text_inputs())
    if name == "strip-text":
        return Case(bert, lambda: STRIP(STRIPConfig(num_copies=3), seed=1), text_clean, text_inputs())
    if name == "onion":
        cfg = ONIONConfig(lm=str(lm_dir), lm_max_length=16)
        return Case(bert, lambda: ONION(cfg, seed=0), tiny_text_samples(16), text_inputs())
    if name == "rap":
        cfg = RAPConfig(trigger="rq", epochs=2, train_batch_size=8, only_protected=False)
        return Case(bert, lambda: RAP(cfg, seed=0), text_clean, text_inputs())
    x = images(20, seed=7).inputs
    if name == "dan-vision":
        return Case(tiny_cnn, lambda: DAN(DANConfig(), seed=0), images(40, seed=0), x)
    assert name == "strip-vision"
    return Case(tiny_cnn, lambda: STRIP(STRIPConfig(num_copies=4), seed=2), images(40, seed=0), x)


CASES = ["dan-text", "dan-vision", "strip-text", "strip-vision", "onion", "rap"]


@pytest.fixture(scope="module", params=CASES)
def saved(request, tiny_bert_dir: Path, lm_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    case = make_case(request.param, tiny_bert_dir, lm_dir)
    model = case.make_model()
    det = case.make_detector().fit(model, case.clean)
    scores = det.score(case.inputs)
    folder = tmp_path_factory.mktemp(request.param) / "detector"
    assert det.save(folder) == folder
    return request.param, case, model, det, scores, folder


def test_saved_detector_reloads_to_identical_scores(saved) -> None:
    name, case, _, det, scores, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == [META_FILE, TENSORS_FILE]  # no temporary file left
    onion._SHARED_CACHES.clear()  # ONION: recompute the suspicions with the reloaded LM, not from the cache
    fresh = case.make_model()  # a new object with the same weights
    loaded = bb.load_detector(folder, fresh)
    assert type(loaded) is type(det) and loaded.model is fresh and loaded.cfg == det.cfg
    assert loaded.threshold == det.threshold
    assert np.array_equal(loaded.calibration_scores, det.calibration_scores)
    again = loaded.score(case.inputs)
    assert np.array_equal(again, scores), name
    assert np.array_equal(loaded.predict(case.inputs), det.predict(case.inputs))
    s, p = loaded.score_and_classify(case.inputs)
    assert np.array_equal(s, scores) and np.array_equal(p, fresh.predict(case.inputs))
    assert len(set(np.round(scores, 9).tolist())) > 1, "scores should vary, else equality proves little"
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["detector"] == name.split("-")[0] and meta["model"]["fingerprint"] == weights_fingerprint(fresh)


def test_saved_detector_refuses_another_model(saved) -> None:
    _, case, _, _, _, folder = saved
    other = case.make_model()
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-3  # one weight changed
    with pytest.raises(ModelMismatchError, match="fitted on a model with weights fingerprint sha256:") as info:
        bb.load_detector(folder, other)
    assert str(folder) in str(info.value) and "refit" in str(info.value)
    assert isinstance(info.value, ValueError)  # the CLI treats it as an expected error


def test_guard_batches_predictions_and_rejections(saved) -> None:
    name, case, model, det, scores, _ = saved
    guard = bb.Guard(model, det, batch_size=6)
    n = len(case.inputs)
    assert n > 6 and n % 6  # several batches, the last one short
    sizes: list[int] = []
    score_and_classify = det.score_and_classify

    def counted(inputs: Any) -> tuple[np.ndarray, np.ndarray]:
        sizes.append(len(inputs))
        return score_and_classify(inputs)

    det.score_and_classify = counted  # type: ignore[method-assign]
    try:
        out = guard(case.inputs)
    finally:
        del det.score_and_classify
    assert sizes == [6] * (n // 6) + [n % 6]
    assert isinstance(out, GuardResult) and len(out) == n and out.threshold == det.threshold
    assert np.array_equal(out.predictions, model.predict(case.inputs))
    assert np.array_equal(out.rejected, det.reject(out.scores)) and out.rejected.dtype == bool
    if not name.startswith("strip"):  # STRIP's copies are drawn per call, so its scores depend on the batch
        # texts are padded per batch: float32 rounding then moves a score of ~550 by up to ~1e-6 relative
        assert np.allclose(out.scores, scores, rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="another model object"):
        Guard(case.make_model(), det)
    if name == "dan-text":
        with pytest.raises(TypeError, match="list of texts"):
            guard("one text")
        with pytest.raises(ValueError, match="not fitted"):
            Guard(model, DAN(DANConfig()))


@pytest.fixture
def dan_folder(tmp_path: Path) -> tuple[Path, Classifier]:
    model = tiny_cnn()
    folder = DAN(DANConfig(), seed=0).fit(model, images(40, seed=0)).save(tmp_path / "dan")
    return folder, model


def _edit_meta(folder: Path, **changes: Any) -> None:
    meta = json.loads((folder / META_FILE).read_text())
    meta.update(changes)
    (folder / META_FILE).write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("no folder", "the folder does not exist"),
        ("no json", "detector.json is missing"),
        ("corrupt json", "detector.json is not valid JSON"),
        ("no safetensors", "detector.safetensors is missing"),
        ("truncated safetensors", "does not match the checksum"),
        ("format version", "saved in format version 99; this backdoorbench"),
        ("unknown name", "'nosuch', which is not registered"),
        ("not a detector", r"\('finetune'\) is not a detector"),  # told by its registry category (its kind)
    ],
)
def test_broken_folders_give_one_clear_error(dan_folder, breakage: str, message: str) -> None:
    folder, model = dan_folder
    target = folder
    if breakage == "no folder":
        target = folder.parent / "missing"
    elif breakage == "no json":
        (folder / META_FILE).unlink()
    elif breakage == "corrupt json":
        (folder / META_FILE).write_text('{"detector": "dan", ')
    elif breakage == "no safetensors":
        (folder / TENSORS_FILE).unlink()
    elif breakage == "truncated safetensors":
        data = (folder / TENSORS_FILE).read_bytes()
        (folder / TENSORS_FILE).write_bytes(data[: len(data) // 2])
    elif breakage == "format version":
        _edit_meta(folder, format_version=99)
    elif breakage == "not a detector":
        _edit_meta(folder, detector="finetune")
    else:
        _edit_meta(folder, detector="nosuch")
    with pytest.raises(DetectorLoadError, match=message) as info:
        bb.load_detector(target, model)
    assert str(target) in str(info.value) and "\n" not in str(info.value)


def test_load_never_unpickles_and_save_overwrites(dan_folder, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, model = dan_folder

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("load_detector must not unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    det = bb.load_detector(folder, model)
    monkeypatch.undo()
    old = (folder / META_FILE).read_text()
    det.cfg.frr = 0.2  # a different threshold, saved over the old files
    det.threshold = det.threshold_at(0.2)
    det.save(folder)
    assert (folder / META_FILE).read_text() != old
    assert sorted(os.listdir(folder)) == [META_FILE, TENSORS_FILE]
    assert bb.load_detector(folder, model).threshold == det.threshold


def test_fingerprint_covers_buffers_dtype_and_normalisation() -> None:
    base = weights_fingerprint(tiny_cnn())
    assert base == weights_fingerprint(tiny_cnn())
    bn = tiny_cnn()
    bn.net.stage1[1].running_var.mul_(2)  # a buffer, not a parameter
    assert weights_fingerprint(bn) != base
    assert weights_fingerprint(tiny_cnn().double()) != base
    other_norm = VisionClassifier(tiny_cnn().net, 2, ImageSpec(1, 8, 8, (0.4,), (0.5,), False), ["stage1"])
    assert weights_fingerprint(other_norm) != base  # same weights, other input normalisation


@pytest.mark.parametrize("saved", ["onion"], indirect=True)
def test_onion_refuses_another_language_model(saved, tmp_path: Path) -> None:
    _, case, _, _, _, folder = saved
    moved = tmp_path / "detector"
    shutil.copytree(folder, moved)
    meta = json.loads((moved / META_FILE).read_text())
    meta["state"]["lm_fingerprint"] = "sha256:" + "0" * 64
    (moved / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelMismatchError, match="language model of weights fingerprint") as info:
        bb.load_detector(moved, case.make_model())
    assert str(moved) in str(info.value)


def test_save_needs_a_fitted_registered_detector(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="call fit"):
        DAN(DANConfig()).save(tmp_path / "unfitted")

    class Unregistered(DAN):
        pass

    det = Unregistered(DANConfig(), seed=0).fit(tiny_cnn(), images(40, seed=0))
    with pytest.raises(ValueError, match="not a registered defense"):
        det.save(tmp_path / "unregistered")
    assert not (tmp_path / "unfitted").exists() and not (tmp_path / "unregistered").exists()


def test_public_entry_points_are_lazy() -> None:
    import subprocess
    import sys

    from conftest import subprocess_env

    code = (
        "import sys, backdoorbench as bb\n"
        "assert 'backdoorbench.defenses.persist' not in sys.modules\n"
        "assert bb.load_detector.__module__ == 'backdoorbench.defenses.persist'\n"
        "assert bb.Guard.__name__ == 'Guard' and issubclass(bb.ModelMismatchError, bb.DetectorLoadError)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=subprocess_env())


def test_a_save_that_fails_midway_leaves_the_old_pair_loadable(dan_folder, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    folder, model = dan_folder
    before = {name: (folder / name).read_bytes() for name in (META_FILE, TENSORS_FILE)}

    def half_written(tensors: Any, filename: str, metadata: Any = None) -> None:
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    det = bb.load_detector(folder, model)
    with pytest.raises(OSError, match="disk full"):
        det.save(folder)
    assert sorted(os.listdir(folder)) == [META_FILE, TENSORS_FILE]  # no temporary file left
    assert {name: (folder / name).read_bytes() for name in before} == before
    monkeypatch.undo()
    assert bb.load_detector(folder, model).threshold == det.threshold
