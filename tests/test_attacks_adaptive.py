"""The DAN paper's adaptive attack (``attack.adaptive``): the feature-distance regulariser, hand-checked on tiny
features, and its use by BadNet-RW, AddSent and EP on a tiny random BERT."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_text_samples

from backdoorbench.attacks.base import AttackContext
from backdoorbench.attacks.text.adaptive import (
    AdaptivePoisonModule,
    clean_anchors,
    feature_distance,
    in_batch_regulariser,
)
from backdoorbench.attacks.text.addsent import AddSent, AddSentConfig
from backdoorbench.attacks.text.badnet_rw import BadNetRW, BadNetRWConfig
from backdoorbench.attacks.text.ep import EP, AdaptiveEmbeddingRowModule, EPConfig
from backdoorbench.data.base import Samples
from backdoorbench.trainer.lit import TrainConfig, make_loader

# two layers of 2-d features for a batch of four: row 0 poisoned, rows 1 and 3 clean of the target class
F1 = [[1.0, 2.0], [3.0, 4.0], [0.0, 0.0], [2.0, 2.0]]
F2 = [[0.0, 1.0], [1.0, 1.0], [1.0, 3.0], [1.0, -1.0]]
POISONED = [True, False, False, False]
CLEAN_TARGET = [False, True, False, True]


def test_in_batch_regulariser_by_hand() -> None:
    # layer 1: anchor = mean(rows 1, 3) = (2.5, 3); row 0: ((1 - 2.5)² + (2 - 3)²) / 2 = 1.625
    # layer 2: anchor = (1, 0);                    row 0: ((0 - 1)² + (1 - 0)²) / 2 = 1.0
    # R = (1.625 + 1.0) / 2
    f1, f2 = torch.tensor(F1, requires_grad=True), torch.tensor(F2, requires_grad=True)
    reg = in_batch_regulariser([f1, f2], torch.tensor(POISONED), torch.tensor(CLEAN_TARGET))
    assert float(reg) == pytest.approx(1.3125)
    reg.backward()
    # d/dx of ((x - a)² / 2) / 2 layers = (x - a) / 2: only the poisoned row moves; the anchors are detached
    assert torch.allclose(f1.grad, torch.tensor([[-0.75, -0.5], [0, 0], [0, 0], [0, 0]]))
    assert torch.allclose(f2.grad, torch.tensor([[-0.5, 0.5], [0, 0], [0, 0], [0, 0]]))


def test_regulariser_is_zero_without_poisoned_or_clean_target_rows() -> None:
    f1, f2 = torch.tensor(F1), torch.tensor(F2)
    none = torch.zeros(4, dtype=torch.bool)
    assert float(in_batch_regulariser([f1, f2], none, torch.tensor(CLEAN_TARGET))) == 0.0
    assert float(in_batch_regulariser([f1, f2], torch.tensor(POISONED), none)) == 0.0


def test_feature_distance_with_fixed_anchors_by_hand() -> None:
    # two poisoned rows, one layer of width 3, anchor (1, 1, 1): ((0+1+4)/3 + (1+1+1)/3) / 2 = (5/3 + 1) / 2
    feats = [torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])]
    assert float(feature_distance(feats, [torch.ones(3)])) == pytest.approx((5 / 3 + 1) / 2)
    with pytest.raises(ValueError, match="layers"):
        feature_distance(feats, [torch.ones(3), torch.ones(3)])


@pytest.mark.parametrize("cfg_cls", [BadNetRWConfig, AddSentConfig, EPConfig])
def test_adaptive_keys_are_validated(cfg_cls) -> None:
    assert cfg_cls().adaptive == 0.0  # off by default: the plain attack
    with pytest.raises(ValueError, match="attack.adaptive must be >= 0"):
        cfg_cls(adaptive=-1.0)
    with pytest.raises(ValueError, match="adaptive_pooling"):
        cfg_cls(adaptive=1.0, adaptive_pooling="max")


def _ctx(model, data: Samples) -> AttackContext:
    return AttackContext(train=data, proxy=data, num_classes=2, new_model=lambda: model,
                         trainer=TrainConfig(max_epochs=1, batch_size=8, lr=1e-3, accelerator="cpu"))


@pytest.mark.parametrize("attack_cls,cfg_cls", [(BadNetRW, BadNetRWConfig), (AddSent, AddSentConfig)])
def test_data_poisoning_loss_is_ce_plus_lambda_times_the_hand_computed_regulariser(
    tiny_text_model, attack_cls, cfg_cls
) -> None:
    data = tiny_text_samples(24)
    attack = attack_cls(cfg_cls(adaptive=2.5), seed=0)
    poisoned = attack.poison(data, 0.25, attack.rng(1))
    train = poisoned.materialize()
    module = AdaptivePoisonModule(tiny_text_model, TrainConfig(), 2.5, poisoned.is_poisoned(), attack.target, "cls")
    module.eval()  # no augmentation / accuracy tracking: the loss alone
    batch = next(iter(make_loader(tiny_text_model, train, 24, shuffle=False)))
    with torch.no_grad():
        logits, feats = tiny_text_model.forward_features(batch["inputs"], "cls")
        flags = poisoned.is_poisoned()
        clean_target = ~flags & (train.labels == attack.target)
        assert flags.any() and clean_target.any()
        reg = np.mean([
            np.mean(((f[flags].numpy() - f[clean_target].numpy().mean(0)) ** 2).mean(1)) for f in feats
        ])
        expected = float(F.cross_entropy(logits, batch["labels"])) + 2.5 * reg
        assert float(module.loss(batch)) == pytest.approx(expected, rel=1e-5)


def test_badnet_rw_adaptive_trains_through_the_regularised_module(tiny_text_model, monkeypatch) -> None:
    seen = []
    real = AdaptivePoisonModule.loss

    def spy(self, batch):
        seen.append(self.weight)
        return real(self, batch)

    monkeypatch.setattr(AdaptivePoisonModule, "loss", spy)
    data = tiny_text_samples(24)
    attack = BadNetRW(BadNetRWConfig(adaptive=0.5, epochs=1, batch_size=8), seed=0)
    attack.run(_ctx(tiny_text_model, data))
    assert seen and set(seen) == {0.5}  # every training step of the attacker went through the regulariser
    seen.clear()
    BadNetRW(BadNetRWConfig(epochs=1, batch_size=8), seed=0).run(_ctx(tiny_text_model, data))
    assert seen == []  # adaptive = 0: the plain attack


def test_ep_adaptive_anchors_are_the_clean_target_means_and_enter_the_loss(tiny_text_model) -> None:
    data = tiny_text_samples(24)
    attack = EP(EPConfig(adaptive=3.0, clean_finetune=False, epochs=1), seed=0)
    poisoned = attack.poison(data, 0.5, attack.rng(1))
    clean_target = data.subset(np.flatnonzero(data.labels == attack.target))
    anchors = clean_anchors(tiny_text_model, clean_target, "cls", batch_size=5)  # batches of unequal size
    with torch.no_grad():
        _, feats = tiny_text_model.forward_features(tiny_text_model.collate(clean_target.inputs), "cls")
    for a, f in zip(anchors, feats):
        assert torch.allclose(a, f.mean(0), atol=1e-5)

    ids = attack.token_ids(tiny_text_model)
    module = AdaptiveEmbeddingRowModule(tiny_text_model, TrainConfig(lr=0.05), ids, "original", anchors, 3.0, "cls")
    module.log = lambda *a, **k: None  # outside a Trainer
    triggered = Samples(poisoned.inputs, poisoned.labels)
    batch = next(iter(make_loader(tiny_text_model, triggered, 64, shuffle=False)))
    with torch.no_grad():
        logits, pf = tiny_text_model.forward_features(batch["inputs"], "cls")
        expected = float(F.cross_entropy(logits, batch["labels"])) + 3.0 * float(
            np.mean([((p - a) ** 2).mean(1).mean() for p, a in zip(pf, anchors)]))
        assert float(module.training_step(batch, 0)) == pytest.approx(expected, rel=1e-5)


def test_ep_adaptive_run_moves_only_the_trigger_row(tiny_text_model) -> None:
    data = tiny_text_samples(24)
    before = {n: p.detach().clone() for n, p in tiny_text_model.named_parameters()}
    attack = EP(EPConfig(adaptive=1.0, clean_finetune=False, epochs=2, batch_size=8), seed=0)
    result = attack.run(_ctx(tiny_text_model, data))
    ids = attack.trigger_ids
    emb_name = next(n for n, p in result.model.named_parameters() if p is result.model.word_embeddings.weight)
    for n, p in result.model.named_parameters():
        if n == emb_name:
            changed = (p.detach() != before[n]).any(dim=1).nonzero().flatten().tolist()
            assert changed == ids
        else:
            assert torch.equal(p.detach(), before[n]), n
