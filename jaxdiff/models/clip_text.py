"""CLIP text transformer (transformers ``CLIPTextModel``), as Stable Diffusion uses it, and
``CLIPTextModelWithProjection`` (SDXL's second encoder, OpenCLIP-bigG).

``apply({"params": p}, input_ids [B,L]) -> last_hidden_state [B,L,D]`` (after the final
LayerNorm). ``output_hidden_states=True`` also returns the input embeddings and every
layer's output (before the final LayerNorm), like transformers' ``hidden_states``. The
projection model returns ``(text_embeds [B,P], last_hidden_state)`` first.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models import config as config_lib
from jaxdiff.models.attention import attend

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def validate(self, source="text_encoder config"):
        if self.hidden_act not in ACTIVATIONS:
            raise config_lib.UnsupportedConfigError(
                f"{source}: hidden_act={self.hidden_act!r} is not supported "
                f"(supported: {sorted(ACTIVATIONS)}).")
        if self.hidden_size % self.num_attention_heads:
            raise config_lib.UnsupportedConfigError(
                f"{source}: hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}.")

    @classmethod
    def from_dict(cls, d, source="text_encoder/config.json"):
        return config_lib.from_dict(cls, d, source=source)

    def to_dict(self):
        return config_lib.to_dict(self, "CLIPTextModel", extra={
            "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
            "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1})


@dataclasses.dataclass(frozen=True)
class CLIPTextProjectionConfig(CLIPTextConfig):
    """``CLIPTextModelWithProjection``: pooled at the first ``eos_token_id`` (at the
    largest id when ``eos_token_id == 2``, transformers' rule for old configs), then
    ``text_projection`` (no bias) to ``projection_dim``."""
    projection_dim: int = 512
    eos_token_id: int = 2

    @classmethod
    def from_dict(cls, d, source="text_encoder_2/config.json"):
        return config_lib.from_dict(cls, d, source=source)

    def to_dict(self):
        return config_lib.to_dict(self, "CLIPTextModelWithProjection", extra={
            "architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model",
            "bos_token_id": 0, "pad_token_id": 1})


class _SelfAttention(nn.Module):
    cfg: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        cfg = self.cfg
        heads, dh = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        proj = lambda n, y: nn.Dense(cfg.hidden_size, dtype=self.dtype, name=n)(y)
        split = lambda y: y.reshape(y.shape[0], y.shape[1], heads, dh)
        q, k, v = (split(proj(n, x)) for n in ("q_proj", "k_proj", "v_proj"))
        a = attend(q, k, v, scale=dh ** -0.5, upcast=False, impl="einsum", mask=mask)
        return proj("out_proj", a.reshape(x.shape))


class _EncoderLayer(nn.Module):
    cfg: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        ln = lambda n: nn.LayerNorm(epsilon=self.cfg.layer_norm_eps, dtype=self.dtype, name=n)
        x = x + _SelfAttention(self.cfg, self.dtype, name="self_attn")(ln("layer_norm1")(x), mask)
        return x + _MLP(self.cfg, self.dtype, name="mlp")(ln("layer_norm2")(x))


class CLIPEncoder(nn.Module):
    """The pre-LN transformer stack shared by CLIP's text and vision towers (``layers_i``);
    ``mask`` None = full attention. Returns ``(output, [input, each layer's output])``."""
    cfg: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        hidden = [x]
        for i in range(self.cfg.num_hidden_layers):
            x = _EncoderLayer(self.cfg, self.dtype, name=f"layers_{i}")(x, mask)
            hidden.append(x)
        return x, hidden


class _MLP(nn.Module):
    cfg: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.cfg.intermediate_size, dtype=self.dtype, name="fc1")(x)
        h = ACTIVATIONS[self.cfg.hidden_act](h)
        return nn.Dense(self.cfg.hidden_size, dtype=self.dtype, name="fc2")(h)


class CLIPTextModel(nn.Module):
    """CLIP text encoder with a causal mask. Params live under ``text_model``."""
    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, output_hidden_states: bool = False, embeddings=None):
        """input_ids: [B, L] int32. ``embeddings`` optionally replaces the token-embedding
        lookup with given [B, L, D] vectors (used by Textual Inversion)."""
        return CLIPTextTransformer(self.config, self.dtype, name="text_model")(
            input_ids, output_hidden_states, embeddings)


class CLIPTextModelWithProjection(nn.Module):
    """``(text_embeds [B,P], last_hidden_state [B,L,D])`` (+ hidden states when asked).
    Params: ``text_model`` as ``CLIPTextModel``'s, and ``text_projection``."""
    config: CLIPTextProjectionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, output_hidden_states: bool = False, embeddings=None):
        cfg = self.config
        out = CLIPTextTransformer(cfg, self.dtype, name="text_model")(
            input_ids, output_hidden_states, embeddings)
        last = out[0] if output_hidden_states else out
        pooled = pool_at_eos(last, input_ids, cfg.eos_token_id)
        embeds = nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype,
                          name="text_projection")(pooled).astype(jnp.float32)
        return (embeds, *out) if output_hidden_states else (embeds, last)


def pool_at_eos(last_hidden_state, input_ids, eos_token_id: int):
    """[B, L, D] -> [B, D]: the state at the first ``eos_token_id`` (at the largest id when
    ``eos_token_id == 2``: transformers' rule for configs written before the fix)."""
    ids = jnp.asarray(input_ids).astype(jnp.int32)
    eos = (jnp.argmax(ids, axis=-1) if eos_token_id == 2
           else jnp.argmax(ids == eos_token_id, axis=-1))
    return jnp.take_along_axis(last_hidden_state, eos[:, None, None], axis=1)[:, 0]


class CLIPTextTransformer(nn.Module):
    """``text_model``: embeddings, causal ``CLIPEncoder``, ``final_layer_norm``."""
    cfg: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, output_hidden_states, embeddings):
        cfg = self.cfg
        b, length = input_ids.shape
        if length > cfg.max_position_embeddings:
            raise ValueError(f"token sequence length {length} exceeds the text encoder's "
                             f"max_position_embeddings={cfg.max_position_embeddings}.")
        x = _Embeddings(cfg, name="embeddings")(input_ids, embeddings).astype(self.dtype)
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
        x, hidden = CLIPEncoder(cfg, self.dtype, name="encoder")(x, mask)
        out = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype,
                           name="final_layer_norm")(x).astype(jnp.float32)
        if output_hidden_states:
            return out, tuple(h.astype(jnp.float32) for h in hidden)
        return out


class _Embeddings(nn.Module):
    cfg: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids, embeddings=None):
        tok = nn.Embed(self.cfg.vocab_size, self.cfg.hidden_size, name="token_embedding")
        pos = nn.Embed(self.cfg.max_position_embeddings, self.cfg.hidden_size,
                       name="position_embedding")
        x = tok(input_ids) if embeddings is None else embeddings
        return x + pos(jnp.arange(input_ids.shape[1]))[None]
