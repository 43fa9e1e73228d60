"""DBD's checkpoint formats (:mod:`backdoorbench.defenses.training.dbd`): a stage's weights, or a given
``defense.ssl_checkpoint``, loaded into the model from our safetensors files or from a torch / Lightning
checkpoint that ``torch.load(weights_only=True)`` accepts, converted to the classifier's ``state_dict``."""

from __future__ import annotations

from pathlib import Path

import torch

from backdoorbench.modality.vision import VisionClassifier
from backdoorbench.trainer.checkpoint import CheckpointError, load_state_dict, torch_load_weights

CONVERT_HINT = "as docs/defenses/dbd.md ('Checkpoint files') shows"


def load_model_state(model: VisionClassifier, path: Path, what: str) -> None:
    """Load model weights from a safetensors file (ours: the model's ``state_dict``), or from a
    ``.ckpt``/``.pt`` file that ``torch.load(weights_only=True)`` accepts (a Lightning checkpoint's
    ``model.*`` entries, or a plain state dict); never unpickles anything else. ``what`` names the file: a
    stage of the cache (ours: the error says to delete it), or the user's own ``defense.ssl_checkpoint``
    (never to be deleted: the error names the option instead)."""
    given = what.startswith("defense.")
    redo = (f"give {what} the stage1_ssl.safetensors of a DBD run with this model, or leave it unset to train "
            "stage 1") if given else "delete it to recompute it"
    if path.suffix == ".safetensors":
        try:
            state = load_state_dict(path)
        except CheckpointError as exc:
            if not given:
                raise
            cause = exc.__cause__ or exc
            raise CheckpointError(f"{what} {path} is not a readable safetensors file "
                                  f"({type(cause).__name__}: {cause}); {redo}") from exc
    else:
        obj = torch_load_weights(path, what, CONVERT_HINT)
        found = obj.get("state_dict", obj) if isinstance(obj, dict) else None
        if not isinstance(found, dict) or not all(isinstance(v, torch.Tensor) for v in found.values()):
            raise CheckpointError(f"{what} {path} holds no state dict of tensors; convert it {CONVERT_HINT}")
        state = found
    if any(k.startswith("model.") for k in state):  # a Lightning module's state: keep the classifier's
        state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith(("mean", "std"))]:
        raise CheckpointError(
            f"{what} {path} does not fit this model (missing {missing[:5]}, unexpected {unexpected[:5]}); {redo}"
        )
