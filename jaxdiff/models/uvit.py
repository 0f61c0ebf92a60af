"""U-ViT (Bao et al. 2023): a ViT denoiser where the timestep, the condition and the latent
patches are all tokens, with long skip connections from shallow to deep blocks.

NHWC: ``apply({"params": p}, sample [B,h,w,C], t [B] or scalar, context=None,
class_labels=None) -> [B,h,w,C]``. The architecture is the reference code's
(github.com/baofff/U-ViT, ``libs/uvit_t2i.py`` with text, ``libs/uvit.py`` with classes):

- tokens: text-to-image ``[time, context_embed(context)..., patches]``; class-conditional
  ``[label_emb(y), time, patches]``; unconditional ``[time, patches]``; plus a learned
  position table ``pos_embed`` [1, extras + patches, D];
- ``depth // 2`` ``in_blocks`` (each output kept), a ``mid_block``, ``depth // 2``
  ``out_blocks`` that first fuse the matching shallow output by
  ``skip_linear(concat(x, skip))`` (last in, first out);
- pre-LN blocks (LayerNorm eps 1e-5, fused ``qkv`` attention, GELU MLP ``fc1``/``fc2``);
  ``norm`` -> ``decoder_pred`` -> unpatchify -> optional 3x3 ``final_layer`` conv.

Parameter names are the reference's (its checkpoints' keys, through weights.convert).

Reference: Bao et al., "All are Worth Words: A ViT Backbone for Diffusion Models",
CVPR 2023.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.attention import attend
from jaxdiff.models.layers import conv3x3, timestep_embedding
from jaxdiff.models.transformer_blocks import (PatchEmbed, batch_timesteps, check_patch_grid,
                                               unpatchify)


@dataclasses.dataclass(frozen=True)
class UViTConfig:
    """The reference constructor's arguments (``img_size`` is the latent size)."""
    img_size: int = 32
    patch_size: int = 2
    in_chans: int = 4
    embed_dim: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    mlp_time_embed: bool = False
    clip_dim: Any = 768  # None: no text condition
    num_clip_token: int = 77
    num_classes: int = -1  # > 0: class-conditional (then clip_dim must be None)
    conv: bool = True
    skip: bool = True

    @property
    def extras(self) -> int:
        if self.clip_dim is not None:
            return 1 + self.num_clip_token
        return 2 if self.num_classes > 0 else 1

    @property
    def sample_size(self) -> int:
        """The latent side (``img_size``), under the name pipelines read."""
        return self.img_size

    @property
    def in_channels(self) -> int:
        """``in_chans``, under the name pipelines read."""
        return self.in_chans

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    def validate(self, source="U-ViT config"):
        if self.clip_dim is not None and self.num_classes > 0:
            raise ValueError(f"{source}: clip_dim and num_classes > 0 together is not a U-ViT "
                             "(text or classes, as the reference's two models).")
        if self.img_size % self.patch_size:
            raise ValueError(f"{source}: img_size={self.img_size} is not divisible by "
                             f"patch_size={self.patch_size}.")
        if self.embed_dim % self.num_heads or self.embed_dim % 2:
            raise ValueError(f"{source}: embed_dim={self.embed_dim} must be even and divisible "
                             f"by num_heads={self.num_heads}.")

    def __post_init__(self):
        self.validate()


class UViTAttention(nn.Module):
    """Fused ``qkv`` (layout K, heads, head width) -> ``attend`` -> ``proj``."""
    num_heads: int
    qkv_bias: bool = False
    layer: int = -1
    impl: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, control=None):
        b, l, d = x.shape
        qkv = nn.Dense(3 * d, use_bias=self.qkv_bias, dtype=self.dtype, name="qkv")(x)
        q, k, v = qkv.reshape(b, l, 3, self.num_heads, d // self.num_heads).transpose(
            2, 0, 1, 3, 4)
        out = attend(q, k, v, scale=(d // self.num_heads) ** -0.5, upcast=False, impl=self.impl,
                     control=control, layer=self.layer, cross=False)
        return nn.Dense(d, dtype=self.dtype, name="proj")(out.reshape(b, l, d))


class UViTBlock(nn.Module):
    """Pre-LN attention and GELU MLP; with ``skip``, ``skip_linear`` fuses a long skip."""
    config: UViTConfig
    skip: bool = False
    layer: int = -1
    impl: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, skip=None, control=None):
        c = self.config
        ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)
        if self.skip:
            x = nn.Dense(x.shape[-1], dtype=self.dtype, name="skip_linear")(
                jnp.concatenate([x, skip], axis=-1))
        x = x + UViTAttention(c.num_heads, c.qkv_bias, self.layer, self.impl, self.dtype,
                              name="attn")(ln("norm1")(x), control)
        return x + _Mlp(int(c.embed_dim * c.mlp_ratio), self.dtype, name="mlp")(ln("norm2")(x))


class _Mlp(nn.Module):
    hidden: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x), approximate=False)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(h)


class UViT(nn.Module):
    """See the module docstring. ``control``: the attention controller of docs/design.md,
    "Controller as data" (self-attention over all tokens; blocks numbered in, mid, out)."""
    config: UViTConfig
    dtype: jnp.dtype = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, sample, timestep, context=None, class_labels=None, control=None):
        c = self.config
        h, w = check_patch_grid(sample.shape, c.patch_size, "UViT")
        if h * w != c.num_patches:
            raise ValueError(f"UViT: latent size {sample.shape[1]}x{sample.shape[2]} differs "
                             f"from the config's img_size={c.img_size} (the learned position "
                             "table has one row per patch); use that latent size.")
        if (context is None) != (c.clip_dim is None):
            raise ValueError("UViT: pass context [B, num_clip_token, clip_dim] exactly when the "
                             "config has clip_dim.")
        if (class_labels is None) != (c.num_classes <= 0):
            raise ValueError("UViT: pass class_labels exactly when the config has num_classes.")
        b, d = sample.shape[0], c.embed_dim
        x = PatchEmbed(d, c.patch_size, sincos=False, dtype=self.dtype, name="patch_embed")(
            sample.astype(self.dtype))
        time = timestep_embedding(batch_timesteps(timestep, b), d, flip_sin_to_cos=True,
                                  downscale_freq_shift=0.0).astype(self.dtype)
        if c.mlp_time_embed:
            time = nn.Dense(4 * d, dtype=self.dtype, name="time_embed_0")(time)
            time = nn.Dense(d, dtype=self.dtype, name="time_embed_2")(nn.silu(time))
        tokens = [time[:, None]]
        if c.clip_dim is not None:
            tokens.append(nn.Dense(d, dtype=self.dtype, name="context_embed")(
                context.astype(self.dtype)))
        if c.num_classes > 0:
            label = nn.Embed(c.num_classes, d, dtype=self.dtype, name="label_emb")(
                jnp.asarray(class_labels).astype(jnp.int32).reshape(b))
            tokens.insert(0, label[:, None])
        x = jnp.concatenate(tokens + [x], axis=1)
        pos = self.param("pos_embed", nn.initializers.truncated_normal(0.02),
                         (1, c.extras + c.num_patches, d))
        x = x + pos.astype(self.dtype)
        half, skips = c.depth // 2, []
        block = lambda i, name, skip=False: UViTBlock(c, skip, i, self.impl, self.dtype, name=name)
        for i in range(half):
            x = block(i, f"in_blocks_{i}")(x, control=control)
            skips.append(x)
        x = block(half, "mid_block")(x, control=control)
        for i in range(half):
            x = block(half + 1 + i, f"out_blocks_{i}", c.skip)(x, skips.pop(), control)
        x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm")(x)
        x = nn.Dense(c.patch_size ** 2 * c.in_chans, dtype=self.dtype, name="decoder_pred")(x)
        x = unpatchify(x[:, c.extras:], h, w, c.patch_size, c.in_chans)
        if c.conv:
            x = conv3x3(c.in_chans, self.dtype, "final_layer")(x)
        return x


def uvit_dummy_inputs(module: UViT):
    """Smallest valid inputs for ``module.init``."""
    c = module.config
    s = c.img_size
    context = None if c.clip_dim is None else jnp.zeros((1, c.num_clip_token, c.clip_dim))
    labels = jnp.zeros((1,), jnp.int32) if c.num_classes > 0 else None
    return (jnp.zeros((1, s, s, c.in_chans)), jnp.zeros((1,)), context, labels)


def reference_init(params, key):
    """U-ViT's own initialisation (its ``_init_weights``) of a params tree that flax
    initialised, for training from scratch: every Dense kernel N(0, 0.02) (timm's
    ``trunc_normal_(std=.02)`` cuts at +-2 absolute, i.e. 100 standard deviations: a plain
    normal), zero biases. The patch embedding and the final 3x3 convolution keep their
    initialisers (the reference leaves its convolutions at PyTorch's defaults), LayerNorms
    are 1 / 0 and ``pos_embed`` is already truncated-normal 0.02."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(key, len(leaves))
    names = [tuple(str(getattr(p, "key", p)) for p in path) for path, _ in leaves]
    dense = {n[:-1] for n, (_, w) in zip(names, leaves) if n[-1] == "kernel" and w.ndim == 2}
    out = []
    for n, (_, w), k in zip(names, leaves, keys):
        if n[:-1] in dense:          # a Dense layer: its kernel and its bias
            w = (0.02 * jax.random.normal(k, w.shape, w.dtype) if n[-1] == "kernel"
                 else jnp.zeros_like(w))
        out.append(w)
    return jax.tree_util.tree_unflatten(tree, out)
