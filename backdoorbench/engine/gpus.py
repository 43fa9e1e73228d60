"""Several GPUs: one run per GPU, never one run over several (docs/scale.md, "Several GPUs").

A run trains on one device. Lightning's multi-process strategies (``ddp`` and the like) would re-launch the whole
command once per rank, so the attack, the defenses, the evaluation and every cache and result write would run
once per GPU: :func:`several_devices_problem` makes :func:`~backdoorbench.engine.spec.validate` refuse them. A
machine with several GPUs runs a *sweep* with one GPU per job instead: :class:`OneGpuPerJob` (a Hydra callback
registered in ``configs/config.yaml``) gives each job process of a multirun one of the GPUs it can see, through
``CUDA_VISIBLE_DEVICES``, before the job touches CUDA.

How a job picks its GPU: the job's process takes the lowest free *slot* ``k`` among lock files in
``<sweep dir>/.gpu_slots/`` (an exclusive ``flock`` that it holds until it exits) and uses GPU ``k mod n``. Jobs
that run at the same time therefore get different GPUs while there are enough (joblib's workers, submitit's local
processes); a worker process that runs several jobs one after another keeps its slot (CUDA cannot move a process
to another GPU once it started); with more workers than GPUs they share them in turn. A job that already sees one
GPU (SLURM with ``gpus_per_node: 1``), runs on the CPU, or names its GPUs itself (``trainer.devices=[i]``) is left
as it is.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

#: the way that works, named in every refusal
SWEEP_HINT = (
    "for several GPUs run a sweep with one GPU per job (--multirun with hydra/launcher=joblib, local or slurm; "
    "docs/scale.md, 'Several GPUs')"
)
#: Lightning strategies that start one process per device (each would re-run the whole command)
MULTI_PROCESS = ("ddp", "fsdp", "deepspeed", "xla", "hpu_parallel")

_claimed: tuple[IO[str], str] | None = None  # this process's slot (its open lock file) and its GPU


def several_devices_problem(devices: Any, strategy: str, accelerator: str, cuda_count: int | None = None) -> str | None:
    """Why ``trainer.devices`` / ``trainer.strategy`` ask for more than the run's one device, or ``None``.
    ``accelerator``: the resolved device type (``cpu``, ``cuda``, ``mps``); ``cuda_count``: the GPUs visible
    (asked of torch only for ``devices=auto`` on CUDA)."""
    if any(str(strategy).startswith(name) for name in MULTI_PROCESS):
        return (f"trainer.strategy={strategy} is not supported: Lightning would re-run the whole run (attack, "
                f"defenses, evaluation, cache and result writes) once per process; a run trains on one device; "
                + SWEEP_HINT)
    if isinstance(devices, (list, tuple)):
        count = len(devices)
    elif devices == "auto":
        if accelerator != "cuda":
            return None
        if cuda_count is None:
            import torch

            cuda_count = torch.cuda.device_count()
        count = cuda_count
    else:
        count = int(devices)
    if count <= 1:
        return None
    if accelerator == "cpu":
        return (f"trainer.devices={devices} on the CPU: a run is one process on one device (its CPU threads: "
                f"threads=N); use trainer.devices=1")
    return f"trainer.devices={devices}: a run trains on one device; {SWEEP_HINT}"


def visible_gpus() -> list[str]:
    """The GPUs this process may use, without initialising CUDA (after which ``CUDA_VISIBLE_DEVICES`` no longer
    counts): the entries of ``CUDA_VISIBLE_DEVICES`` when it is set, else one index per line of ``nvidia-smi -L``
    (none without the tool)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i in range(sum(line.startswith("GPU ") for line in out.splitlines()))]


def claim_gpu(gpus: list[str], slots: Path) -> str:
    """This process's GPU among ``gpus``: the lowest slot whose lock file in ``slots`` no other process holds
    (held until this process exits), modulo ``len(gpus)``. A process claims once; later calls return its GPU."""
    global _claimed
    if _claimed is not None:
        return _claimed[1]
    import fcntl

    slots.mkdir(parents=True, exist_ok=True)
    k = 0
    while True:
        handle = open(slots / f"slot-{k}.lock", "a")  # noqa: SIM115 - held open for the life of the process
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            k += 1
            continue
        _claimed = (handle, gpus[k % len(gpus)])
        return _claimed[1]


class OneGpuPerJob(Callback):
    """Hydra callback: in a multirun, the job's process sees one GPU (``CUDA_VISIBLE_DEVICES``), chosen by
    :func:`claim_gpu` among the GPUs it could see. Does nothing outside a multirun, with one GPU or none, for a
    CPU job (``trainer.accelerator=cpu``) or a job that names its devices (``trainer.devices`` other than 1)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        gpu = self.assign(config)
        if gpu is not None:
            log.info("one GPU per job: this job's process uses GPU %s (CUDA_VISIBLE_DEVICES)", gpu)

    def assign(self, config: DictConfig) -> str | None:
        """Set ``CUDA_VISIBLE_DEVICES`` for this job; returns the GPU, or ``None`` when left alone."""
        hydra: Any = config.get("hydra") or {}  # a DictConfig (its node), or {} outside Hydra
        trainer = config.get("trainer") or {}
        if not self.enabled or not str(hydra.get("mode", "")).endswith("MULTIRUN"):
            return None
        if trainer.get("accelerator", "auto") == "cpu" or trainer.get("devices", 1) != 1:
            return None
        gpus = visible_gpus()
        if len(gpus) <= 1:
            return None
        torch = sys.modules.get("torch")  # not imported yet: CUDA cannot be initialised either
        if torch is not None and torch.cuda.is_initialized() and _claimed is None:
            log.warning("one GPU per job: CUDA is already initialised in this process; it keeps the GPUs it sees")
            return None
        gpu = claim_gpu(gpus, Path(str(hydra.sweep.dir)) / ".gpu_slots")
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
        return gpu
