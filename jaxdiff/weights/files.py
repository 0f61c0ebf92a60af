"""Reading and writing weight files: safetensors (sharded or not); pickle only on request.

Writes are atomic: everything goes to a temporary sibling directory that is renamed
into place at the end, so an interrupted save never leaves a half-written checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from typing import Dict, Mapping, Optional

import jax
import numpy as np

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


class PickleRefusedError(ValueError):
    """A checkpoint has only pickle-based weights and allow_pickle was not given."""


def to_device(tree):
    """Host (numpy) weights -> device arrays of JAX's dtypes (float64 -> float32 without x64),
    as one transfer. Not ``jax.tree.map(jnp.asarray, tree)``: that stages every array through
    a program compiled for its shape, ~80 small compiles for even the embedded model."""
    return jax.device_put(tree)


def find_weights(folder: str, stem: str, variant: Optional[str] = None,
                 allow_pickle: bool = False) -> str:
    """Locates ``<stem>[.<variant>].safetensors`` (or its ``.index.json``) in ``folder``."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: folder not found; is this a diffusers-layout "
                                "checkpoint directory?")
    name = f"{stem}.{variant}" if variant else stem
    for candidate in (f"{name}.safetensors", f"{name}.safetensors.index.json"):
        path = os.path.join(folder, candidate)
        if os.path.exists(path):
            return path
    pickles = [f for f in sorted(os.listdir(folder)) if f.endswith(PICKLE_SUFFIXES)]
    if pickles and not allow_pickle:
        raise PickleRefusedError(
            f"{os.path.join(folder, pickles[0])}: pickle-based weights can run arbitrary code "
            "when loaded; convert them to safetensors, or pass allow_pickle=True if you "
            "trust the file.")
    if pickles:
        return os.path.join(folder, pickles[0])
    raise FileNotFoundError(f"{folder}: no {name}.safetensors found; the checkpoint is "
                            "incomplete (re-download or re-export it).")


def read_tensors(path: str) -> Dict[str, np.ndarray]:
    """Reads a safetensors file, a sharded ``.index.json``, or (if allowed) a pickle."""
    if path.endswith(".index.json"):
        with open(path, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        out = {}
        for shard in shards:
            out.update(read_tensors(os.path.join(os.path.dirname(path), shard)))
        return out
    if path.endswith(PICKLE_SUFFIXES):
        return _read_pickle(path)
    from safetensors import safe_open
    try:
        # numpy, not flax: the flax reader stages every tensor through a program compiled
        # for its shape (bfloat16 comes back as ml_dtypes' bfloat16 either way).
        with safe_open(path, framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors file ({e}); the file is "
                         "corrupt or truncated — re-download or re-export it.") from None


class LazyTensors(Mapping):
    """key -> numpy array of a safetensors file, read from the memory-mapped file on access
    (``open_tensors``): a converter holds one tensor at a time, not a copy of the file."""

    def __init__(self, path: str):
        from safetensors import safe_open
        self.path = path
        try:
            self._file = safe_open(path, framework="numpy")
            self._keys = list(self._file.keys())
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{path}: not a readable safetensors file ({e}); the file is "
                             "corrupt or truncated — re-download or re-export it.") from None
        self._set = set(self._keys)

    def __getitem__(self, key):
        if key not in self._set:
            raise KeyError(key)
        try:
            return self._file.get_tensor(key)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{self.path}: tensor '{key}' cannot be read ({e}); the file is "
                             "corrupt or truncated — re-download or re-export it.") from None

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    def __contains__(self, key):
        return key in self._set


def open_tensors(path: str) -> Mapping:
    """``read_tensors``, lazily for a single safetensors file (``LazyTensors``); sharded
    indexes and allowed pickles are read whole."""
    if path.endswith(".safetensors"):
        return LazyTensors(path)
    return read_tensors(path)


def _read_pickle(path):
    try:
        import torch  # only for explicitly allowed legacy pickle checkpoints
    except ImportError:
        raise PickleRefusedError(f"{path}: reading pickle weights needs PyTorch; convert the "
                                 "file to safetensors instead.") from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    return {k: v.float().numpy() for k, v in state.items() if hasattr(v, "numpy")}


def weight_file(path: str, default_name: str, create: bool, what: str = "weights") -> str:
    """Resolves a file-or-directory argument to a ``.safetensors`` path.

    ``path`` is either the file itself or a directory holding ``default_name``; with
    ``create`` the needed directories are made.
    """
    if path.endswith(".safetensors") or (not create and os.path.isfile(path)):
        if create:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return path
    if create:
        os.makedirs(path, exist_ok=True)
    elif not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such {what} file or directory.")
    return os.path.join(path, default_name)


# numpy dtype -> safetensors dtype name (bfloat16 is ml_dtypes', as jax uses).
_SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
                       "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
                       "uint8": "U8", "bool": "BOOL"}


def write_tensors(path: str, tensors: Dict[str, np.ndarray]) -> None:
    """Writes ``tensors`` as one ``.safetensors`` file (PyTorch metadata, keys sorted),
    streaming each tensor's bytes to the file: no second copy of the weights is built in
    memory (safetensors' ``save_file`` serialises everything into one buffer first)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    keys = sorted(tensors)
    for key in keys:
        value = tensors[key]
        name = _SAFETENSORS_DTYPES.get(np.dtype(value.dtype).name)
        if name is None:
            raise ValueError(f"{path}: tensor '{key}' has dtype {value.dtype}, which "
                             "safetensors cannot store; cast it to float32 or float16.")
        size = int(np.prod(np.shape(value), dtype=np.int64)) * np.dtype(value.dtype).itemsize
        header[key] = {"dtype": name, "shape": [int(d) for d in np.shape(value)],
                       "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as save_file writes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key in keys:
            f.write(np.ascontiguousarray(tensors[key]).reshape(-1).view(np.uint8).data)


@contextlib.contextmanager
def atomic_directory(out_dir: str, overwrite: bool = True):
    """Yields a temporary directory that replaces ``out_dir`` only if the body succeeds."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir}: already exists; pass overwrite=True or choose "
                              "another output directory.")
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        yield tmp
        backup = None
        if os.path.exists(out_dir):
            backup = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rmdir(backup)
            os.rename(out_dir, backup)
        os.rename(tmp, out_dir)
        if backup:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_model_folder(out_dir: str, config: dict, weights_name: str,
                       tensors: Dict[str, np.ndarray], *, overwrite: bool = True) -> str:
    """Writes a diffusers-style model folder atomically (``atomic_directory``):
    ``config.json`` (``config`` with ``_diffusers_version``, keys sorted) and the
    ``weights_name`` safetensors file of ``tensors``. Returns ``out_dir``."""
    with atomic_directory(out_dir, overwrite) as tmp:
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(dict(config, _diffusers_version="0.42.1"), f, indent=2, sort_keys=True)
            f.write("\n")
        write_tensors(os.path.join(tmp, weights_name), tensors)
    return out_dir

