"""The class-conditional Diffusion Transformer (Peebles & Xie 2023), diffusers'
``DiTTransformer2DModel``.

NHWC: ``apply({"params": p}, sample [B,h,w,C], t [B] or scalar, class_labels [B] int) ->
[B,h,w,out_channels]``. Latent patches are tokens (``PatchEmbed`` with a 2D sincos
position table); every block is adaLN-Zero: its own timestep + class embedding (with one
extra "null" class row, index ``num_embeds_ada_norm``, for classifier-free guidance) gives
shift/scale/gate of the self-attention and the MLP. With ``out_channels = 2 *
in_channels`` the second half of the output is the learned variance (DiT's learned sigma).
Config fields and parameter names are diffusers'.

Reference: Peebles & Xie, "Scalable Diffusion Models with Transformers", ICCV 2023.
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
from jaxdiff.models.transformer_blocks import (GELUFeedForward, PatchEmbed, batch_timesteps,
                                               check_patch_grid, embed_timesteps,
                                               plain_layer_norm, unpatchify)


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    num_attention_heads: int = 16
    attention_head_dim: int = 72
    in_channels: int = 4
    out_channels: Any = None  # None: in_channels
    num_layers: int = 28
    norm_num_groups: int = 32  # unused by the model (diffusers keeps it in the config)
    attention_bias: bool = True
    sample_size: int = 32
    patch_size: int = 2
    activation_fn: str = "gelu-approximate"
    num_embeds_ada_norm: Any = 1000
    upcast_attention: bool = False
    norm_type: str = "ada_norm_zero"
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-5

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
    def num_classes(self) -> int:
        return self.num_embeds_ada_norm

    def validate(self, source="transformer config"):
        _refuse = lambda field, why: config_lib.UnsupportedConfigError(
            f"{source}: {field}={getattr(self, field)!r} is not supported ({why}).")
        if self.norm_type != "ada_norm_zero":
            raise _refuse("norm_type", "DiTTransformer2DModel has only 'ada_norm_zero'")
        if not isinstance(self.num_embeds_ada_norm, int) or self.num_embeds_ada_norm < 1:
            raise _refuse("num_embeds_ada_norm", "the number of classes, a positive int")
        if self.activation_fn not in ("gelu-approximate", "gelu"):
            raise _refuse("activation_fn", "only 'gelu-approximate' and 'gelu'")
        if self.norm_elementwise_affine:
            raise _refuse("norm_elementwise_affine", "only False, as DiT checkpoints")
        if self.inner_dim % 4:
            raise _refuse("attention_head_dim", "heads x head width must be divisible by 4 "
                          "for the sincos position table")
        if self.sample_size % self.patch_size:
            raise _refuse("sample_size", f"not divisible by patch_size={self.patch_size}")

    @classmethod
    def from_dict(cls, d, source="transformer/config.json"):
        return config_lib.from_dict(cls, d, fixed=DIT_FIXED, source=source)

    def to_dict(self):
        return config_lib.to_dict(self, "DiTTransformer2DModel")


# Upstream fields jaxdiff accepts only at these values.
DIT_FIXED = {"dropout": (0.0, 0)}


def check_class_labels(labels, num_classes: int, *, allow_null: bool = False) -> np.ndarray:
    """Concrete class labels as int32 [B]; one-line ValueError for any out of range.

    ``allow_null`` also accepts ``num_classes`` (the unconditional label of guidance).
    """
    arr = np.asarray(labels)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"class_labels: expected a list of ints, got shape {arr.shape} of "
                         f"{arr.dtype}.")
    top = num_classes + int(allow_null)
    bad = arr[(arr < 0) | (arr >= top)]
    if bad.size:
        raise ValueError(f"class_labels: {int(bad[0])} is out of range; this model has "
                         f"{num_classes} classes (0..{num_classes - 1}).")
    return arr.astype(np.int32)


class CombinedTimestepLabelEmbeddings(nn.Module):
    """Timestep (shift 1) + class embedding (``num_classes + 1`` rows): [B] x [B] -> [B, D]."""
    num_classes: int
    dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, t, labels):
        temb = embed_timesteps(t, self.dim, 1.0, self.dtype)
        return temb + LabelEmbedding(self.num_classes, self.dim, self.dtype,
                                     name="class_embedder")(labels)


class LabelEmbedding(nn.Module):
    """diffusers ``LabelEmbedding`` at inference: ``embedding_table`` [num_classes + 1, D]
    (the last row is the null class; training's label dropout is the recipe's job)."""
    num_classes: int
    dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, labels):
        return nn.Embed(self.num_classes + 1, self.dim, dtype=self.dtype,
                        name="embedding_table")(labels)


class AdaLayerNormZero(nn.Module):
    """``emb`` -> SiLU -> ``linear`` (6 D): shift/scale/gate for attention and MLP."""
    num_classes: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, t, labels):
        d = x.shape[-1]
        cond = CombinedTimestepLabelEmbeddings(self.num_classes, d, self.dtype, name="emb")(
            t, labels)
        mod = nn.Dense(6 * d, dtype=self.dtype, name="linear")(nn.silu(cond))
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        x = plain_layer_norm(1e-6, self.dtype, "norm")(x) * (1 + scale[:, None]) + shift[:, None]
        return x, (gate, shift_mlp, scale_mlp, gate_mlp), cond


class DiTBlock(nn.Module):
    """diffusers ``BasicTransformerBlock`` with ``norm_type="ada_norm_zero"`` and no
    cross-attention. Returns (x, the block's conditioning vector)."""
    config: DiTConfig
    layer: int = -1
    impl: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, t, labels, control=None):
        c = self.config
        h, (gate, shift_mlp, scale_mlp, gate_mlp), cond = AdaLayerNormZero(
            c.num_classes, self.dtype, name="norm1")(x, t, labels)
        attn = Attention(c.num_attention_heads, c.attention_head_dim, bias=c.attention_bias,
                         upcast=c.upcast_attention, layer=self.layer, impl=self.impl,
                         dtype=self.dtype, name="attn1")
        x = x + gate[:, None] * attn(h, control=control)
        h = plain_layer_norm(c.norm_eps, self.dtype, "norm3")(x)
        h = h * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        ff = GELUFeedForward(c.activation_fn, dtype=self.dtype, name="ff")
        return x + gate_mlp[:, None] * ff(h), cond


class DiTTransformer2DModel(nn.Module):
    """See the module docstring. ``control``: the attention controller of
    docs/design.md, "Controller as data" (self-attention layers 0..num_layers-1)."""
    config: DiTConfig
    dtype: jnp.dtype = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, sample, timestep, class_labels, control=None):
        c = self.config
        h, w = check_patch_grid(sample.shape, c.patch_size, "DiTTransformer2DModel")
        b = sample.shape[0]
        t = batch_timesteps(timestep, b)
        labels = jnp.asarray(class_labels).astype(jnp.int32).reshape(b)
        x = PatchEmbed(c.inner_dim, c.patch_size, base_size=c.sample_size // c.patch_size,
                       dtype=self.dtype, name="pos_embed")(sample.astype(self.dtype))
        cond0 = None
        for i in range(c.num_layers):
            x, cond = DiTBlock(c, layer=i, impl=self.impl, dtype=self.dtype,
                               name=f"transformer_blocks_{i}")(x, t, labels, control)
            cond0 = cond if i == 0 else cond0
        mod = nn.Dense(2 * c.inner_dim, dtype=self.dtype, name="proj_out_1")(nn.silu(cond0))
        shift, scale = jnp.split(mod, 2, axis=-1)
        x = plain_layer_norm(1e-6, self.dtype, "norm_out")(x)
        x = x * (1 + scale[:, None]) + shift[:, None]
        x = nn.Dense(c.patch_size ** 2 * c.output_channels, dtype=self.dtype,
                     name="proj_out_2")(x)
        return unpatchify(x, h, w, c.patch_size, c.output_channels)


def dit_dummy_inputs(module: DiTTransformer2DModel):
    """Smallest valid inputs for ``module.init``."""
    p = module.config.patch_size
    return (jnp.zeros((1, p, p, module.config.in_channels)), jnp.zeros((1,)),
            jnp.zeros((1,), jnp.int32))


def split_learned_sigma(config: DiTConfig, out: jax.Array) -> jax.Array:
    """The noise prediction of a model output: its first ``in_channels`` channels when the
    model learns sigma (diffusers' pipelines drop the variance half), else all of it."""
    return out[..., :config.in_channels] if config.learned_sigma else out
