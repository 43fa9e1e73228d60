"""OLID / OffensEval 2019 subtask A (offensive tweets): the official TSV layout, or HF ``tweet_eval`` as a fallback.

Same contract as :mod:`backdoorbench.data.text` (see ``datasets/olid.md``).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from backdoorbench.data._textfiles import first_existing, hub_pairs, local_missing, open_text, resolve_dir, text_bundle
from backdoorbench.data.base import DatasetBundle, reads_data_file
from backdoorbench.errors import DataError
from backdoorbench.registry import register_dataset

__all__ = ["OFFENSIVE", "OLID_TEST", "OLID_TEST_LABELS", "OLID_TRAIN", "load_olid"]

OFFENSIVE = ["not_offensive", "offensive"]

OLID_TRAIN = ("olid-training-v1.0.tsv", "olid-training-v1.tsv")
OLID_TEST = "testset-levela.tsv"
OLID_TEST_LABELS = "labels-levela.csv"
_OLID_LABELS = {"NOT": 0, "OFF": 1}


@reads_data_file("OLID TSV")
def _olid_tsv(path: Path, columns: set[str]) -> list[dict[str, str]]:
    with open_text(path) as fh:
        reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = columns - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{path}: missing column(s) {sorted(missing)}; found {reader.fieldnames}")
        rows = []
        for row in reader:
            if any(row.get(c) is None for c in columns):
                raise DataError(f"{path}, line {reader.line_num}: missing field(s) in {row}")
            rows.append(row)
        return rows


def _olid_label(value: str, where: str) -> int:
    key = value.strip().upper()
    if key not in _OLID_LABELS:
        raise DataError(f"{where}: label {value!r} is not NOT/OFF")
    return _OLID_LABELS[key]


def _read_olid_train(path: Path) -> list[tuple[str, int]]:
    rows = _olid_tsv(path, {"tweet", "subtask_a"})
    return [(r["tweet"], _olid_label(r["subtask_a"], f"{path}, id {r.get('id')}")) for r in rows]


def _read_olid_test(tweets_path: Path, labels_path: Path) -> list[tuple[str, int]]:
    labels: dict[str, int] = {}
    with open_text(labels_path) as fh:
        reader = csv.reader(fh)
        for i, row in enumerate(reader):
            if not row:
                continue
            if len(row) < 2:
                raise DataError(f"{labels_path}, line {reader.line_num}: expected 'id,NOT|OFF', got {row}")
            if i == 0 and row[1].strip().upper() not in _OLID_LABELS:  # tolerate a header line
                continue
            labels[row[0].strip()] = _olid_label(row[1], f"{labels_path}, line {reader.line_num}")
    out: list[tuple[str, int]] = []
    for r in _olid_tsv(tweets_path, {"id", "tweet"}):
        tweet_id = r["id"].strip()
        if tweet_id not in labels:
            raise DataError(f"{labels_path}: no label for test tweet id {tweet_id} of {tweets_path}")
        out.append((r["tweet"], labels[tweet_id]))
    return out


def _hub_olid(hf: Any) -> DatasetBundle:
    ds = hf.load_dataset("tweet_eval", "offensive")
    # tweet_eval labels: 0=non-offensive, 1=offensive. It splits OLID's training set into
    # train/validation; rejoin them as OLID's train split. Its test split is OLID's test set.
    train_parts = [ds["train"]] + ([ds["validation"]] if "validation" in ds else [])
    train_pairs = (pair for part in train_parts for pair in hub_pairs(part))
    train = (train_pairs, "tweet_eval/offensive train")
    test = (hub_pairs(ds["test"]), "tweet_eval/offensive test")
    info = {"source": "huggingface:tweet_eval/offensive (train+validation as train)"}
    return text_bundle("olid", OFFENSIVE, train, test, info)


@register_dataset(
    "olid",
    modality="text",
    category="classification",
    needs="",
    description="OLID / OffensEval 2019 subtask A (offensive tweets), 13,240/860; local TSVs or HF tweet_eval",
)
def load_olid(root: str | None = None, *, hub: bool = True) -> DatasetBundle:
    """OLID subtask A (offensive language identification): NOT=0, OFF=1.

    Train is ``olid-training-v1.0.tsv``; test is ``testset-levela.tsv`` + ``labels-levela.csv``.
    ``test`` is ``None`` when either test file is missing.
    """
    folder = resolve_dir(root, [OLID_TRAIN], ["OLIDv1.0", "OLID", "olid"])
    if folder is None:
        return local_missing(
            "olid",
            root,
            f"{OLID_TRAIN[0]} (and {OLID_TEST} + {OLID_TEST_LABELS} for the test split; OLID v1.0 layout)",
            "download OLIDv1.0 (https://sites.google.com/site/offensevalsharedtask/olid), unpack it and pass "
            "data.root=/path/to/OLIDv1.0 (or install the optional `datasets` package and allow network "
            "access).",
            hub,
            _hub_olid,
            "tweet_eval/offensive",
        )
    train_path = first_existing(folder, OLID_TRAIN)
    train = (_read_olid_train(train_path), str(train_path))
    test = None
    if (folder / OLID_TEST).exists() and (folder / OLID_TEST_LABELS).exists():
        test = (_read_olid_test(folder / OLID_TEST, folder / OLID_TEST_LABELS), str(folder / OLID_TEST))
    return text_bundle("olid", OFFENSIVE, train, test, {"source": str(folder), "format": "OLID v1.0 (subtask A)"})
