"""KV caches of HF causal LMs across transformers versions, detected from the objects, not a version number.

transformers 5.24 renamed the ``forward`` keyword and the output field ``past_key_values`` to ``cache``;
the cache object itself changed layout in 4.56 (``layers`` of ``keys``/``values`` instead of the
``key_cache``/``value_cache`` lists). :class:`~backdoorbench.models.lm.CausalLM` reads the keyword from the
model's signature and uses these helpers for the rest.
"""

from __future__ import annotations

from typing import Any

import torch

#: keyword names of the KV cache in causal LMs' ``forward`` (and fields of their outputs), newest first
CACHE_KWARGS = ("cache", "past_key_values")


def output_cache(res: object) -> object:
    """The KV cache of a causal LM's output (``cache`` from transformers 5.24, ``past_key_values`` before)."""
    for name in CACHE_KWARGS:
        cache = getattr(res, name, None)
        if cache is not None:
            return cache
    raise RuntimeError(f"the LM output {type(res).__name__} holds no KV cache (looked for {', '.join(CACHE_KWARGS)})")


def cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(keys, values)`` ``[B, heads, T, head_dim]`` of an HF KV cache, whatever its layout: a
    ``DynamicCache`` with ``layers`` (transformers >= 4.56), with ``key_cache``/``value_cache`` lists (older),
    or the legacy tuple of ``(k, v)`` pairs."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(k, v) for k, v, *_ in cache]


def make_cache(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> object:
    """A ``DynamicCache`` holding ``layers`` (``ddp_cache_data`` where the constructor takes it, else the
    legacy-tuple converter of older transformers)."""
    import inspect

    from transformers import DynamicCache

    if "ddp_cache_data" in inspect.signature(DynamicCache.__init__).parameters:
        return DynamicCache(ddp_cache_data=layers)
    return DynamicCache.from_legacy_cache(tuple(layers))  # type: ignore[attr-defined]
