"""Writes ``tests/data/dan_saved_v1``: a DAN saved by the implementation before the on-device quadratic-form
distance (commit 2f1dcc9: scikit-learn covariance, ``[N, C, D]`` einsum distance), and the scores it gave on
``probe_inputs()``. Kept as it was written; rerunning it with later code would only test that code against itself.

    python tests/data/make_dan_saved_v1.py
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from test_dan_device import FixedNet, fixed_data, probe_inputs  # noqa: E402

from backdoorbench.defenses.detectors.dan import DAN, DANConfig  # noqa: E402


def main() -> None:
    model = FixedNet()
    det = DAN(DANConfig(batch_size=16), seed=0).fit(model, fixed_data(120, seed=0))
    out = HERE / "dan_saved_v1"
    shutil.rmtree(out, ignore_errors=True)
    det.save(out)
    scores, preds = det.score_and_classify(probe_inputs())
    expected = {"scores": [float(s) for s in scores], "preds": [int(p) for p in preds],
                "threshold": float(det.threshold), "rejected": [bool(r) for r in det.predict(probe_inputs())]}
    (out / "expected_scores.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main()
