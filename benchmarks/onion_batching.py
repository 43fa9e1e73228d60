"""ONION's batched perplexities against a one-sentence-at-a-time loop on the same LM, in one run.

    python benchmarks/onion_batching.py [--n 20] [--lm smollm2] [--dtype float32]

All three compute the perplexity of every sentence and of each of its one-word deletions (what ONION
needs):

* ``loop``: one sequence per LM forward pass, as the original ONION code does;
* ``batched``: all deletions of a group of sentences through the LM in padded batches;
* ``batched + shared prefix`` (what ONION runs): the sentences first, then each deletion feeds only
  its tokens after the deleted word on top of the sentence's cached keys/values.

Prints the times, the speed-ups against the loop (target ≥ 5×), tokens sent through the LM, and the
largest difference between the results.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("BACKDOORBENCH_PROGRESS", "0")


def main() -> None:
    import numpy as np
    import torch

    from backdoorbench.data.text import load_rotten_tomatoes
    from backdoorbench.defenses.detectors.onion import deletions
    from backdoorbench.models.lm import load_causal_lm

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=20, help="sentences")
    p.add_argument("--lm", default="smollm2")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", type=int, default=32)
    a = p.parse_args()

    texts = load_rotten_tomatoes().train.subset(np.arange(a.n)).inputs
    groups = [deletions(t.split()) for t in texts if len(t.split()) >= 2]
    variants = [v for g in groups for v in g]
    lm = load_causal_lm(a.lm, dtype=a.dtype)
    lm.perplexity(variants[:4], a.batch_size)  # warm-up
    tokens = sum(len(ids) for ids in lm.encode(variants))

    t0 = time.perf_counter()
    looped = np.concatenate([lm.mean_nll([v], 1) for v in variants])
    t_loop = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = lm.mean_nll(variants, a.batch_size)
    t_batch = time.perf_counter() - t0
    before = lm.forward_count
    t0 = time.perf_counter()
    shared = np.concatenate(lm.mean_nll_variants([g[0] for g in groups], [g[1:] for g in groups], a.batch_size))
    t_shared = time.perf_counter() - t0
    passes_shared = lm.forward_count - before

    def rel(x: np.ndarray) -> float:
        return float(np.nanmax(np.abs(np.exp(x) - np.exp(looped)) / np.exp(looped)))

    print(f"{len(groups)} sentences, {len(variants)} LM sequences (sentence + one-word deletions, {tokens} tokens)")
    print(f"LM {a.lm} ({a.dtype}), torch threads {torch.get_num_threads()}, batch size {a.batch_size}")
    print(f"one at a time          : {t_loop:7.2f} s ({len(variants) / t_loop:6.1f} sequences/s)")
    print(
        f"batched                : {t_batch:7.2f} s ({len(variants) / t_batch:6.1f} sequences/s)"
        f"  speed-up {t_loop / t_batch:.1f}x  max rel. ppl difference {rel(batched):.1e}"
    )
    print(
        f"batched + shared prefix: {t_shared:7.2f} s ({len(variants) / t_shared:6.1f} sequences/s)"
        f"  speed-up {t_loop / t_shared:.1f}x (target >= 5x)  max rel. ppl difference {rel(shared):.1e}"
        f"  ({passes_shared} partial sequences through the LM)"
    )


if __name__ == "__main__":
    main()
