"""The on-disk array cache (ArrayShards) and ONION's suspicions kept in it across processes."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from test_detectors_text import BigramLM, BowClassifier, make_clean, poison, word_tokenizer

import backdoorbench.defenses.detectors.onion as onion_mod
from backdoorbench.arraycache import ArrayShards, digest
from backdoorbench.defenses.detectors.onion import ONION, ONIONConfig
from backdoorbench.models.lm import CausalLM
from backdoorbench.runtime import Runtime, run_scope


def test_flushed_arrays_reach_another_instance_exactly(tmp_path) -> None:
    a = ArrayShards(tmp_path / "c")
    x32 = np.array([0.1, -2.5, 3.0], dtype=np.float32)
    a.put("the movie", x32)
    a.put("a film", np.zeros(0, dtype=np.float32))
    b = ArrayShards(tmp_path / "c")
    assert b.lookup(["the movie"]) == {}  # not flushed yet: not on disk
    assert a.lookup(["the movie"])["the movie"] is not None  # but known to its writer
    path = a.flush()
    assert path is not None and path.parent == tmp_path / "c" and a.flush() is None  # nothing left pending
    got = b.lookup(["the movie", "a film", "unknown"])
    assert set(got) == {"the movie", "a film"}
    assert got["the movie"].dtype == np.float32 and np.array_equal(got["the movie"], x32)
    assert len(got["a film"]) == 0
    # a second writer's shard is read on the next lookup; the first writer sees it too
    b.put("other", np.array([1.0, 2.0]))
    b.flush()
    assert np.array_equal(a.lookup(["other"])["other"], [1.0, 2.0])
    assert len(list((tmp_path / "c").glob("*.npz"))) == 2


def test_put_flushes_after_the_interval(tmp_path) -> None:
    a = ArrayShards(tmp_path, flush_every_s=0.0)
    a.put("one", np.ones(2))
    assert not list(tmp_path.glob("*.npz"))
    a.put("two", np.ones(3))  # the first pending put is older than 0 s: both are written
    assert set(ArrayShards(tmp_path).lookup(["one", "two"])) == {"one", "two"}


def test_unreadable_shards_and_temporary_files_are_skipped(tmp_path, caplog) -> None:
    a = ArrayShards(tmp_path)
    a.put("kept", np.arange(3.0))
    a.flush()
    (tmp_path / "0-1-broken.npz").write_bytes(b"not a zip file")
    np.savez(tmp_path / "0-2-mismatch.npz", keys=np.array([digest("bad")]), offsets=np.array([0, 5]),
             values=np.zeros(2))
    (tmp_path / ".x.tmp-1234.npz").write_bytes(b"half written")
    with caplog.at_level(logging.WARNING, logger="backdoorbench.arraycache"):
        got = ArrayShards(tmp_path).lookup(["kept", "bad"])
    assert set(got) == {"kept"} and np.array_equal(got["kept"], np.arange(3.0))
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "0-1-broken.npz" in warned and "0-2-mismatch.npz" in warned and ".x.tmp" not in warned


def test_a_missing_folder_is_empty_and_not_created(tmp_path) -> None:
    a = ArrayShards(tmp_path / "none")
    assert a.lookup(["x"]) == {} and len(a) == 0
    assert not (tmp_path / "none").exists()


# -- ONION ---------------------------------------------------------------------------------------------
def fitted_onion() -> ONION:
    det = ONION(ONIONConfig(clean_size=40, bar_quantile=0.9), seed=0, lm=CausalLM(BigramLM(), word_tokenizer()))
    return det.fit(BowClassifier(), make_clean(40))


@pytest.fixture
def fresh_process(monkeypatch):
    """What a new process starts with: no shard folder read yet."""
    monkeypatch.setattr(onion_mod, "_DISK_CACHES", {})


def test_onion_reuses_suspicions_another_process_computed(tmp_path, fresh_process, monkeypatch) -> None:
    texts = poison(make_clean(20, seed=21).inputs) + make_clean(10, seed=22).inputs
    with run_scope(Runtime(cache_dir=tmp_path)):
        first = fitted_onion()
        s_first = first.score(texts)
    assert first.lm_forward_count > 0
    folders = list((tmp_path / "onion").iterdir())
    assert len(folders) == 1 and list(folders[0].glob("*.npz"))

    monkeypatch.setattr(onion_mod, "_DISK_CACHES", {})  # a second process
    with run_scope(Runtime(cache_dir=tmp_path)):
        second = fitted_onion()
        s_second = second.score(texts)
    assert second.lm_forward_count == 0  # the clean fitting sentences and the scored ones came from disk
    assert second.bar == first.bar and np.array_equal(s_first, s_second)
    assert second.cache_hits >= len(texts)
    assert second.correct(texts) == first.correct(texts)


def test_onion_keeps_nothing_on_disk_outside_a_cached_run(tmp_path, fresh_process) -> None:
    with run_scope(Runtime(cache_dir=None)):  # cache.enabled=false
        det = fitted_onion()
        det.score(["the movie cf was good"])
    det2 = fitted_onion()  # library use outside a run
    det2.score(["the movie cf was good"])
    assert det2.lm_forward_count > 0 and not list(tmp_path.iterdir())


def test_onion_shard_folder_depends_on_the_lm_weights(tmp_path, fresh_process) -> None:
    other = BigramLM()
    other.table.data[:, 0] = -3.0  # another LM under the same name: its suspicions must not be reused
    with run_scope(Runtime(cache_dir=tmp_path)):
        fitted_onion()
        det = ONION(ONIONConfig(clean_size=40, bar_quantile=0.9), seed=0, lm=CausalLM(other, word_tokenizer()))
        det.fit(BowClassifier(), make_clean(40))
    assert det.lm_forward_count > 0 and len(list((tmp_path / "onion").iterdir())) == 2
