"""Sweeps that survive (backdoorbench/engine/sweep.py, cli.py): an invalid combination leaves failed.json and the
others run; a re-submitted sweep runs only what is missing; model sweeps over built-in, timm: and HF names compose.
The launchers of the ``cluster`` extra (joblib, submitit's local executor) run real tiny jobs in subprocesses."""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
from pathlib import Path

import pytest
from conftest import PYTHON, subprocess_env
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from backdoorbench import cli
from backdoorbench.engine import pipeline
from backdoorbench.engine.spec import validate
from backdoorbench.engine.sweep import FAILED, job_hash, previous_results

CONFIG_DIR = cli.config_dir()


@pytest.fixture(autouse=True)
def _restore_logging():
    root, handlers, level = logging.getLogger(), logging.getLogger().handlers[:], logging.getLogger().level
    yield
    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)
    GlobalHydra.instance().clear()


@pytest.fixture
def fake_runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """run_experiment replaced by: the real validation (so invalid combinations fail as they do), then
    config.yaml and results.json written as the real one does. Returns the folders it ran in."""
    ran: list[str] = []

    def fake(cfg, out_dir):
        validate(cfg)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        (out / "results.json").write_text(json.dumps({"run": {"attack": cfg.attack.name}}))
        ran.append(out.name)
        return {"run": {}, "metrics": {}}

    monkeypatch.setattr(pipeline, "run_experiment", fake)
    monkeypatch.setattr("backdoorbench.report.print_run_summary", lambda results: None)
    return ran


SWEEP = ["attack=badnets", "defense=none,onion,strip", "seed=3"]


def test_invalid_combination_is_recorded_and_the_sweep_goes_on(tmp_path: Path, fake_runs: list[str], capsys) -> None:
    rc = cli.main(["run", "--multirun", *SWEEP, f"hydra.sweep.dir={tmp_path}"])
    err = capsys.readouterr().err
    assert sorted(d.split("_")[1] for d in fake_runs) == ["none", "strip"]  # ONION (text only) fails, the rest run
    assert rc == 2 and "1 job(s) of the sweep failed" in err
    [failed] = list(tmp_path.glob(f"*/{FAILED}"))
    rec = json.loads(failed.read_text())
    assert failed.parent.name.startswith("badnets_onion_")
    assert "supports text only" in rec["reason"] and rec["type"].endswith("ConfigError") and rec["expected"]
    assert "defense=onion" in rec["overrides"] and rec["config"]["defense"]["name"] == "onion"
    assert rec["traceback"] is None  # an expected failure needs none
    assert not (failed.parent / "results.json").exists()


def test_resubmitted_sweep_runs_only_what_is_missing(tmp_path: Path, fake_runs: list[str], capsys) -> None:
    cli.main(["run", "--multirun", "attack=badnets", "defense=none,strip", f"hydra.sweep.dir={tmp_path}"])
    assert len(fake_runs) == 2
    results = sorted(tmp_path.glob("*/results.json"))
    mtimes = [p.stat().st_mtime_ns for p in results]
    fake_runs.clear()
    rc = cli.main(["run", "--multirun", "attack=badnets", "defense=none,strip", f"hydra.sweep.dir={tmp_path}"])
    assert rc == 0 and fake_runs == []  # nothing ran again
    assert [p.stat().st_mtime_ns for p in sorted(tmp_path.glob("*/results.json"))] == mtimes
    # one more value: only the new job runs, whatever its position in the sweep
    rc = cli.main(["run", "--multirun", "attack=badnets", "defense=finetune,none,strip", f"hydra.sweep.dir={tmp_path}"])
    assert rc == 0 and [d.split("_")[1] for d in fake_runs] == ["finetune"]


def test_a_later_success_removes_failed_json_and_other_results_are_never_overwritten(
    tmp_path: Path, fake_runs: list[str], monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    real = pipeline.run_experiment

    def flaky(cfg, out_dir):
        raise RuntimeError("preempted")

    monkeypatch.setattr(pipeline, "run_experiment", flaky)
    assert cli.main(["run", "--multirun", "attack=badnets", "defense=none", f"hydra.sweep.dir={tmp_path}"]) == 1
    [job] = [p.parent for p in tmp_path.glob(f"*/{FAILED}")]
    rec = json.loads((job / FAILED).read_text())
    assert rec["type"] == "builtins.RuntimeError" and Path(rec["traceback"]) == job / "error.log"
    monkeypatch.setattr(pipeline, "run_experiment", real)
    assert cli.main(["run", "--multirun", "attack=badnets", "defense=none", f"hydra.sweep.dir={tmp_path}"]) == 0
    assert not (job / FAILED).exists() and (job / "results.json").exists()
    # results of a different config in a job folder: refused, never overwritten
    (job / "config.yaml").write_text((job / "config.yaml").read_text().replace("seed: 0", "seed: 99"))
    fake_runs.clear()
    assert cli.main(["run", "--multirun", "attack=badnets", "defense=none", f"hydra.sweep.dir={tmp_path}"]) == 2
    assert fake_runs == [] and "different config (differs in: seed)" in capsys.readouterr().err
    assert "different config" in json.loads((job / FAILED).read_text())["reason"]


def test_previous_results_compares_the_resolved_config(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["attack=badnets", "defense=none"])
    assert previous_results(tmp_path, cfg) is None
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    assert previous_results(tmp_path, cfg) == []
    cfg.trainer.max_epochs = 1
    assert previous_results(tmp_path, cfg) == ["trainer.max_epochs"]
    assert job_hash("a=1,b=2") == job_hash("a=1,b=2") != job_hash("a=1,b=3")


def test_model_sweeps_over_builtin_timm_and_hf_names_compose() -> None:
    rewritten = cli.rewrite_model_override(
        ["attack=badnets", "model=resnet18,timm:resnet10t,bert-base-uncased,org/tiny-bert"], CONFIG_DIR)
    assert rewritten == ["attack=badnets", "model=resnet18,timm_resnet10t,bert-base-uncased,org_tiny-bert"]
    names = {}
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for option in rewritten[1][len("model="):].split(","):
            names[option] = compose("config", overrides=["attack=badnets", f"model={option}"]).model
    assert names["resnet18"].name == "resnet18"
    assert names["timm_resnet10t"].name == "timm:resnet10t" and "stages" in names["timm_resnet10t"]  # timm.yaml
    assert names["bert-base-uncased"].name == "bert-base-uncased" and "max_length" in names["bert-base-uncased"]
    assert names["org_tiny-bert"].name == "org/tiny-bert"
    # two names that clean up to one option name stay apart
    assert cli.register_model_option("org:tiny-bert", CONFIG_DIR) != "org_tiny-bert"


def test_model_sweep_runs_through_hydra(tmp_path: Path, fake_runs: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    real = pipeline.run_experiment

    def spy(cfg, out_dir):
        seen.append(cfg.model.name)
        return real(cfg, out_dir)

    monkeypatch.setattr(pipeline, "run_experiment", spy)
    rc = cli.main(["run", "--multirun", "attack=badnets", "defense=none", "model=wrn16_1,timm:resnet10t,org/x",
                   f"hydra.sweep.dir={tmp_path}"])
    assert sorted(seen) == ["org/x", "timm:resnet10t", "wrn16_1"]  # each job got its model's name
    assert len(set(fake_runs)) == 2  # one folder per model; an HF (text) name on MNIST is refused by validation:
    assert rc == 2 and "unknown model 'org/x' for the vision dataset" in json.loads(
        next(tmp_path.glob(f"*/{FAILED}")).read_text())["reason"]


# -- the launchers of the `cluster` extra, in subprocesses (real tiny jobs) ---------------------------------------
TINY = ["attack=badnets", "defense=none,onion", "data.max_train=100", "data.max_test=40", "data.holdout_size=50",
        "trainer.max_epochs=1", "trainer.batch_size=50", "cache.enabled=false"]


def _sweep(tmp_path: Path, *launcher: str) -> subprocess.CompletedProcess:
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.run([PYTHON, "-m", "backdoorbench", "run", "--multirun", *TINY, *launcher,
                           f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]  # badnets x onion fails: expected, reported by the parent
    assert "1 job(s) of the sweep failed" in proc.stderr
    [done] = list(sweep_dir.glob("badnets_none_*/results.json"))
    [failed] = list(sweep_dir.glob(f"badnets_onion_*/{FAILED}"))
    assert "supports text only" in json.loads(failed.read_text())["reason"]
    return proc


@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher") is None,
                    reason="hydra-joblib-launcher missing: pip install backdoorbench[cluster]")
def test_joblib_launcher_runs_two_jobs(tmp_path: Path) -> None:
    proc = _sweep(tmp_path, "hydra/launcher=joblib")
    assert "Joblib.Parallel(n_jobs=2" in proc.stderr + proc.stdout  # configs/hydra/launcher/joblib.yaml


@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
                    reason="hydra-submitit-launcher missing: pip install backdoorbench[cluster]")
def test_submitit_local_executor_runs_two_jobs(tmp_path: Path) -> None:
    _sweep(tmp_path, "hydra/launcher=local", "hydra.launcher.timeout_min=10")
    assert list((tmp_path / "sweep" / ".submitit").glob("*/*_result.pkl"))  # submitit ran them


def test_a_single_failed_run_leaves_failed_json_too(tmp_path: Path, fake_runs: list[str], capsys) -> None:
    rc = cli.main(["run", "attack=badnets", "defense=onion", f"hydra.run.dir={tmp_path / 'run'}"])
    assert rc == 2 and "supports text only" in capsys.readouterr().err  # the one-line error path, as before
    assert json.loads((tmp_path / "run" / FAILED).read_text())["overrides"] == ["attack=badnets", "defense=onion"]


def test_a_missing_launcher_plugin_names_the_extra() -> None:
    from hydra.errors import MissingConfigException

    exc = MissingConfigException("In 'hydra/launcher/slurm': Could not find 'hydra/launcher/submitit_slurm'", None)
    assert cli.failure_line(exc).endswith(f"({cli.CLUSTER_HINT})")
    assert "cluster" not in cli.failure_line(ValueError("data.max_train must be >= 1"))
    no_slurm = RuntimeError('Could not detect "srun", are you indeed on a slurm cluster?')
    assert "hydra/launcher=local" in cli.failure_line(no_slurm)


@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
                    reason="hydra-submitit-launcher missing: pip install backdoorbench[cluster]")
def test_slurm_launcher_config_composes_with_our_defaults() -> None:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        launcher = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True).hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.max_num_timeout, launcher.array_parallelism) == (1, 3, 32)
