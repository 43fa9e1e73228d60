"""trainer/tracking.py: the devices a stage used are measured at the modules and torch calls, not taken from
the config."""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from backdoorbench.trainer.tracking import DeviceTracker, share, track_devices


def test_parameters_inputs_and_ops_are_recorded_where_they_are() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with track_devices(model) as rec:
        model(torch.randn(5, 3))
    assert rec.params == Counter({"cpu float32": 2})  # the two Linear layers (Sequential and ReLU own none)
    assert rec.inputs == Counter({"cpu float32": 4})  # Sequential, Linear, ReLU, Linear
    assert set(rec.ops) == {"cpu"}
    assert rec.gpu_busy is None or not torch.cuda.is_available()
    assert rec.devices() == {"cpu"}


def test_another_device_and_dtype_show_up() -> None:
    model = nn.Linear(3, 2).to(device="meta", dtype=torch.bfloat16)  # a device no config names
    with track_devices() as rec:  # every module, not one tree
        model(torch.empty(4, 3, device="meta", dtype=torch.bfloat16))
        torch.cdist(torch.randn(3, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))  # no module
    assert rec.params == Counter({"meta bfloat16": 1}) and rec.inputs == Counter({"meta bfloat16": 1})
    assert rec.ops["meta"] >= 1 and rec.ops["cpu"] >= 1
    assert share(rec.ops).startswith(("cpu", "meta")) and "%" in share(rec.ops)


def test_nested_stages_get_their_own_measurements() -> None:
    a, b = nn.Linear(2, 2), nn.Linear(2, 2).double()
    with DeviceTracker() as tracker:
        with tracker.stage("outer"):
            a(torch.randn(1, 2))
            with tracker.stage("inner"):
                b(torch.randn(1, 2, dtype=torch.float64))
            a(torch.randn(1, 2))
        with tracker.stage("outer"), tracker.stage("inner"):  # a repeated stage adds up
            b(torch.randn(1, 2, dtype=torch.float64))
        with tracker.stage("inner"):  # another path
            a(torch.randn(1, 2))
    outer, inner = tracker.records["outer"], tracker.records["outer/inner"]
    assert outer.params == Counter({"cpu float32": 2})
    assert inner.params == Counter({"cpu float64": 2})
    assert tracker.records["inner"].params == Counter({"cpu float32": 1})
    assert outer.seconds >= 0 and inner.seconds >= 0
    assert inner.summary()["params"] == "cpu float64" and inner.summary()["stage"] == "outer/inner"
    assert inner.cpu_share == (1.0 if inner.gpu_busy is None else 1 - inner.gpu_busy)


def test_hooks_and_the_op_counter_are_removed_on_exit() -> None:
    model = nn.Linear(2, 2)
    with track_devices(model) as rec:
        model(torch.randn(1, 2))
    before = (Counter(rec.params), Counter(rec.ops))
    model(torch.randn(1, 2))
    torch.randn(3) + 1
    assert (rec.params, rec.ops) == before
    assert share(Counter()) == "-"


class _FakeStream:
    busy = False

    def query(self) -> bool:  # True: all work done
        return not self.busy


def test_gpu_busy_share_is_sampled_per_stage(monkeypatch) -> None:
    import time

    stream = _FakeStream()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # starts the sampler without a GPU
    monkeypatch.setattr(torch.cuda, "default_stream", lambda device=None: stream)
    with DeviceTracker(ops=False) as tracker:
        with tracker.stage("before any CUDA work"):
            stream.busy = True
            time.sleep(0.2)  # no GPU seen yet: idle, whatever the stream says
        tracker._cuda = torch.device("cuda", 0)
        with tracker.stage("busy"):
            time.sleep(0.2)
        stream.busy = False
        with tracker.stage("idle"):
            time.sleep(0.2)
    rec = tracker.records
    assert all(rec[s].gpu_samples >= 5 for s in rec)
    assert rec["before any CUDA work"].gpu_busy == 0.0 and rec["before any CUDA work"].cpu_share == 1.0
    assert rec["busy"].gpu_busy >= 0.9 and rec["idle"].gpu_busy <= 0.1


def test_model_calls_and_their_cpu_time_are_counted_at_the_outermost_module() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    backward, grad = torch.autograd.backward, torch.autograd.grad
    with DeviceTracker() as tracker:
        with tracker.stage("train"):
            for _ in range(3):  # three outermost forwards (their three submodules do not count) and backwards
                model(torch.randn(5, 3)).sum().backward()
            x = torch.randn(2, 3, requires_grad=True)
            torch.autograd.grad(model(x).sum(), x)  # a fourth forward; grad is timed, not counted as a call
        with tracker.stage("no model"):
            torch.randn(3).sum()
    train, other = tracker.records["train"], tracker.records["no model"]
    assert train.calls == 4 and train.compute_cpu_s >= 0
    assert other.calls == 0 and other.compute_cpu_s == 0
    assert train.summary()["calls"] == 4
    assert (torch.autograd.backward, torch.autograd.grad) == (backward, grad)  # restored on exit
