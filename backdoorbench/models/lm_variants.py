"""Shared-prefix scoring for ONION's one-word deletions: :func:`mean_nll_variants`, the body of
:meth:`backdoorbench.models.lm.CausalLM.mean_nll_variants` (a variant reuses its base's key/value cache for the
tokens they share)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from backdoorbench.models._kvcache import cache_layers, make_cache, output_cache

if TYPE_CHECKING:
    from backdoorbench.models.lm import CausalLM


@torch.no_grad()
def mean_nll_variants(
    lm: CausalLM, bases: Sequence[str], variants: Sequence[Sequence[str]], batch_size: int = 32
) -> list[np.ndarray]:
    """Mean token NLL of every base text and of each of its variants: ``[base, *variants[k]]`` per base.

    Equal to :meth:`CausalLM.mean_nll` of the same texts, but a variant that shares its first ``P`` tokens with
    its base reuses the base's key/value cache for them: the bases go through the LM once (batched),
    and each variant only feeds the tokens after the shared prefix (batched across bases, prefixes
    padded and masked, positions continued from ``P``). The NLL of the shared targets comes from the
    base pass, and the first token after the prefix is scored from the base's logits at ``P − 1``.
    For ONION's one-word deletions this halves the tokens sent through the LM, and deleting the last
    word costs no pass at all. Variants sharing no token with their base (no start token) are scored
    by :meth:`CausalLM.mean_nll`. ``forward_count`` counts the base passes and the variant suffix passes.
    """
    if len(bases) != len(variants):
        raise ValueError(f"{len(bases)} bases but {len(variants)} variant lists")
    cache_kwarg = lm.cache_kwarg
    if cache_kwarg is None:  # e.g. a hand-made LM without a KV cache: every text is scored whole
        lm._warn_no_cache()
        flat = lm.mean_nll([t for base, vs in zip(bases, variants) for t in (base, *vs)], batch_size)
        cuts = np.cumsum([1 + len(vs) for vs in variants])[:-1]
        return list(np.split(flat, cuts)) if len(bases) else []
    base_ids = lm.encode(bases)
    var_ids = [lm.encode(list(v)) for v in variants]
    # per variant: (base index, variant index, shared prefix length P)
    jobs: list[tuple[int, int, int]] = []
    fallback: list[tuple[int, int, int]] = []  # the same triples, without a shared prefix
    for b, (base, vs) in enumerate(zip(base_ids, var_ids)):
        for k, v in enumerate(vs):
            p = 0
            for x, y in zip(base, v):
                if x != y:
                    break
                p += 1
            (jobs if p >= 1 else fallback).append((b, k, p))
    out = [np.full(1 + len(vs), np.nan, dtype=np.float64) for vs in var_ids]
    device = lm.device
    first_nll: dict[tuple[int, int], float] = {}  # NLL of variant[P] given the shared prefix
    needs_first: dict[int, list[tuple[int, int]]] = {}
    for b, k, p in jobs:
        if p < len(var_ids[b][k]):
            needs_first.setdefault(b, []).append((k, p))
    # 1. bases: per-token NLL (prefix sums), first-token NLLs of the variants, and the KV cache
    width_all = max((len(s) for s in base_ids), default=0)
    prefix_sum: list[np.ndarray] = [np.zeros(1)] * len(base_ids)
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    for idx in lm._batches(base_ids, batch_size):
        seqs = [base_ids[i] for i in idx]
        input_ids, mask = lm._pad(seqs)
        input_ids, mask = input_ids.to(device), mask.to(device)
        lm.forward_count += len(seqs)
        res = lm.model(input_ids=input_ids, attention_mask=mask, use_cache=True)
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
        for (k_all, v_all), (keys, values) in zip(kv, layers):
            k_all[rows, :, : keys.shape[2]] = keys
            v_all[rows, :, : values.shape[2]] = values
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
                base_nll = token_nll[row, : n - 1]
                prefix_sum[b] = np.concatenate([[0.0, 0.0], np.cumsum(base_nll)])  # [P] = sum of targets 1..P-1
                out[b][0] = base_nll.mean()
            else:
                prefix_sum[b] = np.zeros(n + 1)
    # 2. variants: only the tokens after the shared prefix go through the LM
    suffix_sum: dict[tuple[int, int], float] = {}
    feed = [(b, k, p) for b, k, p in jobs if len(var_ids[b][k]) - p >= 2]
    if feed:
        assert kv is not None
        fed_lengths = [len(var_ids[b][k]) - 1 - p for b, k, p in feed]  # suffix without its last token
        for idx in lm._batches([[0] * n for n in fed_lengths], batch_size):
            group = [feed[i] for i in idx]
            pmax = max(p for _, _, p in group)
            fed = [var_ids[b][k][p:-1] for b, k, p in group]  # inputs; targets are var[p+1:]
            smax = max(len(f) for f in fed)
            input_ids = torch.full((len(group), smax), lm.pad_id, dtype=torch.long)
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
            lm.forward_count += len(group)
            logits = lm.model(
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
        for (b, k, _), value in zip(fallback, lm.mean_nll(texts, batch_size)):
            out[b][1 + k] = value
    return out
