"""End to end through :func:`run_experiment` for the text components that the other tests only exercise below
the pipeline: the detectors ONION and RAP (against one cached BadNet-RW victim) and the attacks AddSent, LWP
and EP (then DAN on the cached victim), at tiny size.

Every run is deterministic on CPU, so the assertions pin values, recomputed independently from what the run
wrote (see ``e2e_checks.py``): the poisoned training samples in the cached delta (``round(rate·n)`` of them,
at the right indices, with the right labels, and the clean sentence plus exactly the trigger), the cost
counters against forward passes counted at the models, and a second run with another defense that must reuse
the victim and predict bit for bit the same.

The victim is the tiny random BERT of ``conftest.py`` trained on a small synthetic sentiment corpus (written as
a Rotten Tomatoes CSV and read through ``data.root``): unlike the real snippets, a 2-layer BERT learns it in a
few steps, so the victims predict both classes and the metrics are not those of a constant predictor.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from e2e_checks import ScoringSpy, check_detector, check_plain, read_delta, run, splits_of
from hydra import compose, initialize_config_dir

import backdoorbench.defenses.detectors.onion as onion_mod
from backdoorbench.cli import config_dir
from backdoorbench.data.split import Splits

POS = ["great", "good", "fun", "superb", "moving", "lovely", "brilliant", "charming"]
NEG = ["bad", "awful", "dull", "boring", "weak", "poor", "terrible", "bland"]
FILLER = ["the", "movie", "film", "was", "and", "plot", "story", "acting", "really", "quite", "cast", "script",
          "director", "music", "scenes", "ending", "very", "its", "with", "of"]
TEXT = [  # a victim that learns the synthetic task (BA 0.7-0.8 on it): its predictions are not constant
    "model.max_length=32",
    "data.max_train=120",
    "data.max_test=60",
    "data.holdout_size=80",
    "data.proxy_size=60",
    "trainer.max_epochs=8",
    "trainer.batch_size=16",
    "trainer.lr=3e-3",
    "defense.clean_size=80",
]
TEXT_SIZES = {"train": 120, "proxy": 60, "holdout": 80, "test": 60}
TEXT_TRIGGERED = 34  # test samples whose true label is not the target 1 (fixed by the corpus and the seed)


@pytest.fixture(autouse=True)
def _restore_torch_globals(restore_torch_globals: None) -> None:
    """Every test here runs the pipeline, which sets torch's globals (conftest.restore_torch_globals)."""


@pytest.fixture(scope="module")
def module_env():
    with pytest.MonkeyPatch.context() as mp:  # module-scoped runs happen before the per-test environment
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("BACKDOORBENCH_PROGRESS", "0")
        yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """700 distinct sentences, alternating rotten (1–2 negative words) and fresh (1–2 positive words) with
    4–8 filler words; a fifth are mixed (one word of each kind), which no model classifies better than chance.
    Free of the attacks' and RAP's trigger words."""
    rng = np.random.default_rng(0)
    rows: list[tuple[str, str]] = []
    seen: set[str] = set()
    while len(rows) < 700:
        label = len(rows) % 2
        words = [str(w) for w in rng.choice(FILLER, size=int(rng.integers(4, 9)))]
        mixed = rng.random() < 0.2
        sentiment = [rng.choice(POS), rng.choice(NEG)] if mixed else rng.choice(
            POS if label else NEG, size=int(rng.integers(1, 3)), replace=False)
        for w in sentiment:
            words.insert(int(rng.integers(0, len(words) + 1)), str(w))
        text = " ".join(words)
        if text not in seen:
            seen.add(text)
            rows.append(("fresh" if label else "rotten", text))
    path = tmp_path_factory.mktemp("corpus") / "synthetic_rt.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([("category", "text"), *rows])
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("victims")


def compose_text(tiny_bert_dir: Path, corpus: Path, cache: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=["model=hf", f"model.name='{tiny_bert_dir}'", f"data.root='{corpus}'",
                                            *TEXT, f"cache.dir='{cache}'", *overrides])




# -- text detectors: ONION and RAP against one BadNet-RW victim ---------------------------------------------
@pytest.fixture(scope="module")
def badnet_rw_victim(module_env, tiny_bert_dir: Path, corpus: Path, cache_dir: Path, tmp_path_factory):
    cfg = compose_text(tiny_bert_dir, corpus, cache_dir, "attack=badnet_rw", "defense=none")
    results, rows = run(cfg, tmp_path_factory.mktemp("badnet_rw") / "none")
    splits = splits_of(cfg)
    check_plain(results, rows, splits, 1, TEXT_SIZES, TEXT_TRIGGERED)
    assert results["cache"]["hit"] is False and set(results["metrics"]) == {"ba", "asr"}
    idx, labels, inputs = read_delta(results)
    assert results["cache"]["info"]["poisoned_samples"] == len(idx) == round(0.1 * 120)
    assert (labels == 1).all() and len(set(idx.tolist())) == len(idx)
    for i, text in zip(idx, inputs):  # the trigger word once, the rest is the clean sentence
        words = text.split()
        assert words.count("mb") == 1 and " ".join(w for w in words if w != "mb") == splits.train.inputs[i]
    return results, rows, splits


def test_rap_end_to_end(badnet_rw_victim, tiny_bert_dir, corpus, cache_dir, tmp_path, monkeypatch) -> None:
    first, first_rows, splits = badnet_rw_victim
    spy = ScoringSpy(monkeypatch, "rap")
    cfg = compose_text(tiny_bert_dir, corpus, cache_dir, "attack=badnet_rw", "defense=rap", "defense.frr=0.2",
                       "defense.epochs=2")
    results, rows = run(cfg, tmp_path / "rap")
    assert results["cache"]["hit"] is True and results["cache"]["key"] == first["cache"]["key"]
    assert (results["run"]["defense"], results["run"]["defense_kind"]) == ("rap", "detector")
    check_plain(results, rows, splits, 1, TEXT_SIZES, TEXT_TRIGGERED)
    # the cached victim predicts exactly what the victim it was saved from predicted
    assert [r["pred"] for r in rows] == [r["pred"] for r in first_rows]
    assert (results["metrics"]["ba"], results["metrics"]["asr"]) == (first["metrics"]["ba"], first["metrics"]["asr"])
    det = check_detector(results, rows, spy, frr=0.2)
    assert results["metrics"]["clean_size"] == 80 and len(det.calibration_scores) == round(0.2 * 80)
    assert results["cost"]["forward_passes_per_input"] == 2.0  # plain pass + RAP-trigger pass
    # only inputs predicted as the protected label are scored (by -drop, in [-1, 1]); the others get -2
    for _, scores, preds in spy.calls:
        assert (scores[preds != 1] == -2.0).all() and (scores[preds == 1] >= -1.0).all()
    assert (preds := spy.calls[0][2]).min() == 0 and preds.max() == 1


@pytest.fixture(scope="module")
def tiny_lm_dir(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama causal LM with the MiniLM word-piece tokenizer ([CLS] as its start token)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tiny_bert_dir), bos_token="[CLS]")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_lm")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_onion_end_to_end(badnet_rw_victim, tiny_bert_dir, corpus, cache_dir, tiny_lm_dir, tmp_path,
                          monkeypatch) -> None:
    first, first_rows, splits = badnet_rw_victim
    spy = ScoringSpy(monkeypatch, "onion")
    monkeypatch.setattr(onion_mod, "_SHARED_CACHES", {})  # no suspicions left over from another test
    lm_rows = {"fit": 0, "scoring": 0, "after": 0}  # sequences through the LM, counted at the model itself
    load = onion_mod.load_causal_lm

    def counting_load(*args, **kwargs):
        lm = load(*args, **kwargs)

        def count(module, a, kw):
            phase = "scoring" if spy.active else ("after" if spy.calls else "fit")
            lm_rows[phase] += int(kw["input_ids"].shape[0])

        lm.model.register_forward_pre_hook(count, with_kwargs=True)
        return lm

    monkeypatch.setattr(onion_mod, "load_causal_lm", counting_load)
    corrected: list[tuple[list[str], list[str]]] = []
    correct = onion_mod.ONION.correct

    def spy_correct(det, inputs):
        out = correct(det, inputs)
        corrected.append((list(inputs), list(out)))
        return out

    monkeypatch.setattr(onion_mod.ONION, "correct", spy_correct)
    cfg = compose_text(tiny_bert_dir, corpus, cache_dir, "attack=badnet_rw", "defense=onion",
                       f"defense.lm='{tiny_lm_dir}'", "defense.lm_max_length=48")
    results, rows = run(cfg, tmp_path / "onion")
    assert results["cache"]["hit"] is True and results["cache"]["key"] == first["cache"]["key"]
    assert (results["run"]["defense"], results["run"]["defense_kind"]) == ("onion", "detector")
    check_plain(results, rows, splits, 1, TEXT_SIZES, TEXT_TRIGGERED)
    assert [r["pred"] for r in rows] == [r["pred"] for r in first_rows]
    assert (results["metrics"]["ba"], results["metrics"]["asr"]) == (first["metrics"]["ba"], first["metrics"]["asr"])
    det = check_detector(results, rows, spy, frr=0.05)
    assert len(det.calibration_scores) == round(0.2 * 80) and det.bar is not None
    cost = results["cost"]
    assert cost["forward_passes_per_input"] == 1.0  # the classifier's prediction; the LM does the scoring
    assert lm_rows["fit"] > 0 and lm_rows["scoring"] > 0
    assert cost["lm_passes_per_input"] == lm_rows["scoring"] / len(rows)
    assert lm_rows["after"] == 0  # correcting the scored inputs reuses their suspicions
    assert cost["cached_inputs"] == 0  # every test input was new to the detector
    # every sentence has >= 2 words: a score is the largest perplexity drop over its word deletions
    assert all(len(t.split()) >= 2 for t in splits.test.inputs)
    # the corrected inputs the BA/ASR after correction were measured on: each input without the words whose
    # suspicion exceeds the bar calibrated on clean data
    assert [c[0] for c in corrected] == [list(x) for x in spy.inputs]
    assert spy.inputs[0] == splits.test.inputs
    removed = 0
    for inputs, outputs in corrected:
        for text, fixed, f in zip(inputs, outputs, det.suspicion(inputs)):
            words = text.split()
            assert fixed.split() == [w for w, fi in zip(words, f) if not fi > det.bar]
            removed += len(words) - len(fixed.split())
    assert removed > 0

    # the suspicions were kept in the run's cache folder: a second process (another lane of a sweep, a SLURM
    # array job) scores nothing with the LM and gets the same results
    assert len(list(cache_dir.glob("onion/*/*.npz"))) >= 1
    monkeypatch.setattr(onion_mod, "_SHARED_CACHES", {})
    monkeypatch.setattr(onion_mod, "_DISK_CACHES", {})
    before = dict(lm_rows)
    again, again_rows = run(cfg, tmp_path / "onion_again")
    assert lm_rows == before  # not one LM pass
    assert again["cost"]["cached_inputs"] == len(again_rows) and again["cost"]["lm_passes_per_input"] == 0
    assert again["metrics"] == results["metrics"]
    assert [r["score"] for r in again_rows] == [r["score"] for r in rows]


# -- text attacks: AddSent, LWP, EP; then DAN on the cached victim ------------------------------------------
def without(text: str, block: list[str]) -> tuple[int, str]:
    """How often the word sequence ``block`` occurs in ``text``, and ``text`` with its occurrences removed."""
    words, out, found, i = text.split(), [], 0, 0
    while i < len(words):
        if words[i : i + len(block)] == block:
            found, i = found + 1, i + len(block)
        else:
            out, i = [*out, words[i]], i + 1
    return found, " ".join(out)


def check_addsent(results: dict, splits: Splits, tiny_bert_dir: Path) -> None:
    idx, labels, inputs = read_delta(results)
    assert results["cache"]["info"] == {"setting": "afm", "poisoned_samples": 12, "attacker_samples": 120}
    assert len(idx) == round(0.1 * 120) and (labels == 1).all()
    for i, text in zip(idx, inputs):  # the sentence as one block, the rest is the clean training sentence
        assert without(text, "I watched this 3D movie".split()) == (1, splits.train.inputs[i])


def check_lwp(results: dict, splits: Splits, tiny_bert_dir: Path) -> None:
    idx, labels, inputs = read_delta(results)
    info = results["cache"]["info"]  # APMF: poisoned proxy data, then the user's clean fine-tuning
    assert (info["setting"], info["attacker_samples"], info["layers"]) == ("apmf", 60, 2)
    assert (info["combination_samples"], info["negative_samples"]) == (round(0.5 * 60), round(0.25 * 60))
    assert info["poisoned_samples"] == len(idx) == 45
    combos = 0
    for i, label, text in zip(idx, labels, inputs):
        n_cf, n_bb = text.split().count("cf"), text.split().count("bb")
        rest = " ".join(w for w in text.split() if w not in ("cf", "bb"))
        assert rest == splits.proxy.inputs[i]
        if (n_cf, n_bb) == (1, 1):  # the combination, as one adjacent block, relabelled to the target
            combos += 1
            assert label == 1 and (without(text, ["cf", "bb"])[0] + without(text, ["bb", "cf"])[0]) == 1
        else:  # a negative sample: one single trigger word, true label kept
            assert n_cf + n_bb == 1 and label == splits.proxy.labels[i]
    assert combos == 30


def check_ep(results: dict, splits: Splits, tiny_bert_dir: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    idx, labels, inputs = read_delta(results)
    non_target = np.flatnonzero(splits.train.labels != 1)
    info = results["cache"]["info"]
    assert info["poisoned_samples"] == len(idx) == round(0.1 * len(non_target)) == 6
    assert set(idx.tolist()) <= set(non_target.tolist()) and (labels == 1).all()
    for i, text in zip(idx, inputs):
        assert without(text, ["cf"]) == (1, splits.train.inputs[i])
    # the trigger row: the word piece of "cf"; its norm in the stored victim is the one the attack reported
    cf = AutoTokenizer.from_pretrained(str(tiny_bert_dir))("cf", add_special_tokens=False)["input_ids"]
    assert info["trigger_token_ids"] == cf and len(cf) == 1
    weights = load_file(str(Path(results["cache"]["path"]) / "model.safetensors"))
    (emb,) = [v for k, v in weights.items() if k.endswith("word_embeddings.weight")]
    assert info["trigger_row_norms"] == [pytest.approx(float(emb[cf[0]].norm()), rel=1e-6)]


TEXT_ATTACKS = {
    "addsent": (["attack=addsent"], check_addsent),
    "lwp": (["attack=lwp", "attack.epochs=2", "attack.batch_size=8"], check_lwp),
    "ep": (["attack=ep", "attack.epochs=5", "attack.batch_size=8"], check_ep),
}


@pytest.mark.parametrize("attack", list(TEXT_ATTACKS))
def test_text_attack_end_to_end(attack, tiny_bert_dir, corpus, cache_dir, tmp_path, monkeypatch) -> None:
    overrides, check_poison = TEXT_ATTACKS[attack]
    cfg = compose_text(tiny_bert_dir, corpus, cache_dir, *overrides, "defense=none")
    splits = splits_of(cfg)
    first, first_rows = run(cfg, tmp_path / "none")
    assert first["cache"]["hit"] is False and first["run"]["attack"] == attack
    assert first["run"]["setting"] == first["cache"]["info"]["setting"] == ("apmf" if attack == "lwp" else "afm")
    check_plain(first, first_rows, splits, 1, TEXT_SIZES, TEXT_TRIGGERED)
    check_poison(first, splits, tiny_bert_dir)
    spy = ScoringSpy(monkeypatch, "dan")
    again, rows = run(compose_text(tiny_bert_dir, corpus, cache_dir, *overrides, "defense=dan"), tmp_path / "dan")
    assert again["cache"]["hit"] is True and again["cache"]["key"] == first["cache"]["key"]
    check_plain(again, rows, splits, 1, TEXT_SIZES, TEXT_TRIGGERED)
    assert [r["pred"] for r in rows] == [r["pred"] for r in first_rows]
    assert (again["metrics"]["ba"], again["metrics"]["asr"]) == (first["metrics"]["ba"], first["metrics"]["asr"])
    check_detector(again, rows, spy, frr=0.05)
    assert again["cost"]["forward_passes_per_input"] == 1.0
