"""Each text detector's scoring cost against plain inference on the same inputs, in one run.

    python benchmarks/detector_costs.py [--n 200] [--fit 300] [--detectors dan,strip,rap,onion]

Fits every detector on clean Rotten Tomatoes samples with the embedded MiniLM (cost does not depend
on whether the model is backdoored), then times plain batched inference and each detector's
``score_and_classify`` over the same inputs, and prints the time ratio and the forward passes per input
(expected: DAN ≈ 1, STRIP ≈ N + 1, RAP ≈ 2, ONION ≈ 1 classifier pass + words + 1 LM passes). Timings
are only meaningful on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("BACKDOORBENCH_PROGRESS", "0")


def main() -> None:
    import numpy as np

    from backdoorbench.config import to_dataclass
    from backdoorbench.data.text import load_rotten_tomatoes
    from backdoorbench.models.text import TextModelConfig, create_minilm
    from backdoorbench.registry import REGISTRY

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=200, help="inputs to score")
    p.add_argument("--fit", type=int, default=300, help="clean samples to fit each detector")
    p.add_argument("--detectors", default="dan,strip,rap,onion")
    a = p.parse_args()

    data = load_rotten_tomatoes().train
    perm = np.random.default_rng(0).permutation(len(data))
    fit_set = data.subset(perm[: a.fit])
    inputs = data.subset(perm[a.fit : a.fit + a.n]).inputs
    model = create_minilm(TextModelConfig(max_length=64), 2).eval()
    words = np.mean([len(t.split()) for t in inputs])

    t0 = time.perf_counter()
    model.predict(inputs, 64)
    plain = time.perf_counter() - t0
    print(f"{len(inputs)} inputs ({words:.1f} words on average); plain inference {plain:.2f} s")
    print(
        f"{'detector':10s} {'fit s':>8s} {'score s':>9s} {'ratio':>8s} {'passes/input':>13s} {'LM passes/input':>16s}"
    )
    for name in a.detectors.split(","):
        entry = REGISTRY.get("defense", name)
        det = entry.obj(to_dataclass(entry.config, {"clean_size": a.fit}, "defense"), 0)
        t0 = time.perf_counter()
        det.fit(model, fit_set)
        fit_s = time.perf_counter() - t0
        model.reset_forward_count()
        lm0 = getattr(det, "lm_forward_count", 0)
        t0 = time.perf_counter()
        det.score_and_classify(inputs)
        score_s = time.perf_counter() - t0
        lm = (getattr(det, "lm_forward_count", 0) - lm0) / len(inputs)
        print(
            f"{name:10s} {fit_s:8.1f} {score_s:9.2f} {score_s / plain:8.2f} {model.forward_count / len(inputs):13.2f} "
            f"{lm:16.2f}"
        )


if __name__ == "__main__":
    main()
