"""Real BackdoorBench records with attack=external: written the way SCLBD/BackdoorBench's own code writes them
(``utils/save_load_attack.py`` ``save_attack_result``, ``utils/bd_dataset_v2.py`` ``retrieve_state``,
``attack/badnet.py``), pickled under numpy 1's module names as their environment does, in every form their
``bd_test`` takes; they load safely, and their own poisoned test set gives BackdoorBench's ASR.

BackdoorBench itself is not imported: the fixtures below build the same dicts (issue 34, items 1 and 2)."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import backdoorbench as bb
from backdoorbench.attacks.base import AttackContext
from backdoorbench.config import ConfigError
from backdoorbench.data.base import Samples
from backdoorbench.modality.vision import ImageSpec
from backdoorbench.models.checkpoints import BACKDOORBENCH_NORMALIZATION
from backdoorbench.models.vision import VisionModelConfig
from backdoorbench.trainer.lit import TrainConfig

CIFAR_MEAN, CIFAR_STD = BACKDOORBENCH_NORMALIZATION["cifar10"]
FORMS = ("v2_files", "v2_memory", "v1_tensor", "v1_pil")


@pytest.fixture(autouse=True)
def _restore_torch_globals(restore_torch_globals: None) -> None:
    """Every test here runs the pipeline, which sets torch's globals (conftest.restore_torch_globals)."""


# -- writing records as BackdoorBench does --------------------------------------------------------------
class _Numpy1Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Names numpy's reconstructors ``numpy.core.multiarray.*``, as numpy 1.x (BackdoorBench's) pickles do."""

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", "") or ""
        if module.startswith("numpy._core"):
            legacy = "numpy.core" + module[len("numpy._core"):]
            self.write(pickle.GLOBAL + f"{legacy}\n{name or obj.__name__}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


NUMPY1 = types.SimpleNamespace(Pickler=_Numpy1Pickler, __name__="pickle")


def badnets(image: np.ndarray) -> np.ndarray:
    """BackdoorBench's BadNets test transform on an HWC uint8 image: a white 3x3 patch, bottom right."""
    out = image.copy()
    out[-3:, -3:] = 255
    return out


def dataset_state(images: np.ndarray, labels: np.ndarray, target: int, form: str, save_folder: str | None,
                  cwd: Path | None) -> dict:
    """What ``save_attack_result`` stores for a poisoned split of (HWC uint8 ``images``, ``labels``): all-to-one
    to ``target``, every non-target sample poisoned (``generate_poison_index_from_label_transform`` on the
    test set), then ``subset`` to the poisoned ones, as ``attack/badnet.py`` does for ``bd_test``.

    v2 forms: ``prepro_cls_DatasetBD_v2.retrieve_state()``; its container's ``data_dict`` keyed by the
    ``np.int64`` indices of ``np.arange``, holding ``{"path", "other_info": [bd_label, label]}`` with the PNG
    written under ``<save_folder>/<label>/<index>.png`` (relative to ``cwd``, BackdoorBench's root), or
    ``(PIL image, bd_label, label)`` in memory. v1 forms: BackdoorBench 1.x's ``{"x", "y", "original_index",
    "original_targets"}``, ``x`` a float NCHW tensor of 0..255 values or a list of PIL images."""
    poison_indicator = np.zeros(len(labels))
    poison_indicator[np.where(labels != target)[0]] = 1
    poisoned = np.where(poison_indicator == 1)[0]
    if form.startswith("v1"):
        x = [Image.fromarray(badnets(images[i])) for i in poisoned]
        if form == "v1_tensor":
            x = torch.tensor(np.stack([np.asarray(p) for p in x]).transpose(0, 3, 1, 2)).float()
        return {"x": x, "y": torch.full((len(poisoned),), target).long(), "original_index": poisoned,
                "original_targets": torch.from_numpy(labels[poisoned])}
    folder = save_folder if form == "v2_files" else None
    data_dict = {}
    for index in np.arange(len(labels)):  # np.int64 keys, as their loop over np.arange
        if poison_indicator[index] != 1:
            continue
        img, label = Image.fromarray(badnets(images[index])), int(labels[index])
        if folder is None:
            data_dict[index] = (img, target, label)
        else:
            path = f"{folder}/{label}/{index}.png"
            (cwd / path).parent.mkdir(parents=True, exist_ok=True)
            img.save(cwd / path)
            data_dict[index] = {"path": path, "other_info": [target, label]}
    return {
        "bd_data_container": {"save_folder_path": folder, "data_dict": data_dict, "save_file_format": ".png"},
        "getitem_all": True,
        "getitem_all_switch": False,
        "original_index_array": np.arange(len(labels))[poisoned],
        "poison_indicator": poison_indicator,
        "save_folder_path": folder,
    }


def write_record(root: Path, net: torch.nn.Module, test: tuple[np.ndarray, np.ndarray], target: int, form: str,
                 name: str = "badnet_demo") -> Path:
    """A BadNets record as ``attack/badnet.py`` + ``save_attack_result`` leave it under BackdoorBench's
    root ``root``: ``record/<name>/attack_result.pt`` (+ ``bd_train_dataset/``, ``bd_test_dataset/`` PNGs)."""
    save_path = f"./record/{name}"
    (root / save_path).mkdir(parents=True)
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), np.arange(6) % 10
    result = {
        "model_name": "preactresnet18", "num_classes": 10, "model": net.state_dict(),
        "data_path": "./data/cifar10", "img_size": [32, 32, 3], "clean_data": "cifar10",
        "bd_train": dataset_state(*train, target, "v2_files", f"{save_path}/bd_train_dataset", root),
        "bd_test": dataset_state(*test, target, form, f"{save_path}/bd_test_dataset", root),
    }
    torch.save(result, root / save_path / "attack_result.pt", pickle_module=NUMPY1)
    return root / save_path


def their_net(seed: int = 1) -> torch.nn.Module:
    """A PreAct-ResNet-18 with BackdoorBench's parameter names and non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    net = bb.create_model("preact_resnet18", 10, image=ImageSpec(3, 32, 32, CIFAR_MEAN, CIFAR_STD)).net
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def ctx10() -> AttackContext:
    spec = ImageSpec(3, 32, 32, CIFAR_MEAN, CIFAR_STD)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    return AttackContext(
        train=Samples(images, np.arange(6), "vision"), proxy=Samples(images[:0], np.zeros(0), "vision"),
        num_classes=10, new_model=lambda: bb.create_model("preact_resnet18", 10, image=spec),
        trainer=TrainConfig(), model_cfg=VisionModelConfig(name="preact_resnet18"),
    )


def synthetic_test(n: int = 12) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.arange(n) % 10


# -- item 1: every form loads, safely ---------------------------------------------------------------------
@pytest.mark.parametrize("form", FORMS)
def test_their_record_loads_in_every_bd_test_form(form: str, tmp_path: Path) -> None:
    images, labels = synthetic_test()
    record = write_record(tmp_path / "BackdoorBench", their_net(), (images, labels), target=2, form=form)
    moved = Path(shutil.move(str(record), str(tmp_path / "elsewhere")))  # their paths are relative to their root
    attack = bb.create_attack("external", path=str(moved / "attack_result.pt"))
    result = attack.run(ctx10())
    assert result.info["format"] == "backdoorbench" and result.info["bd_test"].startswith("used: 11 images")
    test = Samples(torch.zeros(20, 3, 32, 32, dtype=torch.uint8), np.zeros(20), "vision")
    triggered, index = attack.triggered_test(test)
    keep = np.flatnonzero(labels != 2)
    assert index.tolist() == keep.tolist() and triggered.labels.tolist() == labels[keep].tolist()
    expected = torch.from_numpy(np.stack([badnets(images[i]) for i in keep])).permute(0, 3, 1, 2)
    assert torch.equal(triggered.inputs, expected)  # pixel for pixel
    assert attack.target == 2 and attack.target_labels(triggered.labels).tolist() == [2] * len(keep)
    assert attack.triggered_source == "record"


def test_an_unsafe_global_is_named_alone(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    record = write_record(tmp_path / "BB", their_net(), synthetic_test(), target=0, form="v2_memory")
    obj = torch.load(record / "attack_result.pt", weights_only=False)
    obj["extra"] = Payload()
    torch.save(obj, record / "attack_result.pt", pickle_module=NUMPY1)
    with pytest.raises(ConfigError, match=r"cannot be loaded safely \(it needs posix.system\):") as err:
        bb.create_attack("external", path=str(record)).run(ctx10())
    assert "numpy" not in str(err.value).split(":")[1] and "PIL" not in str(err.value).split(":")[1]
    assert not marker.exists()


def test_a_bd_test_image_outside_the_record_or_missing_is_not_used(tmp_path: Path) -> None:
    record = write_record(tmp_path / "BB", their_net(), synthetic_test(), target=0, form="v2_files")
    obj = torch.load(record / "attack_result.pt", weights_only=False)
    entry = next(iter(obj["bd_test"]["bd_data_container"]["data_dict"].values()))
    entry["path"] = "./record/badnet_demo/bd_test_dataset/../../../../outside.png"
    torch.save(obj, record / "attack_result.pt")
    res = bb.create_attack("external", path=str(record)).run(ctx10())
    assert res.info["bd_test"].startswith("not used: bd_test image") and "outside the record folder" in res.info[
        "bd_test"]
    shutil.rmtree(record / "bd_test_dataset")
    entry["path"] = "./record/badnet_demo/bd_test_dataset/1/1.png"
    torch.save(obj, record / "attack_result.pt")
    attack = bb.create_attack("external", path=str(record))
    assert "not found: keep attack_result.pt" in attack.run(ctx10()).info["bd_test"]
    assert attack.triggered_source is None and attack.target is None  # the model loads; ASR is not measured


# -- item 2: the record's own bd_test gives BackdoorBench's ASR ------------------------------------------------
def test_record_bd_test_gives_backdoorbench_ba_asr_and_detector_metrics(tmp_path: Path) -> None:
    """BA / ASR of the run equal BackdoorBench's own evaluation of the same model on the same data: their test
    transform (Resize, ToTensor, Normalize with their CIFAR-10 statistics) over the clean test set, and over
    ``bd_test`` in its ``original_index_array`` order against each image's backdoor label; a detector scores
    the record's images as the triggered inputs."""
    if importlib.util.find_spec("foolbox") is None:
        pytest.skip("foolbox (cifar10_samples) missing")
    from torchvision import transforms

    from backdoorbench.config import DataConfig, to_dataclass
    from backdoorbench.data.split import threat_model_split

    overrides = ["data.test_fraction=0.5", "defense.num_copies=2", "defense.clean_size=4"]
    cfg = bb.compose(["attack=external", "defense=strip", "data=cifar10_samples", "model=preact_resnet18",
                      *overrides])
    test = threat_model_split(bb.create_dataset("cifar10_samples"), to_dataclass(DataConfig, cfg.data, "data"),
                              cfg.seed).test
    images, labels = test.inputs.permute(0, 2, 3, 1).numpy(), test.labels
    net = their_net()
    their_transform = transforms.Compose(
        [transforms.Resize((32, 32)), transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD)]
    )

    def their_preds(pils: list) -> np.ndarray:
        with torch.no_grad():
            return net(torch.stack([their_transform(p) for p in pils])).argmax(1).numpy()

    # the target: the class this (untrained) net gives most triggered images, so that ASR is not trivially 0
    target = int(np.bincount(their_preds([Image.fromarray(badnets(im)) for im in images])).argmax())
    record = write_record(tmp_path / "BackdoorBench", net, (images, labels), target, "v2_files")
    res = bb.run(attack="external", defense="strip", data="cifar10_samples", model="preact_resnet18",
                 overrides=[f"attack.path={record}", *overrides], out_dir=tmp_path / "run")

    state = torch.load(record / "attack_result.pt", weights_only=False)["bd_test"]
    entries = [state["bd_data_container"]["data_dict"][i] for i in state["original_index_array"]]
    bd_images = [Image.open(tmp_path / "BackdoorBench" / e["path"]).copy() for e in entries]
    asr = float(np.mean(their_preds(bd_images) == np.array([e["other_info"][0] for e in entries])))
    ba = float(np.mean(their_preds([Image.fromarray(im) for im in images]) == labels))
    assert 0.0 < asr and res.asr == pytest.approx(asr, abs=1e-12) and res.ba == pytest.approx(ba, abs=1e-12)
    assert res.run["triggered_test"] == "record" and res.run["target"] == target
    assert res.cache["info"]["bd_test"] == f"used: {len(entries)} images, v2 (image files)"
    m = res.metrics
    assert m["far"] is not None and m["auroc"] is not None and "rejection_rate" not in m
    rows = [r.split(",") for r in (tmp_path / "run" / "scores.csv").read_text().splitlines()[1:]]
    poisoned = [r for r in rows if r[0] == "poisoned"]
    assert [int(r[1]) for r in poisoned] == [int(i) for i in state["original_index_array"]]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["run"]["triggered_test"] == "record"


def test_a_given_trigger_wins_over_the_record(tmp_path: Path) -> None:
    record = write_record(tmp_path / "BB", their_net(), synthetic_test(), target=2, form="v2_memory")
    trigger = np.zeros((32, 32, 3), np.uint8)
    trigger[-3:, -3:] = 255
    Image.fromarray(trigger).save(tmp_path / "trigger.png")
    attack = bb.create_attack("external", path=str(record), trigger_image=str(tmp_path / "trigger.png"), target=5)
    assert attack.run(ctx10()).info["bd_test"] == "not used: attack.trigger_* was given"
    assert attack.triggered_source == "trigger" and attack.target == 5
    test = Samples(torch.zeros(10, 3, 32, 32, dtype=torch.uint8), np.arange(10), "vision")
    triggered, index = attack.triggered_test(test)
    assert index.tolist() == [i for i in range(10) if i != 5] and bool((triggered.inputs[:, :, -3:, -3:] == 255).all())
