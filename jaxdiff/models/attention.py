"""Attention, the transformer block and the spatial transformer used by SD UNets.

The attention control hook (DESIGN contract 7): every UNet attention layer has a static
``layer`` index, and ``__call__`` takes an optional ``control`` argument — a pytree (data,
e.g. a ``flax.struct.dataclass``) with a pure method

    control.edit(probs, layer=int, cross=bool) -> probs     # probs: [B, heads, Lq, Lk]

so Prompt-to-Prompt style replacement, reweighting and map capture run inside jit.
``control=None`` (the default) takes the fast fused path and never materialises probs.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _split_heads(x, heads):
    b, l, d = x.shape
    return x.reshape(b, l, heads, d // heads)


def attend(q, k, v, *, scale: float, upcast: bool, impl: str = "auto", mask=None,
           control: Any = None, layer: int = -1, cross: bool = False):
    """Multi-head scaled dot-product attention.

    Args:
      q: [B, Lq, N, H]; k, v: [B, Lk, N, H].
      scale: softmax temperature (usually H ** -0.5).
      upcast: compute the scores and softmax in float32 (SD2 ``upcast_attention``).
      impl: "auto" | "einsum" | "xla" | "cudnn". "auto" uses cuDNN on GPU for
        16-bit inputs, an explicit einsum elsewhere (faster than XLA's fused op on CPU).
      mask: optional bool [B or 1, 1, Lq, Lk], True = attend.
      control: optional attention controller (see module docstring).
    Returns:
      [B, Lq, N, H] in q's dtype.
    """
    dtype = q.dtype
    if control is None and impl != "einsum":
        if impl == "auto":
            gpu16 = jax.default_backend() == "gpu" and dtype in (jnp.bfloat16, jnp.float16)
            impl = "cudnn" if gpu16 and mask is None else None
            if impl is None and jax.default_backend() == "cpu":
                impl = "einsum"
        elif impl == "xla":
            impl = None
        if impl != "einsum":
            if upcast:
                q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
            out = jax.nn.dot_product_attention(q, k, v, scale=scale, mask=mask,
                                               implementation=impl)
            return out.astype(dtype)
    if upcast:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    scores = jnp.einsum("bqnh,bknh->bnqk", q, k) * scale
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
    if control is not None:
        probs = control.edit(probs, layer=layer, cross=cross)
    return jnp.einsum("bnqk,bknh->bqnh", probs.astype(v.dtype), v)


class Attention(nn.Module):
    """diffusers ``Attention``: to_q/to_k/to_v (+bias optional) -> attend -> to_out.0.

    x: [B, Lq, query_dim], context: [B, Lk, D_ctx] or None (self-attention).
    """
    heads: int
    dim_head: int
    bias: bool = False
    upcast: bool = False
    layer: int = -1
    impl: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, control=None):
        cross = context is not None
        context = x if context is None else context
        inner = self.heads * self.dim_head
        dense = lambda name, bias: nn.Dense(inner, use_bias=bias, dtype=self.dtype, name=name)
        q = _split_heads(dense("to_q", self.bias)(x), self.heads)
        k = _split_heads(dense("to_k", self.bias)(context), self.heads)
        v = _split_heads(dense("to_v", self.bias)(context), self.heads)
        out = attend(q, k, v, scale=self.dim_head ** -0.5, upcast=self.upcast, impl=self.impl,
                     control=control, layer=self.layer, cross=cross)
        out = out.reshape(out.shape[0], out.shape[1], inner)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(out)


class FeedForward(nn.Module):
    """GEGLU feed-forward: ``net.0.proj`` (dim -> 2 * 4dim), gate, ``net.2`` (4dim -> dim)."""
    mult: int = 4
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        inner = dim * self.mult
        h = _GEGLU(inner, dtype=self.dtype, name="net_0")(x)
        return nn.Dense(dim, dtype=self.dtype, name="net_2")(h)


class _GEGLU(nn.Module):
    inner: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h, gate = jnp.split(nn.Dense(2 * self.inner, dtype=self.dtype, name="proj")(x), 2, -1)
        return h * nn.gelu(gate, approximate=False)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention and GEGLU MLP, each pre-LayerNorm and residual."""
    heads: int
    dim_head: int
    upcast: bool = False
    layer: int = -1
    impl: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, control=None):
        ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)
        attn = lambda name: Attention(self.heads, self.dim_head, upcast=self.upcast,
                                      layer=self.layer, impl=self.impl, dtype=self.dtype,
                                      name=name)
        x = x + attn("attn1")(ln("norm1")(x), control=control)
        x = x + attn("attn2")(ln("norm2")(x), context, control=control)
        return x + FeedForward(dtype=self.dtype, name="ff")(ln("norm3")(x))


class Transformer2DModel(nn.Module):
    """Spatial transformer: GroupNorm, proj_in, transformer blocks, proj_out, residual.

    x: [B, H, W, C], context: [B, L, D] -> [B, H, W, C].
    ``first_layer`` is the static controller index of the first block.
    """
    heads: int
    dim_head: int
    num_layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    upcast: bool = False
    first_layer: int = 0
    impl: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, control=None):
        b, h, w, c = x.shape
        inner = self.heads * self.dim_head
        proj = ((lambda n, f: nn.Dense(f, dtype=self.dtype, name=n)) if self.use_linear_projection
                else (lambda n, f: nn.Conv(f, (1, 1), dtype=self.dtype, name=n)))
        y = nn.GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="norm")(x)
        y = proj("proj_in", inner)(y).reshape(b, h * w, inner)
        for i in range(self.num_layers):
            y = BasicTransformerBlock(self.heads, self.dim_head, self.upcast,
                                      layer=self.first_layer + i, impl=self.impl,
                                      dtype=self.dtype, name=f"transformer_blocks_{i}")(
                                          y, context, control)
        y = proj("proj_out", c)(y.reshape(b, h, w, inner))
        return x + y

