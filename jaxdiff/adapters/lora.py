"""LoRA: low-rank adapters kept as a separate pytree, merged functionally; their files.

An adapter pytree mirrors the pipeline params paths of the Dense layers it adapts::

    {"unet": {"down_blocks_0": {... "attn1": {"to_q": {"down": [in, r], "up": [r, out]}}}},
     "text_encoder": {"text_model": {... "q_proj": {"down": ..., "up": ...}}}}

and ``merge_lora(params, lora, scale)`` returns params whose kernels are
``kernel + scale * down @ up`` (``kernel`` is ``[in, out]``, the PyTorch weight transposed;
a convolution's ``down`` is ``[kh * kw * in, r]``: kohya LoCon, ``jaxdiff.adapters.kohya``).
As in peft, ``up`` starts at zero, so a fresh adapter leaves the model unchanged, and the
effective scale is ``lora_scale * alpha / rank``.

Files are diffusers/peft-style safetensors (``pytorch_lora_weights.safetensors``), read by
diffusers' ``StableDiffusionPipeline.load_lora_weights`` (needs ``peft`` installed):

* ``unet.<module>.lora_A.weight`` = ``down.T`` [r, in], ``unet.<module>.lora_B.weight`` =
  ``up.T`` [out, r]; text-encoder modules as
  ``text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight`` (SDXL's
  second encoder: ``text_encoder_2.``).
* header metadata ``lora_adapter_metadata``: JSON ``{"unet.r": r, "unet.lora_alpha": alpha,
  "unet.target_modules": [...], "text_encoder.r": ...}`` — the ``LoraConfig`` per component
  that diffusers >= 0.35 writes and reads. Without it diffusers assumes ``alpha = rank``.

Training them is ``jaxdiff.training.lora`` (loss) and ``jaxdiff.training.dreambooth``.

References:
  Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models".
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxdiff.weights import files
from jaxdiff.weights.convert import torch_key

DEFAULT_TARGETS = {
    "unet": ("to_q", "to_k", "to_v", "to_out_0"),
    "text_encoder": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "text_encoder_2": ("q_proj", "k_proj", "v_proj", "out_proj"),  # SDXL's second encoder
}
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
# peft (lora_A/B) and diffusers' training-script names (lora.down/up, lora_linear_layer.*).
_KEY_RE = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+?)\.(lora_A|lora_B|lora\.down|"
                     r"lora\.up|lora_linear_layer\.down|lora_linear_layer\.up)\.weight$")
_ALPHA_RE = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)\.alpha$")

Path = Tuple[str, ...]


# ------------------------------------------------------------------------------ adapters

def find_targets(params, targets: Sequence[str], scope: str = "unet") -> list:
    """Paths of the Dense layers of ``params[scope]`` whose module name is in ``targets``.

    Args:
      params: pipeline params ``{"text_encoder", "unet", "vae"}``.
      targets: module names as in the flax tree (``"to_q"``, ``"to_out_0"``, ``"q_proj"``).
      scope: top-level component to search.
    Returns:
      Sorted paths from the params root, e.g. ``("unet", "down_blocks_0", ..., "to_q")``.
    """
    if scope not in params:
        raise ValueError(f"{scope=} is not a component of params (have {sorted(params)}).")
    flat = traverse_util.flatten_dict(params[scope])
    paths = sorted((scope,) + p[:-1] for p, v in flat.items()
                   if p[-1] == "kernel" and len(v.shape) == 2 and p[-2] in set(targets))
    if not paths:
        raise ValueError(f"no Dense layer named any of {tuple(targets)} in params[{scope!r}].")
    return paths


def init_lora(params, rank: int, targets: Optional[Sequence[str]] = None, *,
              key: jax.Array, scope: str = "unet") -> dict:
    """Creates adapters for the ``targets`` layers of ``params[scope]``.

    ``down`` is drawn as peft's ``kaiming_uniform(a=sqrt(5))`` (U(-1/sqrt(in), 1/sqrt(in)))
    and ``up`` is zero, so the adapted model starts equal to the base model.

    Args:
      params: pipeline params ``{"text_encoder", "unet", "vae"}``.
      rank: adapter rank r >= 1.
      targets: module names; ``None`` means ``DEFAULT_TARGETS[scope]`` (attention q/k/v/out).
      key: PRNG key.
      scope: ``"unet"`` or ``"text_encoder"``.
    Returns:
      Nested dict ``{scope: {...: {"down": [in, r], "up": [r, out]}}}`` (float32). Adapters
      of two scopes combine with ``{**lora_unet, **lora_text}``.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank=}.")
    targets = DEFAULT_TARGETS.get(scope, ()) if targets is None else tuple(targets)
    flat = {}
    for i, path in enumerate(find_targets(params, targets, scope)):
        d_in, d_out = _get(params, path + ("kernel",)).shape
        bound = 1.0 / math.sqrt(d_in)
        flat[path + ("down",)] = jax.random.uniform(jax.random.fold_in(key, i), (d_in, rank),
                                                    jnp.float32, -bound, bound)
        flat[path + ("up",)] = jnp.zeros((rank, d_out), jnp.float32)
    return traverse_util.unflatten_dict(flat)


def adapters(lora) -> Dict[Path, dict]:
    """Flat view ``{module path: {"down": [in, r], "up": [r, out]}}`` of an adapter pytree."""
    mods: Dict[Path, dict] = {}
    for path, value in traverse_util.flatten_dict(lora).items():
        if path[-1] not in ("down", "up"):
            raise ValueError(f"not a LoRA pytree: leaf {'/'.join(path)} is not 'down'/'up'.")
        mods.setdefault(path[:-1], {})[path[-1]] = value
    for path, m in mods.items():
        if set(m) != {"down", "up"}:
            raise ValueError(f"LoRA module {_name(path)} lacks a 'down' or 'up' matrix.")
        if np.shape(m["down"])[-1] != np.shape(m["up"])[0]:
            raise ValueError(f"LoRA module {_name(path)}: its 'down' matrix has rank "
                             f"{np.shape(m['down'])[-1]} but its 'up' matrix "
                             f"{np.shape(m['up'])[0]}.")
    return mods


def lora_rank(lora) -> int:
    """The (uniform) rank r of an adapter pytree; mixed ranks are an error."""
    ranks = {np.shape(m["down"])[1] for m in adapters(lora).values()}
    if len(ranks) != 1:
        raise ValueError(f"LoRA adapters must share one rank, got ranks {sorted(ranks)}.")
    return ranks.pop()


def lora_scale(alpha: float, rank: int, scale: float = 1.0) -> float:
    """peft's effective multiplier ``scale * alpha / rank`` (``scale``: the user's strength,
    diffusers' ``cross_attention_kwargs={"scale": ...}``)."""
    return scale * alpha / rank


def merge_lora(params, lora, scale=1.0):
    """Returns params with every adapted kernel replaced by ``kernel + scale * down @ up``.

    Pure: ``params`` is not modified; unadapted leaves are shared, not copied. ``scale`` may
    be a traced value (changing it does not recompile).

    Args:
      params: pipeline params ``{"text_encoder", "unet", "vae"}``.
      lora: adapter pytree from ``init_lora`` / ``load_lora``.
      scale: multiplier, normally ``lora_scale * alpha / rank``.
    Returns:
      New params pytree of the same structure.
    """
    flat = traverse_util.flatten_dict(params)
    for path, m in adapters(lora).items():
        k = path + ("kernel",)
        if k not in flat:
            raise ValueError(f"LoRA module {_name(path)} has no Dense kernel in params.")
        w = flat[k]
        delta = jnp.matmul(m["down"], m["up"], precision=jax.lax.Precision.HIGHEST)
        if w.ndim == 4 and delta.shape == (math.prod(w.shape[:3]), w.shape[3]):
            delta = delta.reshape(w.shape)  # a conv adapter: rows in the kernel's HWI order
        if delta.shape != w.shape:
            raise ValueError(f"LoRA module {_name(path)} gives a {delta.shape} update for "
                             f"a {tuple(w.shape)} kernel.")
        flat[k] = (w + scale * delta).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


# --------------------------------------------------------------------------------- files

def to_state_dict(lora) -> Dict[str, np.ndarray]:
    """Adapter pytree -> peft-style PyTorch state dict (``...lora_A.weight`` [r, in])."""
    out = {}
    for path, m in adapters(lora).items():
        if path[0] not in DEFAULT_TARGETS:
            raise ValueError(f"LoRA scope {path[0]!r} has no diffusers file prefix "
                             f"(supported: {sorted(DEFAULT_TARGETS)}).")
        name = f"{path[0]}.{_module_key(path[1:])}"
        out[f"{name}.lora_A.weight"] = np.ascontiguousarray(np.asarray(m["down"], np.float32).T)
        out[f"{name}.lora_B.weight"] = np.ascontiguousarray(np.asarray(m["up"], np.float32).T)
    return out


def from_state_dict(state: Dict[str, np.ndarray]) -> Tuple[dict, Dict[str, float]]:
    """LoRA state dict -> (adapter pytree, per-module alphas from ``<module>.alpha`` keys).

    Reads peft keys (``unet.<module>.lora_A.weight``) and the names diffusers' training
    scripts write (``...lora.down.weight``, ``...lora_linear_layer.up.weight``).
    """
    flat, alphas = {}, {}
    for key, value in state.items():
        m, a = _KEY_RE.match(key), _ALPHA_RE.match(key)
        if a is not None:
            alphas[key] = float(np.asarray(value))
            continue
        if m is None:
            raise ValueError(f"LoRA tensor {key!r} is not a diffusers/peft key "
                             "('unet.<module>.lora_A.weight' / '...lora_B.weight'); kohya "
                             "('lora_unet_...') files are read by jaxdiff.adapters.kohya "
                             "(and --lora).")
        scope, module, kind = m.groups()
        if scope.startswith("text_encoder") and not module.startswith("text_model."):
            module = "text_model." + module  # transformers >= 5 module names
        leaf = "down" if kind.endswith(("A", "down")) else "up"
        flat[(scope,) + _flax_path(module) + (leaf,)] = jnp.asarray(
            np.asarray(value, np.float32).T)
    return traverse_util.unflatten_dict(flat), alphas


def save_lora(lora, path: str, alpha: Optional[float] = None,
              rank: Optional[int] = None) -> str:
    """Writes adapters as a diffusers/peft-style LoRA safetensors file.

    Args:
      lora: adapter pytree.
      path: a directory (the file is ``<path>/pytorch_lora_weights.safetensors``) or a
        ``.safetensors`` file name.
      alpha: peft ``lora_alpha`` (``None``: ``rank``, i.e. scale 1).
      rank: optional check of the adapters' rank.
    Returns:
      The file written (atomically).
    """
    r = lora_rank(lora)
    if rank is not None and rank != r:
        raise ValueError(f"{rank=} does not match the adapters' rank {r}.")
    alpha = r if alpha is None else alpha
    alpha = int(alpha) if float(alpha).is_integer() else float(alpha)
    meta = {}
    for scope, mods in _by_scope(lora).items():
        # peft matches targets by name suffix; without "text_model." they match both
        # transformers < 5 (CLIPTextModel.text_model.encoder...) and >= 5 (flattened).
        mods = sorted(m.removeprefix("text_model.") for m in mods)
        meta.update({f"{scope}.r": r, f"{scope}.lora_alpha": alpha,
                     f"{scope}.target_modules": mods})
    file = _file(path, create=True)
    tmp = file + ".tmp"
    save_file(to_state_dict(lora), tmp,
              metadata={"format": "pt", METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True)})
    os.replace(tmp, file)
    return file


def load_lora(path: str) -> Tuple[dict, float]:
    """Reads a LoRA safetensors file written by ``save_lora`` or by diffusers.

    Accepts peft names (``lora_A``/``lora_B``), diffusers' training-script names
    (``lora.down``/``lora.up``, ``lora_linear_layer.down``/``.up``) and ``<module>.alpha``
    tensors; kohya-style files are refused.

    Args:
      path: the file, or a directory holding ``pytorch_lora_weights.safetensors``.
    Returns:
      ``(lora, alpha)``; merge with ``merge_lora(params, lora, s * alpha / lora_rank(lora))``.
      Files without metadata get ``alpha = rank`` (diffusers' convention).
    """
    file = _file(path, create=False)
    if not file.endswith(".safetensors"):
        raise ValueError(f"{file}: only safetensors LoRA files are read (pickle files can run "
                         "code); convert it to safetensors first.")
    with safe_open(file, framework="numpy") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        header = f.metadata() or {}
    try:  # name the file: an unknown key, a module without its pair, mismatched ranks
        lora, alphas = from_state_dict(state)
        rank = lora_rank(lora)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None
    meta = json.loads(header.get(METADATA_KEY) or "{}")
    meta.update({f"{k}.lora_alpha": v for k, v in alphas.items()})
    return lora, _alpha(meta, rank, file)


# ------------------------------------------------------------------------------- helpers

def _get(tree, path: Path):
    for name in path:
        tree = tree[name]
    return tree


def _name(path: Path) -> str:
    """An adapter's module as a file names it: ``'unet.down_blocks.0.attentions.0.to_q'``."""
    return repr(f"{path[0]}.{_module_key(path[1:])}" if len(path) > 1 else "/".join(path))


def _module_key(path: Path) -> str:
    """Flax module path (within a component) -> PyTorch module name."""
    return torch_key(tuple(path) + ("kernel",))[: -len(".weight")]


def _flax_path(module: str) -> Path:
    """PyTorch module name -> flax path (``layers.0`` -> ``layers_0``)."""
    path = tuple(re.sub(r"\.(\d+)(?=\.|$)", r"_\1", module).split("."))
    if _module_key(path) != module:
        raise ValueError(f"LoRA module name {module!r} has no jaxdiff equivalent.")
    return path


def _by_scope(lora) -> Dict[str, list]:
    out: Dict[str, list] = {}
    for path in adapters(lora):
        out.setdefault(path[0], []).append(_module_key(path[1:]))
    return out


def _file(path: str, create: bool) -> str:
    return files.weight_file(path, WEIGHT_NAME, create, "LoRA")


def _alpha(meta: dict, rank: int, source: str) -> float:
    """The single alpha of a file's per-component LoraConfig metadata."""
    if any(meta.get(k) for k in meta if k.endswith((".alpha_pattern", ".rank_pattern"))):
        raise ValueError(f"{source}: per-module alpha/rank patterns are not supported.")
    alphas = {meta[k] for k in meta if k.endswith(".lora_alpha")}
    ranks = {meta[k] for k in meta if k.endswith(".r")}
    if (ranks and ranks != {rank}) or len(alphas) > 1:
        raise ValueError(f"{source}: components use different ranks {sorted(ranks)} or alphas "
                         f"{sorted(alphas)}; only one LoRA scale is supported.")
    return float(alphas.pop()) if alphas else float(rank)
