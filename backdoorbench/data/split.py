"""The threat-model split, done once per run from the seed.

From the dataset's labelled training pool (after holding out a test set when the source has none):

* ``holdout`` — clean training samples reserved for the defender (each defense takes what its
  ``defense.clean_size`` asks for, from the front of this reserve);
* ``proxy``   — the attacker's proxy data (used in the APMF setting);
* ``train``   — the task's training set (poisoned by the attacker in AFM, the user's clean
  fine-tuning data in APMF);
* ``test``    — only ever used to report metrics.

The split depends only on the data config and the seed, never on the attack or the defense, so every
defense is evaluated against the same cached victim.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from backdoorbench.config import ConfigError, DataConfig
from backdoorbench.data.base import DatasetBundle, Samples
from backdoorbench.seeds import stream

log = logging.getLogger(__name__)


@dataclass
class Splits:
    train: Samples
    proxy: Samples
    holdout: Samples
    test: Samples

    def sizes(self) -> dict[str, int]:
        return {
            "train": len(self.train),
            "proxy": len(self.proxy),
            "holdout": len(self.holdout),
            "test": len(self.test),
        }

    def defender_clean(self, n: int) -> Samples:
        """The defender's clean data: the first ``n`` samples of the reserve."""
        if len(self.holdout) == 0:
            raise ConfigError("the defender has no clean data: set data.holdout_size > 0")
        if n > len(self.holdout):
            log.warning("defense asks for %d clean samples, the reserve has %d; using all", n, len(self.holdout))
        return self.holdout.subset(np.arange(min(n, len(self.holdout))))


def threat_model_split(bundle: DatasetBundle, cfg: DataConfig, seed: int) -> Splits:
    rng = stream(seed, "split")
    pool = bundle.train
    if bundle.test is None:
        perm = rng.permutation(len(pool))
        n_test = int(round(cfg.test_fraction * len(pool)))
        test, pool = pool.subset(np.sort(perm[:n_test])), pool.subset(np.sort(perm[n_test:]))
    else:
        test = bundle.test
    if cfg.max_test is not None and len(test) > cfg.max_test:
        test = test.subset(np.sort(rng.permutation(len(test))[: cfg.max_test]))
    perm = rng.permutation(len(pool))
    n_hold = min(cfg.holdout_size, len(pool))
    n_proxy = min(cfg.proxy_size, len(pool) - n_hold)
    rest = perm[n_hold + n_proxy :]
    if cfg.max_train is not None:
        rest = rest[: cfg.max_train]
    if len(rest) == 0:
        raise ConfigError(
            f"no training data left: the pool has {len(pool)} samples, data.holdout_size={cfg.holdout_size} "
            f"and data.proxy_size={cfg.proxy_size} take them all"
        )
    if cfg.max_train is not None and len(rest) < cfg.max_train:
        log.warning("data.max_train=%d but only %d training samples are left", cfg.max_train, len(rest))
    return Splits(
        train=pool.subset(np.sort(rest)),
        proxy=pool.subset(np.sort(perm[n_hold : n_hold + n_proxy])),
        holdout=pool.subset(perm[:n_hold]),  # keep the random order: defenses take a prefix
        test=test,
    )
