"""Several GPUs (docs/scale.md): a run refuses multi-device / multi-process training with one line (exit 2), and a
multirun gives each job process one GPU through ``CUDA_VISIBLE_DEVICES`` (``OneGpuPerJob``)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import PYTHON, subprocess_env
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from backdoorbench.cli import config_dir
from backdoorbench.config import ConfigError
from backdoorbench.engine import gpus
from backdoorbench.engine.spec import validate


def job_config(tmp_path: Path, *overrides: str, multirun: bool = True):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = "MULTIRUN" if multirun else "RUN"
        cfg.hydra.sweep.dir = str(tmp_path / "sweep")
    return cfg


def plain_config(*overrides: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("overrides, expected", [
    (("trainer.accelerator=cpu", "trainer.devices=3"), "trainer.devices=3 on the CPU"),
    (("trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"), "trainer.strategy=ddp is not supported"),
    (("trainer.strategy=ddp_spawn",), "trainer.strategy=ddp_spawn is not supported"),
    (("trainer.accelerator=cpu", "trainer.devices=[0,1]"), "trainer.devices=[0, 1] on the CPU"),
])
def test_several_devices_or_a_multi_process_strategy_are_refused(overrides, expected) -> None:
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        validate(plain_config(*overrides))


def test_one_device_is_accepted() -> None:
    for overrides in ((), ("trainer.devices=auto",), ("trainer.accelerator=cpu", "trainer.devices=[0]")):
        assert validate(plain_config("trainer.accelerator=cpu", *overrides)).device.type == "cpu"


def test_gpu_refusals_name_the_sweep_way() -> None:
    msg = gpus.several_devices_problem(4, "auto", "cuda")
    assert msg and "one GPU per job" in msg and "docs/scale.md" in msg
    assert "docs/scale.md" in gpus.several_devices_problem(1, "ddp", "cuda")
    assert gpus.several_devices_problem("auto", "auto", "cuda", cuda_count=2)
    assert gpus.several_devices_problem("auto", "auto", "cuda", cuda_count=1) is None
    assert gpus.several_devices_problem([3], "auto", "cuda") is None


@pytest.mark.parametrize("args, expected", [
    (["trainer.accelerator=cpu", "trainer.devices=3"], "trainer.devices=3 on the CPU"),
    (["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"], "one GPU per job"),
])
def test_the_command_line_refuses_with_one_line_and_exit_2(tmp_path: Path, args, expected) -> None:
    proc = subprocess.run([PYTHON, "-m", "backdoorbench", "run", *args, f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=subprocess_env(BACKDOORBENCH_CACHE=str(tmp_path / "cache")),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0]
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.safetensors"))


def test_the_callback_is_registered_for_every_sweep(tmp_path: Path) -> None:
    cfg = job_config(tmp_path)
    callback = instantiate(cfg.hydra.callbacks.one_gpu_per_job)
    assert isinstance(callback, gpus.OneGpuPerJob) and callback.enabled


#: one job process: loads engine/gpus.py alone (not the package and torch: seconds, not a minute, per process),
#: runs the callback for two jobs in a row, waits until every process has claimed, records what it saw
JOB = """
import importlib.util, os, sys, time
from pathlib import Path
from omegaconf import OmegaConf
spec = importlib.util.spec_from_file_location("gpus", sys.argv[1]); gpus = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpus)
cfg, out, n = OmegaConf.load(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
seen = []
for _ in range(2):
    gpus.OneGpuPerJob().on_job_start(cfg)
    seen.append(os.environ["CUDA_VISIBLE_DEVICES"])
(out / f"{os.getpid()}.claimed").write_text(",".join(seen))
while len(list(out.glob("*.claimed"))) < n:  # hold the slot while the others claim theirs
    time.sleep(0.05)
"""


def test_concurrent_job_processes_get_different_gpus(tmp_path: Path) -> None:
    cfg = tmp_path / "job.yaml"
    cfg.write_text(OmegaConf.to_yaml(job_config(tmp_path)))
    out = tmp_path / "seen"
    out.mkdir()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "4,6"}
    procs = [subprocess.Popen([PYTHON, "-c", JOB, gpus.__file__, str(cfg), str(out), "3"], env=env)
             for _ in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    seen = [f.read_text().split(",") for f in out.glob("*.claimed")]
    assert all(a == b for a, b in seen)  # a process that runs two jobs keeps its GPU
    assert sorted(a for a, _ in seen) == ["4", "4", "6"]  # three workers, two GPUs: taken in turn


def test_the_callback_leaves_other_jobs_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpus, "_claimed", None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    callback = gpus.OneGpuPerJob()
    assert callback.assign(job_config(tmp_path, multirun=False)) is None  # a single run
    assert callback.assign(job_config(tmp_path, "trainer.accelerator=cpu")) is None  # a CPU job
    assert callback.assign(job_config(tmp_path, "trainer.devices=[1]")) is None  # names its GPU
    assert gpus.OneGpuPerJob(enabled=False).assign(job_config(tmp_path)) is None
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")  # SLURM gave the job its one GPU
    assert callback.assign(job_config(tmp_path)) is None
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(gpus.shutil, "which", lambda _: None)  # no nvidia-smi: no GPU
    assert gpus.visible_gpus() == []


def test_a_real_multirun_gives_its_job_process_one_gpu(tmp_path: Path) -> None:
    """Through Hydra's own launcher (jobs in the submitting process): the callback runs before the job, in the
    job's process. Two jobs that fail at validation (ONION on images) keep the test fast."""
    sweep = tmp_path / "sweep"
    proc = subprocess.run([PYTHON, "-m", "backdoorbench", "run", "--multirun", "attack=badnets", "defense=onion,rap",
                           f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=subprocess_env(CUDA_VISIBLE_DEVICES="3,5"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]  # both jobs: expected failures
    logs = {p.parent.name: p.read_text() for p in sweep.glob("*/cli.log")}
    assert "uses GPU 3 (CUDA_VISIBLE_DEVICES)" in logs[next(k for k in logs if "onion" in k)]
    assert [p.name for p in (sweep / ".gpu_slots").iterdir()] == ["slot-0.lock"]  # one process, one slot
