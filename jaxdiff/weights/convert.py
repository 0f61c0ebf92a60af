"""PyTorch <-> Flax parameter names and layouts.

jaxdiff's module names mirror diffusers / transformers names, with list indices joined
by ``_`` (``down_blocks.0.resnets.1.conv1.weight`` <-> ``down_blocks_0/resnets_1/conv1/
kernel``). Conversion is driven by the *expected* Flax tree (from ``jax.eval_shape`` of the
model's init), so every missing, misshapen or unused tensor is reported by name.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, Mapping, Tuple

import jax
import numpy as np
from flax import traverse_util

# Flax scope names of the form "<list>_<i>" that are PyTorch ModuleList/Sequential items.
_LIST_NAMES = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers",
               "upsamplers", "transformer_blocks", "layers", "to_out", "net",
               "controlnet_down_blocks", "blocks", "body", "in_blocks", "out_blocks",
               "time_embed", "linears", "linears_text", "linears_image")
_LIST_RE = re.compile(rf"^({'|'.join(_LIST_NAMES)})_(\d+)$")

# Parameters PyTorch holds as bare ``nn.Parameter`` attributes (PixArt's, U-ViT's,
# GLIGEN's gates and null features): the Flax leaf keeps the PyTorch name instead of
# becoming ``weight``.
_RAW_LEAVES = ("scale_shift_table", "pos_embed", "alpha_attn", "alpha_dense",
               "null_positive_feature", "null_position_feature", "null_text_feature",
               "null_image_feature")

# Old diffusers VAE attention names, accepted on load.
_LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

# Buffers some checkpoints carry that are not parameters.
IGNORABLE = re.compile(r"(^|\.)position_ids$")


class WeightsError(ValueError):
    """A checkpoint's tensors do not match the model (missing, misshapen, unknown)."""


def torch_key(path: Tuple[str, ...]) -> str:
    """Flax param path -> PyTorch state-dict key."""
    parts = []
    for name in path[:-1]:
        m = _LIST_RE.match(name)
        parts.extend(m.groups() if m else (name,))
    leaf = path[-1]
    parts.append(leaf if leaf in _RAW_LEAVES else "bias" if leaf == "bias" else "weight")
    return ".".join(parts)


def to_flax_layout(leaf: str, value: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
    """PyTorch tensor -> the Flax layout of a param named ``leaf`` with ``shape``."""
    if leaf == "kernel" and value.ndim == 4 and len(shape) == 4:
        value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif leaf == "kernel" and len(shape) == 2:
        if value.ndim == 4 and value.shape[2:] == (1, 1):  # 1x1 conv stored for a linear
            value = value[:, :, 0, 0]
        value = value.T
    return value


def to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    return value


def _candidates(key: str, prefixes: Iterable[str]) -> Iterable[str]:
    for prefix in prefixes:
        if not key.startswith(prefix):
            continue
        stripped = key[len(prefix):]
        yield stripped
        for new, old in _LEGACY.items():
            if f".{new}." in f".{stripped}":
                yield f".{stripped}".replace(f".{new}.", f".{old}.", 1)[1:]


def torch_to_flax(state: Mapping[str, np.ndarray], expected, *, source: str,
                  strip_prefixes: Tuple[str, ...] = ("",), device: bool = False) -> Dict:
    """Converts a PyTorch state dict to the Flax params tree whose shapes are ``expected``.

    Args:
      state: key -> numpy array (any float dtype; cast to the expected dtype); may be a
        lazy mapping that reads each tensor on access (``files.open_tensors``).
      expected: pytree of ``jax.ShapeDtypeStruct`` (``jax.eval_shape`` of init params).
      source: file name for error messages.
      strip_prefixes: prefixes the expected keys may carry but the file may omit
        (e.g. ``"text_model."`` for transformers v5 files), tried in order.
      device: put each converted tensor on the default device as soon as it is made
        (``jax.device_put``: a transfer, no compiled program), so host memory holds one
        tensor's conversion at a time rather than a second copy of the whole model.
    Raises:
      WeightsError naming the tensor and file for missing, misshapen or unknown tensors.
    """
    flat = traverse_util.flatten_dict(expected)
    out, used = {}, set()
    prefixes = ("",) + tuple(p for p in strip_prefixes if p)
    for path, spec in flat.items():
        key = torch_key(path)
        found = next((k for k in _candidates(key, prefixes) if k in state), None)
        if found is None:
            raise WeightsError(f"{source}: tensor '{key}' is missing; the file does not match "
                               "the model config (wrong checkpoint or config.json?).")
        value = to_flax_layout(path[-1], np.asarray(state[found]), spec.shape)
        if tuple(value.shape) != tuple(spec.shape):
            raise WeightsError(f"{source}: tensor '{found}' has shape "
                               f"{tuple(np.asarray(state[found]).shape)} but the model config "
                               f"needs {_torch_shape(path[-1], spec.shape)}.")
        value = value.astype(spec.dtype)
        out[path] = jax.device_put(value) if device else value
        del value
        used.add(found)
    unknown = sorted(k for k in state if k not in used and not IGNORABLE.search(k))
    if unknown:
        more = f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise WeightsError(f"{source}: unknown tensor(s) {unknown[:3]}{more} not used by the "
                           "model; the config.json does not describe this checkpoint.")
    return traverse_util.unflatten_dict(out)


def flax_to_torch(params, prefix: str = "", dtype=np.float32) -> Dict[str, np.ndarray]:
    """Flax params tree -> PyTorch state dict (numpy, contiguous, ``dtype``: each tensor is
    cast as it is converted, so a float16 export never holds a float32 copy)."""
    out = {}
    for path, value in traverse_util.flatten_dict(params).items():
        value = to_torch_layout(path[-1], np.asarray(value, dtype=dtype))
        # reshape: ascontiguousarray makes a 0-d array (GLIGEN's gates) 1-d.
        out[prefix + torch_key(path)] = np.ascontiguousarray(value).reshape(value.shape)
    return out


def _torch_shape(leaf, shape):
    if leaf == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if leaf == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)
