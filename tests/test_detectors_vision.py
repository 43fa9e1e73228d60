"""DAN and STRIP on images: the same detector classes as for text, through the vision modality interface."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from backdoorbench.data.base import Samples
from backdoorbench.defenses.detectors.dan import DAN, DANConfig
from backdoorbench.defenses.detectors.strip import STRIP, STRIPConfig
from backdoorbench.modality.vision import ImageSpec, VisionClassifier, random_crop_flip, to_float, to_uint8
from backdoorbench.registry import REGISTRY

SPEC = ImageSpec(channels=1, height=8, width=8, mean=(0.5,), std=(0.5,), flip=False)


class PatchNet(nn.Module):
    """Class = which half of the image is brighter, unless the bottom-right 2×2 patch is white: then class 1
    with a huge margin (a backdoor that survives any superimposition)."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Identity()
        self.stage2 = nn.AdaptiveAvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage1(x)
        pooled = self.stage2(x)  # [B, 1, 2, 2] quadrant means (normalised pixels)
        top, bottom = pooled[:, 0, 0].mean(1), pooled[:, 0, 1].mean(1)
        trigger = (x[:, 0, -2:, -2:] > 0.99).all(-1).all(-1).float()  # white patch (normalised 1.0)
        logits = torch.stack([4 * (top - bottom), 4 * (bottom - top)], dim=1)
        return logits + trigger[:, None] * torch.tensor([-50.0, 50.0])


def patch_model() -> VisionClassifier:
    return VisionClassifier(PatchNet(), 2, SPEC, stages=["stage1", "stage2"], augment=False)


def images(n: int, seed: int) -> Samples:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    x = torch.randint(0, 90, (n, 1, 8, 8), generator=g)
    x[labels == 0, :, :4] += 120  # class 0: brighter top half
    x[labels == 1, :, 4:] += 120
    return Samples(x.clamp(0, 255).to(torch.uint8), labels.numpy(), "vision")


def with_patch(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[:, :, -2:, -2:] = 255
    return x


def test_strip_is_one_plugin_for_both_modalities() -> None:
    entry = REGISTRY.get("defense", "strip")
    assert entry.supports("text") and entry.supports("vision")
    assert REGISTRY.get("defense", "dan").supports("vision")


def test_strip_superimposition_by_hand() -> None:
    det = STRIP(STRIPConfig(num_copies=3), seed=0)
    clean = Samples(torch.tensor([[[[200, 10]]], [[[100, 0]]]], dtype=torch.uint8), [0, 1], "vision")
    det.fit_perturbation(patch_model(), clean)
    x = torch.tensor([[[[100, 250]]]], dtype=torch.uint8)
    rng = np.random.default_rng(0)
    picks = np.random.default_rng(0).integers(2, size=3)
    copies = det.perturb(x, np.array([0]), rng)
    assert copies.shape == (3, 1, 1, 2) and copies.dtype == torch.uint8
    expected = {0: [255, 255], 1: [200, 250]}  # saturating sum (cv2.addWeighted(x, 1, clean, 1, 0))
    for copy, pick in zip(copies, picks):
        assert copy.flatten().tolist() == expected[int(pick)]
    avg = STRIP(STRIPConfig(num_copies=3, superimpose="average"), seed=0)
    avg.fit_perturbation(patch_model(), clean)
    copies = avg.perturb(x, np.array([0]), np.random.default_rng(0))
    halves = {0: [150, 130], 1: [100, 125]}
    for copy, pick in zip(copies, picks):
        assert copy.flatten().tolist() == halves[int(pick)]


def test_strip_images_default_copies_passes_and_ordering() -> None:
    model = patch_model()
    det = STRIP(STRIPConfig(clean_size=100, batch_size=16), seed=0).fit(model, images(100, 0))
    assert det.num_copies == 100  # the paper's N for images
    test = images(20, 1)
    model.reset_forward_count()
    s_clean, preds = det.score_and_classify(test.inputs)
    assert model.forward_count == 20 * 101
    assert np.array_equal(preds, model.predict(test.inputs))
    s_poison = det.score(with_patch(test.inputs))
    assert s_poison.min() > s_clean.max()  # the patch keeps control of every superimposed copy
    assert np.allclose(s_poison, 0.0, atol=1e-6)  # entropy ~0 under the backdoor


def test_dan_on_images_uses_stage_features() -> None:
    model = patch_model()
    clean = images(200, 2)
    det = DAN(DANConfig(clean_size=200), seed=0).fit(model, clean)
    assert len(det.gaussians) == 2  # one Gaussian per stage
    test = images(40, 3)
    model.reset_forward_count()
    scores, preds = det.score_and_classify(test.inputs)
    assert model.forward_count == 40 and np.array_equal(preds, model.predict(test.inputs))
    # features = stage outputs, global-average pooled: stage 1 = the normalised image's mean
    _, feats = model.forward_features(model.collate(test.inputs[:3]))
    assert [f.shape for f in feats] == [torch.Size([3, 1]), torch.Size([3, 1])]
    assert torch.allclose(feats[0][:, 0], ((to_float(test.inputs[:3]) - 0.5) / 0.5).mean(dim=(1, 2, 3)))
    assert np.isfinite(scores).all()


def test_vision_classifier_hooks_pooling_and_augmentation() -> None:
    model = patch_model()
    batch = model.collate(images(4, 4).inputs)
    logits, maps = model.forward_features(batch, pooling="none")
    assert torch.equal(logits, model(batch))
    assert maps[0].shape == (4, 1, 8, 8) and maps[1].shape == (4, 1, 2, 2)
    torch.manual_seed(0)
    x = torch.rand(6, 1, 8, 8)
    out = random_crop_flip(x, pad=2, flip=True)
    assert out.shape == x.shape and not torch.equal(out, x)
    assert torch.equal(random_crop_flip(x, pad=0, flip=False), x)
    assert torch.equal(to_uint8(to_float(images(2, 5).inputs)), images(2, 5).inputs)
    with pytest.raises(ValueError, match="not found"):
        VisionClassifier(PatchNet(), 2, SPEC, stages=["nope"])
