"""DAN's scoring cost against plain inference on the same inputs, in one run.

    python benchmarks/dan_overhead.py [--n 1000] [--repeats 3] [--model PATH_OR_NAME]

Fits DAN on clean data with the (untrained-head) embedded MiniLM, then times, alternately and
``--repeats`` times each, (a) plain batched inference (logits only) and (b) DAN's
``score_and_classify`` (logits + per-layer features + Mahalanobis scores) over the same inputs, and
prints the median seconds and the ratio DAN / plain (target ≤ 1.10). Timing is only meaningful on an
otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("BACKDOORBENCH_PROGRESS", "0")


def main() -> None:
    import numpy as np
    import torch

    from backdoorbench.data.text import load_rotten_tomatoes
    from backdoorbench.defenses.detectors.dan import DAN, DANConfig
    from backdoorbench.models.text import TextModelConfig, create_hf, create_minilm

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1000, help="inputs to score")
    p.add_argument("--fit", type=int, default=500, help="clean samples to fit DAN")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--model", default=None, help="HF name or path (default: embedded MiniLM)")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    data = load_rotten_tomatoes().train
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(data))
    fit_set, inputs = data.subset(perm[: a.fit]), data.subset(perm[a.fit : a.fit + a.n]).inputs
    cfg = TextModelConfig(name=a.model or "minilm", max_length=64)
    model = create_hf(cfg, 2) if a.model else create_minilm(cfg, 2)
    model.eval()
    dan = DAN(DANConfig(batch_size=a.batch_size), seed=0).fit(model, fit_set)

    def plain() -> None:
        model.predict(inputs, a.batch_size)

    def scored() -> None:
        dan.score_and_classify(inputs)

    plain()  # warm-up (allocator, tokenizer caches)
    t_plain, t_dan = [], []
    for _ in range(a.repeats):
        for fn, acc in ((plain, t_plain), (scored, t_dan)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    mp, md = statistics.median(t_plain), statistics.median(t_dan)
    print(
        f"inputs: {len(inputs)}, batch size {a.batch_size}, torch threads {torch.get_num_threads()}, "
        f"device {model.device}"
    )
    print(f"plain inference : {mp:.3f} s median of {a.repeats} ({len(inputs) / mp:.1f} inputs/s)")
    print(f"DAN scoring     : {md:.3f} s median of {a.repeats} ({len(inputs) / md:.1f} inputs/s)")
    print(f"ratio DAN/plain : {md / mp:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
