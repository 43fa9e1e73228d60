"""The torchvision guard: torchvision (and what imports it) must import; the guard is idempotent and
a no-op where the real operators exist."""

from __future__ import annotations

import subprocess
import sys

import torch

from backdoorbench import _compat


def test_torchvision_and_dependents_import() -> None:
    import lightning  # noqa: F401
    import timm  # noqa: F401
    import torchvision

    assert torchvision.__version__
    assert _compat._has_op("nms")


def test_guard_is_idempotent() -> None:
    first = _compat.ensure_torchvision_importable()
    assert _compat.ensure_torchvision_importable() == first


def test_guard_is_noop_when_ops_exist() -> None:
    # In a fresh interpreter where the op already exists (we define it first, as a working build
    # would), the guard must not install anything.
    code = (
        "import torch\n"
        "lib = torch.library.Library('torchvision', 'DEF')\n"
        "lib.define('nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')\n"
        "from backdoorbench._compat import ensure_torchvision_importable\n"
        "assert ensure_torchvision_importable() is False\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fallback_nms_kernel() -> None:
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert _compat._nms_cpu(boxes, scores, 0.5).tolist() == [0, 2]
    assert _compat._nms_cpu(boxes, scores, 0.95).tolist() == [0, 1, 2]
    assert _compat._nms_cpu(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0


def test_guard_logs_once_at_debug_when_it_activates() -> None:
    """In a fresh interpreter: one DEBUG record when the fallback is installed (none on a second call), none
    where the real operators exist."""
    code = (
        "import logging, sys\n"
        "records = []\n"
        "class H(logging.Handler):\n"
        "    def emit(self, r): records.append(r)\n"
        "logging.getLogger('backdoorbench._compat').addHandler(H())\n"
        "logging.getLogger('backdoorbench._compat').setLevel(logging.DEBUG)\n"
        "if sys.argv[1] == 'real':\n"
        "    import torch\n"
        "    lib = torch.library.Library('torchvision', 'DEF')\n"
        "    lib.define('nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')\n"
        "from backdoorbench._compat import ensure_torchvision_importable\n"
        "patched = ensure_torchvision_importable()\n"
        "ensure_torchvision_importable()\n"
        "print(int(patched), len(records), ','.join(r.levelname for r in records))\n"
    )
    patched = _compat.ensure_torchvision_importable()
    out = subprocess.run([sys.executable, "-c", code, "guard"], check=True, capture_output=True, text=True).stdout
    assert out.split() == (["1", "1", "DEBUG"] if patched else ["0", "0"])
    out = subprocess.run([sys.executable, "-c", code, "real"], check=True, capture_output=True, text=True).stdout
    assert out.split() == ["0", "0"]
