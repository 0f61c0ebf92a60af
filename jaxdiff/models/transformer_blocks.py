"""Pieces shared by the latent-patch transformers (DiT, PixArt, U-ViT), NHWC.

Names mirror diffusers' (``pos_embed.proj``, ``ff.net.0.proj``, ``linear_1``) so that
``jaxdiff.weights.convert`` maps them mechanically. Attention itself is
``jaxdiff.models.attention.Attention``.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.conv import Conv
from jaxdiff.models.layers import TimestepEmbedding, timestep_embedding

_ACTIVATIONS = ("gelu-approximate", "gelu")


def check_patch_grid(shape, patch_size: int, what: str) -> tuple:
    """(h, w) patch grid of a [B, H, W, C] latent; one-line ValueError if not divisible."""
    h, w = shape[1], shape[2]
    if h % patch_size or w % patch_size:
        raise ValueError(f"{what}: latent size {h}x{w} is not divisible by patch_size="
                         f"{patch_size}; use a latent (image) size that is a multiple of "
                         f"{patch_size} (times the VAE's downscale for images).")
    return h // patch_size, w // patch_size


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """diffusers' ``get_1d_sincos_pos_embed_from_grid`` (float64): [M] -> [M, dim]."""
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    out = np.outer(pos.reshape(-1), 1.0 / 10000 ** omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_2d(dim: int, h: int, w: int, base_size: int,
                        interpolation_scale: float = 1.0) -> np.ndarray:
    """diffusers' ``get_2d_sincos_pos_embed`` for an h x w grid: [h * w, dim] float32.

    Tokens are row-major (h, w); the first half of each row embeds the column coordinate,
    the second the row coordinate (diffusers' order).
    """
    if dim % 4:
        raise ValueError(f"sincos position embedding: width {dim} is not divisible by 4.")
    rows = np.arange(h, dtype=np.float32) / (h / base_size) / interpolation_scale
    cols = np.arange(w, dtype=np.float32) / (w / base_size) / interpolation_scale
    gc, gr = np.meshgrid(cols, rows, indexing="xy")  # each [h, w]
    return np.concatenate([sincos_1d(dim // 2, gc.astype(np.float64)),
                           sincos_1d(dim // 2, gr.astype(np.float64))], 1).astype(np.float32)


class PatchEmbed(nn.Module):
    """diffusers ``PatchEmbed``: stride-p conv ``proj`` to tokens [B, h*w, D] (+ sincos).

    ``base_size`` / ``interpolation_scale`` as diffusers (base = sample_size // p); the table
    is computed for the input's own grid, as diffusers does when it differs from the
    config's. ``sincos=False``: no position embedding (U-ViT adds a learned one).
    """
    embed_dim: int
    patch_size: int
    base_size: int = 1
    interpolation_scale: float = 1.0
    sincos: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        p = self.patch_size
        y = Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    name="proj")(x)
        b, h, w, d = y.shape
        y = y.reshape(b, h * w, d)
        if self.sincos:
            pos = sincos_pos_embed_2d(d, h, w, self.base_size, self.interpolation_scale)
            y = y + jnp.asarray(pos, y.dtype)[None]
        return y


def unpatchify(x, h: int, w: int, p: int, c: int):
    """[B, h*w, p*p*c] tokens (patch-row, patch-column, channel order) -> [B, h*p, w*p, c]."""
    b = x.shape[0]
    x = x.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, c)


class GELUFeedForward(nn.Module):
    """diffusers ``FeedForward`` with ``activation_fn`` "gelu-approximate" (tanh) or
    "gelu": ``net.0.proj`` (dim -> mult * dim), GELU, ``net.2`` (-> dim)."""
    activation: str = "gelu-approximate"
    mult: int = 4
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        h = _GELU(dim * self.mult, self.activation == "gelu-approximate", self.dtype,
                  name="net_0")(x)
        return nn.Dense(dim, dtype=self.dtype, name="net_2")(h)


class _GELU(nn.Module):
    features: int
    approximate: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.features, dtype=self.dtype, name="proj")(x)
        return nn.gelu(h, approximate=self.approximate)


def plain_layer_norm(eps: float, dtype, name: str) -> nn.LayerNorm:
    """LayerNorm without affine parameters (diffusers' ``elementwise_affine=False``)."""
    return nn.LayerNorm(epsilon=eps, use_bias=False, use_scale=False, dtype=dtype, name=name)


def embed_timesteps(t, dim: int, shift: float, dtype):
    """diffusers' ``time_proj`` (``Timesteps(256, flip_sin_to_cos=True, shift)``) and
    ``timestep_embedder`` (a ``TimestepEmbedding``): [B] -> [B, dim].

    Call inside a compact method: the ``timestep_embedder`` submodule belongs to the caller.
    """
    emb = timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=shift)
    return TimestepEmbedding(dim, dtype, name="timestep_embedder")(emb.astype(dtype))


def batch_timesteps(t, batch: int) -> jax.Array:
    """A scalar or [B] timestep as [B]."""
    t = jnp.asarray(t)
    return jnp.broadcast_to(t.reshape(-1) if t.ndim else t, (batch,))
