"""The attack-artifact cache: keys, atomic writes, stale temporary folders, concurrent finishes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from backdoorbench import store as store_mod
from backdoorbench.store import ArtifactStore, cache_key, canonical_json, default_cache_dir

SPEC = {
    "attack": {"name": "ripples", "lam": 0.1, "triggers": ["cf", "mn"]},
    "seed": 0,
    "data": {"max_train": 10},
}


def _writer(text: str):
    def write(path: Path) -> None:
        path.write_text(text)

    return write


def _tmp_dirs(root: Path) -> list[Path]:
    return sorted(root.glob(".tmp-*"))


def test_cache_key_is_stable_under_dict_reordering() -> None:
    reordered = {"data": {"max_train": 10}, "seed": 0, "attack": {"triggers": ["cf", "mn"], "lam": 0.1,
                                                                    "name": "ripples"}}
    assert cache_key(SPEC) == cache_key(reordered)
    assert canonical_json(SPEC) == canonical_json(reordered)
    assert len(cache_key(SPEC)) == 20 and all(c in "0123456789abcdef" for c in cache_key(SPEC))


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 1},
        {"attack": {"name": "ripples", "lam": 0.2, "triggers": ["cf", "mn"]}},
        {"attack": {"name": "ripples", "lam": 0.1, "triggers": ["mn", "cf"]}},  # list order matters
        {"data": {"max_train": 10, "extra": None}},
    ],
)
def test_cache_key_differs_for_different_specs(change: dict) -> None:
    assert cache_key({**SPEC, **change}) != cache_key(SPEC)


def test_default_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BACKDOORBENCH_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    assert ArtifactStore().root == tmp_path / "c"
    monkeypatch.delenv("BACKDOORBENCH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "backdoorbench"


def test_save_has_meta_and_files(tmp_path: Path) -> None:
    st = ArtifactStore(tmp_path / "cache")
    key = cache_key(SPEC)
    assert not st.has(key)
    writers = {"model.bin": _writer("weights"), "poison.json": _writer("[1, 2]")}
    path = st.save(key, {"info": {"asr": 0.9}}, writers)
    assert path == st.path(key) == tmp_path / "cache" / key
    assert st.has(key)
    meta = st.meta(key)
    assert meta["info"] == {"asr": 0.9} and meta["key"] == key
    assert abs(meta["created"] - time.time()) < 3600
    assert (path / "model.bin").read_text() == "weights"
    assert json.loads((path / "poison.json").read_text()) == [1, 2]
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.bin", "poison.json"]
    assert _tmp_dirs(st.root) == []
    assert not st.has(cache_key({**SPEC, "seed": 1}))  # a miss for another key
    st.remove(key)
    assert not st.has(key) and not path.exists()


def test_interrupted_write_leaves_no_entry(tmp_path: Path) -> None:
    st = ArtifactStore(tmp_path / "cache")
    key = "k" * 20

    def half_written(path: Path) -> None:
        path.write_text("partial")
        raise RuntimeError("killed midway")

    with pytest.raises(RuntimeError, match="killed midway"):
        st.save(key, {}, {"a.bin": _writer("a"), "b.bin": half_written, "c.bin": _writer("c")})
    assert not st.has(key)
    assert not st.path(key).exists()
    assert _tmp_dirs(st.root) == []

    with pytest.raises(KeyboardInterrupt):  # BaseException too (Ctrl-C during a write)
        st.save(key, {}, {"a.bin": lambda p: (_ for _ in ()).throw(KeyboardInterrupt())})
    assert not st.has(key) and _tmp_dirs(st.root) == []
    st.save(key, {}, {"a.bin": _writer("a")})  # a later write succeeds
    assert st.has(key)


def test_stale_tmp_folders_are_cleaned(tmp_path: Path) -> None:
    st = ArtifactStore(tmp_path / "cache")
    st.root.mkdir(parents=True)
    old = st.root / ".tmp-oldkey-deadbeef"
    old.mkdir()
    (old / "model.bin").write_text("x")
    fresh = st.root / ".tmp-newkey-cafebabe"
    fresh.mkdir()
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(old, (two_days_ago, two_days_ago))
    st.clean_stale()
    assert not old.exists()
    assert fresh.exists()  # may belong to a writer still running
    st.clean_stale(older_than_s=-1)
    assert not fresh.exists()
    ArtifactStore(tmp_path / "missing").clean_stale()  # no folder: nothing to do

    # save() cleans stale folders on the way
    old.mkdir()
    os.utime(old, (two_days_ago, two_days_ago))
    st.save("k1", {}, {})
    assert not old.exists() and st.has("k1")


def test_concurrent_finish_keeps_the_existing_entry(tmp_path: Path) -> None:
    st = ArtifactStore(tmp_path / "cache")
    key = "c" * 20
    first = st.save(key, {"who": "first"}, {"model.bin": _writer("first")})

    path = st.save(key, {"who": "second"}, {"model.bin": _writer("second")})
    assert path == first
    assert st.meta(key)["who"] == "first"
    assert (first / "model.bin").read_text() == "first"
    assert _tmp_dirs(st.root) == []


def test_entry_finished_by_another_run_during_our_write_is_kept(tmp_path: Path) -> None:
    st = ArtifactStore(tmp_path / "cache")
    key = "d" * 20

    def slow_writer(path: Path) -> None:
        # another process finishes the same entry while we are still writing ours
        other = ArtifactStore(st.root)
        other.save(key, {"who": "other"}, {"model.bin": _writer("other")})
        path.write_text("ours")

    path = st.save(key, {"who": "ours"}, {"model.bin": slow_writer})
    assert path == st.path(key)
    assert st.meta(key)["who"] == "other"
    assert (path / "model.bin").read_text() == "other"
    assert _tmp_dirs(st.root) == []


def test_race_at_the_final_rename_keeps_the_other_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another run renames its entry into place between our last check and our own rename."""
    st = ArtifactStore(tmp_path / "cache")
    key = "e" * 20
    real_rename = os.rename
    raced = []

    def racing(real):
        def move(src, dst, *args, **kwargs):
            if Path(dst) == st.path(key) and not Path(dst).exists():
                other = tmp_path / "other"
                other.mkdir()
                (other / "meta.json").write_text(json.dumps({"who": "other"}))
                real_rename(other, dst)  # the other run wins the race
                raced.append(True)
            return real(src, dst, *args, **kwargs)

        return move

    monkeypatch.setattr(store_mod.os, "rename", racing(os.rename))
    monkeypatch.setattr(store_mod.os, "replace", racing(os.replace))
    path = st.save(key, {"who": "ours"}, {})
    assert raced
    assert path == st.path(key)
    assert st.meta(key)["who"] == "other"
    assert _tmp_dirs(st.root) == []


def test_failed_rename_without_a_finished_entry_is_an_error(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    st = ArtifactStore(tmp_path / "cache")

    def broken(src, dst, *args, **kwargs):
        raise OSError("disk trouble")

    monkeypatch.setattr(store_mod.os, "rename", broken)
    monkeypatch.setattr(store_mod.os, "replace", broken)
    with pytest.raises(OSError, match="disk trouble"):
        st.save("f" * 20, {}, {"a.bin": _writer("a")})
    assert not st.has("f" * 20) and _tmp_dirs(st.root) == []


# -- verification (issue 12, finding 2) ------------------------------------------------------------
def _entry(tmp_path: Path) -> tuple[ArtifactStore, str]:
    st = ArtifactStore(tmp_path / "cache")
    key = "v" * 20
    st.save(key, {"poison_file": "poison.json"}, {"model.bin": _writer("w" * 64), "poison.json": _writer("[1, 2]")})
    return st, key


def test_save_records_a_content_hash_of_every_file(tmp_path: Path) -> None:
    import hashlib

    st, key = _entry(tmp_path)
    files = st.meta(key)["files"]
    assert set(files) == {"model.bin", "poison.json"}
    assert files["poison.json"] == {"sha256": hashlib.sha256(b"[1, 2]").hexdigest(), "bytes": 6}
    assert st.lookup(key, required=["model.bin"])["key"] == key
    assert st.lookup("n" * 20) is None  # a miss


@pytest.mark.parametrize("verify", [True, False])
def test_missing_file_is_an_error_naming_the_entry(tmp_path: Path, verify: bool) -> None:
    st, key = _entry(tmp_path)
    (st.path(key) / "poison.json").unlink()
    with pytest.raises(store_mod.CacheError, match="poison.json is missing") as err:
        st.lookup(key, verify=verify)
    assert str(st.path(key)) in str(err.value) and "cache.rebuild=true" in str(err.value)
    assert "\n" not in str(err.value)


def test_changed_content_of_the_same_size_is_detected(tmp_path: Path) -> None:
    st, key = _entry(tmp_path)
    (st.path(key) / "model.bin").write_text("w" * 32 + "x" * 32)  # same size, other content
    with pytest.raises(store_mod.CacheError, match=r"model.bin changed since it was written \(sha256"):
        st.lookup(key)
    assert st.lookup(key, verify=False) is not None  # verify=false checks sizes only


@pytest.mark.parametrize("verify", [True, False])
def test_truncated_file_is_an_error_naming_the_entry(tmp_path: Path, verify: bool) -> None:
    st, key = _entry(tmp_path)
    with open(st.path(key) / "model.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(store_mod.CacheError, match="model.bin has 10 bytes, 64 were written") as err:
        st.lookup(key, verify=verify)
    assert str(st.path(key)) in str(err.value)


@pytest.mark.parametrize("content", ['{"key": "v", "files": {', "", "[1, 2]", None])
def test_broken_meta_is_an_error_naming_the_entry(tmp_path: Path, content: str | None) -> None:
    st, key = _entry(tmp_path)
    meta = st.path(key) / "meta.json"
    if content is None:
        meta.unlink()
    else:
        meta.write_text(content)
    with pytest.raises(store_mod.CacheError, match="meta.json is") as err:
        st.lookup(key)
    assert str(st.path(key)) in str(err.value)


@pytest.mark.parametrize("drop", [["meta_sha256"], ["meta_sha256", "format"], ["meta_sha256", "format", "files"]])
def test_entry_of_an_older_format_is_refused_with_the_rebuild_command(tmp_path: Path, drop: list[str]) -> None:
    """Entries written before meta.json had a digest (format 1, with or without files' hashes) cannot be verified:
    refused, naming the entry and the rebuild command, never used as if verified."""
    st, key = _entry(tmp_path)
    meta = st.meta(key)
    for k in drop:
        del meta[k]
    (st.path(key) / "meta.json").write_text(json.dumps(meta))
    for verify in (True, False):
        with pytest.raises(store_mod.CacheError, match="cannot be verified: its meta.json has no meta_sha256") as err:
            st.lookup(key, required=["model.bin"], verify=verify)
        assert str(st.path(key)) in str(err.value) and "cache.rebuild=true" in str(err.value)
        assert "\n" not in str(err.value)


def _rewrite(st: ArtifactStore, key: str, change, redigest: bool) -> None:
    """Edit an entry's meta.json with ``change(meta)``; with ``redigest``, as if its writer had written it so (the
    digest matches): what the checks behind the digest must catch."""
    meta = st.meta(key)
    change(meta)
    if redigest:
        meta["meta_sha256"] = store_mod.meta_digest(meta)
    (st.path(key) / "meta.json").write_text(json.dumps(meta, indent=2))


def test_entry_records_the_format_and_a_digest_of_its_metadata(tmp_path: Path) -> None:
    st, key = _entry(tmp_path)
    meta = st.meta(key)
    assert meta["format"] == store_mod.CACHE_FORMAT == 2
    assert meta["meta_sha256"] == store_mod.meta_digest(meta) and len(meta["meta_sha256"]) == 64
    assert st.lookup(key, required=["model.bin", "poison.json"]) == meta


def _same_json(a: bytes, b: bytes) -> bool:
    """Whether two meta.json texts parse to the same values (an edit that changes no value is no edit)."""
    try:
        return json.loads(a) == json.loads(b)
    except ValueError:
        return False


@pytest.mark.parametrize("verify", [True, False])
def test_every_one_byte_edit_of_meta_json_is_refused(tmp_path: Path, verify: bool) -> None:
    """Each byte of meta.json that is not formatting whitespace, replaced by another: the entry is refused, also
    with verify=false (the digest of meta.json is always checked; only the files' hashes are skipped)."""
    st, key = _entry(tmp_path)
    path = st.path(key) / "meta.json"
    original = path.read_bytes()
    positions = [i for i, b in enumerate(original) if b not in b" \n"]
    assert len(positions) > 300
    for i in positions:
        edited = bytearray(original)
        edited[i] = ord("1") if original[i] != ord("1") else ord("2")
        if _same_json(bytes(edited), original):  # e.g. the 17th digit of the float "created": the same double
            continue
        path.write_bytes(bytes(edited))
        with pytest.raises(store_mod.CacheError, match="meta.json (changed since it was written|is unreadable|is not)"
                                                       "|its meta.json has no meta_sha256"):  # an edit of that key
            st.lookup(key, verify=verify)
    path.write_bytes(original)
    assert st.lookup(key, verify=verify) is not None


def test_renamed_poison_file_key_or_deleted_files_is_refused(tmp_path: Path) -> None:
    st, key = _entry(tmp_path)
    _rewrite(st, key, lambda m: m.update(poison_fil=m.pop("poison_file")), redigest=False)
    with pytest.raises(store_mod.CacheError, match=r"meta.json changed since it was written \(meta_sha256 mismatch\)"):
        st.lookup(key, verify=False)

    st, key = _entry(tmp_path / "b")
    _rewrite(st, key, lambda m: m.pop("files"), redigest=False)
    with pytest.raises(store_mod.CacheError, match="meta_sha256 mismatch"):
        st.lookup(key)
    _rewrite(st, key, lambda m: None, redigest=True)  # a record that lacks files even with a matching digest
    with pytest.raises(store_mod.CacheError, match="meta.json has no 'files' record"):
        st.lookup(key)


@pytest.mark.parametrize("name", ["../elsewhere.bin", "../../elsewhere.bin", "/tmp/elsewhere.bin", "a/../../x.bin",
                                  "link.bin"])
def test_a_file_outside_the_entry_is_refused_by_name(tmp_path: Path, name: str) -> None:
    st, key = _entry(tmp_path)
    outside = tmp_path / "elsewhere.bin"
    outside.write_text("w" * 64)
    (st.path(key) / "link.bin").symlink_to(outside)  # inside by name, outside once resolved
    rec = {"sha256": store_mod.file_digest(outside), "bytes": 64}
    _rewrite(st, key, lambda m: m["files"].update({name: rec}), redigest=True)
    with pytest.raises(store_mod.CacheError, match=f"meta.json names the file '{name}', which lies outside the entry"):
        st.lookup(key, verify=False)


def test_member_is_inside_and_recorded(tmp_path: Path) -> None:
    st, key = _entry(tmp_path)
    meta = st.lookup(key)
    assert st.member(key, meta, "poison.json") == st.path(key) / "poison.json"
    with pytest.raises(store_mod.CacheError, match="'../../elsewhere.safetensors', which lies outside the entry"):
        st.member(key, meta, "../../elsewhere.safetensors")
    (st.path(key) / "extra.json").write_text("{}")
    with pytest.raises(store_mod.CacheError, match="meta.json records no extra.json"):
        st.member(key, meta, "extra.json")  # present, but neither its size nor its hash was recorded
    with pytest.raises(store_mod.CacheError, match="gone.json is missing"):
        st.member(key, meta, "gone.json")


def test_meta_of_another_entry_or_format_is_refused(tmp_path: Path) -> None:
    import shutil

    st, key = _entry(tmp_path)
    other = "w" * 20
    shutil.copytree(st.path(key), st.path(other))  # a whole entry copied under another key
    with pytest.raises(store_mod.CacheError, match=f"meta.json belongs to the entry '{key}', not to '{other}'"):
        st.lookup(other)
    _rewrite(st, key, lambda m: m.update(format=3), redigest=True)
    with pytest.raises(store_mod.CacheError, match="cannot be used: meta.json is of cache format 3; this backdoorbench "
                                                   "reads format 2"):
        st.lookup(key)


def test_cache_error_pickles(tmp_path: Path) -> None:
    import pickle

    err = store_mod.CacheError(tmp_path / "entry", "x is missing")
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.entry == err.entry
    err = store_mod.CacheError(tmp_path / "entry", "old", state="cannot be verified")
    assert str(pickle.loads(pickle.dumps(err))) == str(err)


# -- atomic files (issue 12, finding 3) ------------------------------------------------------------
def test_atomic_writer_leaves_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    with pytest.raises(RuntimeError, match="killed"):
        with store_mod.atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".json" and tmp != target
            tmp.write_text('{"metrics": ')
            raise RuntimeError("killed midway")
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary file

    target.write_text('{"old": 1}')
    with pytest.raises(RuntimeError):
        with store_mod.atomic_path(target) as tmp:
            tmp.write_text("{")
            raise RuntimeError("killed midway")
    assert target.read_text() == '{"old": 1}' and list(tmp_path.iterdir()) == [target]  # the old file is kept
    store_mod.atomic_write_text(target, '{"new": 2}')
    assert target.read_text() == '{"new": 2}' and list(tmp_path.iterdir()) == [target]
