"""Tests for the benchmark vision loaders: ``gtsrb`` (``data/gtsrb.py``), ``cifar100`` and ``tiny_imagenet``
(``data/vision_bench.py``).

Every test writes a few tiny files in the official layout into ``tmp_path`` (GTSRB PPMs with their
semicolon-separated GT CSVs, CIFAR-100 python pickles, a tiny-imagenet-200 tree of JPEGs); nothing
touches the network: the download paths run against fake torchvision modules.
"""

from __future__ import annotations

import os
import pickle
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from backdoorbench.config import DataConfig, to_dataclass
from backdoorbench.data import gtsrb as G
from backdoorbench.data import vision_bench as VB
from backdoorbench.data.base import DatasetBundle
from backdoorbench.data.images import image_tensor
from backdoorbench.errors import DataError
from backdoorbench.modality.vision import image_spec
from backdoorbench.registry import REGISTRY

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "data"


def _check(b: DatasetBundle, shape: tuple[int, ...], flip: bool) -> None:
    for split in (b.train, b.test):
        if split is not None:
            x = image_tensor(split.inputs)  # image folders: a lazy ImageArray, read here
            assert isinstance(x, torch.Tensor) and x.dtype == torch.uint8
            assert x.is_contiguous() and tuple(x.shape[1:]) == shape
            assert split.labels.dtype == np.int64 and split.modality == "vision"
    assert b.modality == "vision" and b.info["flip"] is flip
    assert len(b.info["mean"]) == len(b.info["std"]) == 3
    assert b.info["source"] and b.info["licence"]
    spec = image_spec(b)
    assert (spec.channels, spec.height, spec.width, spec.flip) == (*shape, flip)


def _save(path: Path, array: np.ndarray, **kwargs: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


def _solid(w: int, h: int, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(np.asarray(rgb, dtype=np.uint8), (h, w, 3)).copy()


def _fake_module(monkeypatch: pytest.MonkeyPatch, name: str, **attrs: Any) -> None:
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        mod = types.ModuleType(".".join(parts[:i]))
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
        if i > 1:
            setattr(sys.modules[".".join(parts[: i - 1])], parts[i - 1], mod)
    for key, value in attrs.items():
        setattr(sys.modules[name], key, value)


@pytest.mark.parametrize(
    ("name", "fn"), [("gtsrb", G.load_gtsrb), ("cifar100", VB.load_cifar100), ("tiny_imagenet", VB.load_tiny_imagenet)]
)
def test_registered(name: str, fn: Any) -> None:
    entry = REGISTRY._tables["dataset"][name]  # the table, not get(): get() imports every component
    assert entry.obj is fn and entry.modality == ("vision",) and entry.category == "classification"


# -- gtsrb ---------------------------------------------------------------------------------------
GT_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
SIGN = {0: (255, 0, 0), 2: (0, 0, 255), 14: (0, 255, 0)}


def _sign(w: int, h: int, rgb: tuple[int, int, int]) -> np.ndarray:
    """A solid sign inside a 5-pixel white border (the ROI is the inner box)."""
    img = _solid(w, h, (255, 255, 255))
    img[5 : h - 5, 5 : w - 5] = rgb
    return img


def _gtsrb_class(folder: Path, cls: int, sizes: list[tuple[int, int]], csv: bool = True) -> None:
    lines = [GT_HEADER]
    for k, (w, h) in enumerate(sizes):
        name = f"{k:05d}_{k:05d}.ppm"
        _save(folder / name, _sign(w, h, SIGN[cls]))
        lines.append(f"{name};{w};{h};5;5;{w - 5};{h - 5};{cls}\n")
    if csv:
        (folder / f"GT-{cls:05d}.csv").write_text("".join(lines))


def _gtsrb_official(root: Path) -> Path:
    """GTSRB_Final_Training_Images.zip + GTSRB_Final_Test_Images.zip + GTSRB_Final_Test_GT.zip, unpacked."""
    train = root / "GTSRB" / "Final_Training" / "Images"
    _gtsrb_class(train / "00000", 0, [(30, 40), (20, 20)])
    _gtsrb_class(train / "00014", 14, [(50, 45)])
    test = root / "GTSRB" / "Final_Test" / "Images"
    _save(test / "00000.ppm", _sign(25, 30, SIGN[14]))
    _save(test / "00001.ppm", _sign(40, 40, SIGN[0]))
    (test / "GT-final_test.test.csv").write_text("Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2\n")  # unlabelled
    (test / "GT-final_test.csv").write_text(GT_HEADER + "00000.ppm;25;30;5;5;20;25;14\n00001.ppm;40;40;5;5;35;35;0\n")
    return root / "GTSRB"


def test_gtsrb_official_layout(tmp_path: Path) -> None:
    root = _gtsrb_official(tmp_path)
    for r in (root, tmp_path):  # GTSRB/ or its parent
        b = G.load_gtsrb(str(r))
        _check(b, (3, 32, 32), flip=False)
        assert b.class_names == G.GTSRB_CLASSES and len(b.class_names) == 43 and b.class_names[14] == "stop"
        assert b.train.labels.tolist() == [0, 0, 14]
        assert b.test is not None and b.test.labels.tolist() == [14, 0]
        centre = b.train.inputs[:, :, 16, 16].tolist()
        assert centre == [[255, 0, 0], [255, 0, 0], [0, 255, 0]]  # RGB order, sign in the middle
        assert b.train.inputs[0, :, 0, 0].tolist() == [255, 255, 255]  # whole image resized: the border stays
        assert b.info["image_size"] == 32 and b.info["mean"] == G.GTSRB_MEAN


def test_gtsrb_roi_crop_and_size(tmp_path: Path) -> None:
    root = _gtsrb_official(tmp_path)
    b = G.load_gtsrb(str(root), crop_roi=True, image_size=16)
    _check(b, (3, 16, 16), flip=False)
    x = b.train.inputs
    assert torch.equal(x[2], torch.tensor(SIGN[14], dtype=torch.uint8).view(3, 1, 1).expand(3, 16, 16))  # no border
    assert b.test is not None and int(b.test.inputs[0, 1].min()) == 255 and int(b.test.inputs[0, 0].max()) == 0


def test_gtsrb_torchvision_layout(tmp_path: Path) -> None:
    """torchvision's download: gtsrb/GTSRB/Training/<class>/*.ppm (read by folder name) + gtsrb/GT-final_test.csv."""
    base = tmp_path / "gtsrb"
    _gtsrb_class(base / "GTSRB" / "Training" / "00002", 2, [(32, 32), (35, 33)], csv=False)
    _save(base / "GTSRB" / "Final_Test" / "Images" / "00000.ppm", _sign(30, 30, SIGN[2]))
    (base / G.GTSRB_TEST_GT).write_text(GT_HEADER + "00000.ppm;30;30;5;5;25;25;2\n")
    b = G.load_gtsrb(str(tmp_path))
    assert b.train.labels.tolist() == [2, 2]
    assert b.test is not None and b.test.labels.tolist() == [2]
    with pytest.raises(DataError, match="crop_roi needs the ROI boxes"):
        G.load_gtsrb(str(tmp_path), crop_roi=True)


def test_gtsrb_without_test_labels(tmp_path: Path) -> None:
    root = _gtsrb_official(tmp_path)
    gt = root / "Final_Test" / "Images" / G.GTSRB_TEST_GT
    gt.rename(tmp_path / G.GTSRB_TEST_GT)  # only the unlabelled .test.csv is left below root
    assert G.load_gtsrb(str(root)).test is None  # a GT file above data.root is not used
    (tmp_path / G.GTSRB_TEST_GT).rename(root / "Final_Test" / G.GTSRB_TEST_GT)  # one folder above the images: found
    b = G.load_gtsrb(str(root))
    assert b.test is not None and b.test.labels.tolist() == [14, 0]


def test_gtsrb_bad_files(tmp_path: Path) -> None:
    root = _gtsrb_official(tmp_path)
    ppm = root / "Final_Training" / "Images" / "00014" / "00000_00000.ppm"
    ppm.write_bytes(b"P6\n50 45\n255\n" + b"\x00" * 10)  # truncated pixel data
    with pytest.raises(DataError, match=r"data file .*00000_00000.ppm is not a valid GTSRB image \(PPM\)"):
        G.load_gtsrb(str(root))
    ppm.unlink()
    with pytest.raises(DataError, match=r"GT-00014.csv lists 00000_00000.ppm, which is not in"):
        G.load_gtsrb(str(root))
    (root / "Final_Training" / "Images" / "00014" / "GT-00014.csv").write_text("Filename;Width\nx.ppm;3\n")
    with pytest.raises(DataError, match=r"GT-00014.csv is not a valid GTSRB annotation CSV .*missing column"):
        G.load_gtsrb(str(root))
    (root / "Final_Training" / "Images" / "00014" / "GT-00014.csv").write_text(GT_HEADER + "a.ppm;1;1;0;0;1;1;43\n")
    with pytest.raises(DataError, match="ClassId 43 out of range"):
        G.load_gtsrb(str(root))


def test_gtsrb_missing_and_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for root in (str(tmp_path), None):
        with pytest.raises(FileNotFoundError, match="Final_Training/Images.*data.root=.*download=true"):
            G.load_gtsrb(root)
    calls: list[tuple[str, str, bool]] = []

    def gtsrb(root: str, split: str = "train", download: bool = False) -> None:
        calls.append((root, split, download))
        if split == "train":
            _gtsrb_class(Path(root) / "gtsrb" / "GTSRB" / "Training" / "00000", 0, [(20, 20)], csv=False)

    _fake_module(monkeypatch, "torchvision.datasets", GTSRB=gtsrb)
    b = G.load_gtsrb(str(tmp_path / "dl"), download=True)
    assert calls == [(str(tmp_path / "dl"), "train", True), (str(tmp_path / "dl"), "test", True)]
    assert b.train.labels.tolist() == [0] and b.test is None


# -- cifar100 ------------------------------------------------------------------------------------
class _Evil:
    def __reduce__(self) -> tuple[Any, tuple]:
        return (os.getcwd, ())


def _cifar100(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    data = np.zeros((3, 3072), dtype=np.uint8)
    for k in range(3):
        data[k, :1024], data[k, 1024:2048], data[k, 2048:] = 10 + k, 100 + k, 200 + k
    data[0, 2 * 1024 + 31 * 32 + 0] = 9  # blue plane, row 31, column 0
    train = {b"data": data, b"fine_labels": [99, 0, 42], b"coarse_labels": [19, 4, 0], b"filenames": [b"a", b"b", b"c"]}
    (folder / "train").write_bytes(pickle.dumps(train, protocol=2))
    test = {"data": data[:1], "fine_labels": [7], "coarse_labels": [3]}
    (folder / "test").write_bytes(pickle.dumps(test, protocol=5))
    meta = {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": [f"c{i}" for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta))


def test_cifar100_fine_and_coarse(tmp_path: Path) -> None:
    folder = tmp_path / VB.CIFAR100_DIR
    _cifar100(folder)
    b = VB.load_cifar100(str(tmp_path))
    _check(b, (3, 32, 32), flip=True)
    assert b.class_names == [f"f{i}" for i in range(100)]  # read from meta
    assert b.train.labels.tolist() == [99, 0, 42]
    x = b.train.inputs
    assert x[:, :, 5, 5].tolist() == [[10, 100, 200], [11, 101, 201], [12, 102, 202]]
    assert int(x[0, 2, 31, 0]) == 9 and int(x[0, 2, 0, 31]) == 200  # planes are row-major
    assert b.test is not None and b.test.labels.tolist() == [7]
    coarse = VB.load_cifar100(str(folder), label_mode="coarse")
    assert coarse.class_names == [f"c{i}" for i in range(20)] and coarse.train.labels.tolist() == [19, 4, 0]
    (folder / "meta").unlink()
    (folder / "test").unlink()
    b = VB.load_cifar100(str(folder))
    assert b.class_names == VB.CIFAR100_FINE_CLASSES and len(set(VB.CIFAR100_FINE_CLASSES)) == 100
    assert b.class_names[42] == "leopard" and b.test is None
    assert len(set(VB.CIFAR100_COARSE_CLASSES)) == 20
    with pytest.raises(DataError, match="label_mode"):
        VB.load_cifar100(str(folder), label_mode="both")


def test_cifar100_bad_files(tmp_path: Path) -> None:
    _cifar100(tmp_path)
    (tmp_path / "test").write_bytes(pickle.dumps({"data": _Evil(), "fine_labels": [0]}))
    with pytest.raises(DataError, match=r"data file .*test is not a valid CIFAR-100 file .*: refusing to load"):
        VB.load_cifar100(str(tmp_path))
    (tmp_path / "train").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError, match=r"data file .*train is not a valid CIFAR-100 file"):
        VB.load_cifar100(str(tmp_path))
    (tmp_path / "train").write_bytes(pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [0]}))
    with pytest.raises(DataError, match="needs 'data' and 'fine_labels'"):
        VB.load_cifar100(str(tmp_path))


def test_cifar100_missing_and_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for root in (str(tmp_path), None):
        with pytest.raises(FileNotFoundError, match="cifar-100-python.tar.gz.*data.root=.*download=true"):
            VB.load_cifar100(root)
    calls: list[tuple[str, bool, bool]] = []

    def cifar100(root: str, train: bool = True, download: bool = False) -> None:
        calls.append((root, train, download))
        _cifar100(Path(root) / VB.CIFAR100_DIR)  # what torchvision unpacks

    _fake_module(monkeypatch, "torchvision.datasets", CIFAR100=cifar100)
    b = VB.load_cifar100(str(tmp_path / "dl"), download=True)
    assert calls == [(str(tmp_path / "dl"), True, True)] and len(b.train) == 3
    VB.load_cifar100(str(tmp_path / "dl"), download=True)  # already there: no second download
    assert len(calls) == 1

    def offline(root: str, train: bool = True, download: bool = False) -> None:
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    _fake_module(monkeypatch, "torchvision.datasets", CIFAR100=offline)
    with pytest.raises(FileNotFoundError, match="downloading into .* failed .*name resolution"):
        VB.load_cifar100(str(tmp_path / "other"), download=True)


# -- tiny_imagenet -------------------------------------------------------------------------------
WNIDS = {"n02124075": (200, 0, 0), "n01443537": (0, 200, 0), "n09999999": (0, 0, 200)}  # file order, unsorted


def _tiny(base: Path) -> Path:
    root = base / VB.TINY_DIR
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (root / "words.txt").write_text(
        "n00001740\tentity\nn02124075\tEgyptian cat\nn01443537\tgoldfish, Carassius auratus\n"
    )  # n09999999 has no entry: its name is the wnid
    annotations = []
    for i, (wnid, rgb) in enumerate(WNIDS.items()):
        for k in range(2):
            _save(root / "train" / wnid / "images" / f"{wnid}_{k}.JPEG", _solid(64, 64, rgb), quality=95)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t63\t63\n")
        _save(root / "val" / "images" / f"val_{i}.JPEG", _solid(64, 64, rgb), quality=95)
        annotations.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    gray = np.tile(np.arange(64, dtype=np.uint8)[None, :] * 4, (64, 1))
    _save(root / "val" / "images" / "val_3.JPEG", gray)  # a grayscale JPEG, as some Tiny-ImageNet images are
    annotations.append("val_3.JPEG\tn01443537\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    _save(root / "test" / "images" / "test_0.JPEG", _solid(64, 64, (1, 2, 3)))  # unlabelled: ignored
    return root


def test_tiny_imagenet(tmp_path: Path) -> None:
    root = _tiny(tmp_path)
    for r in (root, tmp_path):
        b = VB.load_tiny_imagenet(str(r))
        _check(b, (3, 64, 64), flip=True)
        assert b.info["wnids"] == ["n01443537", "n02124075", "n09999999"]  # sorted, as ImageFolder
        assert b.class_names == ["goldfish", "Egyptian cat", "n09999999"]
        assert b.train.labels.tolist() == [0, 0, 1, 1, 2, 2]
        centre = b.train.inputs[::2, :, 32, 32].to(torch.int64)
        expected = torch.tensor([WNIDS["n01443537"], WNIDS["n02124075"], WNIDS["n09999999"]])
        assert int((centre - expected).abs().max()) <= 3  # JPEG is lossy
        assert b.test is not None and b.test.labels.tolist() == [1, 0, 2, 0]
        g = b.test.inputs[3]
        assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])  # grayscale → RGB
        assert b.info["mean"] == VB.TINY_MEAN
    small = VB.load_tiny_imagenet(str(root), num_classes=2, max_per_class=1)
    assert small.class_names == ["goldfish", "Egyptian cat"] and small.train.labels.tolist() == [0, 1]
    assert small.test is not None and small.test.labels.tolist() == [1, 0]
    with pytest.raises(DataError, match=r"num_classes must be in 1..3"):
        VB.load_tiny_imagenet(str(root), num_classes=4)


def test_tiny_imagenet_bad_files(tmp_path: Path) -> None:
    root = _tiny(tmp_path)
    (root / "val" / "images" / "val_2.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DataError, match=r"data file .*val_2.JPEG is not a valid Tiny-ImageNet image \(JPEG\)"):
        VB.load_tiny_imagenet(str(root))
    _save(root / "val" / "images" / "val_2.JPEG", _solid(32, 64, (0, 0, 0)))
    with pytest.raises(DataError, match="val_2.JPEG .*it is 32x64, not 64x64"):
        VB.load_tiny_imagenet(str(root))
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\n")
    with pytest.raises(DataError, match="val_annotations.txt is not a valid .*line 1: expected"):
        VB.load_tiny_imagenet(str(root))
    for p in (root / "train" / "n09999999" / "images").iterdir():
        p.unlink()
    with pytest.raises(DataError, match="no images in .*n09999999"):
        VB.load_tiny_imagenet(str(root))


def test_tiny_imagenet_missing_and_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for root in (str(tmp_path), None):
        with pytest.raises(FileNotFoundError, match="tiny-imagenet-200.zip.*data.root=.*download=true"):
            VB.load_tiny_imagenet(root)
    calls: list[tuple[str, str, str | None]] = []

    def download_and_extract_archive(url: str, download_root: str, md5: str | None = None) -> None:
        calls.append((url, download_root, md5))
        _tiny(Path(download_root))

    _fake_module(monkeypatch, "torchvision.datasets.utils", download_and_extract_archive=download_and_extract_archive)
    b = VB.load_tiny_imagenet(str(tmp_path / "dl"), download=True)
    assert calls == [(VB.TINY_URL, str(tmp_path / "dl"), VB.TINY_MD5)] and len(b.train) == 6


def test_configs_match_the_loaders(tmp_path: Path) -> None:
    """configs/data/<name>.yaml's options are the loaders' keyword arguments (what a run passes them)."""
    _gtsrb_official(tmp_path / "g")
    _cifar100(tmp_path / "c")
    _tiny(tmp_path / "t")
    for name, root, n in (("gtsrb", "g", 3), ("cifar100", "c", 3), ("tiny_imagenet", "t", 6)):
        cfg = to_dataclass(DataConfig, OmegaConf.load(CONFIGS / f"{name}.yaml"), "data")
        assert cfg.name == name
        assert len(REGISTRY._tables["dataset"][name].obj(root=str(tmp_path / root), **cfg.options).train) == n
