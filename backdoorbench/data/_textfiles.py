"""File and hub helpers shared by the text loaders (``data/text.py``, ``data/olid.py``, ``data/text_bench.py``).

The loaders' contract lives here: :func:`to_samples` strips texts, drops empty ones and exact duplicates
(keeping the first occurrence and its label), checks labels and counts what it dropped; :func:`local_missing`
turns "no local copy" into a hub fetch or one clear :class:`FileNotFoundError` naming the files and the fix.
"""

from __future__ import annotations

import bz2
import gzip
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from backdoorbench.data.base import DatasetBundle, Samples
from backdoorbench.errors import DataError

_MAX_REASON = 400


def clean_pairs(
    pairs: Iterable[tuple[str, int]], num_classes: int, where: str
) -> tuple[list[str], list[int], dict[str, int]]:
    """Strip, drop empty texts and exact duplicates (keep the first); check labels are in range."""
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    empty = duplicates = 0
    for raw, label in pairs:
        text = (raw or "").strip()
        if not text:
            empty += 1
            continue
        if text in seen:
            duplicates += 1
            continue
        label = int(label)
        if not 0 <= label < num_classes:
            raise DataError(f"{where}: label {label} out of range 0..{num_classes - 1} for text {text[:60]!r}")
        seen.add(text)
        texts.append(text)
        labels.append(label)
    return texts, labels, {"empty": empty, "duplicates": duplicates}


def to_samples(
    pairs: Iterable[tuple[str, int]], num_classes: int, where: str, dropped: dict[str, Any], key: str
) -> Samples:
    texts, labels, stats = clean_pairs(pairs, num_classes, where)
    dropped[key] = stats
    return Samples(texts, np.asarray(labels, dtype=np.int64), "text")


def unlabeled_texts(texts: Iterable[str], where: str, dropped: dict[str, Any]) -> list[str]:
    out, _, stats = clean_pairs(((t, 0) for t in texts), 1, where)
    dropped["unlabeled"] = stats
    return out


def text_bundle(
    name: str,
    classes: Sequence[str],
    train: tuple[Iterable[tuple[str, int]], str],
    test: tuple[Iterable[tuple[str, int]], str] | None,
    info: dict[str, Any],
    unlabeled: tuple[Iterable[str], str] | None = None,
) -> DatasetBundle:
    """A text data set's bundle: the ``train`` and ``test`` ``(text, label)`` pairs (test None: no test split) and
    the ``unlabeled`` texts, each given with where it comes from (named in errors), cleaned in that order by
    :func:`to_samples` / :func:`unlabeled_texts`; ``info`` gets what the cleaning dropped as ``"dropped"``."""
    dropped: dict[str, Any] = {}
    train_samples = to_samples(train[0], len(classes), train[1], dropped, "train")
    test_samples = None if test is None else to_samples(test[0], len(classes), test[1], dropped, "test")
    texts = None if unlabeled is None else unlabeled_texts(unlabeled[0], unlabeled[1], dropped)
    return DatasetBundle(name, "text", list(classes), train=train_samples, test=test_samples, unlabeled=texts,
                         info={**info, "dropped": dropped})


def open_text(path: Path) -> IO[str]:
    """Open a (possibly .bz2/.gz compressed) UTF-8 text file for the csv module."""
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8-sig", newline="")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def resolve_dir(
    root: str | Path | None, required: Sequence[str | tuple[str, ...]], subdirs: Sequence[str] = ()
) -> Path | None:
    """The folder (``root`` itself, or one of ``subdirs`` below it) holding every required entry.

    An entry given as a tuple is satisfied by any of its alternatives. ``root`` may also name a file,
    in which case its folder is searched.
    """
    if root is None:
        return None
    base = Path(root).expanduser()
    if base.is_file():
        base = base.parent
    for folder in [base, *(base / s for s in subdirs)]:
        if all(any((folder / alt).exists() for alt in ((req,) if isinstance(req, str) else req)) for req in required):
            return folder
    return None


def first_existing(folder: Path, names: Sequence[str]) -> Path:
    for name in names:
        if (folder / name).exists():
            return folder / name
    return folder / names[0]


def import_hf_datasets() -> Any:
    import datasets as hf  # optional dependency, imported only for the hub fallback

    if not hasattr(hf, "load_dataset"):  # e.g. a local ``datasets/`` folder shadowing the package
        raise ImportError("the optional HuggingFace 'datasets' package is not installed (pip install datasets)")
    return hf


def local_missing(
    name: str,
    root: str | Path | None,
    expected: str,
    fix: str,
    hub: bool,
    fetch: Callable[[Any], DatasetBundle],
    hub_id: str,
) -> DatasetBundle:
    """Fetch ``name`` from the hub, or raise the one clear :class:`FileNotFoundError`."""
    cause: BaseException | None = None
    if hub:
        try:
            return fetch(import_hf_datasets())
        except Exception as exc:  # noqa: BLE001 - any failure: package missing, offline, HF_HUB_OFFLINE=1
            cause = exc
            detail = f"{type(exc).__name__}: {exc}"
            if len(detail) > _MAX_REASON:
                detail = detail[:_MAX_REASON] + "..."
            reason = f"the HuggingFace hub ({hub_id}) could not be reached either ({detail})"
    else:
        reason = "the HuggingFace hub fallback is disabled (hub=False)"
    where = f"under {Path(root).expanduser()}" if root is not None else "(no data.root was given)"
    raise FileNotFoundError(
        f"dataset {name!r}: no local copy found: expected {expected} {where}; {reason}. "
        f"Fix: {fix} See datasets/{name}.md."
    ) from cause


def hub_pairs(
    split: Any, text_column: str = "text", clean: Callable[[str], str] | None = None
) -> Iterable[tuple[str, int]]:
    """``(text, label)`` pairs of a hub split (a ``datasets.Dataset`` or any mapping of columns)."""
    texts, labels = list(split[text_column]), list(split["label"])
    for text, label in zip(texts, labels, strict=True):
        yield (clean(text) if clean is not None and text is not None else text), label
