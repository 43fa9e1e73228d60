"""The pure parts of benchmarks/reproducibility.py: metric flattening, the largest difference, which cache a run
uses (a defense row loads the victim its victim row trained at the same tag) and the overrides per scale."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT


def _load():
    spec = importlib.util.spec_from_file_location("bench_repro", REPO_ROOT / "benchmarks" / "reproducibility.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


repro = _load()


def test_flat_metrics_flattens_nested_drops_nan_and_bools():
    m = {"ba": 0.9, "far_at_frr": {"0.05": 0.25, "0.1": float("nan")}, "flag": True, "name": "x", "n": 3}
    assert repro.flat_metrics(m) == {"ba": 0.9, "far_at_frr.0.05": 0.25, "n": 3.0}


def test_largest_difference_in_points_rates_only():
    a = {"ba": 0.90, "asr": 0.50, "far_at_frr": {"0.05": 0.10}, "threshold": 1.0, "clean_size": 100, "der": 0.7}
    b = {"ba": 0.91, "asr": 0.50, "far_at_frr": {"0.05": 0.13}, "threshold": 9.0, "clean_size": 200, "der": 0.7}
    d, where = repro.largest_difference(a, b)
    assert where == "far_at_frr.0.05" and math.isclose(d, 3.0)  # threshold and counts are not rates
    assert repro.largest_difference(a, a) == (0.0, "—")


def test_largest_difference_of_a_defense_leaves_the_victim_out():
    a = {"ba": 0.90, "asr": 1.0, "ba_after": 0.80, "asr_after": 0.10}
    b = {"ba": 0.70, "asr": 0.5, "ba_after": 0.81, "asr_after": 0.10}
    assert repro.largest_difference(a, b, victim=True)[1] == "asr"
    d, where = repro.largest_difference(a, b, victim=False)
    assert where == "ba_after" and math.isclose(d, 1.0)


def test_a_defense_row_uses_its_victim_rows_cache_per_tag(tmp_path: Path):
    c = repro.COMPONENTS
    victim, dbd, dan = c["victim:badnets"], c["dbd"], c["dan (text)"]
    assert dbd.attack == victim.attack == "badnets"
    assert repro.cache_dir(tmp_path, dbd.attack, "threads2_a") == (
        repro.run_dir(tmp_path, "victim:badnets", "threads2_a") / "cache")
    tags = [t for t, _ in repro.TAGS]
    assert len({repro.cache_dir(tmp_path, "badnets", t) for t in tags}) == len(tags)  # a fresh cache per tag
    assert repro.cache_dir(tmp_path, dan.attack, "threads1") != repro.cache_dir(tmp_path, "badnets", "threads1")
    assert repro.run_dir(tmp_path, "dbd", "threads1") != repro.run_dir(tmp_path, "dbd (defense.threads=null)",
                                                                       "threads1")


@pytest.mark.parametrize("scale", sorted(repro.SCALES))
def test_every_defense_row_has_its_victim_row_and_the_same_victim_overrides(scale: str):
    """A defense row trains no victim of its own: the data/model/trainer/attack overrides (the victim's cache key)
    are its victim row's, and only ``defense.*`` differs."""
    for name, comp in repro.COMPONENTS.items():
        if comp.defense == "none":
            continue
        row = f"victim:{comp.attack}"
        assert row in repro.COMPONENTS, name
        own, theirs = repro.overrides(comp, scale), repro.overrides(repro.COMPONENTS[row], scale)
        assert [o for o in own if not o.startswith("defense")] == [o for o in theirs if not o.startswith("defense")]


def test_the_published_metrics_of_each_row_kind():
    c = repro.COMPONENTS
    assert repro.published_keys(c["victim:badnets"]) == ("ba", "asr")
    assert repro.published_keys(c["finetune"]) == ("ba_after", "asr_after")
    assert repro.published_keys(c["dan (text)"]) == ("far_at_frr.0.05",)
    assert repro.published_keys(c["clp"]) == ()
    a = {"ba": 0.5, "asr": 0.9, "far_at_frr": {"0.05": 0.2}}
    b = {"ba": 0.52, "asr": 0.9, "far_at_frr": {"0.05": 0.1}}
    assert repro.differences(a, b, ("ba", "asr")) == "BA 2.00 / ASR 0.00"
    assert repro.differences(a, b, ("far_at_frr.0.05",)) == "FAR@5% 10.00"
    assert repro.differences(a, b, ()) == "—"


def test_differing_names_every_metric_that_moved():
    a = {"ba": 0.5, "threshold": 3.8805516, "far_at_frr": {"0.05": 1.0}}
    b = {"ba": 0.5, "threshold": 3.8805553, "far_at_frr": {"0.05": 1.0}, "auroc": 0.4}
    assert repro.differing(a, b) == ["auroc", "threshold"]
    assert repro.differing(a, a) == []
