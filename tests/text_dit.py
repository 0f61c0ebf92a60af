"""The tiny text DiT pipeline the interface tests share (test_denoiser.py,
test_denoiser_methods.py): the shipped pipeline with its U-Net swapped for a tiny random
PixArt-style ``PixArtTransformer2DModel`` (the shipped CLIP text encoder, VAE, tokenizer
and scheduler around it), and the fixed-batch optimiser loop their training tests use."""
import dataclasses

import jax
import numpy as np
import optax

from jaxdiff import pipeline as pl
from jaxdiff.models.pixart import PixArtConfig, PixArtTransformer2DModel


def tiny_text_dit(pipe, params, from_shapes: bool = False, **config):
    """(pipe, params) of the embedded ``(pipe, params)`` with its U-Net swapped for a tiny
    text DiT (learned sigma: 8 output channels, of which ``denoise`` keeps the noise half;
    ``config`` overrides PixArtConfig fields). Its output layer is scaled by 0.1 (noise
    predictions of std ~0.06, DiT-like near-zero init): a random net at full scale varies
    too fast in t for DDIM's first-order inversion to come back at small step counts.
    ``from_shapes``: random weights drawn with numpy on the init's shapes (kernels
    N(0, 1 / fan_in), other leaves N(0, 0.02^2)) instead of compiling the init (~5 CPU-s)."""
    fields = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2,
                  sample_size=pipe.unet.config.sample_size, out_channels=8,
                  cross_attention_dim=16, use_additional_conditions=False,
                  caption_channels=pipe.text_encoder.config.hidden_size)
    cfg = PixArtConfig(**dict(fields, **config))
    pipe = dataclasses.replace(pipe, unet=PixArtTransformer2DModel(cfg))
    if from_shapes:
        rng = np.random.default_rng(0)
        draw = lambda a: (rng.standard_normal(a.shape) * (
            a.shape[-2] ** -0.5 if a.ndim > 1 else 0.02)).astype(a.dtype)
        net = jax.tree.map(draw, jax.eval_shape(lambda: pl.init_params(
            dataclasses.replace(pipe, text_encoder=None, vae=None))["unet"]))
    else:
        net = pl.init_params(dataclasses.replace(pipe, text_encoder=None, vae=None))["unet"]
    net = dict(net, proj_out=jax.tree.map(lambda a: 0.1 * a, net["proj_out"]))
    return pipe, dict(params, unet=net)


def optimise(loss, params, batch, opt, steps: int):
    """``steps`` jitted ``opt`` updates of ``loss(params, batch, key)`` (fixed key): the
    losses before each update and the final params."""
    @jax.jit
    def step(p, s):
        val, g = jax.value_and_grad(loss)(p, batch, jax.random.key(0))
        u, s = opt.update(g, s, p)
        return val, optax.apply_updates(p, u), s

    state, vals = opt.init(params), []
    for _ in range(steps):
        val, params, state = step(params, state)
        vals.append(float(val))
    return vals, params
