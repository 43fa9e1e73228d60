"""The text side of the modality interface: a :class:`TextClassifier` is any HuggingFace sequence classifier
plus its tokenizer. Texts travel as lists of ``str``; ``collate`` tokenises them (padding, truncation to
``max_length``); ``forward_features`` returns the logits and every transformer layer's hidden states (not the
embeddings), pooled by ``[CLS]`` or the masked mean, from one pass. Text attacks and defenses that need the
word embeddings or the tokenizer (RIPPLES, EP, RAP, ...) use its ``word_embeddings`` / ``token_ids`` /
``tokenizer``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from backdoorbench.modality.base import Batch, BatchTable, Classifier

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["POOLINGS", "TextClassifier", "TokenTable"]

POOLINGS = ("cls", "mean", "none")


class TextClassifier(Classifier):
    """An HF sequence classifier plus its tokenizer."""

    modality = "text"

    def __init__(self, hf_model: nn.Module, tokenizer: Any, max_length: int = 64) -> None:
        hf = cast("PreTrainedModel", hf_model)  # an HF model: one with a ``config`` (wrap_hf checks it)
        if hf.config.num_labels is None:  # (int(None) raised this TypeError before, less clearly)
            raise TypeError(f"{type(hf_model).__name__} has no labels: its config.num_labels is None")
        super().__init__(int(hf.config.num_labels))
        self.hf = hf
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.source = ""

    def collate(self, inputs: Sequence[str]) -> Batch:  # type: ignore[override]  # a text model takes texts
        enc = self.tokenizer(
            list(inputs), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def encode(self, inputs: Sequence[str]) -> list[dict[str, list[int]]]:  # type: ignore[override]  # texts
        """Every text tokenised once (truncated to ``max_length``, not padded): ``collate_encoded`` pads a batch."""
        enc = self.tokenizer(list(inputs), padding=False, truncation=True, max_length=self.max_length)
        keys = [k for k in enc if k in ("input_ids", "attention_mask", "token_type_ids")]  # collate's order
        return [{k: enc[k][i] for k in keys} for i in range(len(inputs))]

    def collate_encoded(self, encoded: Sequence[dict[str, list[int]]]) -> Batch:
        """Pad a batch of :meth:`encode` items to its longest sequence, as the tokenizer pads in :meth:`collate`
        (``pad_token_id`` for the ids, 0 for the mask and the token types, on the tokenizer's padding side)."""
        width = max(len(e["input_ids"]) for e in encoded)
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        pads = {"input_ids": self.tokenizer.pad_token_id, "attention_mask": 0,
                "token_type_ids": self.tokenizer.pad_token_type_id}
        out: Batch = {}
        for key in encoded[0]:
            t = torch.full((len(encoded), width), int(pads[key]), dtype=torch.long)
            for row, e in enumerate(encoded):
                seq = torch.tensor(e[key], dtype=torch.long)
                if left:
                    t[row, width - len(seq) :] = seq
                else:
                    t[row, : len(seq)] = seq
            out[key] = t
        return out

    def batch_table(self, inputs: Sequence[str]) -> TokenTable:  # type: ignore[override]
        """Every text tokenised once (:meth:`encode`) into flat id arrays: a batch is one gather
        (:class:`TokenTable`)."""
        return TokenTable(self, self.encode(inputs))

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.hf(**batch).logits

    def forward_features(self, batch: Batch, pooling: str = "cls") -> tuple[torch.Tensor, list[torch.Tensor]]:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        out = self.hf(**batch, output_hidden_states=True)
        hidden = out.hidden_states[1:]  # every transformer layer, not the embeddings
        if pooling == "none":  # raw hidden states [B, T, D] (NAD's token-wise attention maps)
            return out.logits, list(hidden)
        if pooling == "cls":
            feats = [h[:, 0] for h in hidden]
        else:
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden[0].dtype)
            denom = mask.sum(1).clamp(min=1.0)
            feats = [(h * mask).sum(1) / denom for h in hidden]
        return out.logits, feats

    def layer_names(self) -> list[str]:
        return [f"layer{i + 1}" for i in range(int(self.hf.config.num_hidden_layers))]

    @property
    def word_embeddings(self) -> nn.Embedding:
        return cast(nn.Embedding, self.hf.get_input_embeddings())  # a text model's: an nn.Embedding

    def token_ids(self, word: str) -> list[int]:
        """Word-piece ids of ``word`` (without special tokens)."""
        return list(self.tokenizer(word, add_special_tokens=False)["input_ids"])


class TokenTable(BatchTable):
    """Tokenised texts kept as one flat id tensor per key with each text's start and length; :meth:`take` pads the
    rows of a batch to their longest with one gather: the very tensors :meth:`TextClassifier.collate_encoded` (and
    so :meth:`TextClassifier.collate`) gives for them, without a Python loop over the batch's texts."""

    def __init__(self, model: TextClassifier, encoded: Sequence[dict[str, list[int]]]) -> None:
        super().__init__(None, encoded)  # no model: the ids and the padding values are all a batch needs
        self.keys = list(encoded[0]) if len(encoded) else ["input_ids", "attention_mask"]
        self.lengths = torch.tensor([len(e["input_ids"]) for e in encoded], dtype=torch.long)
        self.starts = torch.cumsum(self.lengths, 0) - self.lengths
        self.flat = {k: torch.tensor([t for e in encoded for t in e[k]], dtype=torch.long) for k in self.keys}
        tok = model.tokenizer
        self.pads = {"input_ids": tok.pad_token_id, "attention_mask": 0, "token_type_ids": tok.pad_token_type_id}
        self.left = getattr(tok, "padding_side", "right") == "left"

    def take(self, index: torch.Tensor) -> Batch:
        lengths = self.lengths[index]
        width = int(lengths.max()) if len(lengths) else 0
        cols = torch.arange(width)
        # position j of row i holds token j (right padding) or j - (width - len) (left padding), when in range
        offset = cols[None, :] - (width - lengths[:, None] if self.left else 0)
        valid = (offset >= 0) & (offset < lengths[:, None])
        src = (self.starts[index][:, None] + offset)[valid]
        out: Batch = {}
        for key in self.keys:
            t = torch.full((len(index), width), int(self.pads[key]), dtype=torch.long)
            t[valid] = self.flat[key][src]
            out[key] = t
        return out
