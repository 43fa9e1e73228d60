"""Image sets larger than memory: decoded once into a uint8 file, read per index, viewed by index.

:class:`ImageFile` is a decoded image set on disk: a NumPy ``.npy`` file holding ``uint8 [N, C, H, W]``,
written once (atomically) by :func:`decode_to_store` into the run's cache (``<cache>/images/<key>.npy``, the key
hashes the decoder settings and every source file's path, size and modification time), or into an anonymous
temporary file when the run has no cache. Rows are read with ``pread`` into the batch being built, so decoded
pixels live in the kernel's page cache, never in the process's own memory.

:class:`ImageArray` is what a vision ``Samples.inputs`` holds for such a set: the rows of a base (an
:class:`ImageFile`, or an in-memory uint8 tensor) that the view selects, plus an optional *patch* (the
poisoned inputs at some positions). ``select`` (subsets, splits) makes a new view sharing the base and the
patch; ``with_patch`` applies a poison delta per index; ``take`` / indexing returns a real ``uint8`` tensor of
just the rows asked for (``__getitems__`` gives a batch in one call, for loaders that fetch batches). Other
tensor uses (``torch.cat``, ``.float()``, ...) materialise the view's rows first: fine for the small sets
(test, defender data, poisoned rows), to be avoided for the training set.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from backdoorbench.errors import DataError

__all__ = ["STORE_VERSION", "ImageArray", "ImageFile", "as_image_array", "decode_to_store", "image_tensor"]

STORE_VERSION = 1  # bump when the store's layout or the decoders' output changes
_HASH_CHUNK_BYTES = 64 << 20


class ImageFile:
    """``uint8 [N, C, H, W]`` images in a ``.npy`` file (or an anonymous temporary file), read by row."""

    def __init__(self, path: Path | None, shape: tuple[int, ...], offset: int, handle: IO[bytes] | None = None) -> None:
        self.path, self.shape, self.offset = path, tuple(int(s) for s in shape), int(offset)
        self._handle = handle  # an anonymous temporary file (no path) keeps its handle
        self._fd: int | None = None
        self._pid = -1

    @classmethod
    def open(cls, path: Path) -> ImageFile:
        """Open a store written by :func:`decode_to_store`; a foreign or truncated file raises ``DataError``."""
        try:
            with open(path, "rb") as f:
                major, _ = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(f)
                offset = f.tell()
            ok = dtype == np.uint8 and not fortran and len(shape) == 4
            size = path.stat().st_size
        except (OSError, ValueError) as exc:
            msg = f"image store {path} is not readable ({exc}); delete it to decode the images again"
            raise DataError(msg) from exc
        if not ok or size != offset + int(np.prod(shape)):
            raise DataError(f"image store {path} is damaged or truncated; delete it to decode the images again")
        return cls(path, shape, offset)

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:]))

    def _fileno(self) -> int:
        if self._handle is not None:
            return self._handle.fileno()
        if self._fd is None or self._pid != os.getpid():  # a forked loader worker opens its own descriptor
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()  # type: ignore[arg-type]
        return self._fd

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The images at ``rows`` (any order, repeats allowed) as a new ``uint8`` array."""
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.uint8)
        fd, n = self._fileno(), self.row_bytes
        flat = out.reshape(len(rows), n)
        for k, r in enumerate(rows.tolist()):
            if os.preadv(fd, [flat[k]], self.offset + r * n) != n:
                raise DataError(f"image store {self.path}: short read at row {r}; delete it to decode again")
        return out

    def __getstate__(self) -> dict[str, Any]:
        if self.path is None:
            raise TypeError("an image store in an anonymous temporary file cannot be pickled (run with a cache)")
        return {"path": self.path, "shape": self.shape, "offset": self.offset}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["shape"], state["offset"])  # type: ignore[misc]

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass


class ImageArray:
    """A lazy ``uint8 [n, C, H, W]`` view: rows of a base, some replaced by a patch (see the module docstring)."""

    def __init__(
        self,
        base: torch.Tensor | ImageFile,
        rows: np.ndarray | None = None,
        patch: torch.Tensor | None = None,
        patch_of: np.ndarray | None = None,
    ) -> None:
        self.base = base
        self.rows = np.arange(base.shape[0], dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        self.patch = patch  # [P, C, H, W] uint8
        self.patch_of = patch_of  # per view position: the patch row, or -1 (None: no patch)

    # -- the tensor-like surface ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), *self.base.shape[1:]))

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def ndim(self) -> int:
        return 4

    def dim(self) -> int:
        return 4

    def size(self, d: int | None = None) -> Any:
        return self.shape if d is None else self.shape[d]

    def __repr__(self) -> str:
        where = self.base.path if isinstance(self.base, ImageFile) else "memory"
        patched = 0 if self.patch_of is None else int((self.patch_of >= 0).sum())
        return f"ImageArray(shape={tuple(self.shape)}, base={where}, patched={patched})"

    def _positions(self, key: Any) -> np.ndarray:
        if isinstance(key, slice):
            return np.arange(len(self))[key]
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        idx = np.asarray(key)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise IndexError(f"boolean index of shape {idx.shape} for {len(self)} images")
            return np.flatnonzero(idx)
        if idx.dtype.kind not in "iu":
            raise IndexError(f"ImageArray indices must be integers, slices or boolean masks, got {idx.dtype}")
        idx = idx.astype(np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} images")
        return np.where(idx < 0, idx + len(self), idx)

    def take(self, indices: Sequence[int] | np.ndarray | torch.Tensor | slice) -> torch.Tensor:
        """The images at ``indices`` (view positions) as one new ``uint8 [k, C, H, W]`` tensor."""
        pos = self._positions(indices)
        rows = self.rows[pos]
        if isinstance(self.base, ImageFile):
            out = torch.from_numpy(self.base.read(rows))
        else:
            out = self.base[torch.from_numpy(rows)]
        if self.patch_of is not None and len(pos):
            src = self.patch_of[pos]
            hit = np.flatnonzero(src >= 0)
            if len(hit):
                out[torch.from_numpy(hit)] = self.patch[torch.from_numpy(src[hit])]  # type: ignore[index]
        return out

    def __getitem__(self, key: Any) -> torch.Tensor:
        if isinstance(key, (int, np.integer)):
            return self.take([int(key)])[0]
        if isinstance(key, tuple):  # e.g. x[:, :, 0:3] or x[0, 2]: rows first, then the rest on the tensor
            if isinstance(key[0], (int, np.integer)):
                return self[key[0]][key[1:]]
            rest = (slice(None), *key[1:])  # (a name: mypy reads x[(a, *b)] as 3.11's x[a, *b])
            return self.take(key[0])[rest]
        return self.take(key)

    def __getitems__(self, indices: Sequence[int]) -> torch.Tensor:
        """A batch in one call (``torch.utils.data`` fetches batches this way from datasets that have it)."""
        return self.take(list(indices))

    def __iter__(self) -> Iterator[torch.Tensor]:
        step = max(1, _HASH_CHUNK_BYTES // max(1, int(np.prod(self.shape[1:]))))
        for start in range(0, len(self), step):
            yield from self.take(slice(start, start + step))

    def to_tensor(self) -> torch.Tensor:
        """Every image of the view as one in-memory tensor (only for small views)."""
        return self.take(slice(None))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self.to_tensor().numpy()
        return arr if dtype is None else arr.astype(dtype)

    @classmethod
    def __torch_function__(cls, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        from torch.utils._pytree import tree_map

        def real(a: Any) -> Any:
            return a.to_tensor() if isinstance(a, ImageArray) else a

        return func(*tree_map(real, args), **tree_map(real, kwargs or {}))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("base", "rows", "patch", "patch_of"):
            raise AttributeError(name)
        attr = getattr(torch.Tensor, name, None)
        if attr is None:
            raise AttributeError(f"'ImageArray' object has no attribute {name!r}")
        return getattr(self.to_tensor(), name)  # any other tensor method: on the materialised rows

    # -- views ---------------------------------------------------------------------------------------------
    def select(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> ImageArray:
        """The view of the images at ``indices``: shares the base and the patch, copies nothing but indices."""
        pos = self._positions(indices)
        patch_of = None if self.patch_of is None else self.patch_of[pos]
        return ImageArray(self.base, self.rows[pos], self.patch, patch_of)

    def with_patch(self, indices: np.ndarray, images: torch.Tensor) -> ImageArray:
        """This view with the images at ``indices`` replaced by ``images`` (a poison delta, applied per index)."""
        images = image_tensor(images)
        if len(indices) != len(images) or tuple(images.shape[1:]) != tuple(self.shape[1:]):
            raise ValueError(f"a patch of {tuple(images.shape)} for {len(indices)} positions of {tuple(self.shape)}")
        pos = self._positions(indices)
        if self.patch_of is None:
            patch, patch_of, first = images.contiguous(), np.full(len(self), -1, dtype=np.int64), 0
        else:  # earlier patch rows stay where they are not overwritten
            patch, patch_of, first = torch.cat([self.patch, images]), self.patch_of.copy(), len(self.patch)  # type: ignore[list-item,arg-type]
        patch_of[pos] = first + np.arange(len(pos))
        return ImageArray(self.base, self.rows, patch, patch_of)

    def digest_into(self, h: Any) -> None:
        """Feed the view's bytes to the hash ``h`` in chunks (the same bytes as the materialised tensor's)."""
        step = max(1, _HASH_CHUNK_BYTES // max(1, int(np.prod(self.shape[1:]))))
        for start in range(0, len(self), step):
            h.update(self.take(slice(start, start + step)).numpy().tobytes())


def as_image_array(images: torch.Tensor | ImageArray) -> ImageArray:
    """``images`` as an :class:`ImageArray` (an in-memory tensor is wrapped, not copied)."""
    return images if isinstance(images, ImageArray) else ImageArray(images)


def image_tensor(images: Any) -> Any:
    """``images`` as a real tensor (an :class:`ImageArray` is materialised); anything else is returned as is."""
    return images.to_tensor() if isinstance(images, ImageArray) else images


# -- writing a store -----------------------------------------------------------------------------------------
def store_key(settings: dict[str, Any], files: Sequence[Path]) -> str:
    """The store's name: a hash of the decoder ``settings`` and each file's path, size and modification time."""
    h = hashlib.sha256(json.dumps({"version": STORE_VERSION, **settings}, sort_keys=True, default=str).encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.resolve()}\x00{st.st_size}\x00{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def _write(f: IO[bytes], files: Sequence[Path], decode: Callable[[Path], np.ndarray], where: str) -> tuple[tuple, int]:
    first = decode(files[0])
    shape = (len(files), *first.shape)
    np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
    offset = f.tell()
    f.write(np.ascontiguousarray(first, dtype=np.uint8).tobytes())
    for path in files[1:]:
        img = decode(path)
        if img.shape != first.shape:
            raise DataError(
                f"{where}: images have different sizes {sorted({first.shape, img.shape})} ({path}); set a crop size"
            )
        f.write(np.ascontiguousarray(img, dtype=np.uint8).tobytes())
    return shape, offset


def decode_to_store(
    files: Sequence[Path], decode: Callable[[Path], np.ndarray], settings: dict[str, Any], where: str,
    folder: Path | None,
) -> ImageArray:
    """Decode ``files`` (``decode(path)`` → ``uint8 [C, H, W]``) once into a store and return its view.

    With a ``folder`` (the run's ``Runtime.cache_folder("images")``: ``<cache>/images``) the store is
    ``<folder>/<key>.npy`` (reused by later runs, written atomically); without one it is an anonymous temporary
    file that lives as long as the returned view."""
    from backdoorbench.store import atomic_path

    if not files:
        raise DataError(f"{where}: no images found")
    if folder is None:
        handle = tempfile.TemporaryFile()
        shape, offset = _write(handle, files, decode, where)
        handle.flush()
        return ImageArray(ImageFile(None, shape, offset, handle))
    path = Path(folder) / f"{store_key(settings, files)}.npy"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            _write(f, files, decode, where)
    return ImageArray(ImageFile.open(path))
