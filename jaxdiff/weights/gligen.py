"""GLIGEN UNets in diffusers format: a ``UNet2DConditionModel`` folder whose config has
``attention_type="gated"`` (``position_net.*`` and ``...transformer_blocks.N.fuser.*``
tensors beside the UNet's), alone or as the ``unet/`` of a ``StableDiffusionGLIGENPipeline``
folder, as ``from_pretrained`` reads and ``save_pretrained`` writes them."""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp

from jaxdiff.models.gligen import ATTENTION_TYPES
from jaxdiff.pipeline import Pipeline
from jaxdiff.weights import convert, files
from jaxdiff.weights.diffusers_format import load_component

_STEM = "diffusion_pytorch_model"


def _unet_folder(folder: str) -> str:
    if os.path.exists(os.path.join(folder, "model_index.json")):
        return os.path.join(folder, "unet")
    return folder


def load_gligen_unet(folder: str, dtype=jnp.float32, variant=None, allow_pickle=False):
    """Reads a GLIGEN UNet: a diffusers UNet folder or a GLIGEN pipeline folder (its
    ``unet/``). Returns (module, params); a UNet without GLIGEN layers is refused."""
    unet_dir = _unet_folder(folder)
    if not os.path.isdir(unet_dir):
        raise FileNotFoundError(f"{folder}: no such GLIGEN UNet or pipeline directory.")
    module, params = load_component(unet_dir, "unet", dtype, variant, allow_pickle)
    if module.config.attention_type not in ATTENTION_TYPES:
        raise ValueError(f"{os.path.join(unet_dir, 'config.json')}: attention_type="
                         f"{module.config.attention_type!r}; a GLIGEN UNet has "
                         f"{' or '.join(map(repr, ATTENTION_TYPES))}.")
    return module, params


def check_matches(gligen_cfg, base_cfg, source: str = "GLIGEN UNet") -> None:
    """One-line ValueError naming both values unless the GLIGEN UNet is the base UNet's
    architecture plus GLIGEN layers (every field but ``attention_type``/``sample_size``)."""
    for f in dataclasses.fields(base_cfg):
        if f.name in ("attention_type", "sample_size"):
            continue
        mine, theirs = getattr(gligen_cfg, f.name), getattr(base_cfg, f.name)
        if mine != theirs:
            raise ValueError(f"{source}: {f.name}={mine!r} but the base UNet has "
                             f"{f.name}={theirs!r}; use a GLIGEN model built on this base.")


def with_gligen(pipe: Pipeline, params, folder: str, variant=None, allow_pickle=False):
    """(pipe, params) with the GLIGEN UNet of ``folder`` in place of the pipeline's UNet
    (checked against it first: ``check_matches``), as diffusers' GLIGEN pipeline uses its
    own UNet whole."""
    module, unet_params = load_gligen_unet(folder, pipe.unet.dtype, variant, allow_pickle)
    check_matches(module.config, pipe.unet.config, f"GLIGEN UNet {folder}")
    module = module.clone(remat=pipe.unet.remat)
    return (dataclasses.replace(pipe, unet=module),
            dict(params, unet=files.to_device(unet_params)))


def save_gligen_unet(module, params, out_dir: str, *, overwrite: bool = True) -> str:
    """Writes a GLIGEN UNet and its params as a diffusers UNet folder (atomically)."""
    with files.atomic_directory(out_dir, overwrite) as tmp:
        cfg = dict(module.config.to_dict(), _diffusers_version="0.42.1")
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
        files.write_tensors(os.path.join(tmp, f"{_STEM}.safetensors"),
                            convert.flax_to_torch(params))
    return out_dir
