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
import functools

import jax
import jax.numpy as jnp

from jaxdiff.models.unet import UNet2DConditionModel
from jaxdiff.pipeline import dummy_inputs


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
    stages = [s for s in unet.plan() if s["name"] != "mid_block"]
    new_at = tuple((s["name"], _new_index(s)) for s in stages)
    # init_params' key for the U-Net (the second of its modules), so the new layers are
    # drawn as ``init_params(new_pipe, seed)["unet"]`` draws them.
    key = jax.random.fold_in(jax.random.key(seed), 1)
    fresh = _new_layers_init(new_pipe.unet, new_at)(key, *dummy_inputs(new_pipe.unet, "unet"))
    old = params["unet"]
    net = dict(old)                                   # conv_in, time embedding, mid, ...
    for stage in stages:
        net[stage["name"]] = _grown_block(old[stage["name"]], fresh[stage["name"]], stage)
    return new_pipe, dict(params, unet=net)


def _new_index(stage: dict) -> int:
    """Index of the inserted layer in a grown down / up block (module doc)."""
    return 1 if stage["name"].startswith("up_blocks_") else stage["num_resnets"]


@functools.lru_cache(maxsize=4)
def _new_layers_init(unet, new_at: tuple):
    """jitted ``(key, *dummy inputs) -> {block: {"resnets_i", "attentions_i": params}}``:
    the inserted layers' params (``new_at``: (block name, index) pairs) of ``unet.init``,
    only those, so XLA drops the random draws of every other parameter (same values;
    compile 31 -> 8 CPU-s on the embedded U-Net)."""
    def init(key, *args):
        p = unet.init(key, *args)["params"]
        return {b: {k: v for k, v in p[b].items() if k in (f"resnets_{i}", f"attentions_{i}")}
                for b, i in new_at}
    return jax.jit(init)


def _grown_block(old: dict, fresh: dict, stage: dict) -> dict:
    """One down or up block's params with the identity layer inserted (see module doc);
    ``fresh``: the inserted layer's freshly initialised params."""
    n = stage["num_resnets"]                          # the old block's resnet count
    new_at = _new_index(stage)
    out = {k: v for k, v in old.items() if not k.startswith(("resnets_", "attentions_"))}
    for i in range(n + 1):
        src = None if i == new_at else (i if i < new_at else i - 1)
        for kind in ("resnets", "attentions"):
            if f"{kind}_{new_at}" not in fresh:
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
