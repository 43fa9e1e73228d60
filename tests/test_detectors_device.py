"""STRIP, ONION and RAP on the run's device and in the run's precision: STRIP superimposes in uint8 with the
values of the earlier int16 formula; ONION's LM copies to the host once per batch (not per deleted word), has a
token budget key and runs under ``trainer.inference_precision``; RAP's optimisation runs under
``trainer.precision``; at full precision on the CPU nothing changes."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from test_detectors_text import BigramLM, BowClassifier, make_clean, poison, tiny_lm, word_tokenizer
from test_detectors_vision import images, patch_model, with_patch

import backdoorbench as bb
import backdoorbench.defenses.detectors.onion as onion_mod
from backdoorbench.config import ConfigError
from backdoorbench.defenses.detectors.onion import ONION, ONIONConfig, deletions
from backdoorbench.defenses.detectors.rap import RAP, RAPConfig
from backdoorbench.defenses.detectors.strip import STRIP, STRIPConfig, superimpose_uint8
from backdoorbench.models.lm import CausalLM
from backdoorbench.runtime import TRAIN_AUTOCAST, Runtime, run_scope, train_dtype
from backdoorbench.trainer.config import TrainConfig, runtime_for


# -- STRIP ---------------------------------------------------------------------------------------------------
def int16_superimpose(base: torch.Tensor, other: torch.Tensor, how: str) -> torch.Tensor:
    """The superimposition before the change: CPU int16 arithmetic."""
    a, b = base.to(torch.int16), other.to(torch.int16)
    if how == "add":
        return (a + b).clamp_(0, 255).to(torch.uint8)
    return ((a + b + 1) // 2).to(torch.uint8)


@pytest.mark.parametrize("how", ["add", "average"])
def test_uint8_superimposition_equals_int16_on_every_pixel_pair(how: str) -> None:
    a = torch.arange(256, dtype=torch.uint8).repeat_interleave(256)
    b = torch.arange(256, dtype=torch.uint8).repeat(256)
    out = superimpose_uint8(a, b, how)
    assert out.dtype == torch.uint8
    assert torch.equal(out, int16_superimpose(a, b, how))


@pytest.mark.parametrize("how", ["add", "average"])
def test_strip_scores_equal_the_int16_superimposition(how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = STRIPConfig(clean_size=60, batch_size=8, num_copies=6, superimpose=how)
    test = torch.cat([images(10, 1).inputs, with_patch(images(6, 2).inputs)])  # type: ignore[list-item]
    new = STRIP(cfg, seed=0).fit(patch_model(), images(60, 0))
    scores = new.score(test)

    old = STRIP(cfg, seed=0).fit(patch_model(), images(60, 0))

    def superimpose(images_: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        assert old.backgrounds is not None
        idx = torch.from_numpy(rng.integers(len(old.backgrounds), size=len(images_) * old.num_copies))
        base = images_.cpu().repeat_interleave(old.num_copies, dim=0)
        return int16_superimpose(base, old.backgrounds[idx], how)

    monkeypatch.setattr(old, "superimpose", superimpose)
    assert np.array_equal(scores, old.score(test))
    assert len(np.unique(scores)) == len(scores)  # real, varied scores (not a constant that trivially matches)
    if how == "add":
        assert scores[10:].min() > scores[:10].max()  # the patch survives the saturating sum


def test_strip_refuses_float_images() -> None:
    det = STRIP(STRIPConfig(num_copies=2), seed=0).fit(patch_model(), images(20, 0))
    with pytest.raises(ConfigError, match="uint8"):
        det.superimpose(images(2, 1).inputs.float(), np.random.default_rng(0))  # type: ignore[union-attr]


# -- ONION ---------------------------------------------------------------------------------------------------
class HostCopies:
    """Counts tensor copies to the host (``.cpu()``, ``.item()``, ``float()``, ``.tolist()``) while active."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        for name in ("cpu", "item", "__float__", "tolist"):
            original = getattr(torch.Tensor, name)

            def counting(t, *a, _original=original, **k):  # type: ignore[no-untyped-def]
                self.count += 1
                return _original(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counting)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_onion_lm_copies_to_the_host_per_batch_not_per_word(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    lm = CausalLM(tiny_lm(kind), word_tokenizer(), max_batch_tokens=10_000)
    short = ["the movie was good", "quite dull plot"]
    long = ["the movie was good and the plot was dull and the acting was weak really",
            "quite boring story and cf plot and the film was really bad and awful"]
    expected = {}
    for name, texts in (("short", short), ("long", long)):
        groups = [deletions(t.split()) for t in texts]
        expected[name] = [lm.mean_nll(g) for g in groups]
    copies = {}
    with monkeypatch.context() as m:
        counter = HostCopies(m)
        for name, texts in (("short", short), ("long", long)):
            groups = [deletions(t.split()) for t in texts]
            before = counter.count
            got = lm.mean_nll_variants([g[0] for g in groups], [g[1:] for g in groups], batch_size=1000)
            copies[name] = counter.count - before
            for a, b in zip(got, expected[name]):
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    # one LM batch of bases and one of deletion suffixes either way: the same few host copies, however many words
    assert copies["short"] == copies["long"] <= 4


def test_onion_token_budget_is_a_config_key(monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    assert yaml.safe_load((REPO_ROOT / "configs/defense/onion.yaml").read_text())["lm_batch_tokens"] == 2048
    assert bb.create_defense("onion", lm_batch_tokens=512).cfg.lm_batch_tokens == 512
    seen = {}

    def fake_load(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.update(kwargs)
        return CausalLM(BigramLM(), word_tokenizer(), max_batch_tokens=kwargs["max_batch_tokens"])

    monkeypatch.setattr(onion_mod, "load_causal_lm", fake_load)
    monkeypatch.setattr(onion_mod, "_SHARED_CACHES", {})
    clean, x = make_clean(20), poison(make_clean(6, seed=5).inputs)
    wide = ONION(ONIONConfig(clean_size=20), seed=0).fit(BowClassifier(), clean)
    assert seen["max_batch_tokens"] == 2048 and wide.lm is not None and wide.lm.max_batch_tokens == 2048
    narrow = ONION(ONIONConfig(clean_size=20, lm_batch_tokens=8), seed=0).fit(BowClassifier(), clean)
    assert seen["max_batch_tokens"] == 8
    monkeypatch.setattr(onion_mod, "_SHARED_CACHES", {})  # score afresh: smaller batches, the same suspicions
    narrow._cache, wide._cache = {}, {}
    passes = narrow.lm.forward_count  # type: ignore[union-attr]
    np.testing.assert_allclose(narrow.score(x), wide.score(x), rtol=0, atol=1e-9)
    assert narrow.lm.forward_count > passes  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="lm_batch_tokens"):
        ONIONConfig(lm_batch_tokens=0)


class AutocastProbe(BigramLM):
    """The bigram LM, recording whether each forward ran under autocast and in which dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.dtype | None] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        on = torch.is_autocast_enabled("cpu")
        self.seen.append(torch.get_autocast_dtype("cpu") if on else None)
        return super().forward(input_ids, attention_mask)


def test_onion_lm_runs_in_the_runs_inference_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    probe = AutocastProbe()
    monkeypatch.setattr(onion_mod, "load_causal_lm", lambda *a, **k: CausalLM(probe, word_tokenizer()))
    monkeypatch.setattr(onion_mod, "_SHARED_CACHES", {})
    clean = make_clean(20)
    full = ONION(ONIONConfig(clean_size=20), seed=0).fit(BowClassifier(), clean)
    assert probe.seen and set(probe.seen) == {None}
    probe.seen.clear()
    with run_scope(Runtime(inference_precision="bf16")):
        half = ONION(ONIONConfig(clean_size=20), seed=0).fit(BowClassifier(), clean)
    assert probe.seen and set(probe.seen) == {torch.bfloat16}  # not served from the full-precision suspicions
    assert full._cache is not half._cache


# -- RAP -----------------------------------------------------------------------------------------------------
RAP_FAST = {"trigger": "rq", "lr": 0.05, "epochs": 3, "train_batch_size": 8, "clean_size": 80}


def fit_rap(precision: str | None) -> tuple[RAP, list[tuple[bool, torch.dtype | None]]]:
    model = BowClassifier()
    seen: list[tuple[bool, torch.dtype | None]] = []

    def record(module, args):  # type: ignore[no-untyped-def]
        on = torch.is_autocast_enabled("cpu")
        seen.append((torch.is_grad_enabled(), torch.get_autocast_dtype("cpu") if on else None))

    model.head.register_forward_pre_hook(record)
    det = RAP(RAPConfig(**RAP_FAST), seed=0)
    if precision is None:
        det.fit(model, make_clean(80))
    else:
        with run_scope(Runtime(precision=precision)):
            det.fit(model, make_clean(80))
    return det, seen


@pytest.mark.parametrize(
    "precision,dtype", [("bf16-mixed", torch.bfloat16), ("16-true", torch.float16), ("16-mixed", torch.bfloat16)]
)
def test_rap_optimisation_runs_in_the_runs_training_precision(precision: str, dtype: torch.dtype) -> None:
    full, seen_full = fit_rap(None)
    assert {d for grad, d in seen_full if grad} == {None}
    mixed, seen = fit_rap(precision)
    assert {d for grad, d in seen if grad} == {dtype}  # every optimisation step
    assert {d for grad, d in seen if not grad} == {None}  # the plain pass is inference (inference_precision)
    assert mixed.rows is not None and full.rows is not None and torch.isfinite(mixed.rows).all()
    assert mixed.rows.dtype == torch.float32
    # the same optimisation in lower precision: close to the full-precision rows, not the original ones
    assert not torch.equal(mixed.rows, full.rows)
    torch.testing.assert_close(mixed.rows, full.rows, rtol=0.05, atol=0.05)
    assert not torch.allclose(mixed.rows, mixed.original_rows)


def test_rap_at_full_precision_is_unchanged_by_the_runtime() -> None:
    plain, _ = fit_rap(None)
    scoped, _ = fit_rap("32-true")
    assert plain.rows is not None and torch.equal(plain.rows, scoped.rows)
    assert plain.history == scoped.history


# -- the runtime's training precision ------------------------------------------------------------------------
def test_training_precision_reaches_the_runtime() -> None:
    assert runtime_for(TrainConfig(accelerator="cpu", precision="bf16-mixed")).precision == "bf16-mixed"
    assert Runtime().precision is None  # outside a run: each stage's own
    expected = {"32-true": None, "32": None, "64-true": None, "16-mixed": torch.float16, "16-true": torch.float16,
                "16": torch.float16, "bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "bf16": torch.bfloat16}
    assert {p: TRAIN_AUTOCAST[p] for p in expected} == expected
    with run_scope(Runtime(precision="16-mixed")):  # on a CPU Lightning makes 16-mixed bf16; so do the loops
        assert train_dtype("cpu") == torch.bfloat16 and train_dtype("cuda") == torch.float16
