"""Tests for the benchmark text loaders ``ag_news`` and ``hsol`` (``backdoorbench.data.text_bench``).

Every test writes a few rows in the official file format into ``tmp_path``; nothing touches the network
(the hub fallback runs with a failing import and with a fake in-memory ``datasets`` module).
"""

from __future__ import annotations

import csv
import io
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from backdoorbench.config import DataConfig, to_dataclass
from backdoorbench.data import text_bench as TB
from backdoorbench.errors import DataError
from backdoorbench.registry import REGISTRY

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "data"


def _csv(rows: list[list[str]], quoting: int = csv.QUOTE_ALL) -> str:
    buf = io.StringIO()
    csv.writer(buf, quoting=quoting, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _pairs(split: Any) -> list[tuple[str, int]]:
    return list(zip(split.inputs, split.labels.tolist(), strict=True))


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails, as when it is not installed


def _fake_hf(monkeypatch: pytest.MonkeyPatch, data: dict[tuple[str, ...], Any]) -> list:
    calls: list[tuple[str, ...]] = []

    def load_dataset(*args: str) -> Any:
        calls.append(args)
        return data[args]

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", module)
    return calls


@pytest.mark.parametrize(("name", "fn"), [("ag_news", TB.load_ag_news), ("hsol", TB.load_hsol)])
def test_registered(name: str, fn: Any) -> None:
    entry = REGISTRY._tables["dataset"][name]  # the table, not get(): get() imports every component
    assert entry.obj is fn and entry.modality == ("text",) and entry.category == "classification"


# -- ag_news -------------------------------------------------------------------------------------
AG_TRAIN = [
    ["3", "Wall St. Bears Claw Back (Reuters)", "Reuters - Short-sellers, Wall Street's dwindling\\band"],
    ["1", "Talks, \"quoted\"", "A title with a comma,\nand a newline in the description."],
    ["2", " Cup final ", " Team wins. "],
    ["4", "New chip", "Faster."],
    ["2", "Cup final", "Team wins."],  # not a duplicate: the inner spaces differ
    ["1", "New chip", "Faster."],  # duplicate text: dropped (the first label is kept)
]


def _ag_news(base: Path) -> Path:
    folder = base / "ag_news_csv"
    folder.mkdir(parents=True)
    (folder / "train.csv").write_text(_csv(AG_TRAIN), encoding="utf-8")
    (folder / "test.csv").write_text(_csv([["4", "Phones", "Cheaper."], ["1", "Summit", "Leaders meet."]]))
    (folder / "classes.txt").write_text("World\nSports\nBusiness\nSci/Tech\n")
    return folder


def test_ag_news(tmp_path: Path) -> None:
    folder = _ag_news(tmp_path)
    for root in (folder, tmp_path):  # ag_news_csv/ or its parent
        b = TB.load_ag_news(str(root), hub=False)
        assert b.modality == "text" and b.class_names == ["World", "Sports", "Business", "Sci/Tech"]
        assert _pairs(b.train) == [
            ("Wall St. Bears Claw Back (Reuters) Reuters - Short-sellers, Wall Street's dwindling\\band", 2),
            ('Talks, "quoted" A title with a comma,\nand a newline in the description.', 0),
            ("Cup final   Team wins.", 1),
            ("New chip Faster.", 3),
            ("Cup final Team wins.", 1),
        ]  # fmt: skip
        assert b.test is not None and _pairs(b.test) == [("Phones Cheaper.", 3), ("Summit Leaders meet.", 0)]
        assert b.info["source"] == str(folder) and b.info["dropped"]["train"] == {"empty": 0, "duplicates": 1}
    (folder / "test.csv").unlink()
    assert TB.load_ag_news(str(folder), hub=False).test is None


def test_ag_news_bad_rows(tmp_path: Path) -> None:
    folder = _ag_news(tmp_path)
    (folder / "train.csv").write_text(_csv([["1", "ok", "fine"], ["5", "bad", "class"]]))
    with pytest.raises(DataError, match=r"train.csv is not a valid AG News CSV .*line 2: expected"):
        TB.load_ag_news(str(folder), hub=False)
    (folder / "train.csv").write_text(_csv([["1", "only a title"]]))
    with pytest.raises(DataError, match="line 1: expected"):
        TB.load_ag_news(str(folder), hub=False)


def test_ag_news_missing_and_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match=r"'ag_news'.*train.csv.*hub=False.*data.root=/path/to/ag_news_csv"):
        TB.load_ag_news(str(tmp_path), hub=False)
    calls = _fake_hf(
        monkeypatch,
        {("ag_news",): {"train": {"text": ["a b", "c", "a b"], "label": [0, 3, 1]},
                        "test": {"text": ["d"], "label": [2]}}},
    )  # fmt: skip
    b = TB.load_ag_news()
    assert calls == [("ag_news",)]
    assert _pairs(b.train) == [("a b", 0), ("c", 3)] and b.test is not None and _pairs(b.test) == [("d", 2)]
    assert b.info["source"] == "huggingface:ag_news" and b.info["dropped"]["train"]["duplicates"] == 1


# -- hsol ----------------------------------------------------------------------------------------
HSOL_HEADER = ["", "count", "hate_speech", "offensive_language", "neither", "class", "tweet"]  # pandas index column
HSOL_ROWS = [
    ["0", "3", "0", "0", "3", "2", "!!! RT @mayasolovely: As a woman you shouldn't complain &amp; stuff"],
    ["1", "3", "0", "3", "0", "1", "!!!!! RT @user: multi\nline tweet"],
    ["2", "3", "2", "1", "0", "0", "a hateful tweet"],
    ["3", "3", "0", "0", "3", "2", "  "],  # empty after strip: dropped
    ["4", "6", "0", "6", "0", "1", "another offensive one"],
]


def _hsol(path: Path, rows: list[list[str]] = HSOL_ROWS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_csv([HSOL_HEADER, *rows], quoting=csv.QUOTE_MINIMAL), encoding="utf-8")
    return path


def test_hsol_binary_and_original(tmp_path: Path) -> None:
    path = _hsol(tmp_path / "repo" / "data" / TB.HSOL_FILE)  # the authors' repository layout
    for root in (path, path.parent, tmp_path / "repo"):
        b = TB.load_hsol(str(root), hub=False)
        assert b.class_names == ["clean", "toxic"] and b.test is None
        assert _pairs(b.train) == [
            ("!!! RT @mayasolovely: As a woman you shouldn't complain &amp; stuff", 0),
            ("!!!!! RT @user: multi\nline tweet", 1),
            ("a hateful tweet", 1),
            ("another offensive one", 1),
        ]
        assert b.info["source"] == str(path) and b.info["dropped"]["train"]["empty"] == 1
        assert b.info["label_scheme"] == "binary"
    b = TB.load_hsol(str(path), hub=False, label_scheme="original")
    assert b.class_names == ["hate_speech", "offensive_language", "neither"]
    assert b.train.labels.tolist() == [2, 1, 0, 1]
    with pytest.raises(DataError, match="label_scheme must be 'binary' or 'original'"):
        TB.load_hsol(str(path), label_scheme="three")


def test_hsol_bad_file(tmp_path: Path) -> None:
    path = _hsol(tmp_path / TB.HSOL_FILE, [["0", "3", "0", "0", "3", "7", "a tweet"]])
    with pytest.raises(DataError, match=r"labeled_data.csv is not a valid HSOL labeled_data.csv .*class 0\|1\|2"):
        TB.load_hsol(str(path), hub=False)
    path.write_text("id,text\n1,hello\n")
    with pytest.raises(DataError, match=r"missing column\(s\) \['class', 'tweet'\]"):
        TB.load_hsol(str(path), hub=False)


def test_hsol_missing_and_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_hub: None) -> None:
    with pytest.raises(FileNotFoundError, match=r"'hsol'.*labeled_data.csv.*could not be reached.*data.root=") as exc:
        TB.load_hsol(str(tmp_path))
    assert isinstance(exc.value.__cause__, ImportError)
    calls = _fake_hf(
        monkeypatch,
        {(TB.HSOL_HUB,): {"train": {"tweet": ["hate", "rude", "nice"], "class": [0, 1, 2], "count": [3, 3, 3]}}},
    )
    b = TB.load_hsol()
    assert calls == [(TB.HSOL_HUB,)]
    assert _pairs(b.train) == [("hate", 1), ("rude", 1), ("nice", 0)]
    assert b.info["source"] == f"huggingface:{TB.HSOL_HUB}"
    assert TB.load_hsol(label_scheme="original").train.labels.tolist() == [0, 1, 2]


def test_configs_match_the_loaders(tmp_path: Path) -> None:
    """configs/data/<name>.yaml's options are the loaders' keyword arguments (what a run passes them)."""
    for name, root, n in (("ag_news", _ag_news(tmp_path), 5), ("hsol", _hsol(tmp_path / TB.HSOL_FILE), 4)):
        cfg = to_dataclass(DataConfig, OmegaConf.load(CONFIGS / f"{name}.yaml"), "data")
        assert cfg.name == name
        b = REGISTRY._tables["dataset"][name].obj(root=str(root), hub=False, **cfg.options)
        assert len(b.train) == n
