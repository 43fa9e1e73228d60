"""Tests for the vision dataset loaders (``data.vision``, ``data.cifar10``, ``data.imagenet``).

Every format test writes tiny files in the official layouts into ``tmp_path`` (CIFAR-10 pickled
batches, an ImageFolder of PNGs, IDX ``.gz`` files, an mlxtend-style CSV); the embedded datasets
(mnist5k in mlxtend, the CIFAR-10 samples in foolbox) are read for real. Nothing touches the network:
the CIFAR-10 download path runs against a fake ``torchvision.datasets`` module.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from backdoorbench import assets
from backdoorbench.data import cifar10 as C
from backdoorbench.data import imagenet as I
from backdoorbench.data import vision as V
from backdoorbench.data.base import DatasetBundle
from backdoorbench.data.images import ImageArray
from backdoorbench.errors import DataError
from backdoorbench.modality.vision import image_spec
from backdoorbench.registry import REGISTRY

HAS_MLXTEND = importlib.util.find_spec("mlxtend") is not None
HAS_FOOLBOX = importlib.util.find_spec("foolbox") is not None


def _check_images(b: DatasetBundle, shape: tuple[int, ...]) -> None:
    for split in (b.train, b.test):
        if split is None:
            continue
        x = split.inputs.to_tensor() if isinstance(split.inputs, ImageArray) else split.inputs
        assert isinstance(x, torch.Tensor)
        assert x.dtype == torch.uint8 and x.is_contiguous()
        assert tuple(x.shape[1:]) == shape
        assert split.labels.dtype == np.int64
        assert split.modality == "vision"
    assert b.modality == "vision"
    assert len(b.info["mean"]) == len(b.info["std"]) == shape[0]
    assert all(0.0 < v < 1.0 for v in [*b.info["mean"], *b.info["std"]])
    assert b.info["source"] and b.info["licence"]


# -- registry ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "fn"),
    [
        ("mnist5k", V.load_mnist5k),
        ("cifar10", C.load_cifar10),
        ("imagenet_subset", I.load_imagenet_subset),
        ("fashion_mnist", V.load_fashion_mnist),
        ("cifar10_samples", C.load_cifar10_samples),
    ],
)
def test_registered(name: str, fn: Any) -> None:
    entry = REGISTRY._tables["dataset"][name]  # the table, not get(): get() imports every component
    assert entry.obj is fn
    assert entry.modality == ("vision",)
    assert entry.category == "classification"
    assert entry.description


# -- mnist5k -------------------------------------------------------------------------------------
def _mnist_rows(n: int) -> np.ndarray:
    rows = np.zeros((n, 785), dtype=np.int64)
    for i in range(n):
        rows[i, 28 * 1 + 2] = 255  # row 1, column 2
        rows[i, 28 * 27 + 0] = 10 + i  # row 27, column 0
        rows[i, 784] = (3 * i) % 10
    return rows


def test_mnist5k_tiny_csv(tmp_path: Path) -> None:
    rows = _mnist_rows(4)
    text = "\n".join(",".join(map(str, r)) for r in rows) + "\n"
    plain = tmp_path / "digits.csv"
    plain.write_text(text)
    (tmp_path / V.MNIST5K_FILE).write_bytes(gzip.compress(text.encode()))
    for root, source in ((plain, plain), (tmp_path, tmp_path / V.MNIST5K_FILE)):
        b = V.load_mnist5k(str(root))
        _check_images(b, (1, 28, 28))
        assert b.class_names == [str(d) for d in range(10)]
        assert b.train.labels.tolist() == [0, 3, 6, 9]
        x = b.train.inputs
        assert x[:, 0, 1, 2].tolist() == [255] * 4
        assert x[:, 0, 27, 0].tolist() == [10, 11, 12, 13]
        assert int(x.sum()) == 4 * 255 + 10 + 11 + 12 + 13
        assert b.test is None
        assert b.info["source"] == str(source)
        assert b.info["flip"] is False


def test_mnist5k_bad_rows_and_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    short = tmp_path / "short.csv"
    short.write_text("0,1,2,3\n")
    with pytest.raises(ValueError, match="785 values per row"):
        V.load_mnist5k(str(short))
    rows = _mnist_rows(1)
    rows[0, 5] = 256
    bad = tmp_path / "bad.csv"
    bad.write_text(",".join(map(str, rows[0])) + "\n")
    with pytest.raises(ValueError, match="0..255"):
        V.load_mnist5k(str(bad))
    with pytest.raises(FileNotFoundError, match="data.root"):
        V.load_mnist5k(str(tmp_path / "nowhere"))
    monkeypatch.setattr(assets, "_package_dirs", lambda package: [])
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mlxtend==0.25.0"):
        V.load_mnist5k()


@pytest.mark.skipif(not HAS_MLXTEND, reason="mlxtend (embedded MNIST digits) is not installed")
def test_mnist5k_embedded() -> None:
    b = V.load_mnist5k()
    _check_images(b, (1, 28, 28))
    assert len(b.train) == 5000 and b.test is None
    assert np.bincount(b.train.labels).tolist() == [500] * 10
    x = b.train.inputs.float() / 255
    assert abs(float(x.mean()) - 0.1313) < 0.002  # close to MNIST's 0.1307
    assert (b.info["mean"], b.info["std"], b.info["flip"]) == ([0.1307], [0.3081], False)
    spec = image_spec(b)
    assert (spec.channels, spec.height, spec.width, spec.flip) == (1, 28, 28, False)


# -- cifar10 -------------------------------------------------------------------------------------
class _Evil:
    def __reduce__(self) -> tuple[Any, tuple]:
        return (os.getcwd, ())


def _cifar_rows(n: int, start: int) -> np.ndarray:
    """Rows of 3072 bytes: image k has red = start + k, green = 100 + k, blue = 200 + k, plus two marker pixels."""
    data = np.zeros((n, 3072), dtype=np.uint8)
    for k in range(n):
        data[k, :1024] = start + k
        data[k, 1024:2048] = 100 + k
        data[k, 2048:] = 200 + k
        data[k, 0 * 1024 + 0 * 32 + 1] = 7  # red, row 0, column 1
        data[k, 2 * 1024 + 31 * 32 + 0] = 9  # blue, row 31, column 0
    return data


def _write_cifar(folder: Path, *, test: bool = True, protocol: int = 2) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    labels_all = []
    for i, name in enumerate(C.CIFAR10_TRAIN):
        labels = [(2 * i) % 10, (2 * i + 1) % 10]
        labels_all += labels
        batch: dict[Any, Any] = {"batch_label": f"training batch {i + 1} of 5", "labels": labels}
        batch["data"] = _cifar_rows(2, 10 * i)
        batch["filenames"] = [f"img_{i}_{k}.png" for k in range(2)]
        if i == 0:  # what Python 2 pickles look like under encoding="bytes": bytes keys
            batch = {k.encode(): v for k, v in batch.items()}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=protocol if i else 5)  # protocol 5: numpy's _frombuffer path
    if test:
        with open(folder / "test_batch", "wb") as fh:
            pickle.dump({"labels": [9, 0, 4], "data": _cifar_rows(3, 50)}, fh, protocol=protocol)
    names = [f"class{c}" for c in range(10)]
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": names, "num_cases_per_batch": 2, "num_vis": 3072}, fh, protocol=protocol)
    return {"train_labels": labels_all, "names": names}


def test_cifar10_pickle_folder(tmp_path: Path) -> None:
    folder = tmp_path / C.CIFAR10_DIR
    expected = _write_cifar(folder)
    for root in (folder, tmp_path):  # the batches folder, or its parent
        b = C.load_cifar10(str(root))
        _check_images(b, (3, 32, 32))
        assert b.class_names == expected["names"]  # read from batches.meta
        assert b.train.labels.tolist() == expected["train_labels"]
        x = b.train.inputs
        assert len(x) == 10
        for j in range(10):  # batch i = j // 2, image k = j % 2
            i, k = divmod(j, 2)
            assert int(x[j, 0, 5, 5]) == 10 * i + k  # red plane first
            assert int(x[j, 1, 5, 5]) == 100 + k
            assert int(x[j, 2, 5, 5]) == 200 + k
            assert int(x[j, 0, 0, 1]) == 7 and int(x[j, 0, 1, 0]) == 10 * i + k  # rows are row-major
            assert int(x[j, 2, 31, 0]) == 9 and int(x[j, 2, 0, 31]) == 200 + k
        assert b.test is not None
        assert b.test.labels.tolist() == [9, 0, 4]
        assert b.test.inputs[:, 0, 3, 3].tolist() == [50, 51, 52]
        assert b.info["source"] == str(folder)
        assert b.info["mean"] == C.CIFAR10_MEAN and b.info["flip"] is True


def _sbs(s: bytes) -> bytes:
    return b"U" + bytes([len(s)]) + s  # SHORT_BINSTRING: a Python 2 ``str``


def _py2_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch pickled the way the official files were (Python 2 cPickle, protocol 2, numpy.core names)."""
    raw = data.tobytes()
    dtype = (
        b"cnumpy\ndtype\n" + _sbs(b"u1") + b"K\x00K\x01\x87R(K\x03" + _sbs(b"|")
        + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    )  # fmt: skip
    shape = b"K" + bytes([data.shape[0]]) + b"M" + data.shape[1].to_bytes(2, "little") + b"\x86"
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _sbs(b"b") + b"\x87R"
        + b"(K\x01" + shape + dtype + b"\x89T" + len(raw).to_bytes(4, "little") + raw + b"tb"
    )  # fmt: skip
    label_list = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return b"\x80\x02}(" + _sbs(b"data") + array + _sbs(b"labels") + label_list + b"u."


def test_cifar10_python2_pickles(tmp_path: Path) -> None:
    data = (np.arange(2 * 3072) % 251).astype(np.uint8).reshape(2, 3072)
    for name in C.CIFAR10_TRAIN:
        (tmp_path / name).write_bytes(_py2_batch(data, [3, 7]))
    (tmp_path / "test_batch").write_bytes(_py2_batch(data[:1], [5]))
    names = b"](" + b"".join(_sbs(n.encode()) for n in C.CIFAR10_CLASSES) + b"e"
    (tmp_path / "batches.meta").write_bytes(b"\x80\x02}(" + _sbs(b"label_names") + names + b"u.")
    b = C.load_cifar10(str(tmp_path))
    assert b.class_names == C.CIFAR10_CLASSES
    assert b.train.labels.tolist() == [3, 7] * 5
    assert np.array_equal(b.train.inputs[1].numpy(), data[1].reshape(3, 32, 32))
    assert b.test is not None and b.test.labels.tolist() == [5]


def test_cifar10_without_test_batch_and_meta(tmp_path: Path) -> None:
    _write_cifar(tmp_path, test=False)
    (tmp_path / "batches.meta").unlink()
    b = C.load_cifar10(str(tmp_path))
    assert b.test is None
    assert b.class_names == C.CIFAR10_CLASSES


def test_cifar10_refuses_code_in_pickles(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    with open(tmp_path / "data_batch_3", "wb") as fh:
        pickle.dump({"data": _Evil(), "labels": [0]}, fh)
    with pytest.raises(DataError, match="data_batch_3 is not a valid CIFAR-10 batch .*: refusing to load"):
        C.load_cifar10(str(tmp_path))


def test_cifar10_missing(tmp_path: Path) -> None:
    (tmp_path / C.CIFAR10_DIR).mkdir()
    (tmp_path / C.CIFAR10_DIR / "data_batch_1").write_bytes(b"")  # incomplete copy
    for root in (str(tmp_path), None):
        with pytest.raises(FileNotFoundError) as exc:
            C.load_cifar10(root)
        msg = str(exc.value)
        for needle in ("data.root=", "cifar-10-python.tar.gz", "download=true", "data_batch_5"):
            assert needle in msg, f"{needle!r} missing from: {msg}"
    with pytest.raises(FileNotFoundError, match="needs data.root"):
        C.load_cifar10(None, download=True)


def _fake_torchvision(monkeypatch: pytest.MonkeyPatch, cifar10: Any) -> None:
    tv = types.ModuleType("torchvision")
    datasets = types.ModuleType("torchvision.datasets")
    datasets.CIFAR10 = cifar10  # type: ignore[attr-defined]
    tv.datasets = datasets  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)


def test_cifar10_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, bool, bool]] = []

    def cifar10(root: str, train: bool = True, download: bool = False) -> None:
        calls.append((root, train, download))
        _write_cifar(Path(root) / C.CIFAR10_DIR)  # what torchvision unpacks

    _fake_torchvision(monkeypatch, cifar10)
    target = tmp_path / "data"
    b = C.load_cifar10(str(target), download=True)
    assert calls == [(str(target), True, True)]
    assert len(b.train) == 10 and b.test is not None
    b = C.load_cifar10(str(target), download=True)  # already there: no second download
    assert len(calls) == 1


def test_cifar10_download_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def cifar10(root: str, train: bool = True, download: bool = False) -> None:
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    _fake_torchvision(monkeypatch, cifar10)
    with pytest.raises(FileNotFoundError, match="downloading into .* failed .*name resolution") as exc:
        C.load_cifar10(str(tmp_path), download=True)
    assert isinstance(exc.value.__cause__, OSError)
    assert "data.root=" in str(exc.value)


# -- imagenet_subset -----------------------------------------------------------------------------
def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _solid(w: int, h: int, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(np.asarray(rgb, dtype=np.uint8), (h, w, 3)).copy()


COLOURS = {"cat": (255, 0, 0), "dog": (0, 255, 0), "fox": (0, 0, 255)}


def _image_folder(base: Path, val: bool = True) -> Path:
    for name, rgb in COLOURS.items():
        for k in range(3):
            _png(base / "train" / name / f"{k}.png", _solid(40 + 4 * k, 20, rgb))  # landscape, varying widths
        if val:
            _png(base / "val" / name / "v.png", _solid(20, 30, rgb))  # portrait
    (base / "train" / "cat" / "notes.txt").write_text("not an image")
    return base


def test_imagenet_subset_all_classes(tmp_path: Path) -> None:
    root = _image_folder(tmp_path)
    b = I.load_imagenet_subset(str(root), image_size=8)
    _check_images(b, (3, 8, 8))
    assert b.class_names == ["cat", "dog", "fox"]
    assert b.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for label, rgb in enumerate(COLOURS.values()):  # solid colours survive resize + crop exactly, channels in RGB order
        expected = torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1).expand(3, 8, 8)
        assert torch.equal(b.train.inputs[3 * label], expected)
    assert b.test is not None and b.test.labels.tolist() == [0, 1, 2]
    assert b.info["resize"] == 9 and b.info["image_size"] == 8  # round(8 * 8 / 7)
    assert b.info["mean"] == I.IMAGENET_MEAN


def test_imagenet_subset_center_crop_exact(tmp_path: Path) -> None:
    h, w = 10, 12
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., 0] = np.arange(h)[:, None] * 16  # red encodes the row
    arr[..., 1] = np.arange(w)[None, :] * 16  # green encodes the column
    arr[..., 2] = 5
    _png(tmp_path / "train" / "only" / "a.png", arr)
    b = I.load_imagenet_subset(str(tmp_path), image_size=8, resize=10)  # shorter side already 10: no resampling
    x = b.train.inputs[0].numpy()
    top, left = 1, 2  # round((10 - 8) / 2), round((12 - 8) / 2)
    assert np.array_equal(x, arr[top : top + 8, left : left + 8].transpose(2, 0, 1))
    assert b.test is None


def test_imagenet_subset_resize_shape_and_gray(tmp_path: Path) -> None:
    gray = np.tile(np.arange(0, 250, 5, dtype=np.uint8)[None, :], (100, 1))  # 50 wide, 100 high, mode L
    _png(tmp_path / "train" / "g" / "a.png", gray)
    b = I.load_imagenet_subset(str(tmp_path), image_size=16, resize=20, max_per_class=1)
    x = b.train.inputs
    assert tuple(x.shape) == (1, 3, 16, 16)
    assert torch.equal(x[0, 0], x[0, 1]) and torch.equal(x[0, 1], x[0, 2])  # grayscale → RGB
    assert bool((x[0, 0, :, 1:] >= x[0, 0, :, :-1]).all())  # the horizontal ramp survives, left to right


def test_imagenet_subset_class_selection(tmp_path: Path) -> None:
    root = _image_folder(tmp_path)
    b = I.load_imagenet_subset(str(root), classes=["fox", "cat"], image_size=8, max_per_class=2)
    assert b.class_names == ["fox", "cat"]  # labels follow the given order
    assert b.train.labels.tolist() == [0, 0, 1, 1]
    assert int(b.train.inputs[0, 2, 0, 0]) == 255 and int(b.train.inputs[2, 0, 0, 0]) == 255
    assert b.test is not None and b.test.labels.tolist() == [0, 1]

    listing = tmp_path / "classes.txt"
    listing.write_text("# my subset\ndog\n\ncat\n")
    b = I.load_imagenet_subset(str(root), classes=str(listing), image_size=8)
    assert b.class_names == ["dog", "cat"]
    assert len(b.train) == 6

    b = I.load_imagenet_subset(str(root), num_classes=2, image_size=8)
    assert b.class_names == ["cat", "dog"]

    with pytest.raises(ValueError, match=r"unknown class name\(s\) \['wolf'\].*cat, dog, fox"):
        I.load_imagenet_subset(str(root), classes=["cat", "wolf"])
    with pytest.raises(ValueError, match="not both"):
        I.load_imagenet_subset(str(root), classes=["cat"], num_classes=1)
    with pytest.raises(ValueError, match="num_classes must be in 1..3"):
        I.load_imagenet_subset(str(root), num_classes=4)
    with pytest.raises(FileNotFoundError, match="one name per line"):
        I.load_imagenet_subset(str(root), classes=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="resize"):
        I.load_imagenet_subset(str(root), image_size=8, resize=4)


def test_imagenet_subset_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data.root="):
        I.load_imagenet_subset(None)
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="it contains: images"):
        I.load_imagenet_subset(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        I.load_imagenet_subset(str(tmp_path / "nowhere"))
    root = _image_folder(tmp_path / "inet")
    (root / "val" / "fox" / "v.png").unlink()
    (root / "val" / "fox").rmdir()
    with pytest.raises(ValueError, match=r"no folder for class\(es\) \['fox'\]"):
        I.load_imagenet_subset(str(root), image_size=8)
    (root / "train" / "empty").mkdir()
    with pytest.raises(ValueError, match="no images in"):
        I.load_imagenet_subset(str(root), classes=["empty"], image_size=8)


# -- fashion_mnist -------------------------------------------------------------------------------
def _idx(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _write_fashion(folder: Path, compress: bool = True, test: bool = True) -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    train = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)  # 3 images, 4 rows, 5 columns
    labels = np.array([9, 0, 3], dtype=np.uint8)
    files = {"train-images-idx3-ubyte": _idx(train, 2051), "train-labels-idx1-ubyte": _idx(labels, 2049)}
    if test:
        files["t10k-images-idx3-ubyte"] = _idx(train[:2][:, ::-1], 2051)
        files["t10k-labels-idx1-ubyte"] = _idx(labels[:2], 2049)
    for name, raw in files.items():
        if compress:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return train, labels


def test_fashion_mnist_idx(tmp_path: Path) -> None:
    train, labels = _write_fashion(tmp_path)
    b = V.load_fashion_mnist(str(tmp_path))
    _check_images(b, (1, 4, 5))
    assert b.class_names == V.FASHION_MNIST_CLASSES and b.class_names[9] == "Ankle boot"
    assert np.array_equal(b.train.inputs[:, 0].numpy(), train)
    assert int(b.train.inputs[1, 0, 2, 3]) == 20 + 2 * 5 + 3  # image 1, row 2, column 3
    assert b.train.labels.tolist() == [9, 0, 3]
    assert b.test is not None
    assert np.array_equal(b.test.inputs[:, 0].numpy(), train[:2][:, ::-1])
    assert b.info["mean"] == [0.2860] and b.info["std"] == [0.3530]
    b.train.inputs[0, 0, 0, 0] = 1  # a writable copy, not the read-only file buffer


def test_fashion_mnist_torchvision_raw_layout_uncompressed(tmp_path: Path) -> None:
    _write_fashion(tmp_path / "FashionMNIST" / "raw", compress=False, test=False)
    b = V.load_fashion_mnist(str(tmp_path))
    assert len(b.train) == 3 and b.test is None
    assert b.info["source"] == str(tmp_path / "FashionMNIST" / "raw")


def test_fashion_mnist_bad_magic_and_size(tmp_path: Path) -> None:
    _write_fashion(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(np.zeros((3, 1)), 2051)))
    with pytest.raises(ValueError, match=r"bad IDX magic number 2051 \(0x00000803\), expected 2049"):
        V.load_fashion_mnist(str(tmp_path))
    raw = _idx(np.zeros(3), 2049)[:-1]  # one label byte missing
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(raw))
    with pytest.raises(ValueError, match="header says shape"):
        V.load_fashion_mnist(str(tmp_path))
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(np.zeros(2), 2049)))
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        V.load_fashion_mnist(str(tmp_path))


def test_fashion_mnist_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as exc:
        V.load_fashion_mnist(str(tmp_path))
    msg = str(exc.value)
    for needle in ("apt-get install dataset-fashion-mnist", "data.root=", "train-images-idx3-ubyte.gz", str(tmp_path)):
        assert needle in msg, f"{needle!r} missing from: {msg}"


@pytest.mark.skipif(not Path(V.FASHION_MNIST_ROOT).is_dir(), reason="Debian dataset-fashion-mnist is not installed")
def test_fashion_mnist_debian() -> None:
    b = V.load_fashion_mnist()
    _check_images(b, (1, 28, 28))
    assert len(b.train) == 60000 and b.test is not None and len(b.test) == 10000
    assert np.bincount(b.train.labels).tolist() == [6000] * 10


# -- cifar10_samples -----------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_FOOLBOX, reason="foolbox (CIFAR-10 sample images) is not installed")
def test_cifar10_samples_embedded() -> None:
    folder = assets.find_package_file("foolbox", "data")
    files = sorted(folder.glob("cifar10_*_*.png"))
    assert len(files) == 20
    b = C.load_cifar10_samples()
    _check_images(b, (3, 32, 32))
    assert len(b.train) == 20 and b.test is None
    assert b.train.labels.tolist() == [int(p.stem.split("_")[2]) for p in files]
    assert b.class_names == C.CIFAR10_CLASSES
    first = np.asarray(Image.open(files[0]).convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(b.train.inputs[0].numpy(), first)
    assert b.train.inputs.float().std() > 20  # real photos, not blank


def test_cifar10_samples_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _png(tmp_path / "cifar10_10_4.png", _solid(32, 32, (1, 2, 3)))
    _png(tmp_path / "cifar10_02_7.png", _solid(32, 32, (4, 5, 6)))
    _png(tmp_path / "cifar100_00_49.png", _solid(32, 32, (9, 9, 9)))  # another dataset: ignored
    b = C.load_cifar10_samples(str(tmp_path))
    assert b.train.labels.tolist() == [7, 4]  # ordered by index
    assert b.train.inputs[:, :, 0, 0].tolist() == [[4, 5, 6], [1, 2, 3]]
    (tmp_path / "cifar10_10_4.png").unlink()
    (tmp_path / "cifar10_02_7.png").unlink()
    with pytest.raises(FileNotFoundError, match="no cifar10_NN_LABEL.png"):
        C.load_cifar10_samples(str(tmp_path))
    monkeypatch.setattr(assets, "_package_dirs", lambda package: [])
    with pytest.raises(FileNotFoundError, match="pip install --no-deps foolbox==3.3.4"):
        C.load_cifar10_samples()
