"""Saved detectors: :meth:`Detector.save` writes a fitted detector to a folder, :func:`load_detector` puts it
back in front of the model it was fitted on.

A saved detector is two files, never a pickle:

* ``detector.safetensors`` — the tensors of the fitted state (the detector's own, under ``state.``, from
  :meth:`~backdoorbench.defenses.base.Detector.fitted_state`) and the clean calibration scores;
* ``detector.json`` — the registry name, the config, the seed, the threshold, the detector's non-tensor
  state, a format version, the library versions, the SHA-256 of the safetensors file, and the
  **fingerprint of the model's weights** (:func:`weights_fingerprint`).

Each file is written atomically with :func:`backdoorbench.store.atomic_path` (the safetensors
file first, the JSON last, so the JSON commits the pair); the JSON names the safetensors file's SHA-256,
so a half-replaced or tampered pair is refused on load rather than silently mixed.

The fingerprint is taken from the detector's model at save time. No built-in detector changes the model:
RAP trains its trigger rows outside the model and only hooks them into the embedding layer while it scores
(its tests check that every weight of the model is byte-identical after ``fit``), so the fingerprint is
that of the model as given to ``fit``, which is the model the user loads again.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from backdoorbench.modality.base import weights_fingerprint
from backdoorbench.store import atomic_path, atomic_write_text, file_digest

if TYPE_CHECKING:  # for type hints only: defenses/base.py imports this module (Detector.save), never the reverse
    from backdoorbench.defenses.base import Detector
    from backdoorbench.modality.base import Classifier

FORMAT_VERSION = 1
TENSORS_FILE = "detector.safetensors"
META_FILE = "detector.json"
STATE_PREFIX = "state."  # the detector's own tensors
CALIBRATION_KEY = "calibration_scores"


class DetectorLoadError(ValueError):
    """A saved detector cannot be loaded (missing or corrupt files, unknown name, other format version).

    A ``ValueError``, so the command line reports it as an expected error (one line, no traceback)."""


class ModelMismatchError(DetectorLoadError):
    """The model given to :func:`load_detector` is not the one the detector was fitted on."""


def _config_to_json(cfg: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return dataclasses.asdict(cfg)
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg or {})


def _registry_name(detector: Detector) -> str:
    from backdoorbench.registry import REGISTRY

    for entry in REGISTRY.entries("defense"):
        if entry.obj is type(detector):
            return entry.name
    raise ValueError(
        f"{type(detector).__name__} is not a registered defense: register it with @register_defense so that "
        "load_detector can rebuild it by name"
    )


def _versions() -> dict[str, str]:
    import safetensors

    import backdoorbench

    return {
        "backdoorbench": backdoorbench.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
    }


def save_detector(detector: Detector, folder: str | Path) -> Path:
    """Write a fitted detector to ``folder`` (created if needed); see the module docstring."""
    from safetensors.torch import save_file

    if detector.model is None or detector.threshold is None or detector.calibration_scores is None:
        raise RuntimeError(f"{type(detector).__name__}: call fit() before save()")
    name = _registry_name(detector)
    tensors, state_meta = detector.fitted_state()
    out: dict[str, torch.Tensor] = {
        CALIBRATION_KEY: torch.from_numpy(np.asarray(detector.calibration_scores, dtype=np.float64)),
    }
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{type(detector).__name__}.fitted_state: {key!r} is not a tensor")
        out[STATE_PREFIX + key] = value.detach().cpu().contiguous().clone()  # safetensors refuses shared memory
    model = detector.model
    meta = {
        "format_version": FORMAT_VERSION,
        "detector": name,
        "class": f"{type(detector).__module__}.{type(detector).__qualname__}",
        "seed": int(detector.seed),
        "config": _config_to_json(detector.cfg),
        "threshold": float(detector.threshold),
        "state": state_meta,
        "model": {
            "fingerprint": weights_fingerprint(model),
            "class": type(model).__name__,
            "modality": model.modality,
            "num_classes": int(model.num_classes),
        },
        "versions": _versions(),
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / TENSORS_FILE) as tmp:
        save_file(out, str(tmp))
    meta["tensors_sha256"] = file_digest(folder / TENSORS_FILE)
    text = json.dumps(meta, indent=2, allow_nan=False)
    atomic_write_text(folder / META_FILE, text + "\n")
    return folder


def read_meta(folder: str | Path) -> dict[str, Any]:
    """The ``detector.json`` of a saved detector, checked for format version (no model needed)."""
    folder = Path(folder)
    path = folder / META_FILE
    if not folder.is_dir():
        raise DetectorLoadError(f"no saved detector at {folder}: the folder does not exist")
    if not path.is_file():
        raise DetectorLoadError(f"no saved detector in {folder}: {META_FILE} is missing")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DetectorLoadError(
            f"the saved detector in {folder} is corrupt: {META_FILE} is not valid JSON ({exc})"
        ) from exc
    if not isinstance(meta, dict) or not {"detector", "config", "threshold", "model"} <= meta.keys():
        raise DetectorLoadError(f"the saved detector in {folder} is corrupt: {META_FILE} lacks required fields")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise DetectorLoadError(
            f"the detector in {folder} was saved in format version {version}; this backdoorbench "
            f"({_versions()['backdoorbench']}) reads version {FORMAT_VERSION}: refit it, or load it with the "
            f"backdoorbench version that saved it ({meta.get('versions', {}).get('backdoorbench', 'unknown')})"
        )
    return meta


def load_detector(folder: str | Path, model: Classifier) -> Detector:
    """Load a detector saved with :meth:`Detector.save <backdoorbench.defenses.base.Detector.save>` onto
    ``model``, which must have the weights it was fitted on (checked by fingerprint); the loaded detector
    scores, thresholds and rejects exactly as the saved one did.

    Raises :class:`DetectorLoadError` (a ``ValueError``) for a missing or corrupt folder, an unknown
    detector name or another format version, and :class:`ModelMismatchError` for another model.
    """
    from safetensors.torch import load_file

    from backdoorbench.config import component_config
    from backdoorbench.registry import REGISTRY, UnknownNameError

    folder = Path(folder)
    meta = read_meta(folder)
    try:
        entry = REGISTRY.get("defense", str(meta["detector"]))
    except UnknownNameError as exc:
        raise DetectorLoadError(
            f"the detector in {folder} is {meta['detector']!r}, which is not registered here "
            f"(install the plugin that provides it): {exc}"
        ) from None
    if not (isinstance(entry.obj, type) and entry.category == "detector"):  # the class's kind (registry.py)
        raise DetectorLoadError(f"the saved defense in {folder} ({entry.name!r}) is not a detector")

    expected = str(meta["model"].get("fingerprint", ""))
    actual = weights_fingerprint(model)
    if actual != expected:
        raise ModelMismatchError(
            f"the detector in {folder} was fitted on a model with weights fingerprint {expected}; the given "
            f"model has {actual}: load it onto the model it was fitted on, or refit"
        )

    tensors_path = folder / TENSORS_FILE
    if not tensors_path.is_file():
        raise DetectorLoadError(f"the saved detector in {folder} is incomplete: {TENSORS_FILE} is missing")
    if meta.get("tensors_sha256") != file_digest(tensors_path):
        raise DetectorLoadError(
            f"the saved detector in {folder} is corrupt: {TENSORS_FILE} does not match the checksum in {META_FILE}"
        )
    try:
        tensors = load_file(str(tensors_path))
    except Exception as exc:  # safetensors raises its own error type for malformed files
        raise DetectorLoadError(
            f"the saved detector in {folder} is corrupt: cannot read {TENSORS_FILE} ({exc})"
        ) from exc

    try:
        cfg = component_config(entry, meta["config"], "defense")
    except ValueError as exc:
        raise DetectorLoadError(f"the saved detector in {folder} has a config this version rejects: {exc}") from None
    det: Detector = entry.obj(cfg, seed=int(meta.get("seed", 0)))
    det.model = model
    model.eval()
    threshold = float(meta["threshold"])
    if not math.isfinite(threshold) or CALIBRATION_KEY not in tensors:
        raise DetectorLoadError(f"the saved detector in {folder} is corrupt: no finite threshold or calibration")
    det.threshold = threshold
    det.calibration_scores = tensors[CALIBRATION_KEY].numpy().astype(np.float64)
    state = {k[len(STATE_PREFIX) :]: v for k, v in tensors.items() if k.startswith(STATE_PREFIX)}
    try:
        det.load_fitted_state(state, meta.get("state") or {})
    except DetectorLoadError as exc:  # e.g. ONION's language model differs from the one it was fitted with
        raise type(exc)(f"cannot load the detector in {folder}: {exc}") from None
    except (KeyError, TypeError, IndexError) as exc:
        raise DetectorLoadError(
            f"the saved detector in {folder} is corrupt: its {entry.name} state is incomplete ({exc!r})"
        ) from None
    return det
