"""kohya-ss / A1111 LoRA files (``lora_unet_*``, ``lora_te_*``), LoCon conv layers included.

A module's tensors are ``<name>.lora_down.weight`` ([r, in] for a linear layer,
[r, in, kh, kw] for a convolution), ``<name>.lora_up.weight`` ([out, r] / [out, r, 1, 1])
and an optional scalar ``<name>.alpha``; ``<name>`` is the diffusers module path with
``.`` -> ``_`` behind ``lora_unet_`` / ``lora_te_`` (SD 1.x / 2.x; kohya names the SD 2.x
text encoder as transformers' CLIPTextModel). SDXL files name the two text encoders
``lora_te1_`` / ``lora_te2_`` and the UNet modules by the original (SGM) layout
(``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), as diffusers'
``_maybe_map_sgm_blocks_to_diffusers`` reads them; both UNet namings are accepted.
As diffusers' ``load_lora_weights`` (peft), a module adds ``alpha / r * up @ down`` to its
weight (alpha = r when absent), so each module's ``up`` is pre-scaled by its own
``alpha / r`` here: ranks and alphas may differ per module, and
``merge_lora(params, lora, strength)`` applies the file at ``strength``.

A convolution adapter is stored as ``down``: [kh * kw * in, r] (rows in the kernel's HWI
order) and ``up``: [r, out]; ``merge_lora`` reshapes ``down @ up`` to the HWIO kernel.
"""
from __future__ import annotations

import os
import re
from typing import Dict, Tuple

import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open

from jaxdiff.weights import files
from jaxdiff.weights import original_layout as ol
from jaxdiff.weights.convert import torch_key

SCOPES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
          "lora_te2_": "text_encoder_2"}
_KEY = re.compile(r"^(lora_unet_|lora_te\d?_)(\w+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_OTHER_FORMATS = (("hada_", "LyCORIS LoHa"), ("lokr_", "LyCORIS LoKr"),
                  ("lora_mid", "LoCon with a Tucker 'lora_mid' core"),
                  ("dora_scale", "DoRA"))


def is_kohya_file(path: str) -> bool:
    """True for a ``.safetensors`` file whose keys are kohya-style (``lora_unet_``/``lora_te``)."""
    if not (os.path.isfile(path) and path.endswith(".safetensors")):
        return False
    try:
        with safe_open(path, framework="numpy") as f:
            return any(k.startswith(("lora_unet_", "lora_te")) for k in f.keys())
    except Exception:  # noqa: BLE001 -- unreadable files are reported by the loader
        return False


def module_names(params, unet_config=None) -> Dict[str, Tuple[str, ...]]:
    """kohya module name -> params path of its kernel's module, for every layer with a
    ``kernel`` in the pipeline's UNet and text encoders; with ``unet_config``, the UNet
    modules also under their original-layout (SGM) names, as SDXL files use."""
    out = {}
    for prefix, scope in SCOPES.items():
        for path in traverse_util.flatten_dict(params.get(scope, {})):
            if path[-1] == "kernel":
                key = torch_key(path)
                out[prefix + key[: -len(".weight")].replace(".", "_")] = (scope,) + path[:-1]
                if scope == "unet" and unet_config is not None:
                    orig = ol.unet_map([key], unet_config)[key][0]
                    sgm = orig[len(ol.UNET_PREFIX): -len(".weight")].replace(".", "_")
                    out.setdefault(prefix + sgm, (scope,) + path[:-1])
    return out


def from_state_dict(state, params, source: str = "LoRA", unet_config=None) -> dict:
    """kohya state dict -> adapter pytree with per-module ``alpha / r`` folded into ``up``.

    Args:
      unet_config: the UNet's config, to read original-layout (SGM) UNet names (SDXL).
    Raises:
      ValueError: one line naming ``source`` and the first offending key (another format,
        a module this model lacks, mismatched down/up ranks).
    """
    for key in state:
        for marker, what in _OTHER_FORMATS:
            if marker in key:
                raise ValueError(f"{source}: '{key}' is a {what} tensor; jaxdiff reads plain "
                                 "LoRA / LoCon (lora_down / lora_up / alpha) kohya files only.")
    mods: Dict[str, dict] = {}
    for key, value in state.items():
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"{source}: '{key}' is not a kohya LoRA key ('lora_unet_<module>."
                             "lora_down.weight' / '.lora_up.weight' / '.alpha').")
        if m.group(1) not in SCOPES or SCOPES[m.group(1)] not in params:
            raise ValueError(f"{source}: '{key}' is for a text encoder this model lacks; the "
                             "LoRA was made for another base model.")
        mods.setdefault(m.group(1) + m.group(2), {})[m.group(3)] = np.asarray(value, np.float32)
    names = module_names(params, unet_config)
    kernels = traverse_util.flatten_dict(params)
    flat = {}
    for name in sorted(mods):
        t = mods[name]
        if name not in names:
            raise ValueError(f"{source}: module '{name}' has no layer in this model; the LoRA "
                             "was made for another base model.")
        if set(t) - {"alpha"} != {"lora_down.weight", "lora_up.weight"}:
            raise ValueError(f"{source}: module '{name}' lacks its lora_down or lora_up weight.")
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        rank = down.shape[0]
        if up.shape[1] != rank or up.ndim not in (2, 4) or up.shape[2:] not in ((), (1, 1)):
            raise ValueError(f"{source}: module '{name}': lora_up {up.shape} does not match "
                             f"lora_down {down.shape}.")
        alpha = float(t["alpha"]) if "alpha" in t else float(rank)
        path = names[name]
        kernel = kernels[path + ("kernel",)].shape  # Dense [in, out] or conv [kh, kw, in, out]
        if int(np.prod(down.shape[1:])) != int(np.prod(kernel[:-1])) or up.shape[0] != kernel[-1]:
            wants = (kernel[-1],) + ((kernel[-2],) + tuple(kernel[:2]) if len(kernel) == 4
                                     else (kernel[0],))
            raise ValueError(f"{source}: '{name}.lora_down.weight' {down.shape} / lora_up "
                             f"{up.shape} does not fit this model's layer (weight {wants}); the "
                             "LoRA was made for another base model.")
        if down.ndim == 4:  # [r, in, kh, kw] -> [kh * kw * in, r]
            down = down.transpose(2, 3, 1, 0).reshape(-1, rank)
        else:
            down = down.T
        flat[path + ("down",)] = jnp.asarray(down)
        flat[path + ("up",)] = jnp.asarray(up.reshape(up.shape[0], rank).T * (alpha / rank))
    return traverse_util.unflatten_dict(flat)


def load_kohya_lora(path: str, params, unet_config=None) -> dict:
    """Reads a kohya / A1111 LoRA ``.safetensors`` for the model of ``params``
    (``unet_config``: ``pipe.unet.config``, needed for SDXL's original-layout UNet names).

    Returns:
      adapter pytree; ``merge_lora(params, lora, strength)`` applies it as diffusers'
      ``load_lora_weights`` at lora scale ``strength`` does.
    """
    return from_state_dict(files.read_tensors(path), params, path,  # bf16 files included
                           unet_config)
