"""Clean models several attacks start from (``AttackContext.clean_model``): EP's and DFEP's clean fine-tuned model,
the label-consistent and Trojan surrogate. With a ``shared_dir`` each is trained once per (pre-trained weights,
data, schedule, seed) and loaded by the next attack that needs it, with the weights training gives."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_text_samples
from test_attacks_text_more import TINY_TRAIN, _model
from test_attacks_vision import TRAINER, tiny_ctx, tiny_images

from backdoorbench.attacks.base import AttackContext
from backdoorbench.attacks.text.dfep import DFEP, DFEPConfig
from backdoorbench.attacks.text.ep import EP, EPConfig
from backdoorbench.attacks.vision.common import train_surrogate
from backdoorbench.attacks.vision.label_consistent import LabelConsistent, LabelConsistentConfig
from backdoorbench.attacks.vision.trojan import Trojan, TrojanConfig
from backdoorbench.modality.base import Classifier
from backdoorbench.runtime import Runtime, run_scope

REUSED = "a checkpoint with the same inputs exists"


def _weights(model: Classifier) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: Classifier, b: Classifier) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _shared(folder: Path) -> AbstractContextManager[Runtime]:
    """A context whose shared folder (``AttackContext.shared_dir``) is ``folder``."""
    return run_scope(Runtime(shared_dir=folder))


def test_a_clean_model_is_trained_once_per_key(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "clean-models"
    train = tiny_images()
    ctx = tiny_ctx(train)
    assert ctx.shared_dir is None  # the default context: nothing shared
    caplog.set_level(logging.INFO, logger="backdoorbench.store")
    with _shared(folder):
        assert ctx.shared_dir == folder
        first = ctx.clean_model(train, TRAINER, 3, "clean", "clean_model")
        assert len(list(folder.glob("clean-*.safetensors"))) == 1 and REUSED not in caplog.text
        again = ctx.clean_model(train, TRAINER, 3, "clean", "clean_model")
    assert REUSED in caplog.text and _same(first, again) and again is not first and not again.training
    # loading gives what training gives: the same call without a shared folder trains the same weights
    assert _same(first, tiny_ctx(train).clean_model(train, TRAINER, 3, "clean", "clean_model"))
    # the seed, the data and the schedule are each part of the key
    with _shared(folder):
        other_seed = ctx.clean_model(train, TRAINER, 4, "clean", "clean_model")
        assert not _same(first, other_seed)
        ctx.clean_model(tiny_images(seed=1), TRAINER, 3, "clean", "clean_model")
        ctx.clean_model(train, replace(TRAINER, lr=0.01), 3, "clean", "clean_model")
    assert len(list(folder.glob("clean-*.safetensors"))) == 4


def test_label_consistent_and_trojan_share_their_surrogate(tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    train = tiny_images()
    ctx = tiny_ctx(train)
    caplog.set_level(logging.INFO, logger="backdoorbench.store")
    with _shared(tmp_path):
        lc = train_surrogate(LabelConsistent(LabelConsistentConfig(), seed=0), ctx, None)
        assert REUSED not in caplog.text
        trojan = train_surrogate(Trojan(TrojanConfig(), seed=0), ctx, None)
        assert REUSED in caplog.text and _same(lc, trojan)
        # another seed of the attack is another surrogate
        train_surrogate(Trojan(TrojanConfig(), seed=1), ctx, None)
    assert len(list(tmp_path.glob("clean-*.safetensors"))) == 2


def test_ep_and_dfep_start_from_the_same_clean_model(tiny_bert_dir: Path, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    data = tiny_text_samples(24)
    ctx = AttackContext(train=data, proxy=data, num_classes=2, new_model=lambda: _model(tiny_bert_dir),
                        trainer=TINY_TRAIN, seed=0)
    caplog.set_level(logging.INFO, logger="backdoorbench.store")
    with _shared(tmp_path):
        ep = EP(EPConfig(), seed=0).start_model(ctx, data)
        assert REUSED not in caplog.text
        dfep = DFEP(DFEPConfig(), seed=0).start_model(ctx, data)
        assert REUSED in caplog.text and _same(ep, dfep)
        # clean_finetune=false starts from the pre-trained model and trains nothing
        assert _same(EP(EPConfig(clean_finetune=False), seed=0).start_model(ctx, data), _model(tiny_bert_dir))
    assert len(list(tmp_path.glob("clean-*.safetensors"))) == 1
