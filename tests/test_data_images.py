"""Image folders decoded once into a uint8 store and read per index (``data/images.py``): the same pixels as an
in-memory decode, poisoning applied per index, subsets as index views, damaged images refused by name."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_vision_bench import _gtsrb_official, _tiny

from backdoorbench import cli, runtime
from backdoorbench.config import DataConfig
from backdoorbench.data import imagenet as I
from backdoorbench.data.base import Samples
from backdoorbench.data.images import ImageArray, ImageFile, as_image_array
from backdoorbench.data.poisoned import PoisonedDataset
from backdoorbench.data.split import threat_model_split
from backdoorbench.errors import DataError


def _folder(root: Path, classes: int = 3, per_class: int = 8, val: int = 2) -> Path:
    """``root/train/c<k>/*.jpg`` (+ ``val/``): small JPEGs of different sizes, noisy, one colour per class."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", val)):
        for c in range(classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = 18 + i % 3, 22 + i % 4
                img = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
                img[..., c % 3] += 180
                Image.fromarray(img).save(folder / f"{i:03d}.jpg", quality=85)
    return root


def _load(root: Path, in_memory: bool, cache: Path | None = None) -> object:
    with runtime.run_scope(runtime.Runtime(cache_dir=cache)):
        return I.load_imagenet_subset(str(root), image_size=12, in_memory=in_memory)


def test_store_equals_in_memory_decode(tmp_path: Path) -> None:
    root = _folder(tmp_path / "folder")
    eager = _load(root, in_memory=True)
    cache = tmp_path / "cache"
    lazy = _load(root, in_memory=False, cache=cache)
    anonymous = _load(root, in_memory=False)  # no cache: an anonymous temporary file
    for split in ("train", "test"):
        ref = getattr(eager, split)
        assert isinstance(ref.inputs, torch.Tensor)
        for other in (getattr(lazy, split), getattr(anonymous, split)):
            assert isinstance(other.inputs, ImageArray) and isinstance(other.inputs.base, ImageFile)
            assert torch.equal(other.inputs.to_tensor(), ref.inputs)  # pixel for pixel
            assert np.array_equal(other.labels, ref.labels)
            assert other.digest() == ref.digest()  # the same key for whatever is computed from them
            assert torch.equal(other.inputs[5], ref.inputs[5]) and torch.equal(other.inputs[-2:], ref.inputs[-2:])
            assert torch.equal(other.inputs[np.array([4, 1, 4])], ref.inputs[[4, 1, 4]])
    stores = sorted((cache / "images").glob("*.npy"))
    assert len(stores) == 2  # train and val, decoded once each
    stamps = [p.stat().st_mtime_ns for p in stores]
    again = _load(root, in_memory=False, cache=cache)  # reused, not decoded again
    assert [p.stat().st_mtime_ns for p in stores] == stamps
    assert torch.equal(again.train.inputs.to_tensor(), eager.train.inputs)
    # a loader worker (spawned) gets the store's path, not its pixels
    clone = pickle.loads(pickle.dumps(lazy.train.inputs))
    assert len(pickle.dumps(lazy.train.inputs)) < lazy.train.inputs.base.row_bytes * len(lazy.train) / 2
    assert torch.equal(clone.to_tensor(), eager.train.inputs)


def test_a_changed_file_is_decoded_again_and_a_damaged_store_is_refused(tmp_path: Path) -> None:
    root = _folder(tmp_path / "folder")
    cache = tmp_path / "cache"
    _load(root, in_memory=False, cache=cache)
    Image.fromarray(np.full((20, 20, 3), 7, np.uint8)).save(root / "train" / "c0" / "000.jpg")
    changed = _load(root, in_memory=False, cache=cache)
    assert int(changed.train.inputs[0].max()) <= 8  # the new pixels, not the cached ones
    assert len(list((cache / "images").glob("*.npy"))) == 3
    store = changed.train.inputs.base.path
    store.write_bytes(store.read_bytes()[:-5])
    with pytest.raises(DataError, match="damaged or truncated; delete it"):
        _load(root, in_memory=False, cache=cache)


def test_poisoning_per_index_equals_the_materialised_poisoning(tmp_path: Path) -> None:
    root = _folder(tmp_path / "folder")
    eager, lazy = _load(root, in_memory=True).train, _load(root, in_memory=False).train
    idx = np.array([1, 4, 9, 20])
    delta = torch.full((4, 3, 12, 12), 255, dtype=torch.uint8)
    old = PoisonedDataset(eager, idx, delta, np.zeros(4), 0).materialize()
    new = PoisonedDataset(lazy, idx, delta, np.zeros(4), 0).materialize()
    assert isinstance(old.inputs, torch.Tensor) and isinstance(new.inputs, ImageArray)
    assert torch.equal(new.inputs.to_tensor(), old.inputs) and np.array_equal(new.labels, old.labels)
    assert new.inputs.base is lazy.inputs.base and len(new.inputs.patch) == 4  # the delta costs its rows only
    assert not torch.equal(lazy.inputs[1], delta[0])  # the clean view is untouched
    # views of the poisoned set carry the delta; a second patch overrides the first where they meet
    pick = np.array([20, 0, 4])
    assert torch.equal(new.subset(pick).inputs.to_tensor(), old.inputs[pick])
    twice = new.inputs.with_patch(np.array([4, 5]), torch.zeros(2, 3, 12, 12, dtype=torch.uint8))
    expected = old.inputs.clone()
    expected[[4, 5]] = 0
    assert torch.equal(twice.to_tensor(), expected)
    # a loader fetching a batch at once gets the same tensor as item by item
    assert torch.equal(new.inputs.__getitems__([9, 2]), torch.stack([old.inputs[9], old.inputs[2]]))


def test_splits_and_subsets_are_views(tmp_path: Path) -> None:
    root = _folder(tmp_path / "folder", per_class=12)
    bundle = _load(root, in_memory=False)
    eager = _load(root, in_memory=True)
    cfg = DataConfig(name="imagenet_subset", holdout_size=6, proxy_size=0)
    splits, ref = threat_model_split(bundle, cfg, seed=3), threat_model_split(eager, cfg, seed=3)
    base = bundle.train.inputs.base
    for name in ("train", "holdout", "test"):
        part, want = getattr(splits, name), getattr(ref, name)
        store = bundle.test.inputs.base if name == "test" else base  # val/ is the test split: its own store
        assert isinstance(part.inputs, ImageArray) and part.inputs.base is store  # shares the store: no copy
        assert torch.equal(part.inputs.to_tensor(), want.inputs)
    clean = splits.defender_clean(4)
    assert clean.inputs.base is base and torch.equal(clean.inputs.to_tensor(), ref.defender_clean(4).inputs)
    # an in-memory tensor wrapped as a view (DBD's labelled / unlabelled split) shares its storage
    wrapped = as_image_array(eager.train.inputs)
    assert wrapped.base.data_ptr() == eager.train.inputs.data_ptr()
    part = wrapped.select(np.array([3, 0]))
    assert part.base is wrapped.base and torch.equal(part[0], eager.train.inputs[3])
    # a view is indices only: viewing all of a big set allocates no pixels
    view = bundle.train.subset(np.arange(len(bundle.train)))
    assert view.inputs.base is base and view.inputs.patch is None
    assert Samples.concat([view, view]).inputs.shape[0] == 2 * len(view)  # tensor code still works (materialised)


def _damage(path: Path, kind: str) -> None:
    data = path.read_bytes()
    path.write_bytes(b"this is not an image" if kind == "garbage" else data[: len(data) // 2])


def _run_cli(args: list[str], run_dir: Path, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    rc = cli.main(["run", "attack=badnets", "defense=none", "cache.enabled=false", *args, f"hydra.run.dir={run_dir}"])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
@pytest.mark.parametrize("dataset", ["imagenet_subset", "gtsrb", "tiny_imagenet"])
def test_a_damaged_image_exits_2_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture, dataset: str, kind: str
) -> None:
    if dataset == "imagenet_subset":
        root = _folder(tmp_path / "folder")
        bad = root / "train" / "c1" / "003.jpg"
    elif dataset == "gtsrb":
        root = _gtsrb_official(tmp_path)
        bad = root / "Final_Training" / "Images" / "00014" / "00000_00000.ppm"
    else:
        root = _tiny(tmp_path)
        bad = next((root / "train").glob("*/images/*_1.JPEG"))
    assert bad.is_file()
    _damage(bad, kind)
    rc, err = _run_cli([f"data={dataset}", f"data.root={root}"], tmp_path / "run", capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2, err[-2000:]
    assert len(lines) == 1 and str(bad) in lines[0] and "unexpected" not in lines[0], err[-2000:]


def test_in_memory_is_not_part_of_the_attack_cache_key(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    from backdoorbench.cli import config_dir
    from backdoorbench.engine.spec import validate
    from backdoorbench.engine.victim import attack_cache_spec

    def key(*extra: str) -> dict:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose("config", overrides=["attack=badnets", "data=imagenet_subset", f"data.root={tmp_path}",
                                               *extra])
        spec = validate(cfg)
        return attack_cache_spec(spec, spec.attack.obj(spec.attack_cfg, spec.seed))

    default = key()
    assert "in_memory" not in default["data"]["options"] and default["data"]["options"]["image_size"] == 64
    assert key("data.options.in_memory=true") == default
    assert key("data.options.image_size=32") != default  # what changes the pixels stays in the key


def test_a_run_on_the_store_equals_the_in_memory_run(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    from backdoorbench.cli import config_dir
    from backdoorbench.engine.pipeline import run_experiment

    root = _folder(tmp_path / "folder", per_class=16, val=4)
    results = {}
    for in_memory in (True, False):
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose("config", overrides=[
                "attack=badnets", "defense=none", "data=imagenet_subset", f"data.root={root}",
                "data.options.image_size=12", f"data.options.in_memory={str(in_memory).lower()}",
                "data.holdout_size=6", "attack.size=3", "attack.poison_rate=0.2", "trainer.max_epochs=2",
                "trainer.batch_size=16", "cache.enabled=false",
            ])
        out = tmp_path / f"run-{in_memory}"
        results[in_memory] = (run_experiment(cfg, out)["metrics"], (out / "scores.csv").read_text())
    assert results[True] == results[False]  # BA, ASR and every per-sample prediction
