"""Writing original-layout (A1111 / ComfyUI / CompVis) single-file checkpoints.

The inverse of :mod:`jaxdiff.weights.single_file`'s reading: jaxdiff params, or any
diffusers-layout state dicts (a diffusers folder's own tensors, read lazily), -> the
original key layout, written to one ``.safetensors`` file atomically, one component's
diffusers-layout tensors alive at a time.
"""
from __future__ import annotations

import functools
import os
from typing import Dict, Optional

import numpy as np

from jaxdiff.pipeline import Pipeline
from jaxdiff.weights import convert, files
from jaxdiff.weights import original_layout as ol
from jaxdiff.weights.single_file import component_map, sdxl_key_map, sdxl_prefixes


def original_state_dict(pipe: Pipeline, params, dtype=np.float32,
                        text_layout: Optional[str] = None) -> Dict[str, np.ndarray]:
    """``(pipe, params)`` -> one original-layout state dict (SD 1.x/2.x, A1111 / ComfyUI).

    ``text_layout``: ``"clip"`` (SD 1.x) or ``"openclip"`` (SD 2.x); default by the text
    encoder's activation (OpenCLIP uses gelu, CLIP-L quick_gelu).
    """
    states = {kind: functools.partial(convert.flax_to_torch, params[kind], dtype=dtype)
              for kind in ("unet", "vae", "text_encoder", "text_encoder_2") if kind in params}
    return original_from_diffusers(pipe, states, text_layout)


def original_from_diffusers(pipe, states, text_layout: Optional[str] = None
                            ) -> Dict[str, np.ndarray]:
    """Diffusers-layout state dicts -> one original-layout state dict.

    ``pipe``: the networks' configs (``pipe.unet.config`` ..., ``pipe.is_sdxl``);
    ``states``: ``{kind: zero-argument callable -> {diffusers key: tensor}}``, called one
    component at a time, so only one diffusers-layout component is alive at once (the
    tensors are kept as given: cast them before, e.g. ``flax_to_torch(..., dtype=)``).
    """
    out: Dict[str, np.ndarray] = {}
    if pipe.is_sdxl:  # SDXL base / refiner: text encoders under conditioner.embedders.
        prefixes = sdxl_prefixes("xl" if pipe.text_encoder is not None else "xl_refiner")
        for kind, prefix in prefixes.items():
            state = states[kind]()
            key_map = sdxl_key_map(kind, state.keys(), getattr(pipe, kind).config, prefix)
            out.update(ol.to_original(state, key_map))
            del state
        return out
    if text_layout is None:
        text_layout = "openclip" if pipe.text_encoder.config.hidden_act == "gelu" else "clip"
    for kind in ("unet", "vae", "text_encoder"):
        state = states[kind]()
        key_map = component_map(kind, state.keys(), getattr(pipe, kind).config, text_layout)
        out.update(ol.to_original(state, key_map))
        del state
    return out  # to_original's .T / [:, :, None, None] views are made contiguous when written


def save_single_file(pipe: Pipeline, params, path: str, *, dtype=np.float32,
                     text_layout: Optional[str] = None) -> str:
    """Writes one original-layout ``.safetensors`` (atomically: a temporary file renamed)."""
    if not path.endswith(".safetensors"):
        raise ValueError(f"{path}: a single-file checkpoint is written as .safetensors; "
                         "give a file name ending in .safetensors.")
    state = original_state_dict(pipe, params, dtype, text_layout)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        files.write_tensors(tmp, state)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
