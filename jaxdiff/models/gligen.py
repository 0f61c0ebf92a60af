"""GLIGEN grounding (Li et al. 2023): boxes + phrase embeddings -> grounding tokens.

diffusers' ``UNet2DConditionModel(attention_type="gated")`` adds ``position_net`` (the
``GLIGENTextBoundingboxProjection`` here) and, in every transformer block, a gated
self-attention ``fuser`` (``attention.GatedSelfAttentionDense``) that reads the tokens it
makes. The UNet takes diffusers' ``cross_attention_kwargs["gligen"]`` dict as its
``gligen`` argument:

    text-only ("gated"):       {"boxes": [B,N,4], "masks": [B,N],
                                "positive_embeddings": [B,N,D]}
    text-image ("gated-text-image"): {"boxes", "masks", "phrases_masks", "image_masks",
                                "phrases_embeddings", "image_embeddings"}

Boxes are (x0, y0, x1, y1) fractions of the image; a slot with mask 0 is replaced by the
learned null features. The GLIGEN layers are a separate pytree of the UNet's params
(``split_params`` / ``merge_params``): ``position_net`` and every ``fuser``.
"""
from __future__ import annotations

from typing import Any, Tuple

import flax.linen as nn
import jax.numpy as jnp
from flax import traverse_util

ATTENTION_TYPES = ("gated", "gated-text-image")
_HIDDEN = 512  # diffusers' fixed MLP width


def fourier_embed_boxes(embed_dim: int, boxes):
    """diffusers' ``get_fourier_embeds_from_boundingbox``: [B,N,4] -> [B,N,embed_dim*8],
    ordered (coordinate, sin/cos, frequency)-major as upstream's permute leaves them."""
    freqs = 100.0 ** (jnp.arange(embed_dim, dtype=jnp.float32) / embed_dim)
    emb = freqs[None, None, None] * boxes[..., None].astype(jnp.float32)  # [B,N,4,F]
    emb = jnp.stack([jnp.sin(emb), jnp.cos(emb)], axis=-1)  # [B,N,4,F,2]
    b, n = boxes.shape[:2]
    return emb.transpose(0, 1, 3, 4, 2).reshape(b, n, embed_dim * 2 * 4)


def _mlp(prefix: str, out_dim: int, dtype, x):
    """``Sequential(Linear 512, SiLU, Linear 512, SiLU, Linear out)``: items 0, 2, 4 of
    ``prefix`` (called inside the position net's compact scope)."""
    x = nn.silu(nn.Dense(_HIDDEN, dtype=dtype, name=f"{prefix}_0")(x))
    x = nn.silu(nn.Dense(_HIDDEN, dtype=dtype, name=f"{prefix}_2")(x))
    return nn.Dense(out_dim, dtype=dtype, name=f"{prefix}_4")(x)


class GLIGENTextBoundingboxProjection(nn.Module):
    """diffusers' ``position_net``: [B,N] objects -> grounding tokens [B,N,out_dim]
    (text-image: [B,2N,out_dim], the phrase tokens then the image tokens)."""
    positive_len: int
    out_dim: int
    feature_type: str = "text-only"
    fourier_freqs: int = 8
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, boxes, masks, positive_embeddings=None, phrases_masks=None,
                 image_masks=None, phrases_embeddings=None, image_embeddings=None):
        pos_dim = self.fourier_freqs * 2 * 4
        null = lambda name, n: self.param(name, nn.initializers.zeros, (n,))
        blend = lambda v, m, nul: v * m + (1.0 - m) * nul[None, None]
        masks = jnp.asarray(masks, jnp.float32)[..., None]
        xyxy = blend(fourier_embed_boxes(self.fourier_freqs, jnp.asarray(boxes)), masks,
                     null("null_position_feature", pos_dim))
        mlp = lambda name: (lambda v: _mlp(name, self.out_dim, self.dtype, v))
        if self.feature_type == "text-only":
            text = blend(jnp.asarray(positive_embeddings, jnp.float32), masks,
                         null("null_positive_feature", self.positive_len))
            return mlp("linears")(jnp.concatenate([text, xyxy], -1).astype(self.dtype))
        text = blend(jnp.asarray(phrases_embeddings, jnp.float32),
                     jnp.asarray(phrases_masks, jnp.float32)[..., None],
                     null("null_text_feature", self.positive_len))
        image = blend(jnp.asarray(image_embeddings, jnp.float32),
                      jnp.asarray(image_masks, jnp.float32)[..., None],
                      null("null_image_feature", self.positive_len))
        objs_text = mlp("linears_text")(jnp.concatenate([text, xyxy], -1).astype(self.dtype))
        objs_image = mlp("linears_image")(jnp.concatenate([image, xyxy], -1).astype(self.dtype))
        return jnp.concatenate([objs_text, objs_image], axis=1)


def position_net(attention_type: str, cross_attention_dim: int, dtype=jnp.float32):
    """The ``position_net`` diffusers builds for this UNet config (``positive_len`` =
    ``out_dim`` = the cross-attention width)."""
    feature = "text-only" if attention_type == "gated" else "text-image"
    return GLIGENTextBoundingboxProjection(cross_attention_dim, cross_attention_dim, feature,
                                           dtype=dtype, name="position_net")


def dummy_gligen(attention_type: str, dim: int, n: int = 1) -> dict:
    """Smallest ``gligen`` input of a gated UNet (parameter shapes, ``init``)."""
    boxes, masks, emb = jnp.zeros((1, n, 4)), jnp.zeros((1, n)), jnp.zeros((1, n, dim))
    if attention_type == "gated":
        return dict(boxes=boxes, masks=masks, positive_embeddings=emb)
    return dict(boxes=boxes, masks=masks, phrases_masks=masks, image_masks=masks,
                phrases_embeddings=emb, image_embeddings=emb)


def _is_gligen(path: Tuple[str, ...]) -> bool:
    return path[0] == "position_net" or "fuser" in path


def split_params(unet_params) -> Tuple[dict, dict]:
    """(base UNet params, GLIGEN layers): ``position_net`` and every ``fuser`` subtree,
    each keeping its path in the UNet tree."""
    flat = traverse_util.flatten_dict(unet_params)
    base = {k: v for k, v in flat.items() if not _is_gligen(k)}
    layers = {k: v for k, v in flat.items() if _is_gligen(k)}
    return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(layers)


def merge_params(base, layers) -> dict:
    """The gated UNet's params from ``split_params``' two parts."""
    flat = traverse_util.flatten_dict(base)
    flat.update(traverse_util.flatten_dict(layers))
    return traverse_util.unflatten_dict(flat)
