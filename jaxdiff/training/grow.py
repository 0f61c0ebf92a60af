"""Growing a trained U-Net one layer deeper per block without changing what it computes.

``deepen_unet`` returns a pipeline whose U-Net has ``layers_per_block + 1`` (every down
block one more resnet (+ transformer), every up block one more) and params under which it
computes exactly what the old one did, so fine-tuning continues from the trained model with
more capacity instead of starting a bigger one from scratch (Net2Net-style growth, Chen et
al. 2016, with the zero-initialised residual branches that ControlNet and GLIGEN use):

* down block: the new layer goes last, before the downsampler. Its resnet keeps its channel
  count (no shortcut conv) and its ``conv2`` is zero, so it returns its input; the new
  transformer's ``proj_out`` is zero, so it returns its input too. The block emits one more
  skip connection, equal to the one before it.
* up block: the new layer goes second. The up block now pops one more skip: the first
  resnet gets the new (duplicate) skip, i.e. what it got before; the new resnet gets the
  skip the old second resnet got and ignores it: ``conv2`` zero and a 1x1 shortcut that
  passes the hidden channels and drops the skip's; every later resnet gets what it got
  before.

The new layers' other weights are freshly initialised (``seed``), so gradients reach them
as soon as ``conv2`` / ``proj_out`` leave zero. The result is an ordinary diffusers-layout
U-Net (``layers_per_block`` + 1 in its config).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxdiff.models.unet import UNet2DConditionModel
from jaxdiff.pipeline import init_params


def deepen_unet(pipe, params, seed: int = 0):
    """``(pipe, params)`` with every U-Net block one layer deeper and the same function.

    ``params`` is the pipeline's params dict (``params["unet"]`` is replaced). Refuses
    transformer backbones and GLIGEN U-Nets in one line.
    """
    unet = pipe.unet
    if not isinstance(unet, UNet2DConditionModel):
        raise ValueError(f"deepen_unet: the pipeline's denoiser is a {type(unet).__name__}; "
                         "only a UNet2DConditionModel can be deepened.")
    cfg = unet.config
    if cfg.attention_type != "default":
        raise ValueError(f"deepen_unet: attention_type={cfg.attention_type!r} (GLIGEN) is not "
                         "supported; deepen the base U-Net before adding GLIGEN layers.")
    lpb = cfg.per_block("layers_per_block")
    deeper = tuple(n + 1 for n in lpb)
    new_cfg = dataclasses.replace(
        cfg, layers_per_block=deeper[0] if len(set(deeper)) == 1 else deeper)
    new_pipe = dataclasses.replace(pipe, unet=unet.clone(config=new_cfg))
    fresh = init_params(dataclasses.replace(new_pipe, text_encoder=None, vae=None,
                                            text_encoder_2=None), seed)["unet"]
    old = params["unet"]
    net = dict(fresh)
    for key in old:                                   # conv_in, time embedding, mid, ...
        if not key.startswith(("down_blocks_", "up_blocks_")):
            net[key] = old[key]
    for stage in unet.plan():
        name = stage["name"]
        if name == "mid_block":
            continue
        net[name] = _grown_block(old[name], fresh[name], stage)
    return new_pipe, dict(params, unet=net)


def _grown_block(old: dict, fresh: dict, stage: dict) -> dict:
    """One down or up block's params with the identity layer inserted (see module doc)."""
    n = stage["num_resnets"]                          # the old block's resnet count
    up = stage["name"].startswith("up_blocks_")
    new_at = 1 if up else n                           # index of the inserted layer
    out = {k: v for k, v in old.items() if not k.startswith(("resnets_", "attentions_"))}
    for i in range(n + 1):
        src = None if i == new_at else (i if i < new_at else i - 1)
        for kind in ("resnets", "attentions"):
            if f"{kind}_0" not in fresh:
                continue
            if src is not None:
                out[f"{kind}_{i}"] = old[f"{kind}_{src}"]
            elif kind == "resnets":
                out[f"{kind}_{i}"] = _identity_resnet(fresh[f"{kind}_{i}"])
            else:
                out[f"{kind}_{i}"] = _identity_transformer(fresh[f"{kind}_{i}"])
    return out


def _identity_resnet(p: dict) -> dict:
    """A resnet that returns its first ``out`` input channels: zero ``conv2``; a shortcut
    (when the input is wider, i.e. hidden + skip) that keeps the hidden channels."""
    p = dict(p, conv2=jax.tree.map(jnp.zeros_like, p["conv2"]))
    if "conv_shortcut" in p:
        k = p["conv_shortcut"]["kernel"]              # [1, 1, in, out]
        c_in, c_out = k.shape[2], k.shape[3]
        eye = jnp.eye(c_in, c_out, dtype=k.dtype)[None, None]
        p["conv_shortcut"] = {"kernel": eye, "bias": jnp.zeros_like(p["conv_shortcut"]["bias"])}
    return p


def _identity_transformer(p: dict) -> dict:
    """A Transformer2DModel whose output projection is zero: it returns its residual."""
    return dict(p, proj_out=jax.tree.map(jnp.zeros_like, p["proj_out"]))
