"""Sample-level detection of the data-inspection defenses on one cached victim, without retraining.

    python benchmarks/inspection_detection.py [--attack badnets] [--defenses spectral,activation_clustering,...]
        [--cache DIR] [--out DIR] [OVERRIDE ...]

Runs each defense with ``defense.retrain=false`` (inspection only: the victim's features, no second training;
ABL is skipped, it trains its own model) against the same victim (trained once, then read from ``--cache``) and
prints, per defense: the victim's BA / ASR, the training samples removed, ``poison_recall``, ``clean_removed``
(count and share), ``sample_auroc`` and the defense's inspection time. Extra ``key=value`` overrides go to every
run (e.g. ``data.max_train=1000 trainer.max_epochs=5``). The times are only meaningful on an idle machine.
"""

from __future__ import annotations

import argparse
import time

FEATURE_DEFENSES = ("spectral", "activation_clustering", "spectre", "cube")


def main() -> None:
    import backdoorbench as bb

    parser = argparse.ArgumentParser()
    parser.add_argument("--attack", default="badnets")
    parser.add_argument("--defenses", default=",".join(FEATURE_DEFENSES))
    parser.add_argument("--cache", default="/tmp/bb-inspection-cache")
    parser.add_argument("--out", default="/tmp/bb-inspection-runs")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    print("defense | BA | ASR | removed | poison recall | clean removed | sample AUROC | inspect s | wall s")
    for name in args.defenses.split(","):
        t0 = time.perf_counter()
        res = bb.run(attack=args.attack, defense=name, out_dir=f"{args.out}/{args.attack}-{name}",
                     overrides=[f"cache.dir={args.cache}", "defense.retrain=false", *args.overrides])
        m = res.metrics
        nan = float("nan")
        print(f"{name} | {m['ba']:.3f} | {m['asr']:.3f} | {m['removed']} | {m.get('poison_recall', nan):.3f} | "
              f"{m.get('clean_removed')} ({m.get('clean_removed_fraction', nan):.3f}) | "
              f"{m.get('sample_auroc', nan):.3f} | {res.timing.get('defense_inspect', nan):.1f} | "
              f"{time.perf_counter() - t0:.1f}", flush=True)


if __name__ == "__main__":
    main()
