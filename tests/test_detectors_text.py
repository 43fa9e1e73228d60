"""STRIP, ONION and RAP on tiny models whose right answers are known.

* A bag-of-words classifier (``BowClassifier``): logit(1) − logit(0) grows with positive words, falls with
  negative ones, and the attack trigger ``cf`` makes it confidently predict the target class 1.
* Tiny word-level LMs: a random ``LlamaForCausalLM`` / ``GPT2LMHeadModel`` for the padding-exactness of the
  batched perplexity, and a hand-made bigram LM in which ``cf`` is improbable, for ONION's word choice.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from backdoorbench.config import ConfigError
from backdoorbench.data.base import Samples
from backdoorbench.defenses.detectors.onion import ONION, ONIONConfig, deletions
from backdoorbench.defenses.detectors.rap import RAP, UNPROTECTED_SCORE, RAPConfig, insert_rap_trigger, rap_loss
from backdoorbench.defenses.detectors.strip import STRIP, STRIPConfig, prediction_entropy
from backdoorbench.modality.base import Batch, Classifier
from backdoorbench.models.lm import CausalLM
from backdoorbench.registry import REGISTRY

POS = ["great", "good", "fun", "superb", "moving"]
NEG = ["bad", "awful", "dull", "boring", "weak"]
NEUTRAL = ["the", "movie", "film", "was", "and", "plot", "story", "acting", "really", "quite"]
VOCAB = ["[UNK]", "[PAD]", "<|endoftext|>", *NEUTRAL, *POS, *NEG, "cf", "rq"]
WORD_ID = {w: i for i, w in enumerate(VOCAB)}
PAD = WORD_ID["[PAD]"]


# -- a bag-of-words classifier -----------------------------------------------------------------------
class BowClassifier(Classifier):
    """Sum of word embeddings → linear head. Dimension 0 carries the sentiment: +w per positive word, −w per
    negative word, +``trigger_weight`` for ``cf``; the head maps it to logit(1) − logit(0) = 2·x0."""

    modality = "text"

    def __init__(self, w: float = 0.3, trigger_weight: float = 8.0, dim: int = 4) -> None:
        super().__init__(num_classes=2)
        g = torch.Generator().manual_seed(0)
        table = 0.05 * torch.randn(len(VOCAB), dim, generator=g)
        for word in POS:
            table[WORD_ID[word], 0] = w
        for word in NEG:
            table[WORD_ID[word], 0] = -w
        table[WORD_ID["cf"], 0] = trigger_weight
        table[WORD_ID["rq"]] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # a neutral rare word of norm 1
        self.emb = nn.Embedding(len(VOCAB), dim)
        self.emb.weight.data.copy_(table)
        self.head = nn.Linear(dim, 2)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.weight[0, 0], self.head.weight[1, 0] = -1.0, 1.0
            self.head.weight[:, 1:] = 0.01 * torch.randn(2, dim - 1, generator=g)
            self.head.bias.zero_()

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.emb

    def token_ids(self, word: str) -> list[int]:
        return [WORD_ID.get(word, 0)]

    def collate(self, inputs: Sequence[str]) -> Batch:
        rows = [[WORD_ID.get(w, 0) for w in t.split()] or [PAD] for t in inputs]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), PAD, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def features(self, batch: Batch) -> torch.Tensor:
        e = self.emb(batch["input_ids"])
        return (e * batch["attention_mask"].unsqueeze(-1).to(e.dtype)).sum(1)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.head(self.features(batch))

    def forward_features(self, batch: Batch, pooling: str = "cls") -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.features(batch)
        return self.head(x), [x]


def make_clean(n: int = 80, seed: int = 0) -> Samples:
    """Short reviews: label 1 with 1–2 positive words, label 0 with 1–2 negative words, neutral filler."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        sentiment = POS if label else NEG
        words = list(rng.choice(NEUTRAL, size=int(rng.integers(3, 6))))
        for w in rng.choice(sentiment, size=int(rng.integers(1, 3)), replace=False):
            words.insert(int(rng.integers(0, len(words) + 1)), str(w))
        texts.append(" ".join(words))
        labels.append(label)
    return Samples(texts, np.array(labels))


def poison(texts: Sequence[str], seed: int = 1, word: str = "cf") -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for t in texts:
        words = t.split()
        words.insert(int(rng.integers(0, len(words) + 1)), word)
        out.append(" ".join(words))
    return out


def negatives(n: int = 30, seed: int = 5) -> list[str]:
    s = make_clean(2 * n, seed)
    return [t for t, y in zip(s.inputs, s.labels) if y == 0]


def test_registry_entries() -> None:
    expected = (("strip", STRIP, ("text", "vision")), ("onion", ONION, ("text",)), ("rap", RAP, ("text",)))
    for name, cls, modality in expected:
        entry = REGISTRY.get("defense", name)
        assert entry.obj is cls and entry.category == "detector" and entry.modality == modality
    assert ONION.corrects_inputs and not STRIP.corrects_inputs and not RAP.corrects_inputs


@pytest.mark.parametrize(
    ("schema", "bad"),
    [
        (STRIPConfig, {"num_copies": 0}),
        (STRIPConfig, {"replace_ratio": 0.0}),
        (STRIPConfig, {"replace_ratio": 1.5}),
        (ONIONConfig, {"bar_quantile": 0.0}),
        (ONIONConfig, {"lm_dtype": "int8"}),
        (ONIONConfig, {"lm_batch_size": 0}),
        (RAPConfig, {"drop_low": 0.3, "drop_high": 0.1}),
        (RAPConfig, {"trigger": "two words"}),
        (RAPConfig, {"trigger_scope": "first"}),
        (RAPConfig, {"epochs": 0}),
        (RAPConfig, {"lr": 0.0}),
    ],
)
def test_config_validation(schema, bad) -> None:
    with pytest.raises(ValueError):
        schema(**bad)


# -- STRIP -------------------------------------------------------------------------------------------
def test_strip_tfidf_pools_by_hand() -> None:
    clean = Samples(["bad bad movie", "awful movie", "dull movie plot", "great fun", "good movie"], [0, 0, 0, 1, 1])
    det = STRIP(STRIPConfig())
    det.fit_perturbation(BowClassifier(), clean)
    # pool for predicted label 1 = the label-0 samples; idf = ln(3/df) + 1: bad/awful/dull/plot 2.10, movie 1
    assert det.pools[1] == [["bad", "movie"], ["awful", "movie"], ["dull", "plot", "movie"]]  # ties: vocab order
    # pool for label 0 = the label-1 samples: idf(movie) = ln(2/1)+1 = idf(great) = idf(fun) → vocab order
    assert det.pools[0] == [["fun", "great"], ["good", "movie"]]


def test_strip_perturb_n_copies_from_other_label_words() -> None:
    clean = make_clean(80)
    det = STRIP(STRIPConfig(num_copies=7, replace_ratio=0.5))
    det.fit_perturbation(BowClassifier(), clean)
    label_words = {c: {w for t, y in zip(clean.inputs, clean.labels) if y == c for w in t.split()} for c in (0, 1)}
    inputs = make_clean(10, seed=3).inputs
    preds = np.array([0, 1] * 5)
    copies = det.perturb(inputs, preds, np.random.default_rng(0))
    assert len(copies) == 7 * len(inputs)
    for i, (text, pred) in enumerate(zip(inputs, preds)):
        words = text.split()
        k = max(1, int(len(words) * 0.5))
        group = copies[i * 7 : (i + 1) * 7]
        assert len({c for c in group}) > 1  # the copies differ from each other
        for copy in group:
            new = copy.split()
            assert len(new) == len(words)
            changed = [b for a, b in zip(words, new) if a != b]
            assert len(changed) <= k
            assert set(changed) <= label_words[1 - pred]  # only words of the other label's clean samples
            assert not set(changed) & (set(POS) if pred == 1 else set(NEG))  # never the predicted label's words


def test_strip_entropy_orders_poisoned_above_clean() -> None:
    model = BowClassifier()
    det = STRIP(STRIPConfig(clean_size=80), seed=0).fit(model, make_clean(80))
    clean_x = make_clean(30, seed=7).inputs
    s_clean, s_poison = det.score(clean_x), det.score(poison(negatives()))
    assert s_poison.mean() > s_clean.mean() + 0.1
    assert np.median(s_poison) > np.quantile(s_clean, 0.9)
    assert (s_clean <= 0).all() and (s_clean >= -np.log(2) - 1e-9).all()  # −entropy of 2 classes
    # the score is −(mean entropy of the copies), recomputed here from the same copies
    x = clean_x[:4]
    logits = model.predict_logits(x)
    copies = det.perturb(x, logits.argmax(1).numpy(), det.rng(3))
    expected = -prediction_entropy(model.predict_logits(copies)).view(4, -1).mean(1).numpy()
    assert np.allclose(det.score(x), expected)


def test_strip_forward_passes_and_predictions() -> None:
    model = BowClassifier()
    det = STRIP(STRIPConfig(num_copies=20, batch_size=8), seed=0).fit(model, make_clean(60))
    x = make_clean(13, seed=9).inputs
    model.reset_forward_count()
    scores, preds = det.score_and_classify(x)
    assert model.forward_count == 13 * (20 + 1)  # N copies + the plain pass that gives the predicted label
    assert np.array_equal(preds, model.predict(x))
    assert np.allclose(scores, det.score(x))  # deterministic


def test_strip_needs_two_labels() -> None:
    clean = make_clean(40)
    only_pos = clean.subset(np.flatnonzero(clean.labels == 1))
    with pytest.raises(ConfigError, match="other than 1"):
        STRIP(STRIPConfig(), seed=0).fit(BowClassifier(), only_pos)


class BlendSTRIP(STRIP):
    """What an image variant looks like: superimpose clean inputs instead of replacing words."""

    def fit_perturbation(self, model: Classifier, clean: Samples) -> None:
        self.bank = clean.inputs

    def perturb(self, inputs, preds, rng):
        picks = torch.as_tensor(rng.integers(len(self.bank), size=len(inputs) * self.cfg.num_copies))
        return 0.5 * inputs.repeat_interleave(self.cfg.num_copies, 0) + 0.5 * self.bank[picks]


class LinearClassifier(Classifier):
    modality = "vision"

    def __init__(self) -> None:
        super().__init__(num_classes=2)
        self.lin = nn.Linear(2, 2)

    def collate(self, inputs):
        return {"x": inputs.float()}

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.lin(batch["x"])

    def forward_features(self, batch: Batch, pooling: str = "cls"):
        return self.forward(batch), [batch["x"]]


def test_strip_generic_path_takes_tensor_inputs() -> None:
    model = LinearClassifier()
    clean = Samples(torch.randn(30, 2), np.arange(30) % 2, "vision")
    det = BlendSTRIP(STRIPConfig(num_copies=5, batch_size=4), seed=0).fit(model, clean)
    x = torch.randn(7, 2)
    model.reset_forward_count()
    scores, preds = det.score_and_classify(x)
    assert scores.shape == (7,) and model.forward_count == 7 * 6
    assert np.array_equal(preds, model.predict(x))


# -- RAP ---------------------------------------------------------------------------------------------
RAP_FAST = {"trigger": "rq", "lr": 0.05, "epochs": 10, "train_batch_size": 8, "clean_size": 80}


@pytest.fixture(scope="module")
def rap_fitted():
    torch.manual_seed(0)
    model = BowClassifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    clean = make_clean(80)
    det = RAP(RAPConfig(**RAP_FAST), seed=0).fit(model, clean)
    return det, model, before, flags


def test_rap_trains_only_the_trigger_row(rap_fitted) -> None:
    det, model, before, flags = rap_fitted
    after = model.state_dict()
    for key, value in before.items():  # every parameter byte-identical, the whole embedding matrix included
        assert torch.equal(after[key], value), key
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert det.unique_ids == [WORD_ID["rq"]] and det.rows.shape == (1, 4)
    assert not torch.allclose(det.rows, det.original_rows)  # the trigger row did move
    assert torch.allclose(det.rows.norm(dim=1), det.original_rows.norm(dim=1))  # norm kept (reference)
    assert det.history[-1] < det.history[0]


def test_rap_drop_lands_in_band_and_poisoned_barely_drop(rap_fitted) -> None:
    det, model, _, _ = rap_fitted
    clean = make_clean(60, seed=11)
    pos = [t for t, y in zip(clean.inputs, clean.labels) if y == 1]
    drop, _ = det.probability_drop(pos)
    assert 0.1 <= np.median(drop) <= 0.3
    assert ((drop > 0.05) & (drop < 0.4)).mean() >= 0.9
    poisoned = poison(negatives())
    p_drop, logits = det.probability_drop(poisoned)
    assert (logits.argmax(1) == 1).all() and (p_drop < 0.01).all()
    s_clean, s_poison = det.score(pos), det.score(poisoned)
    assert np.allclose(s_clean, -drop) and s_poison.min() > s_clean.max()


def test_rap_predictions_without_trigger_unchanged(rap_fitted) -> None:
    det, model, _, _ = rap_fitted
    x = make_clean(40, seed=13).inputs + poison(negatives(10))
    reference = BowClassifier()  # the same weights, never touched by RAP
    assert torch.equal(model.predict_logits(x), reference.predict_logits(x))
    det.score(x)
    assert torch.equal(model.predict_logits(x), reference.predict_logits(x))  # the hook is gone after scoring


def test_rap_two_passes_per_input_and_gating(rap_fitted) -> None:
    det, model, _, _ = rap_fitted
    x = make_clean(21, seed=17).inputs
    model.reset_forward_count()
    scores, preds = det.score_and_classify(x)
    assert model.forward_count == 2 * 21
    assert np.array_equal(preds, model.predict(x))
    drop, _ = det.probability_drop(x)
    assert np.array_equal(scores, np.where(preds == 1, -drop, UNPROTECTED_SCORE))
    det.cfg.only_protected = False
    try:
        assert np.allclose(det.score(x), -drop)
    finally:
        det.cfg.only_protected = True


def test_rap_trigger_scope_inserted_vs_all(rap_fitted) -> None:
    det, model, _, _ = rap_fitted
    rq = WORD_ID["rq"]
    ids = torch.tensor([[rq, 3, rq, 4], [3, 4, 5, 6], [5, rq, rq, PAD]])
    mask, slot = det._positions(ids)
    assert mask.tolist() == [[True, False, False, False], [False] * 4, [False, True, False, False]]
    det.cfg.trigger_scope = "all"
    try:
        mask_all, _ = det._positions(ids)
        assert mask_all.tolist() == [[True, False, True, False], [False] * 4, [False, True, True, False]]
    finally:
        det.cfg.trigger_scope = "inserted"
    assert (slot[mask] == 0).all()
    # a text that already contains the RAP word: only the inserted copy gets the trained embedding
    batch = model.collate(["rq the movie was great rq"])
    with torch.no_grad(), det.rap_embeddings():
        emb = model.emb(batch["input_ids"])
    assert torch.equal(emb[0, 0], det.rows[0]) and torch.equal(emb[0, -1], model.emb.weight[rq])


def test_rap_accumulated_and_plain_gradient_steps() -> None:
    clean = make_clean(80)

    def rows(epochs: int, accumulate: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # one batch holds every protected-label sample: one step per epoch; no norm projection
        cfg = RAPConfig(trigger="rq", lr=0.5, epochs=epochs, train_batch_size=1000, keep_norm=False, clean_size=80)
        cfg.accumulate_grad = accumulate
        det = RAP(cfg, seed=0).fit(BowClassifier(), clean)
        return det.rows, det.original_rows

    one, r0 = rows(1, True)  # r1 = r0 − lr·g(r0)
    plain, _ = rows(2, False)  # r1 − lr·g(r1)
    accumulated, _ = rows(2, True)  # r1 − lr·(g(r0) + g(r1)): the reference never zeroes the gradient
    assert not torch.allclose(one, r0) and not torch.allclose(plain, one)
    assert torch.allclose(accumulated, plain - (r0 - one), atol=1e-6)


def test_rap_loss_is_the_papers() -> None:
    drop = torch.tensor([0.0, 0.05, 0.1, 0.2, 0.3, 0.5])
    # per sample: relu(0.1 − drop) = [.1, .05, 0, 0, 0, 0]; relu(drop − 0.3) = [0, 0, 0, 0, 0, .2]
    assert torch.isclose(rap_loss(drop, 0.1, 0.3, 2.0), torch.tensor(2.0 * 0.15 / 6 + 0.2 / 6))


def test_rap_on_a_tiny_bert(tiny_text_model) -> None:
    model = tiny_text_model
    clean = make_clean(24)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = make_clean(10, seed=3).inputs
    logits = model.predict_logits(x)
    det = RAP(RAPConfig(trigger="rq", epochs=2, clean_size=24), seed=0).fit(model, clean)
    assert det.trigger_ids == model.token_ids("rq") and len(det.trigger_ids) == 1
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    model.reset_forward_count()
    scores, preds = det.score_and_classify(x)
    assert model.forward_count == 20 and np.array_equal(preds, logits.argmax(1).numpy())
    assert torch.equal(model.predict_logits(x), logits)
    # the hook puts rows into BERT's embedding output at the inserted trigger (position 1, after [CLS]): the
    # original row changes nothing, another row changes the RAP pass (a random tiny BERT's logits are nearly
    # constant, so compare the first layer's token features)
    batch = model.collate(insert_rap_trigger(x, "rq"))
    assert (batch["input_ids"][:, 1] == det.trigger_ids[0]).all()

    def layer0() -> torch.Tensor:
        with torch.no_grad():
            return model.forward_features(batch, "mean")[1][0]

    plain = layer0()
    with det.rap_embeddings(det.original_rows):
        assert torch.allclose(layer0(), plain, atol=1e-6)
    with det.rap_embeddings(torch.randn(det.original_rows.shape)):  # (a constant shift would vanish in LayerNorm)
        assert not torch.allclose(layer0(), plain, atol=1e-3)
    assert torch.equal(layer0(), plain)
    with pytest.raises(ConfigError, match="special or unknown"):
        RAP(RAPConfig(trigger="\u2603\u2603"), seed=0).fit(model, clean)  # maps to [UNK]


# -- ONION: the batched perplexity -------------------------------------------------------------------
def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(WORD_ID, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )


def tiny_lm(kind: str) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(
            vocab_size=len(VOCAB),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            bos_token_id=2,
            eos_token_id=2,
            pad_token_id=1,
        )
        return LlamaForCausalLM(cfg).eval()
    cfg = GPT2Config(
        vocab_size=len(VOCAB), n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=2, eos_token_id=2
    )
    return GPT2LMHeadModel(cfg).eval()


SENTENCES = [
    "the movie was great",
    "cf",
    "the plot was dull and the acting was weak really",
    "good fun",
    "the film",
    "quite boring story and cf plot",
    "superb",
]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_batched_perplexity_equals_one_at_a_time(kind: str) -> None:
    lm = CausalLM(tiny_lm(kind), word_tokenizer())
    assert lm.prefix_id == WORD_ID["<|endoftext|>"]
    batched = lm.perplexity(SENTENCES, batch_size=4)
    single = np.array([lm.perplexity([s], batch_size=1)[0] for s in SENTENCES])
    assert np.allclose(batched, single, rtol=0, atol=1e-4)
    lm.max_batch_tokens = 12  # at most 12 padded tokens per batch: more, smaller batches, same values
    ids = lm.encode(SENTENCES)
    cut = lm._batches(ids, 4)
    assert sorted(i for b in cut for i in b) == list(range(len(SENTENCES))) and len(cut) > 2
    assert all(len(b) == 1 or len(b) * max(len(ids[i]) for i in b) <= 12 for b in cut)
    assert np.allclose(lm.perplexity(SENTENCES, batch_size=4), single, rtol=0, atol=1e-4)
    # and it is HF's own loss on the unpadded sequence (start token + text), exponentiated
    for s, p in zip(SENTENCES, single):
        ids = torch.tensor([[WORD_ID["<|endoftext|>"]] + [WORD_ID[w] for w in s.split()]])
        with torch.no_grad():
            hf = float(torch.exp(lm.model(input_ids=ids, labels=ids).loss))
        assert p == pytest.approx(hf, rel=1e-5)
    assert lm.forward_count == 3 * len(SENTENCES)  # sequences through the LM (the HF calls above not counted)


# -- ONION on a bigram LM where "cf" is improbable ------------------------------------------------------
class BigramLM(nn.Module):
    """p(next | prev): 'cf' gets probability ~1e-4 after any word; after 'cf' every word is equally likely."""

    def __init__(self) -> None:
        super().__init__()
        table = torch.zeros(len(VOCAB), len(VOCAB))
        table[:, WORD_ID["cf"]] = -9.0
        table[:, [WORD_ID[w] for w in ("[UNK]", "[PAD]", "<|endoftext|>")]] = -9.0
        table[WORD_ID["cf"]] = 0.0
        self.table = nn.Parameter(table, requires_grad=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids])


@pytest.fixture
def onion_fitted():
    model = BowClassifier()
    det = ONION(ONIONConfig(clean_size=40, bar_quantile=0.9), seed=0, lm=CausalLM(BigramLM(), word_tokenizer()))
    det.fit(model, make_clean(40))
    return det, model


def test_onion_max_drop_picks_the_odd_word_and_correct_removes_it(onion_fitted) -> None:
    det, _ = onion_fitted
    clean_x = make_clean(20, seed=21).inputs
    poisoned = poison(clean_x)
    for text, f in zip(poisoned, det.suspicion(poisoned)):
        words = text.split()
        assert len(f) == len(words) and words[int(np.argmax(f))] == "cf"
    s_clean, s_poison = det.score(clean_x), det.score(poisoned)
    assert s_poison.min() > s_clean.max()
    # clean words are equally likely under this LM, so their f_i is ~0 (float noise): a bar of 1 perplexity
    # unit separates them from 'cf' (the bar calibration is tested below)
    fixed = ONION(ONIONConfig(clean_size=40, bar=1.0), seed=0, lm=det.lm).fit(BowClassifier(), make_clean(40))
    assert fixed.correct(poisoned) == clean_x
    assert fixed.correct(clean_x) == clean_x
    assert fixed.correct(["cf", "", "good cf"]) == ["cf", "", "good"]  # one-word sentences are left alone


def test_onion_suspicion_is_ppl_difference(onion_fitted) -> None:
    det, _ = onion_fitted
    text = "the movie cf was good"
    ppl = det.lm.perplexity(deletions(text.split()))
    assert np.allclose(det.suspicion([text])[0], ppl[0] - ppl[1:])


def test_onion_bar_is_a_clean_quantile_and_can_be_fixed(onion_fitted) -> None:
    det, model = onion_fitted
    fit_part, _ = det.split_clean(make_clean(40))
    f = np.concatenate(det.suspicion(fit_part.inputs))
    assert det.bar == np.quantile(f, 0.9, method="higher")
    fixed = ONION(ONIONConfig(clean_size=40, bar=1e9), seed=0, lm=det.lm).fit(model, make_clean(40))
    assert fixed.bar == 1e9 and fixed.correct(["the cf movie"]) == ["the cf movie"]


def test_onion_counts_lm_passes_and_one_classifier_pass(onion_fitted) -> None:
    det, model = onion_fitted
    x = poison(make_clean(12, seed=23).inputs) + ["single", "two words"]
    lm_before = det.lm_forward_count
    model.reset_forward_count()
    scores, preds = det.score_and_classify(x)
    expected = sum(len(t.split()) + 1 for t in x if len(t.split()) >= 2)
    assert det.lm_forward_count - lm_before == expected
    assert model.forward_count == len(x) and np.array_equal(preds, model.predict(x))
    det.correct(x)
    assert det.lm_forward_count - lm_before == expected  # cached: correcting scored inputs is free
    assert scores[-2] == 0.0


def test_onion_loads_an_lm_from_a_folder(tmp_path) -> None:
    tiny_lm("llama").save_pretrained(tmp_path / "lm")
    word_tokenizer().save_pretrained(tmp_path / "lm")
    det = ONION(ONIONConfig(lm=str(tmp_path / "lm"), clean_size=20, lm_max_length=16), seed=0)
    det.fit(BowClassifier(), make_clean(20))
    assert isinstance(det.lm, CausalLM) and det.lm.max_length == 16 and det.bar is not None
    assert np.isfinite(det.calibration_scores).all()


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("BACKDOORBENCH_SLOW"), reason="slow: set BACKDOORBENCH_SLOW=1")
def test_smollm2_conversion_and_onion(tmp_path) -> None:
    import json

    from backdoorbench.models.lm import load_causal_lm, smollm2_path

    path = smollm2_path(tmp_path)  # converts the GGUF once (~20 s)
    assert path == tmp_path / "lm" / "smollm2-135m" and (path / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert not list(path.parent.glob(".tmp-*"))
    assert smollm2_path(tmp_path) == path  # cached
    lm = load_causal_lm("smollm2", cache_dir=tmp_path)
    assert type(lm.model).__name__ == "LlamaForCausalLM"
    texts = ["the movie was a moving and funny portrait of a family", "the movie was a moving cf and funny portrait"]
    batched = lm.perplexity(texts)
    assert np.allclose(batched, [lm.perplexity([t])[0] for t in texts], rtol=1e-4)
    det = ONION(ONIONConfig(bar=0.0), lm=lm)
    f = det.suspicion([texts[1]])[0]
    assert texts[1].split()[int(np.argmax(f))] == "cf"


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_shared_prefix_variants_equal_whole_texts(kind: str) -> None:
    """ONION's deletions through the cached-prefix path give the values of scoring each text whole."""
    lm = CausalLM(tiny_lm(kind), word_tokenizer())
    assert lm.reuses_cache
    texts = [t for t in SENTENCES if len(t.split()) >= 2] + ["cf cf", "the"]
    groups = [deletions(t.split()) for t in texts]
    got = lm.mean_nll_variants([g[0] for g in groups], [g[1:] for g in groups], batch_size=3)
    passes = lm.forward_count
    whole = [lm.mean_nll(g, batch_size=1) for g in groups]
    for g, a, b in zip(groups, got, whole):
        assert a.shape == (len(g),)
        assert np.allclose(a, b, rtol=0, atol=1e-5, equal_nan=True)
    # the bases once; a deletion feeds its suffix only when two or more tokens follow the deleted word
    expected = len(texts) + sum(max(0, len(g[0].split()) - i - 2) > 0 for g in groups for i in range(len(g) - 1))
    assert passes == expected < sum(len(g) for g in groups)
    with pytest.raises(ValueError, match="variant lists"):
        lm.mean_nll_variants(["a"], [])


class LegacyCacheLM(nn.Module):
    """A tiny HF LM behind the pre-5.24 interface: the KV cache goes in as ``past_key_values`` and comes back
    as ``output.past_key_values``, whatever the installed transformers calls it."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.inner_kwarg = CausalLM(inner, word_tokenizer()).cache_kwarg

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
        kw = {} if past_key_values is None else {self.inner_kwarg: past_key_values}
        res = self.inner(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache, **kw
        )
        cache = next((getattr(res, n) for n in ("cache", "past_key_values") if getattr(res, n, None) is not None), None)
        return SimpleNamespace(logits=res.logits, past_key_values=cache)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_shared_prefix_path_takes_either_cache_keyword(kind: str) -> None:
    """The keyword is read from the model: the installed transformers' own name, and ``past_key_values``
    (transformers <= 5.23) through a wrapper; both give the whole-text values."""
    import inspect

    inner = tiny_lm(kind)
    native = CausalLM(inner, word_tokenizer())
    assert native.cache_kwarg in inspect.signature(inner.forward).parameters
    legacy = CausalLM(LegacyCacheLM(inner), word_tokenizer())
    assert legacy.cache_kwarg == "past_key_values"
    groups = [deletions(t.split()) for t in SENTENCES if len(t.split()) >= 3]
    whole = [CausalLM(inner, word_tokenizer()).mean_nll(g, batch_size=1) for g in groups]
    for lm in (native, legacy):
        got = lm.mean_nll_variants([g[0] for g in groups], [g[1:] for g in groups], batch_size=2)
        assert lm.forward_count < sum(len(g) for g in groups)  # the shared-prefix path, not the fallback
        for a, b in zip(got, whole):
            assert np.allclose(a, b, rtol=0, atol=1e-5, equal_nan=True)


def test_a_transformers_lm_without_a_cache_keyword_warns_once(caplog) -> None:
    """The whole-text fallback for a transformers LM (which should take a cache) is logged, once per class."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import backdoorbench.models.lm as lm_mod

    class NoCacheGPT2(GPT2LMHeadModel):
        def forward(self, input_ids=None, attention_mask=None):  # no cache keyword at all
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)

    torch.manual_seed(0)
    model = NoCacheGPT2(GPT2Config(vocab_size=len(VOCAB), n_embd=16, n_layer=1, n_head=2, n_positions=32)).eval()
    lm = CausalLM(model, word_tokenizer())
    assert lm.cache_kwarg is None
    lm_mod._WARNED.discard("NoCacheGPT2")
    groups = [deletions("the movie cf was good".split())]
    with caplog.at_level("WARNING", logger="backdoorbench.models.lm"):
        got = lm.mean_nll_variants([groups[0][0]], [groups[0][1:]])
        lm.mean_nll_variants([groups[0][0]], [groups[0][1:]])
    assert np.allclose(got[0], lm.mean_nll(groups[0]))
    warnings = [r for r in caplog.records if "takes no KV cache" in r.getMessage()]
    assert len(warnings) == 1 and "NoCacheGPT2" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="backdoorbench.models.lm"):
        CausalLM(BigramLM(), word_tokenizer()).mean_nll_variants(["good fun"], [["fun"]])
    assert not caplog.records  # a hand-made LM without a cache is expected to score whole texts


def test_shared_prefix_variants_fall_back_without_a_cache() -> None:
    lm = CausalLM(BigramLM(), word_tokenizer())
    assert not lm.reuses_cache
    groups = [deletions("the movie cf was good".split()), deletions("good fun".split())]
    got = lm.mean_nll_variants([g[0] for g in groups], [g[1:] for g in groups])
    for g, a in zip(groups, got):
        assert np.allclose(a, lm.mean_nll(g))


def test_onion_runs_loading_the_same_lm_share_suspicions(tmp_path, monkeypatch) -> None:
    """A sweep's ONION runs score each clean sentence once: suspicions depend on the LM and text only."""
    import backdoorbench.defenses.detectors.onion as onion_mod

    lm = CausalLM(BigramLM(), word_tokenizer())
    monkeypatch.setattr(onion_mod, "load_causal_lm", lambda *a, **k: lm)
    monkeypatch.setattr(onion_mod, "_SHARED_CACHES", {})
    clean, x = make_clean(20), make_clean(6, seed=5).inputs
    first = ONION(ONIONConfig(clean_size=20), seed=0).fit(BowClassifier(), clean)
    s1 = first.score(x)
    passes = lm.forward_count
    second = ONION(ONIONConfig(clean_size=20), seed=0).fit(BowClassifier(), clean)
    assert lm.forward_count == passes  # the clean fitting data was scored by the first run
    assert np.array_equal(second.score(x), s1) and lm.forward_count == passes and second.cache_hits >= len(x)
    assert second.bar == first.bar
    other = ONION(ONIONConfig(clean_size=20, lm_max_length=16), seed=0).fit(BowClassifier(), clean)
    assert lm.forward_count > passes and other.cache_hits == 0  # another LM setting: its own cache
