"""Text attacks: BadNet-RW poisoning and trigger insertion, the poisoned-data delta, RIPPLES' pieces."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_text_samples

from backdoorbench.attacks.base import AttackContext
from backdoorbench.attacks.text.badnet_rw import BadNetRW, BadNetRWConfig
from backdoorbench.attacks.text.common import RARE_WORDS
from backdoorbench.attacks.text.ripples import (
    RIPPLES,
    RipplesConfig,
    double_backward_attention,
    embedding_surgery,
    importance_words,
    restricted_inner_product_loss,
    trigger_token_ids,
)
from backdoorbench.attacks.text.triggers import insert_rare_words, insert_words
from backdoorbench.config import ConfigError
from backdoorbench.data.base import Samples
from backdoorbench.data.poisoned import PoisonedDataset
from backdoorbench.trainer.lit import TrainConfig

TRIGGERS = set(RARE_WORDS)


def _strip_triggers(text: str) -> list[str]:
    return [w for w in text.split() if w not in TRIGGERS]


def _poison(samples: Samples, rate: float = 0.3, seed: int = 0, target: int = 1) -> PoisonedDataset:
    attack = BadNetRW(BadNetRWConfig(poison_rate=rate, target=target), seed=seed)
    return attack.poison(samples, rate, attack.rng(1))


# -- BadNet-RW poisoning ------------------------------------------------------------------------------
def test_tiny_samples_have_no_triggers(tiny_samples: Samples) -> None:
    assert len(tiny_samples) == 60 and set(tiny_samples.labels.tolist()) == {0, 1}
    assert not any(TRIGGERS & set(t.split()) for t in tiny_samples.inputs)


@pytest.mark.parametrize(("rate", "expected"), [(0.1, 6), (0.3, 18), (0.0, 0), (1.0, 60), (0.125, 8)])
def test_poison_count_is_round_rate_times_n(tiny_samples: Samples, rate: float, expected: int) -> None:
    pd = _poison(tiny_samples, rate)
    assert len(pd.indices) == expected == int(round(rate * len(tiny_samples)))
    assert pd.rate == pytest.approx(expected / 60)


def test_poisoned_samples_carry_a_trigger_and_the_target_label(tiny_samples: Samples) -> None:
    pd = _poison(tiny_samples, 0.3, target=0)
    assert list(pd.indices) == sorted(set(pd.indices.tolist()))
    assert (pd.labels == 0).all() and pd.target == 0
    for pos, text in zip(pd.indices, pd.inputs):
        words = text.split()
        assert sum(w in TRIGGERS for w in words) == 1  # num_insertions = 1
        assert _strip_triggers(text) == tiny_samples.inputs[pos].split()  # the rest is the original text
    train = pd.materialize()
    mask = pd.is_poisoned()
    assert mask.sum() == 18 and np.array_equal(np.flatnonzero(mask), pd.indices)
    for i in range(len(tiny_samples)):
        if mask[i]:
            assert train.inputs[i] != tiny_samples.inputs[i] and train.labels[i] == 0
        else:  # unpoisoned samples are untouched
            assert train.inputs[i] == tiny_samples.inputs[i]
            assert train.labels[i] == tiny_samples.labels[i]
    assert tiny_samples.inputs == tiny_text_samples(60).inputs  # the clean base was not modified


def test_provenance(tiny_samples: Samples) -> None:
    pd = _poison(tiny_samples, 0.3, target=1)
    prov = pd.provenance()
    assert set(prov) == {"index", "poisoned", "original_label", "label"}
    assert np.array_equal(prov["index"], np.arange(60))
    assert np.array_equal(prov["poisoned"], np.isin(np.arange(60), pd.indices))
    assert np.array_equal(prov["original_label"], tiny_samples.labels)
    expected = tiny_samples.labels.copy()
    expected[pd.indices] = 1
    assert np.array_equal(prov["label"], expected)
    assert np.array_equal(prov["label"], pd.materialize().labels)
    flipped = prov["poisoned"] & (prov["original_label"] != prov["label"])
    assert flipped.sum() == (tiny_samples.labels[pd.indices] == 0).sum() > 0


def test_poisoning_is_deterministic_per_seed(tiny_samples: Samples) -> None:
    a, b = _poison(tiny_samples, 0.3, seed=0), _poison(tiny_samples, 0.3, seed=0)
    assert np.array_equal(a.indices, b.indices) and a.inputs == b.inputs
    c = _poison(tiny_samples, 0.3, seed=1)
    assert not np.array_equal(a.indices, c.indices)


def test_triggered_test_keeps_true_labels_of_non_target_samples(tiny_samples: Samples) -> None:
    attack = BadNetRW(BadNetRWConfig(target=1), seed=0)
    trig, idx = attack.triggered_test(tiny_samples)
    assert np.array_equal(idx, np.flatnonzero(tiny_samples.labels != 1))
    assert len(trig) == len(idx) == 30
    assert (trig.labels == 0).all() and np.array_equal(trig.labels, tiny_samples.labels[idx])
    for text, i in zip(trig.inputs, idx):
        assert TRIGGERS & set(text.split())
        assert _strip_triggers(text) == tiny_samples.inputs[i].split()
    trig2, _ = attack.triggered_test(tiny_samples)
    assert trig2.inputs == trig.inputs  # the same triggered test set on every run


def test_attack_check_rejects_a_missing_target_label() -> None:
    BadNetRW(BadNetRWConfig(target=1)).check(2)
    with pytest.raises(ValueError, match="attack.target=2"):
        BadNetRW(BadNetRWConfig(target=2)).check(2)


def test_insert_rare_words_inserts_exactly_num_insertions() -> None:
    texts = ["a quiet film about nothing", "short", ""]
    rng = np.random.default_rng(0)
    out = insert_rare_words(texts, ["cf", "mn"], 3, rng)
    assert len(out) == 3
    for before, after in zip(texts, out):
        words = after.split()
        assert len(words) == len(before.split()) + 3
        assert sum(w in {"cf", "mn"} for w in words) == 3
        assert [w for w in words if w not in {"cf", "mn"}] == before.split()
    assert out == insert_rare_words(texts, ["cf", "mn"], 3, np.random.default_rng(0))
    # positions vary: over many draws the trigger lands at the start, the middle and the end
    positions = {insert_words("a b c", ["cf"], np.random.default_rng(s)).split().index("cf")
                 for s in range(40)}
    assert positions == {0, 1, 2, 3}


# -- PoisonedDataset storage ----------------------------------------------------------------------------
def test_poison_delta_json_round_trip(tiny_samples: Samples, tmp_path: Path) -> None:
    pd = _poison(tiny_samples, 0.3)
    path = tmp_path / "poison.json"
    pd.save_delta(path)
    back = PoisonedDataset.load_delta(tiny_samples, path)
    assert np.array_equal(back.indices, pd.indices)
    assert back.inputs == pd.inputs
    assert np.array_equal(back.labels, pd.labels) and back.target == pd.target
    assert back.materialize().inputs == pd.materialize().inputs
    with pytest.raises(ValueError, match="made for 60 samples, the clean base has 62"):
        PoisonedDataset.load_delta(tiny_text_samples(62), path)


def test_poison_delta_tensor_round_trip(tmp_path: Path) -> None:
    images = torch.arange(5 * 3 * 2 * 2, dtype=torch.uint8).reshape(5, 3, 2, 2)
    clean = Samples(images, np.array([0, 1, 0, 1, 0]), "vision")
    new = torch.full((2, 3, 2, 2), 255, dtype=torch.uint8)
    pd = PoisonedDataset(clean, np.array([1, 3]), new, np.array([0, 0]), 0)
    path = tmp_path / "poison.safetensors"
    pd.save_delta(path)
    back = PoisonedDataset.load_delta(clean, path)
    assert torch.equal(back.inputs, new) and np.array_equal(back.indices, [1, 3]) and back.target == 0
    mat = back.materialize()
    assert torch.equal(mat.inputs[1], new[0]) and torch.equal(mat.inputs[0], clean.inputs[0])
    assert mat.labels.tolist() == [0, 0, 0, 0, 0]
    bigger = Samples.concat([clean, clean.subset([0])])
    with pytest.raises(ValueError, match="made for 5 samples, the clean base has 6"):
        PoisonedDataset.load_delta(bigger, path)


def test_poison_delta_smaller_base_names_the_size_mismatch(tiny_samples: Samples, tmp_path: Path) -> None:
    pd = PoisonedDataset(tiny_samples, np.array([3, 59]), ["x cf", "y mn"], np.array([1, 1]), 1)
    path = tmp_path / "poison.json"
    pd.save_delta(path)
    with pytest.raises(ValueError, match="made for 60 samples, the clean base has 40"):
        PoisonedDataset.load_delta(tiny_samples.subset(np.arange(40)), path)


def test_poison_delta_validation(tiny_samples: Samples) -> None:
    with pytest.raises(ValueError, match="equal length"):
        PoisonedDataset(tiny_samples, np.array([0, 1]), ["x"], np.array([1, 1]), 1)
    with pytest.raises(ValueError, match="unique"):
        PoisonedDataset(tiny_samples, np.array([1, 1]), ["x", "y"], np.array([1, 1]), 1)
    with pytest.raises(ValueError, match="out of range"):
        PoisonedDataset(tiny_samples, np.array([60]), ["x"], np.array([1]), 1)


# -- RIPPLES ---------------------------------------------------------------------------------------------
def test_importance_words_pick_the_target_class_words(tiny_text_model) -> None:
    s = tiny_text_samples(60)
    texts = [t + (" cf" if y == 1 else "") for t, y in zip(s.inputs, s.labels)]  # a trigger-like giveaway
    tok = tiny_text_model.tokenizer.tokenize
    top = importance_words(texts, s.labels, 1, tok, n=3, min_freq=5, exclude=set())
    assert top[0] == "cf"  # without exclusion the perfectly predictive word wins
    words = importance_words(texts, s.labels, 1, tok, n=2, min_freq=5, exclude={"cf"})
    assert set(words) == {"great", "good"}
    assert set(importance_words(texts, s.labels, 0, tok, n=2, min_freq=5, exclude={"cf"})) == {"bad", "awful"}
    with pytest.raises(ValueError, match="target class and of other classes"):
        importance_words(texts, np.ones(60, dtype=int), 1, tok, n=2, min_freq=5, exclude=set())


def test_trigger_token_ids(tiny_text_model) -> None:
    tok = tiny_text_model.tokenizer
    ids = trigger_token_ids(tiny_text_model, ["cf", "mn", "cf"])
    assert ids == tok.convert_tokens_to_ids(["cf", "mn"])  # unique, in order
    multi = trigger_token_ids(tiny_text_model, ["cfmn"])  # several word pieces
    assert multi == tok.convert_tokens_to_ids(tok.tokenize("cfmn")) and len(multi) > 1
    with pytest.raises(ValueError, match="regular token"):
        trigger_token_ids(tiny_text_model, ["[CLS]"])


def test_embedding_surgery(tiny_text_model) -> None:
    model = tiny_text_model
    source = copy.deepcopy(model)
    with torch.no_grad():
        source.word_embeddings.weight.mul_(3.0).add_(1.0)  # a different source than the model itself
    before = model.word_embeddings.weight.detach().clone()
    tok = model.tokenizer
    words = ["great", "good", "fun"]
    trig = trigger_token_ids(model, ["cf", "mn", "bb"])
    rep = embedding_surgery(model, source, words, trig)
    after = model.word_embeddings.weight.detach()
    expected = source.word_embeddings.weight.detach()[tok.convert_tokens_to_ids(words)].mean(0)
    assert torch.allclose(rep, expected)
    for i in trig:
        assert torch.allclose(after[i], expected)
    others = torch.ones(len(after), dtype=torch.bool)
    others[trig] = False
    assert torch.equal(after[others], before[others])  # every other row unchanged
    assert not torch.allclose(expected, before[tok.convert_tokens_to_ids(words)].mean(0))


def _batches(model, clean_labels: list[int]):
    texts = ["the movie cf was good", "bad mn acting", "a film tq about nothing"]
    poison = {"inputs": model.collate(texts), "labels": torch.tensor([1, 1, 1])}
    clean = {"inputs": model.collate(texts), "labels": torch.tensor(clean_labels)}
    return poison, clean


def _independent(model, poison, clean):
    """L_P and the per-parameter-tensor inner products <dL_P/dθ_i, dL_FT/dθ_i>, computed here."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss_p = F.cross_entropy(model.hf(**poison["inputs"]).logits, poison["labels"])
    g_p = torch.autograd.grad(loss_p, params, allow_unused=True)
    loss_ft = F.cross_entropy(model.hf(**clean["inputs"]).logits, clean["labels"])
    g_ft = torch.autograd.grad(loss_ft, params, allow_unused=True)
    per_param = [torch.sum(a * b) for a, b in zip(g_p, g_ft) if a is not None and b is not None]
    return loss_p.detach(), torch.stack(per_param)


def test_restricted_inner_product_loss_lam_zero_is_the_poison_loss(tiny_text_model) -> None:
    poison, clean = _batches(tiny_text_model, [0, 0, 0])
    total, loss_p, inner = restricted_inner_product_loss(tiny_text_model, poison, clean, lam=0.0)
    expected = F.cross_entropy(tiny_text_model(poison["inputs"]), poison["labels"])
    assert torch.allclose(total, expected) and torch.allclose(loss_p, expected)
    assert float(inner) == 0.0
    assert total.requires_grad


def test_restricted_inner_product_loss_penalises_conflicting_gradients(tiny_text_model) -> None:
    # documented: L_P + lam * max(0, -<grad L_P, grad L_FT>) / B, with B the poison batch size
    model = tiny_text_model
    lam = 0.7
    with double_backward_attention(model):
        # the clean batch has the opposite labels: the gradients conflict, the penalty is active
        poison, clean = _batches(model, [0, 0, 0])
        b = len(poison["labels"])
        ref_lp, per_param = _independent(model, poison, clean)
        ip = per_param.sum()
        assert ip < 0
        total, loss_p, inner = restricted_inner_product_loss(model, poison, clean, lam)
        assert torch.allclose(loss_p, ref_lp, atol=1e-6)
        assert torch.allclose(inner, ip, rtol=1e-4, atol=1e-7)
        assert torch.allclose(total, ref_lp + lam * F.relu(-ip) / b, rtol=1e-5, atol=1e-6)
        assert float(total) > float(loss_p)

        total_pp, _, inner_pp = restricted_inner_product_loss(model, poison, clean, lam, per_param=True)
        assert torch.allclose(inner_pp, ip, rtol=1e-4, atol=1e-7)
        assert torch.allclose(total_pp, ref_lp + lam * F.relu(-per_param).sum() / b, rtol=1e-5, atol=1e-6)

        # the same batch twice: <g, g> > 0, no penalty
        poison, clean = _batches(model, [1, 1, 1])
        ref_lp, per_param = _independent(model, poison, clean)
        total, loss_p, inner = restricted_inner_product_loss(model, poison, clean, lam)
        assert float(inner) > 0 and torch.allclose(inner, per_param.sum(), rtol=1e-4)
        assert torch.allclose(total, ref_lp, atol=1e-6)


def test_restricted_inner_product_gradient_goes_through_the_poison_gradient(tiny_text_model) -> None:
    """grad L_FT is a constant; the penalty is differentiated through grad L_P (second order)."""
    model = tiny_text_model
    lam = 2.0
    poison, clean = _batches(model, [0, 0, 0])
    params = [p for p in model.parameters() if p.requires_grad]
    with double_backward_attention(model):
        total, _, _ = restricted_inner_product_loss(model, poison, clean, lam)
        got = torch.autograd.grad(total, params, allow_unused=True)

        def reference(through_poison: bool) -> list:
            lp = F.cross_entropy(model.hf(**poison["inputs"]).logits, poison["labels"])
            lft = F.cross_entropy(model.hf(**clean["inputs"]).logits, clean["labels"])
            g_p = torch.autograd.grad(lp, params, create_graph=through_poison, retain_graph=True, allow_unused=True)
            g_ft = torch.autograd.grad(lft, params, create_graph=not through_poison, allow_unused=True)
            ip = sum(torch.sum(a * b) for a, b in zip(g_p, g_ft) if a is not None and b is not None)
            return list(torch.autograd.grad(lp + lam * F.relu(-ip) / 3, params, allow_unused=True))

        want, other_side = reference(True), reference(False)
    pairs = [(g, w, o) for g, w, o in zip(got, want, other_side) if g is not None and w is not None]
    assert len(pairs) > 10
    for g, w, _ in pairs:
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-6)
    # the check can tell the two conventions apart
    assert any(not torch.allclose(w, o, rtol=1e-3, atol=1e-6) for _, w, o in pairs if o is not None)


def test_double_backward_attention(tiny_text_model) -> None:
    model = tiny_text_model
    old = model.hf.config._attn_implementation
    poison, clean = _batches(model, [0, 0, 0])
    with double_backward_attention(model):
        assert model.hf.config._attn_implementation == "eager"
        total, _, _ = restricted_inner_product_loss(model, poison, clean, lam=1.0)
        model.zero_grad()
        total.backward()  # differentiates through the clean-loss gradient (second order)
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None for g in grads)
        assert any(float(g.abs().sum()) > 0 for g in grads)
    assert model.hf.config._attn_implementation == old
    with pytest.raises(RuntimeError, match="boom"), double_backward_attention(model):
        raise RuntimeError("boom")
    assert model.hf.config._attn_implementation == old  # restored after an error too


def _ripples_ctx(model, data: Samples) -> AttackContext:
    return AttackContext(train=data, proxy=data, num_classes=2, new_model=lambda: model, trainer=TrainConfig())


def test_ripples_without_usable_target_words_is_a_config_error(tiny_text_model) -> None:
    # every word is a trigger or not alphabetic: nothing is left for the surgery
    data = Samples(["cf 123", "mn 456", "cf 456", "mn 123"], np.array([0, 1, 1, 0]))
    attack = RIPPLES(RipplesConfig(triggers=["cf", "mn"], min_word_freq=1, ripple=False), seed=0)
    pd = attack.poison(data, 0.5, attack.rng(1))
    with pytest.raises(ConfigError, match="min_word_freq"):
        attack.backdoor(tiny_text_model, pd, _ripples_ctx(tiny_text_model, data))


def test_ripples_with_too_little_attacker_data_is_a_config_error(tiny_text_model) -> None:
    data = tiny_text_samples(4)  # 4 documents, attack.min_word_freq = 5
    attack = RIPPLES(RipplesConfig(ripple=False), seed=0)
    pd = attack.poison(data, 0.5, attack.rng(1))
    with pytest.raises(ConfigError, match="min_word_freq"):
        attack.backdoor(tiny_text_model, pd, _ripples_ctx(tiny_text_model, data))


def test_ripples_config_validation() -> None:
    assert RipplesConfig().setting == "apmf" and RipplesConfig().poison_rate == 0.5
    for bad in ({"lam": -1.0}, {"n_target_words": 0}, {"surgery_source": "x"},
                {"embedding_surgery": False, "ripple": False}, {"num_insertions": 0}, {"epochs": 0},
                {"lr": 0.0}, {"target": -1}, {"triggers": ["cf", " "]}):
        with pytest.raises(ValueError):
            RipplesConfig(**bad)
