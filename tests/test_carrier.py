"""The run's context is the one carrier of run-wide settings and folders (issue 35): it names every folder under
the cache and the run directory, components read their folders from it (never set on them from outside), a
component works without a run (the default context), and every random stream derives from the seed one way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from backdoorbench.attacks.base import AttackContext
from backdoorbench.defenses.repair.finetune import Finetune, FinetuneConfig
from backdoorbench.models.lm import SMOLLM2_CACHE_NAME, smollm2_cache_dir
from backdoorbench.runtime import Runtime, current, record_stage, run_scope
from backdoorbench.seeds import STAGE_SEEDS, STREAMS, stage_seed, stream
from backdoorbench.store import ArtifactStore, default_cache_dir


def test_the_context_names_every_folder_under_the_cache(tmp_path: Path) -> None:
    rt, cache = Runtime(cache_dir=tmp_path / "cache", run_dir=tmp_path / "run"), tmp_path / "cache"
    assert isinstance(rt.store, ArtifactStore) and rt.store.root == tmp_path / "cache"
    assert rt.cache_folder("onion", "k") == tmp_path / "cache" / "onion" / "k"
    assert rt.lm_dir("m") == tmp_path / "cache" / "lm" / "m"
    attack = rt.attack_folders("v1")
    assert (attack.work_dir, attack.shared_dir) == (cache / "partial-v1", cache / "clean-models")
    defense = rt.defense_folders("v1", "s1")
    assert (defense.work_dir, defense.shared_dir) == (cache / "defense-s1", cache / "stages-v1")
    assert defense.stage_folder_locked and not rt.defense_folders(None, "").stage_folder_locked
    # a victim without a key (attack=external): the stage folder is the run directory's, nothing shared
    outside = rt.defense_folders(None, "")
    assert (outside.work_dir, outside.shared_dir) == (tmp_path / "run" / "defense_work", None)
    # the derived contexts keep everything else, the stage record included (one record per run)
    assert defense.device == rt.device and defense.stages is rt.stages and defense.store is rt.store


def test_without_a_cache_there_is_no_cache_folder(tmp_path: Path) -> None:
    rt = Runtime(run_dir=tmp_path)
    assert rt.store is None and rt.cache_folder("images") is None
    assert (rt.attack_folders("v").work_dir, rt.attack_folders("v").shared_dir) == (None, None)
    assert rt.defense_folders("v", "s").work_dir == tmp_path / "defense_work"
    assert rt.lm_dir("m") == default_cache_dir() / "lm" / "m"  # the conversion never changes results


def test_components_read_their_folders_from_the_context(tmp_path: Path) -> None:
    ft = Finetune(FinetuneConfig(), seed=0)
    ctx = AttackContext(train=None, proxy=None, num_classes=2, new_model=lambda: None, trainer=None)  # type: ignore[arg-type]
    # the default context: no folders, and the component still works (see test_precision: DBD without a run)
    assert (ft.work_dir, ft.run_dir, ft.shared_dir, ctx.work_dir, ctx.shared_dir) == (None,) * 5
    assert current() == Runtime()
    with run_scope(Runtime(cache_dir=tmp_path, run_dir=tmp_path / "run").defense_folders("v", "s")):
        folders = (tmp_path / "defense-s", tmp_path / "run", tmp_path / "stages-v")
        assert (ft.work_dir, ft.run_dir, ft.shared_dir) == folders
    with run_scope(Runtime(cache_dir=tmp_path).attack_folders("v")):
        assert ctx.checkpoint("x") == tmp_path / "partial-v" / "x.partial.safetensors"
    assert ft.work_dir is None and ctx.checkpoint("x") is None  # restored after the block
    with pytest.raises(AttributeError):
        ft.work_dir = tmp_path  # type: ignore[misc]  # nothing is set on a component from outside


def test_the_lm_folder_follows_the_run(tmp_path: Path) -> None:
    assert smollm2_cache_dir() == default_cache_dir() / "lm" / SMOLLM2_CACHE_NAME
    with run_scope(Runtime(cache_dir=tmp_path)):
        assert smollm2_cache_dir() == tmp_path / "lm" / SMOLLM2_CACHE_NAME
    assert smollm2_cache_dir(tmp_path / "other") == tmp_path / "other" / "lm" / SMOLLM2_CACHE_NAME


def test_stages_of_a_derived_context_are_recorded_in_the_run() -> None:
    with run_scope(Runtime()) as rt, run_scope(rt.attack_folders("v")):
        record_stage("attack stage", {"device": "cpu"})
    assert "attack stage" in rt.stages


def test_streams_and_stage_seeds_keep_the_values_of_the_old_inline_derivations() -> None:
    # the derivations each place wrote inline before seeds.py (cached victims' weights depend on them)
    assert stage_seed(7, "surrogate") == 7 + 101
    assert stage_seed(7, "user-finetune") == 8 and stage_seed(7, "lwp-head") == 12
    assert stage_seed(3, "pretrain-masking-torch") == 3 * 1000 + 17
    assert stage_seed(3, "neural-cleanse-class", 4) == 3 * 1000 + 4
    for name, salts, seed, index in (("attack", (), 5, (9,)), ("defense", (104729,), 5, (2,)),
                                     ("split", (20240601,), 1, ()), ("mixmatch", (31337,), 0, ())):
        assert STREAMS[name] == salts
        assert np.array_equal(stream(seed, name, *index).integers(1 << 30, size=4),
                              np.random.default_rng([seed, *salts, *index]).integers(1 << 30, size=4))
    assert all(scale >= 1 for scale, _ in STAGE_SEEDS.values())
    with pytest.raises(KeyError, match="declare it"):
        stream(0, "nameless")
    with pytest.raises(KeyError, match="declare it"):
        stage_seed(0, "nameless")
