"""Convolutional building blocks shared by the UNet and the VAE (NHWC).

Submodule names mirror diffusers' parameter names (``conv1``, ``time_emb_proj``, ...)
so that weight conversion is a mechanical renaming (see ``jaxdiff.weights.convert``).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool = False,
                       downscale_freq_shift: float = 1.0, max_period: float = 10000.0):
    """Sinusoidal embedding of timesteps, as diffusers' ``get_timestep_embedding``.

    Args:
      t: [B] int or float timesteps.
    Returns:
      [B, dim] float32.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
    freqs = jnp.exp(exponent / (half - downscale_freq_shift))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """``linear_1 -> SiLU -> linear_2`` (diffusers ``TimestepEmbedding``)."""
    time_embed_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.time_embed_dim, dtype=self.dtype, name="linear_1")(x)
        x = nn.silu(x)
        return nn.Dense(self.time_embed_dim, dtype=self.dtype, name="linear_2")(x)


def conv3x3(features: int, dtype, name: str, stride: int = 1, padding=1) -> nn.Conv:
    pad = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
    return nn.Conv(features, (3, 3), strides=(stride, stride), padding=pad, dtype=dtype,
                   name=name)


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv residual block with optional time conditioning.

    x: [B, H, W, C_in], temb: [B, D] or None -> [B, H, W, out_channels].
    """
    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        h = nn.GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, name="norm1")(x)
        h = conv3x3(self.out_channels, self.dtype, "conv1")(nn.silu(h))
        if temb is not None:
            t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, name="norm2")(h)
        h = conv3x3(self.out_channels, self.dtype, "conv2")(nn.silu(h))
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, name="conv_shortcut")(x)
        return x + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. ``padding=0`` pads right/bottom by one first (VAE encoder)."""
    out_channels: int
    padding: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv3x3(self.out_channels, self.dtype, "conv", stride=2, padding=self.padding)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling (to ``size`` when given) followed by a 3x3 conv."""
    out_channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, size=None):
        b, h, w, c = x.shape
        if size is None or tuple(size) == (2 * h, 2 * w):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        else:  # torch "nearest" picks floor(i * in / out)
            rows = (jnp.arange(size[0]) * h) // size[0]
            cols = (jnp.arange(size[1]) * w) // size[1]
            x = x[:, rows][:, :, cols]
        return conv3x3(self.out_channels, self.dtype, "conv")(x)
