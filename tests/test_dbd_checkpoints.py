"""DBD's checkpoints: crafted pickles as ``defense.ssl_checkpoint`` or in the stage cache run no code, and a
stage that resumes after a kill ends bit-identical to an uninterrupted run (stage 1 and stage 3)."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from test_checkpoint import evil_checkpoint
from test_dbd import TINY_DBD, tiny_images, tiny_model

from backdoorbench.defenses.training.dbd import DBD, _head_prefix
from backdoorbench.defenses.training.dbd_config import DBDConfig
from backdoorbench.defenses.training.mixmatch import MixMatchModule
from backdoorbench.defenses.training.ssl import SSLModule
from backdoorbench.runtime import current, run_scope
from backdoorbench.trainer.checkpoint import CheckpointError, load_state_dict


class _InFolders(DBD):
    """DBD whose ``train`` runs in the current context with the stage folder ``work`` and run directory ``run``."""

    def __init__(self, cfg: DBDConfig, work: Path, run: Path | None) -> None:
        super().__init__(cfg, seed=0)
        self.folders = {"work_dir": work, "run_dir": run}

    def train(self, *args: Any, **kwargs: Any) -> Any:
        with run_scope(replace(current(), **self.folders)):
            return super().train(*args, **kwargs)


def _dbd(work: Path, run: Path | None = None, **cfg: object) -> DBD:
    return _InFolders(DBDConfig(**{**TINY_DBD, **cfg}), work, run)


def test_a_crafted_ssl_checkpoint_runs_no_code(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    evil = evil_checkpoint(tmp_path / "stage1_ssl.ckpt", marker)
    d = _dbd(tmp_path / "work", variant="ss_sce", ssl_checkpoint=str(evil))
    refused = f"defense.ssl_checkpoint {re.escape(str(evil))} cannot be loaded safely.*code, not data.*convert it"
    with pytest.raises(CheckpointError, match=refused):
        d.train(tiny_images(), tiny_model)
    assert not marker.exists()


@pytest.mark.parametrize("content", ["garbage", "other model"])
def test_a_bad_ssl_checkpoint_names_the_option_and_is_never_to_be_deleted(tmp_path: Path, content: str) -> None:
    """The user's own file: the error names defense.ssl_checkpoint, and does not tell them to delete it."""
    from backdoorbench.trainer.checkpoint import save_state_dict

    given = tmp_path / "mine.safetensors"
    if content == "garbage":
        given.write_bytes(b"not safetensors at all" * 4)
        problem = "is not a readable safetensors file"
    else:
        save_state_dict(given, {"other.weight": torch.zeros(2, 2)})
        problem = "does not fit this model"
    d = _dbd(tmp_path / "work", variant="ss_sce", ssl_checkpoint=str(given))
    with pytest.raises(CheckpointError, match=rf"^defense.ssl_checkpoint {re.escape(str(given))} {problem}") as err:
        d.train(tiny_images(), tiny_model)
    assert "delete" not in str(err.value) and "leave it unset to train stage 1" in str(err.value)
    assert "\n" not in str(err.value) and given.is_file()


def test_a_weights_only_lightning_checkpoint_is_still_accepted(tmp_path: Path) -> None:
    """An older stage1_ssl.ckpt (Lightning, saved with weights_only=True) holds tensors only: it loads."""
    trained = _dbd(tmp_path / "a", variant="ss_sce")
    trained.train(tiny_images(), tiny_model)
    fresh = tiny_model()
    weights = load_state_dict(tmp_path / "a" / "stage1_ssl.safetensors")
    old = tmp_path / "old.ckpt"
    torch.save({"epoch": 1, "state_dict": {f"model.{k}": v for k, v in weights.items()}}, old)
    d = _dbd(tmp_path / "b", variant="ss_sce", ssl_checkpoint=str(old), head_epochs=1)
    model = d.train(tiny_images(), tiny_model)
    assert d.stage_status["stage1_ssl"] == "loaded"
    backbone = [k for k in weights if not k.startswith(_head_prefix(fresh))]
    assert all(torch.equal(model.state_dict()[k], weights[k]) for k in backbone)  # frozen in stage 2
    assert not all(torch.equal(fresh.state_dict()[k], weights[k]) for k in backbone)  # and not the fresh init


@pytest.mark.parametrize("name", ["stage1_ssl.safetensors", "stage1_ssl.partial.safetensors"])
def test_a_crafted_stage_checkpoint_in_the_cache_runs_no_code(tmp_path: Path, name: str) -> None:
    """Pickles at the old stage names are never opened (the stage trains); a pickle under a current name is
    refused with an error that names the file (the stage is not silently retrained)."""
    marker = tmp_path / "marker"
    work = tmp_path / "work"
    work.mkdir()
    evil = evil_checkpoint(tmp_path / "evil.ckpt", marker)
    for old in ("stage1_ssl.ckpt", "stage1_ssl.partial.ckpt", "stage2_sce.ckpt", "stage3_mixmatch.ckpt"):
        (work / old).write_bytes(evil.read_bytes())
    (work / name).write_bytes(evil.read_bytes())
    refused = f"{re.escape(str(work / name))} is not a readable safetensors file.*delete it"
    with pytest.raises(CheckpointError, match=refused):
        _dbd(work).train(tiny_images(), tiny_model)
    assert not marker.exists()
    (work / name).unlink()
    d = _dbd(work, variant="ss_sce")
    d.train(tiny_images(), tiny_model)
    assert d.stage_status == {"stage1_ssl": "trained", "stage2_sce": "trained"} and not marker.exists()


def _crash_in(module: type, epoch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill in the first step of ``epoch``: epochs before it are in the partial checkpoint, and the RNGs
    have moved on (the data loader's iterator was created) when the process dies."""
    orig = module.training_step

    def step(self, batch, batch_idx):  # noqa: ANN001, ANN202
        if self.current_epoch == epoch:
            torch.rand(7)
            raise RuntimeError("kill -9")
        return orig(self, batch, batch_idx)

    monkeypatch.setattr(module, "training_step", step)


@pytest.fixture
def cpu_run():
    """A run on the CPU (CUDA kernels may be nondeterministic): DBD's stages train on the run's device."""
    from backdoorbench.runtime import Runtime, run_scope

    with run_scope(Runtime(device=torch.device("cpu"))):
        yield


def test_resumed_stages_are_bit_identical_to_an_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpu_run: None
) -> None:
    cfg = {"ssl_epochs": 3, "mixmatch_epochs": 3}
    reference = _dbd(tmp_path / "a", **cfg).train(tiny_images(), tiny_model)
    work, run = tmp_path / "b", tmp_path / "run"

    _crash_in(SSLModule, 2, monkeypatch)
    with pytest.raises(RuntimeError, match="kill"):
        _dbd(work, **cfg).train(tiny_images(), tiny_model)
    assert (work / "stage1_ssl.partial.safetensors").is_file() and not (work / "stage1_ssl.safetensors").exists()
    monkeypatch.undo()
    _crash_in(MixMatchModule, 1, monkeypatch)
    with pytest.raises(RuntimeError, match="kill"):
        d = _dbd(work, **cfg)
        d.train(tiny_images(), tiny_model)
    assert d.stage_status == {"stage1_ssl": "resumed", "stage2_sce": "trained", "stage3_mixmatch": "trained"}

    ssl_a = load_state_dict(tmp_path / "a" / "stage1_ssl.safetensors")
    ssl_b = load_state_dict(work / "stage1_ssl.safetensors")
    assert all(torch.equal(ssl_a[k], ssl_b[k]) for k in ssl_a), "stage 1 resumed differently"
    monkeypatch.undo()

    last = _dbd(work, run, **cfg)
    resumed = last.train(tiny_images(), tiny_model)
    status = json.loads((run / "dbd_stages.json").read_text())["stage_status"]
    assert status == {"stage1_ssl": "loaded", "stage2_sce": "loaded", "stage3_mixmatch": "resumed"}
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"stage 3 resumed differently: {name}"
    assert not list(work.glob("*.partial.safetensors"))
