"""Attention, the transformer block and the spatial transformer used by SD UNets.

The attention control hook (docs/design.md, "Controller as data"): every UNet attention
layer has a static ``layer`` index, and ``__call__`` takes an optional ``control``
argument — a pytree (data, e.g. a ``flax.struct.dataclass``) with a pure method

    control.edit(probs, layer=int, cross=bool) -> probs     # probs: [B, heads, Lq, Lk]

so Prompt-to-Prompt style replacement, reweighting and map capture run inside jit.
``control=None`` (the default) takes the fast fused path and never materialises probs.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.conv import Conv


def _split_heads(x, heads):
    b, l, d = x.shape
    return x.reshape(b, l, heads, d // heads)


# Largest [B, N, q_block, Lk] float32 score block the CPU path materialises at once.
# XLA:CPU gets a call's large buffers afresh from the OS each time, so every page of a
# whole [B, N, Lq, Lk] score tensor page-faults on every call (64 MiB for 8 heads at 32x32
# latents and batch 2; 2 GiB at SD's 64x64), which cost more than the arithmetic: blocking
# the queries cut the SD-like "reduced" UNet forward from ~309k minor faults and ~1 s to
# ~1-5k and ~0.3 s (bench/models.py). 4-16 MiB blocks timed alike; 1 MiB and less lose to
# the per-block loop overhead.
_CPU_SCORE_BLOCK_BYTES = 4 << 20
_IMPLS = ("auto", "blockwise", "einsum", "xla", "cudnn", "splash")
# TPU: the Pallas splash kernel (flash attention: no [Lq, Lk] scores in HBM) takes
# sequences whose lengths are multiples of its block and whose scores would be large; the
# SD UNets' 64x64 and 32x32 self-attention (4096 and 1024 tokens) and DiT / PixArt's
# self-attention qualify, cross-attention over 77 / 120 caption tokens does not.
_SPLASH_BLOCK = 128
_SPLASH_MIN_SCORES = 1024 * 1024


def _scores_to_probs(q, k, scale, mask):
    """[B, Lq, N, H] x [B, Lk, N, H] -> float32 softmax probs [B, N, Lq, Lk]."""
    scores = jnp.einsum("bqnh,bknh->bnqk", q, k) * scale
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    return jax.nn.softmax(scores.astype(jnp.float32), axis=-1)


def _attend_blockwise(q, k, v, scale):
    """Softmax attention over query blocks of at most ``_CPU_SCORE_BLOCK_BYTES`` scores.

    Same arithmetic as the einsum path (scores in q's dtype, softmax in float32, probs cast
    to v's dtype); only the peak size of the score tensor changes. Layouts [B, N, L, H] and
    [B, N, H, Lk] make both products plain batched matmuls. Returns [B, Lq, N, H].
    """
    b, lq, n, h = q.shape
    lk = k.shape[1]
    kt = k.transpose(0, 2, 3, 1)
    vt = v.transpose(0, 2, 1, 3)

    def block(qb):  # [B, N, q_block, H] -> [B, N, q_block, H]
        scores = jnp.matmul(qb, kt) * scale
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
        return jnp.matmul(probs.astype(v.dtype), vt)

    n_blocks = -(-b * n * lq * lk * 4 // _CPU_SCORE_BLOCK_BYTES)
    qt = q.transpose(0, 2, 1, 3)
    if n_blocks <= 1:
        out = block(qt)
    else:
        n_blocks = min(n_blocks, lq)
        q_block = -(-lq // n_blocks)
        pad = n_blocks * q_block - lq  # zero query rows: finite, computed, then dropped
        qt = jnp.pad(qt, ((0, 0), (0, 0), (0, pad), (0, 0)))
        blocks = qt.reshape(b, n, n_blocks, q_block, h).transpose(2, 0, 1, 3, 4)
        out = jax.lax.map(block, blocks).transpose(1, 2, 0, 3, 4).reshape(b, n, -1, h)
        out = out[:, :, :lq]
    return out.transpose(0, 2, 1, 3)


def splash_fits(lq: int, lk: int) -> bool:
    """Whether the TPU splash kernel takes these lengths (multiples of its block)."""
    return lq % _SPLASH_BLOCK == 0 and lk % _SPLASH_BLOCK == 0


def auto_implementation(dtype, masked: bool = False, lq: int = 0, lk: int = 0) -> str:
    """What ``impl="auto"`` runs, chosen here only (at trace time; logged once per choice).

    CPU: "blockwise"; GPU: "cudnn" (flash attention) for 16-bit unmasked inputs, else
    "xla"; TPU: "splash" (Pallas flash attention) for unmasked long sequences (``lq`` x
    ``lk`` >= 1M scores, both multiples of 128), else "xla". ``JAXDIFF_ATTENTION=<impl>``
    overrides the choice (e.g. ``xla`` makes a CPU lowering count attention as an
    accelerator runs it: ``bench/roofline.py``); a forced "splash" still falls back to
    "xla" for lengths the kernel does not take, or a mask.
    """
    forced = os.environ.get("JAXDIFF_ATTENTION", "auto")
    if forced not in _IMPLS:
        raise ValueError(f"JAXDIFF_ATTENTION={forced!r}: expected one of {_IMPLS}.")
    backend = jax.default_backend()
    if forced != "auto":
        impl = forced
    elif backend == "cpu":
        impl = "blockwise"
    elif backend == "tpu":
        impl = "splash" if lq * lk >= _SPLASH_MIN_SCORES else "xla"
    else:
        gpu16 = backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
        impl = "cudnn" if gpu16 and not masked else "xla"
    if impl == "splash" and (masked or not splash_fits(lq, lk)):
        impl = "xla"
    log_choice(backend, jnp.dtype(dtype).name, impl)
    return impl


def _splash_interpret() -> bool:
    """Pallas interpret mode for the splash kernel: off on a TPU backend, on elsewhere
    (CPU tests); ``JAXDIFF_PALLAS_INTERPRET=0/1`` decides instead (0: compile the real
    kernel for a TPU target from a CPU host, as bench/roofline.py --target does)."""
    env = os.environ.get("JAXDIFF_PALLAS_INTERPRET")
    return jax.default_backend() != "tpu" if env is None else env == "1"


@functools.lru_cache(maxsize=None)
def _splash_kernel(heads: int, lq: int, lk: int, interpret: bool):
    """The splash MHA kernel of one example ([N, Lq, H] x [N, Lk, H], no mask)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    mask = sa.MultiHeadMask([sa.FullMask((lq, lk))] * heads)
    bq, bk = min(_SPLASH_BLOCK, lq), min(_SPLASH_BLOCK, lk)
    sizes = sa.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                          block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq,
                          block_kv_dq=bk)
    return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret)


def _attend_splash(q, k, v, scale):
    """[B, Lq, N, H] x [B, Lk, N, H] -> [B, Lq, N, H] by the TPU Pallas splash kernel
    (vmapped over the batch; the kernel takes q already scaled, in [N, L, H] layout)."""
    kernel = _splash_kernel(q.shape[2], q.shape[1], k.shape[1], _splash_interpret())
    tr = lambda x: x.transpose(0, 2, 1, 3)
    out = jax.vmap(kernel)(tr(q * jnp.asarray(scale, q.dtype)), tr(k), tr(v))
    return tr(out)


@functools.lru_cache(maxsize=None)
def log_choice(backend: str, dtype: str, impl: str) -> None:
    """One INFO line per (backend, dtype, implementation) in a process."""
    logging.getLogger(__name__).info("attention on %s for %s inputs: %s", backend, dtype, impl)


def attend(q, k, v, *, scale: float, upcast: bool, impl: str = "auto", mask=None,
           control: Any = None, layer: int = -1, cross: bool = False):
    """Multi-head scaled dot-product attention.

    Args:
      q: [B, Lq, N, H]; k, v: [B, Lk, N, H].
      scale: softmax temperature (usually H ** -0.5).
      upcast: compute the scores and softmax in float32 (SD2 ``upcast_attention``).
      impl: "auto" | "blockwise" | "einsum" | "xla" | "cudnn" | "splash". "auto" uses cuDNN
        on GPU for 16-bit inputs, XLA's fused op for other GPU inputs, the Pallas splash
        kernel on TPU for long sequences (``auto_implementation``), and on CPU "blockwise": the
        einsum arithmetic over query blocks, so the [B, N, Lq, Lk] scores are never
        materialised whole. "einsum" materialises them (it and a ``mask`` or a ``control``
        always take that path).
      mask: optional bool [B or 1, 1, Lq, Lk], True = attend.
      control: optional attention controller (see module docstring).
    Returns:
      [B, Lq, N, H] in q's dtype.
    """
    if impl not in _IMPLS:
        raise ValueError(f"attend: unknown {impl=}; expected one of {_IMPLS}.")
    dtype = q.dtype
    if impl == "auto":
        impl = auto_implementation(dtype, mask is not None, q.shape[1], k.shape[1])
    elif impl == "splash" and (mask is not None or not splash_fits(q.shape[1], k.shape[1])):
        impl = "xla"
    if upcast:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    if control is None and impl in ("xla", "cudnn"):
        if upcast:
            v = v.astype(jnp.float32)
        out = jax.nn.dot_product_attention(q, k, v, scale=scale, mask=mask,
                                           implementation=None if impl == "xla" else impl)
        return out.astype(dtype)
    if control is None and impl == "splash":
        v = v.astype(q.dtype)
        return _attend_splash(q, k, v, scale).astype(dtype)
    if control is None and mask is None and impl == "blockwise":
        return _attend_blockwise(q, k, v, scale).astype(dtype)
    probs = _scores_to_probs(q, k, scale, mask)
    if control is not None:
        probs = control.edit(probs, layer=layer, cross=cross)
    return jnp.einsum("bnqk,bknh->bqnh", probs.astype(v.dtype), v)


class Attention(nn.Module):
    """diffusers ``Attention``: to_q/to_k/to_v (+bias optional) -> attend -> to_out.0.

    x: [B, Lq, query_dim], context: [B, Lk, D_ctx] or None (self-attention); mask:
    optional bool [B or 1, 1, Lq or 1, Lk], True = attend (PixArt's caption mask).
    """
    heads: int
    dim_head: int
    bias: bool = False
    upcast: bool = False
    layer: int = -1
    impl: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, control=None, mask=None):
        cross = context is not None
        context = x if context is None else context
        inner = self.heads * self.dim_head
        dense = lambda name, bias: nn.Dense(inner, use_bias=bias, dtype=self.dtype, name=name)
        q = _split_heads(dense("to_q", self.bias)(x), self.heads)
        k = _split_heads(dense("to_k", self.bias)(context), self.heads)
        v = _split_heads(dense("to_v", self.bias)(context), self.heads)
        out = attend(q, k, v, scale=self.dim_head ** -0.5, upcast=self.upcast, impl=self.impl,
                     mask=mask, control=control, layer=self.layer, cross=cross)
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


class GatedSelfAttentionDense(nn.Module):
    """GLIGEN's ``fuser``: self-attention over [visual; projected object] tokens and a
    GEGLU MLP, each added through a tanh gate (``alpha_attn``, ``alpha_dense``, zero at
    init, so a new fuser leaves the block unchanged). x: [B, L, C], objs: [B, N, D]."""
    heads: int
    dim_head: int
    impl: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, objs):
        ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)
        gate = lambda name: jnp.tanh(self.param(name, nn.initializers.zeros, ()))
        objs = nn.Dense(x.shape[-1], dtype=self.dtype, name="linear")(objs.astype(self.dtype))
        both = ln("norm1")(jnp.concatenate([x, objs], axis=1))
        a = Attention(self.heads, self.dim_head, impl=self.impl, dtype=self.dtype,
                      name="attn")(both)[:, :x.shape[1]]
        x = x + (gate("alpha_attn") * a).astype(x.dtype)
        f = FeedForward(dtype=self.dtype, name="ff")(ln("norm2")(x))
        return x + (gate("alpha_dense") * f).astype(x.dtype)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention and GEGLU MLP, each pre-LayerNorm and residual."""
    heads: int
    dim_head: int
    upcast: bool = False
    layer: int = -1
    impl: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, control=None, grounding=None):
        """``grounding``: None, or GLIGEN's (tokens [B, N, D_ctx], enabled: a traced bool
        or None for on) for the gated ``fuser`` after self-attention (diffusers'
        ``attention_type="gated"``)."""
        ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)
        attn = lambda name: Attention(self.heads, self.dim_head, upcast=self.upcast,
                                      layer=self.layer, impl=self.impl, dtype=self.dtype,
                                      name=name)
        x = x + attn("attn1")(ln("norm1")(x), control=control)
        if grounding is not None:
            objs, enabled = grounding
            fuser = GatedSelfAttentionDense(self.heads, self.dim_head, self.impl, self.dtype,
                                            name="fuser")
            if enabled is None or self.is_initializing():
                x = fuser(x, objs)
            else:
                x = nn.cond(enabled, lambda m, v, o: m(v, o), lambda m, v, o: v, fuser, x, objs)
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
    def __call__(self, x, context, control=None, grounding=None):
        b, h, w, c = x.shape
        inner = self.heads * self.dim_head
        proj = ((lambda n, f: nn.Dense(f, dtype=self.dtype, name=n)) if self.use_linear_projection
                else (lambda n, f: Conv(f, (1, 1), dtype=self.dtype, name=n)))
        y = nn.GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="norm")(x)
        y = proj("proj_in", inner)(y).reshape(b, h * w, inner)
        for i in range(self.num_layers):
            y = BasicTransformerBlock(self.heads, self.dim_head, self.upcast,
                                      layer=self.first_layer + i, impl=self.impl,
                                      dtype=self.dtype, name=f"transformer_blocks_{i}")(
                                          y, context, control, grounding)
        y = proj("proj_out", c)(y.reshape(b, h, w, inner))
        return x + y

