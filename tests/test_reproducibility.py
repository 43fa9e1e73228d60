"""Reproducibility (issue 39): the nondeterminism record, the thread pin of DBD's training and the report's
warnings about tables that mix thread counts or nondeterministic runs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from test_dbd import TINY_DBD, tiny_images, tiny_model

from backdoorbench.engine.determinism import NONDETERMINISTIC, record_nondeterminism, reproducibility_record
from backdoorbench.runtime import intra_op_threads

TORCH_TEXT = f"scatter_add_cuda_kernel {NONDETERMINISTIC}, but you set 'torch.use_deterministic_algorithms(True, " \
             "warn_only=True)'. You can file an issue"


def test_nondeterministic_operations_are_recorded_once_whatever_the_filters() -> None:
    before = warnings.showwarning
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=UserWarning, module="torch")  # the user's filters
        warnings.filterwarnings("ignore", message=f".*{NONDETERMINISTIC}")
        with record_nondeterminism() as ops:
            warnings.filterwarnings("ignore", ".*does not have many workers.*")  # as make_trainer does
            for _ in range(3):
                warnings.warn(TORCH_TEXT, UserWarning, stacklevel=1)
            warnings.warn("index_add_cuda_ " + NONDETERMINISTIC, UserWarning, stacklevel=1)
            warnings.warn("something else", DeprecationWarning, stacklevel=1)
    assert ops == ["scatter_add_cuda_kernel", "index_add_cuda_"]
    texts = [str(w.message) for w in shown]
    assert texts.count(TORCH_TEXT) == 1  # shown once (though the user's filter hid it), not three times
    assert "something else" in texts  # other warnings pass through
    assert warnings.showwarning is before


def test_record_has_the_thread_count_in_force() -> None:
    with intra_op_threads(1):
        rec = reproducibility_record(None, "cpu", [])
    assert rec["threads"] == 1 and rec["threads_configured"] is None
    assert rec["deterministic"] is torch.are_deterministic_algorithms_enabled()
    assert reproducibility_record(2, "cpu", ["scatter_add_cuda_kernel"])["deterministic"] is False


def test_intra_op_threads_pins_and_restores_also_on_errors() -> None:
    before = torch.get_num_threads()
    with intra_op_threads(None) as n:
        assert n == before
    with pytest.raises(RuntimeError, match="boom"), intra_op_threads(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_dbd_trains_with_its_own_thread_count(tmp_path: Path) -> None:
    """DBD's stages run with ``defense.threads`` whatever the run's count: the same weights at 1 and 2 run
    threads (CPU convolution backward sums in a thread-count-dependent order, so unpinned they may differ)."""
    from backdoorbench.defenses.training.dbd import DBD
    from backdoorbench.defenses.training.dbd_config import DBDConfig
    from backdoorbench.runtime import Runtime, run_scope

    before = torch.get_num_threads()
    states, recorded = [], []
    try:
        for run_threads in (1, 2):
            torch.set_num_threads(run_threads)
            d = DBD(DBDConfig(**TINY_DBD, threads=1))
            run = tmp_path / f"r{run_threads}"
            with run_scope(Runtime(work_dir=tmp_path / f"w{run_threads}", run_dir=run)):
                states.append(d.train(tiny_images(), tiny_model).state_dict())
            assert torch.get_num_threads() == run_threads  # the run's count again afterwards
            recorded.append(json.loads((run / "dbd_stages.json").read_text())["threads"])
    finally:
        torch.set_num_threads(before)
    for k, v in states[0].items():
        assert torch.equal(v, states[1][k]), k
    assert recorded == [1, 1]
    with pytest.raises(ValueError, match="threads"):
        DBDConfig(threads=0)


def test_abl_trains_with_its_own_thread_count() -> None:
    """ABL trains its own model from the start, so ``defense.threads: 1`` gives the same weights at run threads 1
    and 2 (as DBD's pin); the run's count is given back afterwards."""
    from backdoorbench.defenses.training.abl import ABL, ABLConfig
    from backdoorbench.trainer.lit import TrainConfig

    tiny = dict(isolation_ratio=0.1, isolation_epochs=1, finetune_epochs=1, unlearning_epochs=1, threads=1)
    trainer = TrainConfig(max_epochs=1, batch_size=16, optimizer="sgd", lr=0.05, logger="none")
    before = torch.get_num_threads()
    seen, states = [], []

    class Spy(ABL):
        def fit_model(self, *args, **kwargs):
            seen.append(torch.get_num_threads())
            return super().fit_model(*args, **kwargs)

    try:
        for run_threads in (1, 2):
            torch.set_num_threads(run_threads)
            states.append(Spy(ABLConfig(**tiny), seed=0).train(tiny_images(), tiny_model, trainer=trainer).state_dict())
            assert torch.get_num_threads() == run_threads  # the run's count again afterwards
    finally:
        torch.set_num_threads(before)
    assert seen == [1] * 6  # three stages per run, each at the pinned count
    for k, v in states[0].items():
        assert torch.equal(v, states[1][k]), k
    with pytest.raises(ValueError, match="threads"):
        ABLConfig(threads=0)


# -- report ----------------------------------------------------------------------------------------------
def _run(root: Path, name: str, seed: int, threads: int | None, ops: list[str] | None = None) -> None:
    import yaml

    d = root / name
    d.mkdir(parents=True)
    metrics = {"ba": 0.9, "asr": 1.0, "ba_after": 0.9, "asr_after": 0.01, "r_acc_after": 0.9, "der": 0.9}
    res = {"run": {"attack": "badnets", "defense": "dbd", "defense_kind": "training", "data": "mnist5k",
                   "model": "wrn16_1", "seed": seed}, "metrics": metrics}
    if ops is not None:
        res["reproducibility"] = {"threads": threads, "nondeterministic_ops": ops}
    (d / "results.json").write_text(json.dumps(res))
    (d / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "threads": threads, "attack": {"name": "badnets"},
                                                   "defense": {"name": "dbd"}}))
    (d / "versions.json").write_text(json.dumps({"backdoorbench": "1", "torch": "2"}))


def test_report_warns_when_a_table_mixes_thread_counts_or_nondeterministic_runs(tmp_path: Path) -> None:
    from backdoorbench.report import write_report

    same = tmp_path / "same"
    _run(same, "a", 0, 1, [])
    _run(same, "b", 1, None)  # an older run: no record, its config says torch's default
    md = write_report(same)
    assert "different CPU thread counts: 1 | default" in md

    clean = tmp_path / "clean"
    _run(clean, "a", 0, 1, [])
    _run(clean, "b", 1, 1)  # an older run with threads=1 configured
    assert "thread counts" not in write_report(clean)

    nondet = tmp_path / "nondet"
    _run(nondet, "a", 0, 2, ["index_add_cuda_"])
    _run(nondet, "b", 1, 2, [])
    md = write_report(nondet)
    assert "1 run(s) used operations without a deterministic implementation: index_add_cuda_" in md
