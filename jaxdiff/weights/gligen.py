"""GLIGEN UNets in diffusers format: a ``UNet2DConditionModel`` folder whose config has
``attention_type="gated"`` (``position_net.*`` and ``...transformer_blocks.N.fuser.*``
tensors beside the UNet's), alone or as the ``unet/`` of a ``StableDiffusionGLIGENPipeline``
folder, as ``from_pretrained`` reads and ``save_pretrained`` writes them.

Also jaxdiff's *GLIGEN layers* folder: the GLIGEN UNet's ``config.json`` and
``gligen_layers.safetensors`` holding only the ``position_net.*`` and ``*.fuser.*`` tensors
(``save_gligen_layers``), a few MB where a whole UNet would repeat its base's weights;
``with_gligen`` puts the layers into the pipeline's own UNet (which must be the base they
were trained on). The embedded model's GLIGEN layers ship as such a folder
(``SHAPES_GLIGEN``, ``--gligen shipped``; trained by configs/gligen.py's default run).
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.gligen import ATTENTION_TYPES, merge_params, split_params
from jaxdiff.pipeline import Pipeline
from jaxdiff.weights import convert, files
from jaxdiff.weights.diffusers_format import (DEFAULT_MODEL, component_module, init_shapes,
                                              load_component)

_STEM = "diffusion_pytorch_model"
LAYERS_FILE = "gligen_layers.safetensors"
# The embedded model's GLIGEN layers (configs/gligen.py's default run, float16).
SHAPES_GLIGEN = os.path.join(os.path.dirname(DEFAULT_MODEL), "shapes_gligen")
# Its gligen_scheduled_sampling_beta: trained on t in [500, 1000), it grounds best on the
# first 0.5-0.7 of the steps (bench/README.md); `--gligen shipped`'s default.
SHAPES_GLIGEN_BETA = 0.6


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


def is_layers_folder(folder: str) -> bool:
    """True for a GLIGEN layers folder (``save_gligen_layers``; or a pipeline holding one)."""
    return os.path.exists(os.path.join(_unet_folder(folder), LAYERS_FILE))


def load_gligen_layers(folder: str, dtype=jnp.float32, base_config=None):
    """Reads a GLIGEN layers folder: (GLIGEN UNet module, its GLIGEN layers alone, float32
    params in the UNet tree's paths). ``base_config``: the UNet config the layers are for,
    checked (``check_matches``) before any tensor is read."""
    unet_dir = _unet_folder(folder)
    module, _, _ = component_module(unet_dir, "unet", dtype)
    if module.config.attention_type not in ATTENTION_TYPES:
        raise ValueError(f"{os.path.join(unet_dir, 'config.json')}: attention_type="
                         f"{module.config.attention_type!r}; a GLIGEN layers folder has "
                         f"{' or '.join(map(repr, ATTENTION_TYPES))}.")
    if base_config is not None:
        check_matches(module.config, base_config, f"GLIGEN layers {folder}")
    path = os.path.join(unet_dir, LAYERS_FILE)
    shapes = split_params(init_shapes(module, "unet"))[1]
    return module, convert.torch_to_flax(files.read_tensors(path), shapes, source=path)


def save_gligen_layers(module, layers, out_dir: str, *, dtype=np.float16,
                       overwrite: bool = True) -> str:
    """Writes a GLIGEN layers folder (atomically): the GLIGEN UNet ``module``'s config and
    ``layers`` (``split_params``' second part, or a whole GLIGEN UNet's params, of which
    only the layers are kept), cast to ``dtype`` (float16 by default: the shipped form)."""
    layers = split_params(layers)[1]
    if not layers:
        raise ValueError(f"{out_dir}: no GLIGEN layers (position_net / fuser) to write.")
    return files.write_model_folder(out_dir, module.config.to_dict(), LAYERS_FILE,
                                    convert.flax_to_torch(layers, dtype=dtype),
                                    overwrite=overwrite)


def with_gligen(pipe: Pipeline, params, folder: str, variant=None, allow_pickle=False):
    """(pipe, params) with the GLIGEN UNet of ``folder`` in place of the pipeline's UNet
    (checked against it first: ``check_matches``), as diffusers' GLIGEN pipeline uses its
    own UNet whole. A GLIGEN layers folder (``is_layers_folder``) instead adds its layers
    to the pipeline's own UNet weights."""
    if is_layers_folder(folder):
        module, layers = load_gligen_layers(folder, pipe.unet.dtype, pipe.unet.config)
        base = split_params(params["unet"])[0]
        unet_params = merge_params(base, layers)
    else:
        module, unet_params = load_gligen_unet(folder, pipe.unet.dtype, variant, allow_pickle)
        check_matches(module.config, pipe.unet.config, f"GLIGEN UNet {folder}")
    module = module.clone(remat=pipe.unet.remat)
    return (dataclasses.replace(pipe, unet=module),
            dict(params, unet=files.to_device(unet_params)))


def save_gligen_unet(module, params, out_dir: str, *, overwrite: bool = True) -> str:
    """Writes a GLIGEN UNet and its params as a diffusers UNet folder (atomically)."""
    return files.write_model_folder(out_dir, module.config.to_dict(), f"{_STEM}.safetensors",
                                    convert.flax_to_torch(params), overwrite=overwrite)
