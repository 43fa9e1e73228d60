"""trainer.checkpoint: safetensors + JSON trees, RNG capture, Lightning's checkpoint I/O without pickle, a
resumed fit identical to an uninterrupted one, and no unsafe ``torch.load`` left in the package."""

from __future__ import annotations

import ast
import random
import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from backdoorbench.trainer.checkpoint import (
    CheckpointError,
    ResumableCheckpoint,
    SafetensorsCheckpointIO,
    capture_rng,
    load_state_dict,
    load_tree,
    restore_rng,
    save_state_dict,
    save_tree,
)
from backdoorbench.trainer.lit import TrainConfig, make_trainer

PACKAGE = Path(__file__).resolve().parents[1] / "backdoorbench"


class Evil:
    """Unpickling this object writes ``marker``: what a crafted checkpoint does with a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


def evil_checkpoint(path: Path, marker: Path) -> Path:
    """A Lightning-looking ``.ckpt`` whose unpickling runs code; the control load proves the payload is live."""
    torch.save({"state_dict": {"model.w": torch.zeros(2)}, "payload": Evil(marker)}, path)
    torch.load(path, weights_only=False)  # the unsafe load that this module replaces
    assert marker.is_file(), "the crafted checkpoint must run code when unpickled"
    marker.unlink()
    return path


def test_tree_round_trip_keeps_optimizer_scheduler_and_rng_state(tmp_path: Path) -> None:
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=0.1, betas=(0.8, 0.9))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7)
    for _ in range(3):
        net(torch.randn(4, 3)).sum().backward()
        opt.step()
        sched.step()
    tree = {
        "opt": opt.state_dict(),  # int keys, tuples (betas), tensors (step, moments)
        "sched": sched.state_dict(),
        "rng": capture_rng(),  # numpy's uint32 array, Python's 625-int tuple, torch's byte tensor
        "gen": np.random.default_rng(5).bit_generator.state,  # 128-bit integers
        "odd": {"$t": 1, 7: [None, 1.5, float("inf")]},  # keys that look like the format's tags
    }
    path = tmp_path / "state.safetensors"
    save_tree(path, tree, kind="test")
    assert [p.name for p in tmp_path.iterdir()] == ["state.safetensors"]  # no temporary file left
    back = load_tree(path, kind="test")
    assert back["opt"]["param_groups"][0]["betas"] == (0.8, 0.9)
    assert set(back["opt"]["state"]) == {0, 1}
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(back["opt"]["state"][0][k], v)
    assert back["sched"] == sched.state_dict()
    assert back["gen"] == tree["gen"] and back["odd"] == tree["odd"]
    opt2 = torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    opt2.load_state_dict(back["opt"])  # loads into a fresh optimizer

    restore_rng(back["rng"])
    after = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng(tree["rng"])
    assert torch.equal(after[0], torch.rand(3)) and np.array_equal(after[1], np.random.rand(3))
    assert after[2] == random.random()

    with pytest.raises(CheckpointError, match="kind 'other'"):
        load_tree(path, kind="other")
    with pytest.raises(TypeError, match="without pickle"):
        save_tree(tmp_path / "x.safetensors", {"obj": object()})
    tied = torch.nn.Linear(2, 2)
    save_state_dict(tmp_path / "w.safetensors", {"a": tied.weight, "b": tied.weight, "c": tied.weight[0]})
    assert torch.equal(load_state_dict(tmp_path / "w.safetensors")["c"], tied.weight[0])


def test_unreadable_files_name_themselves_and_run_no_code(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    evil = evil_checkpoint(tmp_path / "evil.ckpt", marker)
    as_ours = tmp_path / "stage.safetensors"
    as_ours.write_bytes(evil.read_bytes())
    for loader in (load_state_dict, load_tree, SafetensorsCheckpointIO().load_checkpoint):
        with pytest.raises(CheckpointError, match=re.escape(str(as_ours))):
            loader(as_ours)
    assert not marker.exists()


def test_trainer_resume_never_unpickles(tmp_path: Path) -> None:
    """``fit(ckpt_path=...)`` goes through the Trainer's checkpoint I/O, which make_trainer sets to ours."""
    marker = tmp_path / "marker"
    evil = evil_checkpoint(tmp_path / "evil.ckpt", marker)
    trainer = make_trainer(TrainConfig(max_epochs=1, accelerator="cpu"))
    assert isinstance(trainer.strategy.checkpoint_io, SafetensorsCheckpointIO)
    loader = DataLoader(TensorDataset(torch.randn(8, 4), torch.randn(8, 1)), batch_size=4)
    with pytest.raises(CheckpointError, match=re.escape(str(evil))):
        trainer.fit(_Tiny(), train_dataloaders=loader, ckpt_path=evil)
    assert not marker.exists()


# -- a resumed fit equals the uninterrupted one --------------------------------------------------------------
class _Tiny(L.LightningModule):
    """Dropout and input noise (global torch RNG), a numpy draw, SGD with a per-step schedule."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))
        self.crash_at: int | None = None

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.current_epoch == self.crash_at:
            raise RuntimeError("killed")
        x, y = batch
        x = x + 0.1 * torch.randn_like(x) + float(np.random.uniform(-0.05, 0.05))
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> dict:
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _fit(path: Path, crash_at: int | None = None) -> _Tiny:
    L.seed_everything(0, verbose=False)
    data = TensorDataset(torch.linspace(-1, 1, 40).view(10, 4), torch.linspace(0, 1, 10).view(10, 1))
    # the loader's generator seeds its iterators and shuffles through its RandomSampler
    loader = DataLoader(data, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(1))
    module = _Tiny()
    module.crash_at = crash_at
    trainer = make_trainer(TrainConfig(max_epochs=4, accelerator="cpu"), callbacks=[ResumableCheckpoint(path, loader)])
    trainer.fit(module, train_dataloaders=loader, ckpt_path=path if path.is_file() else None)
    return module


def test_a_resumed_fit_is_bit_identical(tmp_path: Path) -> None:
    reference = _fit(tmp_path / "a.safetensors")
    with pytest.raises(RuntimeError, match="killed"):
        _fit(tmp_path / "b.safetensors", crash_at=2)  # epochs 0 and 1 are in the checkpoint
    torch.rand(5), np.random.rand(5), random.random()  # a fresh process has other RNG states
    resumed = _fit(tmp_path / "b.safetensors")
    assert load_tree(tmp_path / "b.safetensors", kind="lightning")["epoch"] == 3
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


# -- no unsafe loading anywhere in the package ----------------------------------------------------------------
def _unsafe_loads(tree: ast.AST) -> list[int]:
    """Line numbers of ``torch.load(...)`` / ``load(...)`` imported from torch without ``weights_only=True``."""
    names = {"torch.load", "torch.serialization.load"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
            names |= {a.asname or a.name for a in node.names if a.name == "load"}
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func) in names:
            safe = any(
                k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                for k in node.keywords
            )
            if not safe:
                bad.append(node.lineno)
    return bad


def test_no_torch_load_without_weights_only_true() -> None:
    assert _unsafe_loads(ast.parse("import torch\ntorch.load(p, weights_only=False)\ntorch.load(p)")) == [2, 3]
    assert _unsafe_loads(ast.parse("from torch import load as ld\nld(p)\nld(p, weights_only=True)")) == [2]
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        bad = _unsafe_loads(ast.parse(path.read_text(), str(path)))
        if bad:
            found[str(path.relative_to(PACKAGE.parent))] = bad
    assert found == {}, f"torch.load without weights_only=True: {found}"
