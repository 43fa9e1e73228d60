"""Compatibility guards that must run before anything imports torchvision.

On machines where the installed torchvision wheel was compiled against a different torch build
(e.g. the CUDA torchvision 0.28.0 wheel next to the CPU torch 2.13.0 wheel), loading its C++
extension fails and ``import torchvision`` raises
``RuntimeError: operator torchvision::nms does not exist`` while registering fake kernels.
``lightning`` (through torchmetrics), ``timm`` and ``lightly`` all import torchvision, so the whole
stack fails with it. backdoorbench needs no detection ops, so when (and only when) the extension
cannot be loaded we define the two operator schemas torchvision registers fake kernels for, with a
pure-PyTorch CPU kernel for ``nms``. Where the real extension loads, this module does nothing.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os

import torch

log = logging.getLogger(__name__)

_STATE: dict[str, object] = {"patched": None}


def _extension_path() -> str | None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = list(spec.submodule_search_locations)[0]
    hits = sorted(glob.glob(os.path.join(root, "_C*.so")) + glob.glob(os.path.join(root, "_C*.pyd")))
    return hits[0] if hits else None


def _nms_cpu(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression in plain PyTorch (boxes as x1, y1, x2, y2)."""
    if dets.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=dets.device)
    order = scores.argsort(descending=True)
    x1, y1, x2, y2 = dets.unbind(1)
    areas = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    keep: list[int] = []
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    for pos in range(len(order)):
        if suppressed[pos]:
            continue
        i = int(order[pos])
        keep.append(i)
        rest = order[pos + 1 :]
        xx1 = torch.maximum(x1[i], x1[rest])
        yy1 = torch.maximum(y1[i], y1[rest])
        xx2 = torch.minimum(x2[i], x2[rest])
        yy2 = torch.minimum(y2[i], y2[rest])
        inter = (xx2 - xx1).clamp(min=0) * (yy2 - yy1).clamp(min=0)
        iou = inter / (areas[i] + areas[rest] - inter).clamp(min=1e-12)
        suppressed[pos + 1 :] |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.int64, device=dets.device)


def ensure_torchvision_importable() -> bool:
    """Make ``import torchvision`` work; return True if a fallback had to be installed.

    Idempotent. A no-op when torchvision is absent or its compiled ops load.
    """
    if _STATE["patched"] is not None:
        return bool(_STATE["patched"])
    patched = False
    if hasattr(torch.ops, "torchvision") and _has_op("nms"):
        _STATE["patched"] = False
        return False
    path = _extension_path()
    if path is not None:
        try:
            torch.ops.load_library(path)
        except (OSError, RuntimeError):
            pass
    if not _has_op("nms"):
        lib = torch.library.Library("torchvision", "DEF")  # noqa: TOR901 - kept alive below
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
        lib.impl("nms", _nms_cpu, "CPU")
        _STATE["library"] = lib
        patched = True
        log.debug(
            "torchvision's compiled ops do not load next to torch %s (%s): defined torchvision::nms/qnms with a "
            "pure-PyTorch CPU kernel so that torchvision imports",
            torch.__version__,
            path or "no extension found",
        )
    _STATE["patched"] = patched
    return patched


def _has_op(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True
