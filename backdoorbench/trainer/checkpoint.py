"""Checkpoints that cannot run code: safetensors for tensors, JSON for everything else, written atomically.

A pickle-based checkpoint (``torch.save`` / ``torch.load(weights_only=False)``, Lightning's default
``.ckpt``) runs whatever its author put in it when it is loaded, and checkpoints in this field are untrusted
by definition. Everything backdoorbench writes goes through this module instead:

* :func:`save_state_dict` / :func:`load_state_dict` -- a model's weights as a plain safetensors file
  (readable by any safetensors tool).
* :func:`save_tree` / :func:`load_tree` -- any nest of dicts, lists, tuples, tensors, numpy arrays and
  JSON scalars (optimizer and LR-scheduler states, RNG states, a whole Lightning checkpoint): the tensors
  go into the safetensors body, the rest into a JSON skeleton in the file's metadata. One file, so one
  rename (:func:`backdoorbench.store.atomic_path`) makes the write atomic.
* :class:`SafetensorsCheckpointIO` -- Lightning's checkpoint I/O on top of :func:`save_tree`, so that
  ``Trainer.save_checkpoint`` and ``Trainer.fit(ckpt_path=...)`` never pickle or unpickle
  (:func:`~backdoorbench.trainer.lit.make_trainer` installs it on every Trainer).
* :class:`ResumableCheckpoint` -- a callback that writes the whole training state after every epoch
  (weights, optimizer and scheduler states, loop counters, the module's own ``on_save_checkpoint`` extras)
  plus every RNG a continuation needs (torch CPU and CUDA, numpy's global state, Python's ``random``, and
  the generators of the training DataLoaders and their samplers). Resuming from it
  (``trainer.fit(..., ckpt_path=path)``) continues exactly as the uninterrupted run would have.
* :func:`torch_load_weights` -- ``torch.load(weights_only=True)`` for checkpoint files that others wrote,
  with an error that names the file when the restricted unpickler refuses it.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.plugins.io import CheckpointIO

from backdoorbench.config import ConfigError
from backdoorbench.store import atomic_path

FORMAT = "backdoorbench-tree/1"  # metadata["format"] of a save_tree file
STATE_DICT_FORMAT = "backdoorbench-state-dict/1"
_TAGS = ("$t", "$tuple", "$items", "$nd")


class CheckpointError(ConfigError):
    """A checkpoint file that cannot be read safely or does not fit; the message names the file and what to do."""


# -- atomic safetensors files ------------------------------------------------------------------------------
def _storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, one storage per tensor (safetensors refuses shared memory, e.g. tied weights)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in tensors.items():
        t = v.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        if t.numel():
            seen.add(ptr)
        out[k] = t
    return out


def _write_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(_storable(tensors), str(tmp), metadata=metadata)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as exc:  # safetensors raises its own SafetensorError, OSError, ...
        raise CheckpointError(
            f"checkpoint {path} is not a readable safetensors file ({type(exc).__name__}: {exc}); "
            "delete it to recompute it"
        ) from exc
    return tensors, meta


def save_state_dict(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a model's ``state_dict`` as a plain safetensors file, atomically."""
    _write_atomic(Path(path), dict(state), {"format": STATE_DICT_FORMAT, **(metadata or {})})


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file of tensors (ours or anyone's) onto the CPU; never runs code."""
    return _read(Path(path))[0]


# -- nested trees: tensors in safetensors, the rest in JSON ------------------------------------------------
def flatten(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split ``obj`` into ``{name: tensor}`` and a JSON-able skeleton that refers to the tensors by name."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(o: Any, path: str) -> Any:
        if isinstance(o, torch.Tensor):
            if path in tensors:
                raise ValueError(f"flatten: two tensors would share the name {path!r}")
            tensors[path] = o
            return {"$t": path}
        if isinstance(o, np.ndarray):
            wide = o.dtype.kind == "u" and o.dtype.itemsize < 8  # torch lacks most unsigned types
            tensors[path] = torch.from_numpy(np.ascontiguousarray(o, dtype=np.int64 if wide else o.dtype))
            return {"$nd": path, "dtype": o.dtype.str}
        if isinstance(o, np.generic):
            return o.item()
        if o is None or isinstance(o, bool | int | float | str):
            return o
        if isinstance(o, tuple):
            return {"$tuple": [walk(v, f"{path}/{i}") for i, v in enumerate(o)]}
        if isinstance(o, list):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(o)]
        if isinstance(o, dict):
            if all(isinstance(k, str) and k not in _TAGS for k in o):
                return {k: walk(v, f"{path}/{k}") for k, v in o.items()}
            for k in o:
                if not (k is None or isinstance(k, bool | int | float | str)):
                    raise TypeError(f"flatten: unsupported dict key {k!r} ({type(k).__name__}) at {path or '/'}")
            return {"$items": [[k, walk(v, f"{path}/{k}")] for k, v in o.items()]}
        raise TypeError(f"flatten: cannot store a {type(o).__name__} at {path or '/'} without pickle")

    return tensors, walk(obj, prefix)


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten`."""
    if isinstance(skeleton, list):
        return [unflatten(v, tensors) for v in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if "$t" in skeleton:
        return tensors[skeleton["$t"]]
    if "$nd" in skeleton:
        return tensors[skeleton["$nd"]].numpy().astype(np.dtype(skeleton["dtype"]))
    if "$tuple" in skeleton:
        return tuple(unflatten(v, tensors) for v in skeleton["$tuple"])
    if "$items" in skeleton:
        return {k: unflatten(v, tensors) for k, v in skeleton["$items"]}
    return {k: unflatten(v, tensors) for k, v in skeleton.items()}


def save_tree(path: str | Path, obj: Any, kind: str = "tree") -> None:
    """Write ``obj`` (see :func:`flatten`) as one safetensors file with a JSON skeleton, atomically."""
    tensors, skeleton = flatten(obj)
    _write_atomic(Path(path), tensors, {"format": FORMAT, "kind": kind, "tree": json.dumps(skeleton)})


def load_tree(path: str | Path, kind: str | None = None) -> Any:
    """Read a :func:`save_tree` file; :class:`CheckpointError` (naming the file) if it is not one."""
    tensors, meta = _read(Path(path))
    if meta.get("format") != FORMAT or "tree" not in meta or (kind is not None and meta.get("kind") != kind):
        want = f"a {FORMAT} file" + (f" of kind {kind!r}" if kind else "")
        raise CheckpointError(f"checkpoint {path} is not {want} (metadata {meta.get('format')!r}); delete it")
    try:
        return unflatten(json.loads(meta["tree"]), tensors)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} is damaged ({type(exc).__name__}: {exc}); delete it") from exc


def checkpoint_progress(path: str | Path) -> str:
    """How far the Lightning checkpoint ``path`` got (``"epoch 3 done, step 120"``), from its JSON metadata only
    (no tensors are read); ``"progress unknown"`` when the file does not say."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tree = json.loads((f.metadata() or {}).get("tree", "{}"))
        return f"epoch {int(tree['epoch']) + 1} done, step {int(tree['global_step'])}"
    except Exception:  # unreadable or not a Lightning checkpoint: Lightning itself will say why when it loads
        return "progress unknown"


# -- RNG state ---------------------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """Every global RNG state: torch CPU, each CUDA device (where CUDA is up), numpy's legacy global, ``random``."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set the global RNGs to a :func:`capture_rng` state."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def loader_generators(loaders: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` objects a (nest of) DataLoader(s) draws from: the loader's own (worker base
    seeds), its sampler's and its batch sampler's sampler's (shuffling); distinct objects, in a fixed order."""
    found: list[torch.Generator] = []

    def loaders_in(obj: Any) -> Iterator[Any]:
        flat = getattr(obj, "flattened", None)  # Lightning's CombinedLoader
        if flat is not None:
            yield from flat
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from loaders_in(v)
        elif isinstance(obj, list | tuple):
            for v in obj:
                yield from loaders_in(v)
        else:
            yield obj

    for dl in loaders_in(loaders):
        batch_sampler = getattr(dl, "batch_sampler", None)
        for owner in (dl, getattr(dl, "sampler", None), getattr(batch_sampler, "sampler", None)):
            g = getattr(owner, "generator", None)
            if isinstance(g, torch.Generator) and all(g is not f for f in found):
                found.append(g)
    return found


# -- Lightning ---------------------------------------------------------------------------------------------
class SafetensorsCheckpointIO(CheckpointIO):
    """Lightning checkpoint I/O through :func:`save_tree` / :func:`load_tree`: no pickle either way."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        save_tree(Path(path), checkpoint, kind="lightning")

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        return load_tree(Path(path), kind="lightning")

    def remove_checkpoint(self, path: Any) -> None:
        Path(path).unlink(missing_ok=True)


class ResumableCheckpoint(Checkpoint):
    """Writes the full training state to ``path`` after every training epoch (atomically, through the
    Trainer's checkpoint I/O) together with the global RNG states and the states of the generators of
    ``loaders`` (the DataLoaders passed to ``fit``). ``trainer.fit(module, loaders, ckpt_path=path)`` then
    restores all of it before the first batch, so the continuation draws the same shuffles and
    augmentations as an uninterrupted run. Modules keep extra RNGs (e.g. a numpy ``Generator``) through
    their own ``on_save_checkpoint`` / ``on_load_checkpoint`` hooks.

    Being a :class:`~lightning.pytorch.callbacks.Checkpoint`, it runs after the other callbacks' and the
    module's ``on_train_epoch_end``, so nothing draws random numbers between the save and the next epoch."""

    def __init__(self, path: str | Path, loaders: Any = None) -> None:
        self.path = Path(path)
        self.loaders = loaders

    @property
    def state_key(self) -> str:
        return "ResumableCheckpoint"

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": capture_rng(), "loader_generators": [g.get_state() for g in loader_generators(self.loaders)]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        gens = loader_generators(self.loaders)
        saved = state_dict.get("loader_generators", [])
        if "rng" not in state_dict or len(saved) != len(gens):
            raise CheckpointError(
                f"checkpoint {self.path} does not fit this run ({len(saved)} loader generators saved, "
                f"{len(gens)} now); delete it to restart the stage"
            )
        restore_rng(state_dict["rng"])
        for g, s in zip(gens, saved, strict=True):
            g.set_state(s)


# -- files written by others -------------------------------------------------------------------------------
def torch_load_weights(path: str | Path, what: str = "checkpoint", convert_hint: str = "") -> Any:
    """``torch.load(path, weights_only=True)``: tensors, plain containers and numbers only; anything the
    restricted unpickler refuses becomes a :class:`CheckpointError` that names the file (``what``) and
    says how to convert it (``convert_hint``)."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (not a zip/pickle), EOFError, ...
        raise CheckpointError(
            f"{what} {path} cannot be loaded safely (torch.load with weights_only=True refused it: {_reason(exc)}); "
            f"convert it to safetensors{', ' + convert_hint if convert_hint else ''}, and only if you trust it"
        ) from exc


def _reason(exc: Exception) -> str:
    """The informative part of torch's weights-only refusal (its message is a page long)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"it needs {found.group(1)}, which is code, not data"
    found = re.search(r"Unsupported operand (\d+)", text)
    if found:
        return f"not a pickle torch can read (operand {found.group(1)})"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[0][:200] if lines else "") or type(exc).__name__
