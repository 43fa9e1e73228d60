"""DBS (``defense=dbs``): the verdict rule on planted inversion losses, the token stamping, and the inversion
end to end on a tiny BERT BadNet-RW victim (trigger ``mb``, target 1) through the pipeline, then the same weights
as an external checkpoint with no trigger."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from e2e_checks import run
from test_e2e_text_components import cache_dir, compose_text, corpus, module_env  # noqa: F401 - fixtures
from torch import nn

from backdoorbench.config import ConfigError
from backdoorbench.data.base import Samples
from backdoorbench.defenses.inspection.dbs import DBS, DBSConfig, Inversion, Scanner, verdict_of
from backdoorbench.modality.text import TextClassifier


@pytest.fixture(autouse=True)
def _restore_torch_globals(restore_torch_globals: None) -> None:
    """The pipeline sets torch's globals (conftest.restore_torch_globals)."""


def inv(source: int, target: int, loss: float, pos: str = "first_half") -> Inversion:
    return Inversion(source, target, pos, loss, [f"t{target}"], [target], 1.0, True)


def test_the_smallest_loss_decides_the_verdict() -> None:
    runs = [inv(0, 1, 0.5), inv(0, 1, 2e-4, "second_half"), inv(1, 0, 0.05), inv(2, 0, 5e-4), inv(0, 2, 3.0)]
    v = verdict_of(runs, 3, 1e-3)
    assert v.flagged and v.top_class == 1 and v.suspected_targets == [1, 0]
    assert v.score == pytest.approx(-math.log10(2e-4)) and v.class_scores == [5e-4, 2e-4, 3.0]
    assert v.extra["trigger_tokens"] == ["t1"] and len(v.extra["inversions"]) == 5
    clean = verdict_of([inv(0, 1, 0.2), inv(1, 0, 0.01)], 2, 1e-3)
    assert not clean.flagged and clean.suspected_targets == [] and clean.top_class == 0
    assert clean.score == pytest.approx(2.0)


def test_stamping_inserts_the_tokens_after_cls(tiny_text_model) -> None:
    scanner = Scanner(tiny_text_model, DBSConfig(trigger_len=3), seed=0)
    assert scanner.max_len == 32  # the model's max_length caps the reference's 100
    ids = tiny_text_model.token_ids("cf mb bb")
    stamped, mask = scanner.stamp(["a good film"], 1, __import__("torch").tensor(ids))
    plain = tiny_text_model.tokenizer("cf mb bb a good film", max_length=32, padding="max_length")
    assert stamped[0].tolist() == plain["input_ids"] and mask[0].tolist() == plain["attention_mask"]
    with pytest.raises(ConfigError, match="trigger_len"):
        Scanner(tiny_text_model, DBSConfig(trigger_len=20), seed=0)
    with pytest.raises(ValueError, match="positions"):
        DBSConfig(positions=["middle"])
    with pytest.raises(ConfigError, match="text only"):
        DBS(DBSConfig(), seed=0).inspect(tiny_text_model, Samples.from_images(np.zeros((2, 8, 8), np.uint8), [0, 1]))


# -- a toy classifier whose trigger is known: class 1's logit is 10 x the summed cosine of the words with "mb" ------
class SecretWord(nn.Module):
    """An HF-like classifier: logit 0 is 0, logit 1 is ``10 · Σ_t mask_t · cos(e_t, e_secret) - 5`` over the word
    embeddings (random, 256-d, so clean words have |cos| ~ 0.06): three copies of the secret word give logit 25,
    clean texts about -5. With ``secret=None`` logit 1 is a constant -5: no input reaches class 1."""

    def __init__(self, vocab: int, secret: int | None) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_labels=2, num_hidden_layers=1)
        self.emb = nn.Embedding(vocab, 256)
        self.secret = secret

    def get_input_embeddings(self) -> nn.Embedding:
        return self.emb

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **_):
        e = self.emb(input_ids) if inputs_embeds is None else inputs_embeds
        if self.secret is None:
            one = e.sum((1, 2)) * 0 - 5
        else:
            cos = nn.functional.cosine_similarity(e, self.emb.weight[self.secret][None, None], dim=-1)
            one = 10 * (cos * attention_mask).sum(1) - 5
        return SimpleNamespace(logits=torch.stack([torch.zeros_like(one), one], 1))


def secret_model(tokenizer, secret: str | None) -> TextClassifier:
    torch.manual_seed(0)
    ids = tokenizer(secret, add_special_tokens=False)["input_ids"] if secret else [None]
    return TextClassifier(SecretWord(len(tokenizer), ids[0]), tokenizer, max_length=32).eval()


CLEAN0 = Samples.from_texts(["the film was dull", "a weak plot and bland acting", "boring", "poor cast"], [0, 0, 0, 0])


def test_dbs_recovers_the_secret_word_of_a_toy_model(tiny_text_model) -> None:
    cfg = DBSConfig(trigger_len=3, positions=["first_half"])
    verdict = DBS(cfg, seed=0).inspect(secret_model(tiny_text_model.tokenizer, "mb"), CLEAN0)
    (only,) = verdict.extra["inversions"]  # the clean texts are all of class 0: one pair, 0 -> 1
    assert (only["source"], only["target"], only["found"], only["asr"]) == (0, 1, True, 1.0)
    assert only["tokens"] == ["mb", "mb", "mb"] and only["loss"] < 1e-3  # one-hot and under the bound
    assert verdict.flagged and verdict.suspected_targets == [1] and verdict.top_class == 1
    assert verdict.score == pytest.approx(-math.log10(max(only["loss"], 1e-12))) and verdict.score > 3  # 1e-12 floor
    assert verdict.class_scores[1] == only["loss"] and verdict.class_scores[0] == 1e12  # nothing targets class 0
    # no secret word: class 1 is out of reach, the loss stays at CE(-5) = 5.007, nothing is flagged
    clean = DBS(cfg, seed=0).inspect(secret_model(tiny_text_model.tokenizer, None), CLEAN0)
    (only,) = clean.extra["inversions"]
    assert not clean.flagged and not only["found"] and only["asr"] == 0.0
    assert only["loss"] == pytest.approx(math.log(1 + math.exp(5)), rel=1e-5)


# -- end to end: a tiny BERT BadNet-RW victim (trigger "mb", target 1) --------------------------------------------
# one trigger token: on this weak victim (the triggered texts' loss is ~0.24, never under the 0.1 bound) ten
# inverted tokens fill with sentiment words of either class, one token is "mb" (docs/defenses/dbs.md, Measured)
TINY = ["defense=dbs", "defense.trigger_len=1", "defense.clean_size=40", "defense.positions=[first_half]"]


def test_dbs_inverts_the_rare_word_of_a_badnet_rw_victim(tiny_bert_dir, corpus, cache_dir, tmp_path) -> None:  # noqa: F811
    results, _ = run(compose_text(tiny_bert_dir, corpus, cache_dir, "attack=badnet_rw", *TINY), tmp_path / "dbs")
    m, section = results["metrics"], results["inspection"]
    assert results["run"]["defense_kind"] == "inspection" and m["true_target"] == 1 and m["asr"] > 0.9
    pairs = {(r["source"], r["target"]): r for r in section["inversions"]}
    assert set(pairs) == {(0, 1), (1, 0)}
    # the backdoor's direction inverts to a far smaller loss, and its trigger is the planted word
    assert pairs[0, 1]["loss"] < 0.5 * pairs[1, 0]["loss"], pairs
    assert pairs[0, 1]["tokens"] == ["mb"] and pairs[0, 1]["asr"] == 1.0 > 2 * pairs[1, 0]["asr"]
    assert m["top_class"] == 1 and m["top_class_correct"] is True
    assert m["verdict_score"] == pytest.approx(-math.log10(pairs[0, 1]["loss"]))
    assert m["flagged"] == (pairs[0, 1]["loss"] < 1e-3) and m["target_flagged"] == m["flagged"]
    saved = (tmp_path / "dbs" / "trigger" / "tokens_1.txt").read_text().split()
    assert saved == pairs[0, 1]["tokens"] and section["trigger_tokens"] == saved


def test_dbs_on_the_same_weights_as_an_external_checkpoint(tiny_bert_dir, corpus, cache_dir, tmp_path) -> None:  # noqa: F811
    first, _ = run(compose_text(tiny_bert_dir, corpus, cache_dir, "attack=badnet_rw", *TINY), tmp_path / "a")
    weights = Path(first["cache"]["path"]) / "model.safetensors"
    ext, _ = run(compose_text(tiny_bert_dir, corpus, cache_dir, "attack=external", f"attack.path='{weights}'",
                              *TINY), tmp_path / "b")
    e = ext["metrics"]
    assert e["asr"] is None and e["true_target"] is None and e["top_class_correct"] is None
    assert json.dumps(ext["inspection"]["inversions"]) == json.dumps(first["inspection"]["inversions"])


def test_image_runs_are_refused_with_a_clear_message() -> None:
    from hydra import compose, initialize_config_dir

    from backdoorbench.cli import config_dir
    from backdoorbench.engine.pipeline import validate

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["attack=badnets", "defense=dbs"])
    with pytest.raises(ConfigError, match="supports text only"):
        validate(cfg)
