"""AG News and HSOL: the text datasets of the textual-backdoor papers beyond sentiment.

Same contract as :mod:`backdoorbench.data.text`: raw strings with labels ``0..K-1`` in
``class_names`` order, stripped, empty texts and exact duplicates dropped per split (counted in
``info["dropped"]``), file order kept. Each loader reads a local copy in the official layout
(``data.root=``); without one, and with ``hub`` true, it tries the HuggingFace hub through the
optional ``datasets`` package, and any failure there ends in one :class:`FileNotFoundError` naming
the expected files and the fix. See ``datasets/ag_news.md`` and ``datasets/hsol.md``.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from backdoorbench.data._textfiles import hub_pairs, local_missing, open_text, resolve_dir, text_bundle, to_samples
from backdoorbench.data.base import DatasetBundle, reads_data_file
from backdoorbench.errors import DataError
from backdoorbench.registry import register_dataset

__all__ = ["AG_NEWS_CLASSES", "HSOL_BINARY_CLASSES", "HSOL_CLASSES", "HSOL_FILE", "load_ag_news", "load_hsol"]

AG_NEWS_CLASSES = ["World", "Sports", "Business", "Sci/Tech"]
HSOL_FILE = "labeled_data.csv"
HSOL_CLASSES = ["hate_speech", "offensive_language", "neither"]  # the file's `class` column, 0..2
HSOL_BINARY_CLASSES = ["clean", "toxic"]  # neither -> clean; hate speech or offensive -> toxic
HSOL_HUB = "tdavidson/hate_speech_offensive"


# -- ag_news -------------------------------------------------------------------------------------
@reads_data_file('AG News CSV ("1..4","title","description"; no header)')
def _read_ag_news_csv(path: Path) -> list[tuple[str, int]]:
    """(title + " " + description, class index - 1) per row, as the HF ``ag_news`` builder joins them."""
    rows: list[tuple[str, int]] = []
    with open_text(path) as fh:
        reader = csv.reader(fh)
        for row in reader:
            if not row:
                continue
            if len(row) != 3 or row[0].strip() not in ("1", "2", "3", "4"):
                raise DataError(f'{path}, line {reader.line_num}: expected \'"1..4","title","description"\', got {row}')
            rows.append((f"{row[1]} {row[2]}", int(row[0]) - 1))
    return rows


def _hub_ag_news(hf: Any) -> DatasetBundle:
    ds = hf.load_dataset("ag_news")
    # hub labels are already 0..3 (World, Sports, Business, Sci/Tech) and text = title + " " + description
    train, test = (hub_pairs(ds["train"]), "ag_news train"), (hub_pairs(ds["test"]), "ag_news test")
    return text_bundle("ag_news", AG_NEWS_CLASSES, train, test, {"source": "huggingface:ag_news"})


@register_dataset(
    "ag_news",
    modality="text",
    category="classification",
    needs="",
    description="AG News topics (Zhang et al. 2015), 4 classes, 120k/7.6k; local ag_news_csv/ or HF hub",
)
def load_ag_news(root: str | None = None, *, hub: bool = True) -> DatasetBundle:
    """AG News from ``ag_news_csv/{train,test}.csv``: rows ``"class","title","description"``, class 1..4 → 0..3.

    The text is the title and the description joined by a space (what the HF ``ag_news`` builder
    does, so local and hub copies agree); the files' ``\\`` escapes are kept as they are.
    ``root`` may be the ``ag_news_csv`` folder or its parent.
    """
    folder = resolve_dir(root, ["train.csv"], ["ag_news_csv"])
    if folder is None:
        return local_missing(
            "ag_news",
            root,
            'train.csv and test.csv (ag_news_csv, rows \'"1..4","title","description"\', no header)',
            "download ag_news_csv.tgz (Zhang et al. 2015; e.g. https://s3.amazonaws.com/fast-ai-nlp/ag_news_csv.tgz),"
            " unpack it and pass data.root=/path/to/ag_news_csv (or install the optional `datasets` package and "
            "allow network access).",
            hub,
            _hub_ag_news,
            "ag_news",
        )
    train = (_read_ag_news_csv(folder / "train.csv"), str(folder / "train.csv"))
    test_path = folder / "test.csv"
    test = (_read_ag_news_csv(test_path), str(test_path)) if test_path.exists() else None
    info = {"source": str(folder), "format": "ag_news_csv (title + description)"}
    return text_bundle("ag_news", AG_NEWS_CLASSES, train, test, info)


# -- hsol ----------------------------------------------------------------------------------------
@reads_data_file("HSOL labeled_data.csv (count,hate_speech,offensive_language,neither,class,tweet)")
def _read_hsol_csv(path: Path) -> list[tuple[str, int]]:
    """(tweet, class 0 hate speech / 1 offensive / 2 neither) per row of Davidson et al.'s labeled_data.csv."""
    rows: list[tuple[str, int]] = []
    with open_text(path) as fh:
        reader = csv.DictReader(fh)
        missing = {"class", "tweet"} - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{path}: missing column(s) {sorted(missing)}; found {reader.fieldnames}")
        for row in reader:
            label = (row["class"] or "").strip()
            if label not in ("0", "1", "2") or row["tweet"] is None:
                raise DataError(f"{path}, line {reader.line_num}: expected class 0|1|2 and a tweet, got {row}")
            rows.append((row["tweet"], int(label)))
    return rows


def _hsol_labels(pairs: list[tuple[str, int]], label_scheme: str) -> list[tuple[str, int]]:
    if label_scheme == "original":
        return pairs
    return [(text, 0 if label == 2 else 1) for text, label in pairs]


def _hub_hsol(label_scheme: str) -> Any:
    def fetch(hf: Any) -> DatasetBundle:
        split = hf.load_dataset(HSOL_HUB)["train"]
        pairs = list(zip(split["tweet"], split["class"], strict=True))
        return _hsol_bundle(_hsol_labels(pairs, label_scheme), label_scheme, f"huggingface:{HSOL_HUB}")

    return fetch


def _hsol_bundle(pairs: list[tuple[str, int]], label_scheme: str, source: str) -> DatasetBundle:
    names = list(HSOL_CLASSES if label_scheme == "original" else HSOL_BINARY_CLASSES)
    dropped: dict[str, Any] = {}
    train = to_samples(pairs, len(names), source, dropped, "train")
    info = {"source": source, "format": f"HSOL labeled_data.csv ({label_scheme} labels)", "dropped": dropped,
            "label_scheme": label_scheme}  # fmt: skip
    return DatasetBundle("hsol", "text", names, train=train, test=None, info=info)


@register_dataset(
    "hsol",
    modality="text",
    category="classification",
    needs="",
    description="HSOL hate speech & offensive tweets (Davidson et al. 2017), 24,783; binary toxic/clean by default",
)
def load_hsol(root: str | None = None, *, hub: bool = True, label_scheme: str = "binary") -> DatasetBundle:
    """HSOL from ``labeled_data.csv`` (Davidson et al., ICWSM 2017), ``class`` 0 hate / 1 offensive / 2 neither.

    ``label_scheme``: ``binary`` (default; the textual-backdoor setting: 0 ``clean`` = neither,
    1 ``toxic`` = hate speech or offensive) or ``original`` (the three classes in the file's order).
    There is no test split (``test=None``: the run holds one out). ``root`` may name the CSV, its
    folder, or the authors' repository checkout (``data/labeled_data.csv``).
    """
    if label_scheme not in ("binary", "original"):
        raise DataError(f"dataset 'hsol': label_scheme must be 'binary' or 'original', got {label_scheme!r}")
    path: Path | None = None
    if root is not None and Path(root).expanduser().is_file():
        path = Path(root).expanduser()
    else:
        folder = resolve_dir(root, [HSOL_FILE], ["data"])
        path = folder / HSOL_FILE if folder is not None else None
    if path is None:
        return local_missing(
            "hsol",
            root,
            f"{HSOL_FILE} (header ,count,hate_speech,offensive_language,neither,class,tweet)",
            "download https://github.com/t-davidson/hate-speech-and-offensive-language/raw/master/data/"
            f"{HSOL_FILE} and pass data.root=/path/to/{HSOL_FILE} (or install the optional `datasets` package "
            "and allow network access).",
            hub,
            _hub_hsol(label_scheme),
            HSOL_HUB,
        )
    return _hsol_bundle(_hsol_labels(_read_hsol_csv(path), label_scheme), label_scheme, str(path))
