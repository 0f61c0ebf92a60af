"""CLIP (transformers ``CLIPModel``): a ViT vision tower beside the text tower.

The vision tower is transformers' ``CLIPVisionTransformer``: a patch embedding (a strided
conv, no bias), a learned class token, position embeddings, ``pre_layrnorm`` (upstream's
spelling), the same pre-LN ``CLIPEncoder`` stack as the text tower (no mask), and
``post_layernorm`` on the class token. Parameter names and shapes follow transformers, so
``weights/clip_format.py`` converts them with the shared PyTorch <-> Flax helpers.

``pixel_values`` are NHWC and already normalised, as transformers' processors leave them
(``(image - image_mean) / image_std``; the shapes CLIP uses mean = std = 0.5, i.e. the
library's [-1, 1] images).

``class_offset`` ([B, D], optional) is added to the class-token embedding: a noise-aware
CLIP (``jaxdiff.training.clip``, ``noisy``) feeds its timestep embedding there, which
leaves the transformers layout of the tower itself unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from jaxdiff.models import config as config_lib
from jaxdiff.models.clip_text import (ACTIVATIONS, CLIPEncoder, CLIPTextProjectionConfig,
                                      CLIPTextTransformer, pool_at_eos)
from jaxdiff.models.conv import Conv
from jaxdiff.models.layers import TimestepEmbedding, timestep_embedding

# transformers' CLIPTextConfig defaults (its config.json omits fields left at them).
TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                     num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                     hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=512,
                     eos_token_id=49407)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """transformers ``CLIPVisionConfig`` (defaults: ViT-B/32)."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def validate(self, source="vision_config"):
        if self.hidden_act not in ACTIVATIONS:
            raise config_lib.UnsupportedConfigError(
                f"{source}: hidden_act={self.hidden_act!r} is not supported "
                f"(supported: {sorted(ACTIVATIONS)}).")
        if self.hidden_size % self.num_attention_heads or self.image_size % self.patch_size:
            raise config_lib.UnsupportedConfigError(
                f"{source}: need hidden_size % num_attention_heads == 0 and image_size % "
                f"patch_size == 0, got {self.hidden_size=}, {self.num_attention_heads=}, "
                f"{self.image_size=}, {self.patch_size=}.")

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_dict(cls, d, source="config.json"):
        return config_lib.from_dict(cls, d, source=source)

    def to_dict(self):
        return config_lib.to_dict(self, "CLIPVisionModelWithProjection", extra={
            "architectures": ["CLIPVisionModelWithProjection"],
            "model_type": "clip_vision_model"})


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """transformers ``CLIPConfig``: both towers, the shared ``projection_dim`` and the
    initial ``logit_scale``. The text tower pools at ``text_config.eos_token_id``."""
    text_config: CLIPTextProjectionConfig = CLIPTextProjectionConfig(**TEXT_DEFAULTS)
    vision_config: CLIPVisionConfig = CLIPVisionConfig()
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config.json") -> "CLIPConfig":
        proj = int(d.get("projection_dim", 512))
        text = {**TEXT_DEFAULTS, **(d.get("text_config") or {}), "projection_dim": proj}
        vision = {**(d.get("vision_config") or {}), "projection_dim": proj}
        return cls(CLIPTextProjectionConfig.from_dict(text, f"{source} text_config"),
                   CLIPVisionConfig.from_dict(vision, f"{source} vision_config"), proj,
                   float(d.get("logit_scale_init_value", 2.6592)))

    def to_dict(self, bos_token_id: int = 49406, pad_token_id: int = 1) -> dict:
        text = config_lib.to_dict(self.text_config, "CLIPTextModel", extra={
            "model_type": "clip_text_model", "bos_token_id": bos_token_id,
            "pad_token_id": pad_token_id})
        vision = config_lib.to_dict(self.vision_config, "CLIPVisionModel",
                                    extra={"model_type": "clip_vision_model"})
        for sub in (text, vision):
            sub.pop("_class_name")
        return {"architectures": ["CLIPModel"], "model_type": "clip",
                "projection_dim": self.projection_dim,
                "logit_scale_init_value": self.logit_scale_init_value,
                "initializer_factor": 1.0, "text_config": text, "vision_config": vision}


class _VisionEmbeddings(nn.Module):
    cfg: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values, class_offset=None):
        cfg, d = self.cfg, self.cfg.hidden_size
        b, h, w, _ = pixel_values.shape
        if (h, w) != (cfg.image_size, cfg.image_size):
            raise ValueError(f"CLIP vision tower: images are {h}x{w} but the config's "
                             f"image_size is {cfg.image_size}; resize them first.")
        cls = self.param("class_embedding", nn.initializers.normal(d ** -0.5), (d,))
        patches = Conv(d, (cfg.patch_size,) * 2, strides=(cfg.patch_size,) * 2,
                          padding="VALID", use_bias=False, dtype=self.dtype,
                          name="patch_embedding")(pixel_values.astype(self.dtype))
        cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d))
        if class_offset is not None:
            cls = cls + class_offset[:, None].astype(self.dtype)
        x = jnp.concatenate([cls, patches.reshape(b, -1, d)], axis=1)
        pos = nn.Embed(cfg.num_positions, d, name="position_embedding")
        return x + pos(jnp.arange(cfg.num_positions))[None].astype(self.dtype)


class CLIPVisionTransformer(nn.Module):
    """``vision_model``: ``(last_hidden_state [B, 1+N, D], pooled [B, D])`` (pooled = the
    class token after ``post_layernorm``)."""
    cfg: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values, class_offset=None):
        ln = lambda n: nn.LayerNorm(epsilon=self.cfg.layer_norm_eps, dtype=self.dtype, name=n)
        x = _VisionEmbeddings(self.cfg, self.dtype, name="embeddings")(pixel_values,
                                                                       class_offset)
        x, _ = CLIPEncoder(self.cfg, self.dtype, name="encoder")(ln("pre_layrnorm")(x), None)
        return x.astype(jnp.float32), ln("post_layernorm")(x[:, 0]).astype(jnp.float32)


class CLIPVisionModelWithProjection(nn.Module):
    """``(image_embeds [B, P], last_hidden_state)``; params ``vision_model``,
    ``visual_projection`` (transformers ``CLIPVisionModelWithProjection``)."""
    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values, class_offset=None):
        last, pooled = CLIPVisionTransformer(self.config, self.dtype, name="vision_model")(
            pixel_values, class_offset)
        embeds = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype,
                          name="visual_projection")(pooled).astype(jnp.float32)
        return embeds, last


class CLIPModel(nn.Module):
    """transformers ``CLIPModel``. ``apply(v, input_ids [B,L], pixel_values [B,H,W,C])``
    returns a dict with ``logits_per_image`` [B_img, B_txt], ``logits_per_text`` and the
    L2-normalised ``text_embeds`` / ``image_embeds``; ``method="get_text_features"`` /
    ``"get_image_features"`` give the unnormalised projections."""
    config: CLIPConfig
    dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        self.text_model = CLIPTextTransformer(cfg.text_config, self.dtype)
        self.vision_model = CLIPVisionTransformer(cfg.vision_config, self.dtype)
        dense = lambda: nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype)
        self.visual_projection, self.text_projection = dense(), dense()
        self.logit_scale = self.param("logit_scale",
                                      nn.initializers.constant(cfg.logit_scale_init_value), ())

    def get_text_features(self, input_ids):
        last = self.text_model(input_ids, False, None)
        pooled = pool_at_eos(last, input_ids, self.config.text_config.eos_token_id)
        return self.text_projection(pooled).astype(jnp.float32)

    def get_image_features(self, pixel_values, class_offset=None):
        _, pooled = self.vision_model(pixel_values, class_offset)
        return self.visual_projection(pooled).astype(jnp.float32)

    def __call__(self, input_ids, pixel_values, class_offset=None):
        text = normalize(self.get_text_features(input_ids))
        image = normalize(self.get_image_features(pixel_values, class_offset))
        logits_per_text = text @ image.T * jnp.exp(self.logit_scale)
        return {"logits_per_image": logits_per_text.T, "logits_per_text": logits_per_text,
                "text_embeds": text, "image_embeds": image}


def normalize(x, eps: float = 0.0):
    """Rows divided by their L2 norm (transformers divides without an epsilon)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class TimeToken(nn.Module):
    """Timestep -> a [B, D] class-token offset for a noise-aware CLIP: the sinusoidal
    embedding then ``linear_1 -> SiLU -> linear_2`` (as a diffusion UNet embeds time)."""
    hidden_size: int

    @nn.compact
    def __call__(self, t):
        emb = timestep_embedding(jnp.asarray(t).reshape(-1), self.hidden_size,
                                 flip_sin_to_cos=True, downscale_freq_shift=0.0)
        return TimestepEmbedding(self.hidden_size, name="time_embedding")(emb)
