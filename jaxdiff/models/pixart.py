"""The text-conditioned Diffusion Transformer of PixArt-alpha (Chen et al. 2023), diffusers'
``PixArtTransformer2DModel``.

NHWC: ``apply({"params": p}, sample [B,h,w,C], t [B] or scalar, context [B,L,D_text],
added_cond_kwargs=None, control=None, encoder_attention_mask=None) -> [B,h,w,out_channels]``
(the mask: [B, L], 1 = a caption token the cross-attention reads, as diffusers'). Patches are tokens
(sincos positions); the caption is projected (``caption_projection``) and read by a
cross-attention in every block; the timestep enters once (adaLN-single: one shared
6-vector per token width, plus a learned per-block ``scale_shift_table``). With
``use_additional_conditions`` (diffusers' default at sample_size 128) the timestep
embedding also takes the micro-conditions ``added_cond_kwargs={"resolution": [B, 2],
"aspect_ratio": [B, 1]}``. ``out_channels = 2 * in_channels`` is a learned variance, which
pipelines drop. Config fields and parameter names are diffusers'.

Reference: Chen et al., "PixArt-alpha: Fast Training of Diffusion Transformer for
Photorealistic Text-to-Image Synthesis", 2023.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models import config as config_lib
from jaxdiff.models.attention import Attention
from jaxdiff.models.layers import TimestepEmbedding, timestep_embedding
from jaxdiff.models.transformer_blocks import (GELUFeedForward, PatchEmbed, batch_timesteps,
                                               check_patch_grid, embed_timesteps,
                                               plain_layer_norm, unpatchify)


@dataclasses.dataclass(frozen=True)
class PixArtConfig:
    num_attention_heads: int = 16
    attention_head_dim: int = 72
    in_channels: int = 4
    out_channels: Any = 8  # None: in_channels
    num_layers: int = 28
    norm_num_groups: int = 32  # unused by the model (diffusers keeps it in the config)
    cross_attention_dim: Any = 1152
    attention_bias: bool = True
    sample_size: int = 128
    patch_size: int = 2
    activation_fn: str = "gelu-approximate"
    num_embeds_ada_norm: Any = 1000  # unused, but diffusers requires a value
    upcast_attention: bool = False
    norm_type: str = "ada_norm_single"
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    interpolation_scale: Any = None
    use_additional_conditions: Any = None
    caption_channels: Any = None

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels

    @property
    def learned_sigma(self) -> bool:
        return self.output_channels == 2 * self.in_channels

    @property
    def micro_conditions(self) -> bool:
        """diffusers: ``use_additional_conditions``, or None -> ``sample_size == 128``."""
        if self.use_additional_conditions is None:
            return self.sample_size == 128
        return bool(self.use_additional_conditions)

    @property
    def pos_interpolation_scale(self) -> float:
        if self.interpolation_scale is not None:
            return self.interpolation_scale
        return max(self.sample_size // 64, 1)

    def validate(self, source="transformer config"):
        _refuse = lambda field, why: config_lib.UnsupportedConfigError(
            f"{source}: {field}={getattr(self, field)!r} is not supported ({why}).")
        if self.norm_type != "ada_norm_single":
            raise _refuse("norm_type", "PixArtTransformer2DModel has only 'ada_norm_single'")
        if self.num_embeds_ada_norm is None:
            raise _refuse("num_embeds_ada_norm", "diffusers requires a value with ada_norm_single")
        if self.activation_fn not in ("gelu-approximate", "gelu"):
            raise _refuse("activation_fn", "only 'gelu-approximate' and 'gelu'")
        if self.norm_elementwise_affine:
            raise _refuse("norm_elementwise_affine", "only False, as PixArt checkpoints")
        if self.inner_dim % 4:
            raise _refuse("attention_head_dim", "heads x head width must be divisible by 4 "
                          "for the sincos position table")
        if self.micro_conditions and self.inner_dim % 3:
            raise _refuse("use_additional_conditions", "micro-conditions need heads x head "
                          "width divisible by 3")
        if self.sample_size % self.patch_size:
            raise _refuse("sample_size", f"not divisible by patch_size={self.patch_size}")

    @classmethod
    def from_dict(cls, d, source="transformer/config.json"):
        return config_lib.from_dict(cls, d, fixed=PIXART_FIXED, source=source)

    def to_dict(self):
        return config_lib.to_dict(self, "PixArtTransformer2DModel")


# Upstream fields jaxdiff accepts only at these values.
PIXART_FIXED = {"dropout": (0.0, 0), "attention_type": ("default", None)}


class AdaLayerNormSingle(nn.Module):
    """Timestep (+ micro-conditions) embedding ``emb`` and its SiLU -> ``linear`` (6 D).

    Returns (modulation [B, 6 D], embedded timestep [B, D])."""
    dim: int
    micro_conditions: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, t, added_cond_kwargs):
        emb = _TimestepSizeEmbeddings(self.dim, self.micro_conditions, self.dtype,
                                      name="emb")(t, added_cond_kwargs)
        return nn.Dense(6 * self.dim, dtype=self.dtype, name="linear")(nn.silu(emb)), emb


class _TimestepSizeEmbeddings(nn.Module):
    """diffusers ``PixArtAlphaCombinedTimestepSizeEmbeddings``."""
    dim: int
    micro_conditions: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, t, added):
        temb = embed_timesteps(t, self.dim, 0.0, self.dtype)
        if not self.micro_conditions:
            return temb
        if not added or "resolution" not in added or "aspect_ratio" not in added:
            raise ValueError("PixArtTransformer2DModel: this config uses micro-conditions; pass "
                             "added_cond_kwargs={'resolution': [B, 2], 'aspect_ratio': [B, 1]}.")
        b = t.shape[0]
        size = self.dim // 3

        def embed(values, name):
            e = timestep_embedding(jnp.asarray(values).reshape(-1), 256, flip_sin_to_cos=True,
                                   downscale_freq_shift=0.0)
            return TimestepEmbedding(size, self.dtype, name=name)(e.astype(self.dtype)).reshape(
                b, -1)

        return temb + jnp.concatenate([embed(added["resolution"], "resolution_embedder"),
                                       embed(added["aspect_ratio"], "aspect_ratio_embedder")], -1)


class PixArtBlock(nn.Module):
    """diffusers ``BasicTransformerBlock`` with ``norm_type="ada_norm_single"``: modulated
    self-attention, plain cross-attention, modulated MLP; per-block ``scale_shift_table``."""
    config: PixArtConfig
    layer: int = -1
    impl: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mod, context, control=None, mask=None):
        c = self.config
        d = x.shape[-1]
        table = self.param("scale_shift_table",
                           lambda k, s: nn.initializers.normal(d ** -0.5)(k, s), (6, d))
        mod = table[None].astype(self.dtype) + mod.reshape(mod.shape[0], 6, d)
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = (mod[:, i:i + 1] for i in range(6))
        attn = lambda name: Attention(c.num_attention_heads, c.attention_head_dim,
                                      bias=c.attention_bias, upcast=c.upcast_attention,
                                      layer=self.layer, impl=self.impl, dtype=self.dtype,
                                      name=name)
        h = plain_layer_norm(c.norm_eps, self.dtype, "norm1")(x) * (1 + scale) + shift
        x = x + gate * attn("attn1")(h, control=control)
        if c.cross_attention_dim is not None:
            x = x + attn("attn2")(x, context, control=control, mask=mask)
        h = plain_layer_norm(c.norm_eps, self.dtype, "norm2")(x) * (1 + scale_mlp) + shift_mlp
        return x + gate_mlp * GELUFeedForward(c.activation_fn, dtype=self.dtype, name="ff")(h)


class PixArtTransformer2DModel(nn.Module):
    """See the module docstring. ``control``: the attention controller of
    docs/design.md, "Controller as data" (block i's self- and cross-attention are layer i,
    told apart by ``cross``)."""
    config: PixArtConfig
    dtype: jnp.dtype = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, sample, timestep, context, added_cond_kwargs=None, control=None,
                 encoder_attention_mask=None):
        c = self.config
        h, w = check_patch_grid(sample.shape, c.patch_size, "PixArtTransformer2DModel")
        b = sample.shape[0]
        x = PatchEmbed(c.inner_dim, c.patch_size, base_size=c.sample_size // c.patch_size,
                       interpolation_scale=c.pos_interpolation_scale, dtype=self.dtype,
                       name="pos_embed")(sample.astype(self.dtype))
        mod, temb = AdaLayerNormSingle(c.inner_dim, c.micro_conditions, self.dtype,
                                       name="adaln_single")(batch_timesteps(timestep, b),
                                                            added_cond_kwargs)
        if context is not None:
            context = context.astype(self.dtype)
            if c.caption_channels is not None:
                context = _CaptionProjection(c.inner_dim, self.dtype,
                                             name="caption_projection")(context)
        mask = (None if encoder_attention_mask is None
                else jnp.asarray(encoder_attention_mask)[:, None, None, :] > 0.5)
        for i in range(c.num_layers):
            x = PixArtBlock(c, layer=i, impl=self.impl, dtype=self.dtype,
                            name=f"transformer_blocks_{i}")(x, mod, context, control, mask)
        d = c.inner_dim
        table = self.param("scale_shift_table",
                           lambda k, s: nn.initializers.normal(d ** -0.5)(k, s), (2, d))
        out_mod = table[None].astype(self.dtype) + temb[:, None]
        shift, scale = out_mod[:, :1], out_mod[:, 1:]
        x = plain_layer_norm(1e-6, self.dtype, "norm_out")(x) * (1 + scale) + shift
        x = nn.Dense(c.patch_size ** 2 * c.output_channels, dtype=self.dtype, name="proj_out")(x)
        return unpatchify(x, h, w, c.patch_size, c.output_channels)


class _CaptionProjection(nn.Module):
    """diffusers ``PixArtAlphaTextProjection``: ``linear_1`` -> GELU(tanh) -> ``linear_2``."""
    dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(self.dim, dtype=self.dtype, name="linear_1")(x), approximate=True)
        return nn.Dense(self.dim, dtype=self.dtype, name="linear_2")(x)


def pixart_dummy_inputs(module: PixArtTransformer2DModel):
    """Smallest valid inputs for ``module.init``."""
    c = module.config
    p = c.patch_size
    width = c.caption_channels if c.caption_channels is not None else c.cross_attention_dim
    context = None if c.cross_attention_dim is None else jnp.zeros((1, 1, width))
    added = ({"resolution": jnp.zeros((1, 2)), "aspect_ratio": jnp.zeros((1, 1))}
             if c.micro_conditions else None)
    return (jnp.zeros((1, p, p, c.in_channels)), jnp.zeros((1,)), context, added)


def reference_init(params, key):
    """PixArt-α's own initialisation (its ``initialize_weights``) of a params tree that
    flax initialised, for training from scratch: xavier-uniform kernels of every Dense and
    of the patch embedding (the fans of the reference's fused ``qkv`` / ``kv_linear`` for
    ``to_q``/``to_k``/``to_v``), zero biases, N(0, 0.02) for the timestep MLP, the
    ``t_block`` (``adaln_single.linear``) and the caption MLP, and zero for every block's
    cross-attention output and the final projection (``proj_out``), so the model
    predicts 0 at step 0. The scale-shift tables (N(0, 1/D)) and the fixed sin-cos
    position table are already the reference's; LayerNorms have no parameters."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, w), k in zip(leaves, keys):
        names = [str(getattr(p, "key", p)) for p in path]
        name, module = names[-1], "/".join(names[:-1])
        if name == "bias" or module == "proj_out" or module.endswith("attn2/to_out_0"):
            w = jnp.zeros_like(w) if name in ("bias", "kernel") else w
        elif name == "kernel" and (module.startswith(("adaln_single/emb/timestep_embedder",
                                                      "caption_projection"))
                                   or module == "adaln_single/linear"):
            w = 0.02 * jax.random.normal(k, w.shape, w.dtype)
        elif name == "kernel":
            fan_in, fan_out = int(np.prod(w.shape[:-1])), w.shape[-1]
            if module.endswith(("attn1/to_q", "attn1/to_k", "attn1/to_v")):
                fan_out *= 3                        # the reference's fused qkv
            elif module.endswith(("attn2/to_k", "attn2/to_v")):
                fan_out *= 2                        # the reference's fused kv_linear
            bound = float(np.sqrt(6.0 / (fan_in + fan_out)))
            w = jax.random.uniform(k, w.shape, w.dtype, -bound, bound)
        out.append(w)
    return jax.tree_util.tree_unflatten(tree, out)
