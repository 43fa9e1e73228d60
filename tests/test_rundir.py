"""Run directory names cannot collide (issue 12, finding 3): two runs or sweeps composed in the same
second get different folders."""

from __future__ import annotations

import re

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from backdoorbench.cli import config_dir
from backdoorbench.engine.rundir import register_resolvers, unique_suffix


def _hydra_cfg():
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", return_hydra_config=True)


def test_run_and_sweep_dirs_of_the_same_second_differ(monkeypatch: pytest.MonkeyPatch) -> None:
    register_resolvers()
    a, b = _hydra_cfg(), _hydra_cfg()
    # pin the clock: both runs start in the same second
    OmegaConf.register_new_resolver("now", lambda pattern: "2030-01-01_00-00-00", use_cache=True, replace=True)
    try:
        runs = [str(c.hydra.run.dir) for c in (a, b)]
        sweeps = [str(c.hydra.sweep.dir) for c in (a, b)]
        assert runs[0] != runs[1] and sweeps[0] != sweeps[1]
        assert all(r.startswith("runs/2030-01-01_00-00-00_ripples_dan_") for r in runs)
        assert all(s.startswith("multirun/2030-01-01_00-00-00_") for s in sweeps)
        assert str(a.hydra.run.dir) == runs[0]  # stable within one run (cached per config)
    finally:
        from hydra.core.utils import setup_globals

        setup_globals()  # Hydra's own `now` again


def test_unique_suffix_names_the_process() -> None:
    import os

    values = {unique_suffix() for _ in range(50)}
    assert len(values) > 40
    assert all(re.fullmatch(rf"{os.getpid()}-[0-9a-f]{{4}}", v) for v in values)
