"""Every expected failure names its cause: data files, labels, trainer values, models, the CLI's one error path
(one line, status 2; unexpected failures status 1 with the traceback in a file), ``++`` keys in sweeps, and
the per-epoch log lines when progress bars are off."""

from __future__ import annotations

import bz2
import gzip
import logging
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PYTHON, subprocess_env, tiny_text_samples

from backdoorbench import cli
from backdoorbench.attacks.text.badnet_rw import BadNetRW, BadNetRWConfig
from backdoorbench.config import ConfigError, component_config, to_dataclass
from backdoorbench.data import cifar10 as cifar10_data
from backdoorbench.data import text as text_data
from backdoorbench.data import vision as vision_data
from backdoorbench.data.base import DatasetBundle, Samples
from backdoorbench.defenses.detectors.dan import DANConfig
from backdoorbench.errors import DataError, ModelError, UserError
from backdoorbench.models.text import load_hf_classifier
from backdoorbench.registry import REGISTRY, UnknownNameError
from backdoorbench.trainer import lit


# -- data files -----------------------------------------------------------------------------------------
def test_garbage_cifar_batch_names_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(DataError, match=r"data file .*data_batch_1 is not a valid CIFAR-10 batch"):
        cifar10_data.load_cifar10(str(tmp_path))


@pytest.mark.parametrize("cut", [0, 100])
def test_empty_or_truncated_cifar_batch_is_not_called_compressed(tmp_path: Path, cut: int) -> None:
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    whole = pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]}, protocol=2)
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(whole[:cut])
    what = "the file is empty \\(0 bytes\\)" if cut == 0 else "the pickle ends early, after 100 bytes"
    with pytest.raises(DataError, match=rf"data file .*data_batch_1 is not a valid CIFAR-10 batch .*: {what}") as err:
        cifar10_data.load_cifar10(str(tmp_path))
    assert "compressed" not in str(err.value) and "\n" not in str(err.value)


def test_garbage_idx_gz_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"this is not gzip at all" * 10)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 8))
    with pytest.raises(DataError, match=r"data file .*train-images-idx3-ubyte.gz is not a valid IDX file"):
        vision_data.load_fashion_mnist(str(tmp_path))


def test_empty_csv_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty.csv is not a valid Rotten Tomatoes CSV.*: the file is empty"):
        text_data.load_rotten_tomatoes(str(empty))
    with pytest.raises(DataError, match=r"data file .*empty.csv is not a valid mnist_5k CSV.*: the file holds no rows"):
        vision_data.load_mnist5k(str(empty))
    header_only = tmp_path / "header.csv"
    header_only.write_text("category,text,movie_name,has_plot_and_reviews\n")
    with pytest.raises(DataError, match="'rotten_tomatoes'.*the training split holds no labelled samples"):
        text_data.load_rotten_tomatoes(str(header_only))


def test_truncated_bz2_csv(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = "".join(f"fresh,{' '.join(map(str, rng.integers(0, 10**6, 8)))},m,1\n" for _ in range(2000))
    data = bz2.compress(("category,text,movie_name,has_plot_and_reviews\n" + rows).encode())
    path = tmp_path / "rt.csv.bz2"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"rt.csv.bz2 is not a valid Rotten Tomatoes CSV.*damaged or truncated"):
        text_data.load_rotten_tomatoes(str(path))


def test_out_of_range_labels_are_named() -> None:
    train = Samples(["a", "b", "c"], np.array([0, 1, 2]))
    with pytest.raises(DataError, match=r"'mine'.*train label 2 is out of range; labels must be 0..1 .*neg, pos"):
        DatasetBundle("mine", "text", ["neg", "pos"], train=train)
    test = Samples(["d"], np.array([-1]))
    with pytest.raises(DataError, match="test label -1 is out of range"):
        DatasetBundle("mine", "text", ["neg", "pos"], train=train.subset([0, 1]), test=test)


def test_all_target_test_split_is_a_clear_error() -> None:
    attack = BadNetRW(BadNetRWConfig(target=1), seed=0)
    only_target = Samples(["good film", "great plot"], np.array([1, 1]))
    with pytest.raises(DataError, match="no non-target test samples .* all 2 test samples are labelled 1"):
        attack.triggered_test(only_target)


# -- trainer values ---------------------------------------------------------------------------------------
def test_bad_precision_lists_the_allowed_values() -> None:
    with pytest.raises(ConfigError, match=r"trainer: precision must be one of 32-true, 16-mixed, .*got 'garbage'"):
        to_dataclass(lit.TrainConfig, {"precision": "garbage"}, "trainer")


def test_gpu_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="accelerator=gpu: no GPU visible.*use cpu or auto"):
        to_dataclass(lit.TrainConfig, {"accelerator": "gpu"}, "trainer")
    with pytest.raises(ConfigError, match="accelerator must be one of auto, cpu"):
        to_dataclass(lit.TrainConfig, {"accelerator": "quantum"}, "trainer")


# -- models -----------------------------------------------------------------------------------------------
def test_model_names() -> None:
    with pytest.raises(UnknownNameError, match="unknown model 'resnet19'. Did you mean 'resnet18'"):
        REGISTRY.get("model", "resnet19")
    assert REGISTRY.get("model", "bert-base-uncased").name == "bert-base-uncased"  # a hub name without org
    assert REGISTRY.get("model", "org/some-model").modality == ("text",)
    with pytest.raises(ModelError, match="^model path /nonexistent/model does not exist$"):
        REGISTRY.get("model", "/nonexistent/model")


def test_empty_model_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"model folder .* holds no model \(no config.json\)"):
        load_hf_classifier(str(tmp_path), 2)


def test_max_length_beyond_the_positions_is_refused_at_load(tiny_bert_dir: Path) -> None:
    with pytest.raises(ModelError, match="model.max_length=100 .* it has 64 token positions.*max_length=64 or less"):
        load_hf_classifier(str(tiny_bert_dir), 2, max_length=100)
    assert load_hf_classifier(str(tiny_bert_dir), 2, max_length=64).max_length == 64


# -- DAN's clean data ---------------------------------------------------------------------------------------
def test_dan_clean_size_below_its_minimum_is_refused_before_training() -> None:
    with pytest.raises(ValueError, match="defense.clean_size=5: DAN needs at least 8 clean samples"):
        DANConfig(clean_size=5)
    assert DANConfig(clean_size=8, fit_fraction=0.8).clean_size == 8


# -- ++keys only some components have -------------------------------------------------------------------------
def test_forced_key_of_another_defense_is_dropped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    dan = REGISTRY.get("defense", "dan")
    with caplog.at_level(logging.WARNING, logger="backdoorbench.config"):
        cfg = component_config(dan, {"name": "dan", "num_copies": 10}, "defense", forced={"num_copies"})
    assert isinstance(cfg, DANConfig)
    assert "defense 'dan' has no key 'num_copies': ignoring ++defense.num_copies" in caplog.text
    with pytest.raises(ConfigError, match="unknown key.*'num_copies'"):  # given without ++: still an error
        component_config(dan, {"name": "dan", "num_copies": 10}, "defense")
    with pytest.raises(ConfigError, match="unknown key.*'num_copiez'"):  # a typo no defense declares
        component_config(dan, {"name": "dan", "num_copiez": 10}, "defense", forced={"num_copiez"})


# -- the command line, in-process ---------------------------------------------------------------------------
def _error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


@pytest.fixture(autouse=True)
def _restore_logging():
    """An in-process Hydra run configures logging onto the captured streams; undo it afterwards."""
    root, handlers, level = logging.getLogger(), logging.getLogger().handlers[:], logging.getLogger().level
    yield
    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)


def test_cli_forced_key_in_a_run_and_the_next_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # DAN has no num_copies: dropped with a warning; the run then stops at the next, real error
    rc = cli.main(["run", "defense=dan", "++defense.num_copies=10", "data.max_train=0",
                   f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert _error_lines(err) == ["error: data.max_train must be >= 1 or null (all), got 0"]
    assert "Traceback" not in err


def test_cli_unexpected_error_keeps_the_traceback(tmp_path: Path, capsys, monkeypatch) -> None:
    from backdoorbench.engine import pipeline

    def boom(cfg, out_dir):
        raise RuntimeError("something internal broke")

    monkeypatch.setattr(pipeline, "run_experiment", boom)
    rc = cli.main(["run", f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 1
    log_path = tmp_path / "run" / "error.log"
    assert _error_lines(err) == [
        f"error: unexpected RuntimeError: something internal broke (full traceback in {log_path})"
    ]
    assert "Traceback" not in err
    assert "Traceback" in log_path.read_text() and "def boom" not in err


def test_expected_failures_share_one_base() -> None:
    assert issubclass(ConfigError, UserError) and issubclass(UnknownNameError, UserError)
    assert issubclass(DataError, ValueError) and issubclass(ModelError, UserError)
    assert cli.report_failure(DataError("data file x is not a valid y: z")) == 2


# -- the command line, in a subprocess (Hydra's own errors, a model path) ---------------------------------------
def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "backdoorbench", *args], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "defense=nope"], "error: In 'config': Could not find 'defense/nope'. Did you mean 'none'? "
                                  "Available options in 'defense': abl, activation_clustering, anp, "),
        (["run", "model=/nonexistent", "attack=badnets"], "error: model path /nonexistent does not exist"),
    ],
)
def test_cli_expected_errors_exit_2_with_one_line(tmp_path: Path, args: list[str], needle: str) -> None:
    proc = _cli([*args, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith(needle), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


# -- per-epoch log lines --------------------------------------------------------------------------------------
def test_epoch_lines_when_progress_is_off(tiny_text_model, caplog: pytest.LogCaptureFixture) -> None:
    cfg = lit.TrainConfig(max_epochs=2, batch_size=8, lr=1e-3, accelerator="cpu")
    with caplog.at_level(logging.INFO, logger="backdoorbench.trainer.lit"):
        lit.fit(tiny_text_model, tiny_text_samples(16), cfg, desc="victim")
    lines = [r.getMessage() for r in caplog.records if ": epoch " in r.getMessage()]
    assert len(lines) == 2, lines
    for i, line in enumerate(lines, 1):
        assert line.startswith(f"victim: epoch {i}/2, train loss ")
        assert "elapsed, ETA " in line
    assert lines[-1].endswith("ETA 0m00s")


# -- a trigger larger than the images (issue 34, item 9) ----------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["attack=badnets", "attack.size=100"],
         "error: attack.size=100 does not fit this dataset's 28x28 images (a 100x100 patch at (row -72, col -72) "
         "does not fit in 28x28 images (position='bottom_right', margin=0, offset=None)); at most 28 fits with "
         "attack.margin=0"),
        (["attack=badnets", "attack.size=5", "attack.offset=[25,2]"],
         "error: attack.size=5 does not fit this dataset's 28x28 images"),
        (["attack=trojan", "attack.size=29"], "error: attack.size=29 does not fit this dataset's 28x28 images"),
        (["attack=trojan", "attack.margin=30"],
         "error: attack.size=null (7% of the image area: 7 pixels) does not fit this dataset's 28x28 images"),
    ],
)
def test_cli_trigger_larger_than_the_images_exits_2_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, args: list[str], needle: str
) -> None:
    from backdoorbench.attacks.vision import common

    calls: list[str] = []
    monkeypatch.setattr(common, "fit", lambda *a, **k: calls.append("fit"))  # every vision attack trains through it
    monkeypatch.setattr(common.VisionAttack, "run", lambda self, ctx: calls.append("run"))
    rc = cli.main(["run", *args, "defense=none", "data.max_train=50", f"cache.dir={tmp_path / 'cache'}",
                   f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert rc == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith(needle), err[-2000:]
    assert "Traceback" not in err and not calls
