"""The one denoiser interface: ``denoise(pipe, params, x_t, t, cond) -> model output``.

Samplers, guidance, inversion, editing and training call a pipeline's backbone only through
``denoise`` (docs/design.md, "One denoiser interface"). It dispatches on the backbone's
config in Python: the U-Net (SD 1.x/2.x, SDXL's pooled text and time ids), a PixArt text
DiT (its caption mask and micro-conditions), a class-conditional DiT (class labels) and a
text- or class-conditional U-ViT. ``caption_attention_mask`` builds the caption mask that
``Pipeline.encode_text`` hands a PixArt text DiT.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.models.dit import DiTConfig
from jaxdiff.models.pixart import PixArtConfig
from jaxdiff.models.uvit import UViTConfig


def caption_attention_mask(ids, eos_token_id: int) -> jax.Array:
    """float32 [B, L]: 1 from BOS through the first EOS, 0 on the padding after it -- the
    attention mask a CLIP tokenizer returns with ``padding="max_length"`` (a prompt
    without EOS, which the tokenizer never makes: every token)."""
    ids = jnp.asarray(ids)
    is_eos = ids == eos_token_id
    last = jnp.where(is_eos.any(-1), jnp.argmax(is_eos, -1), ids.shape[-1] - 1)
    return (jnp.arange(ids.shape[-1])[None] <= last[:, None]).astype(jnp.float32)


def denoise(pipe, unet_params, x, t, cond, **kwargs):
    """The one denoiser interface: ``(params, latents, t, conditioning) -> prediction``.

    Samplers, guidance, inversion, editing and training call the pipeline's backbone only
    through this function (docs/design.md, "One denoiser interface"), so a U-Net and a
    transformer pipeline run the same programs. ``pipe``: a ``pipeline.Pipeline``, or
    anything else whose ``unet`` is the backbone (a ``weights.backbones.DiTPipeline``
    names its class-conditional DiT so too).
    ``unet_params``: ``params["unet"]`` (the denoiser's params, whichever backbone; a
    DiTPipeline's ``params["transformer"]``). ``cond``: a context array [B, L, D] (SD
    1.x/2.x, text U-ViT, text DiT without caption mask), SDXL's ``{"context",
    "text_embeds", "time_ids"}``, a PixArt text DiT's ``{"context", "mask" [B, L]
    (``encoder_attention_mask``), "resolution", "aspect_ratio" (micro-conditions)}``
    (``Pipeline.encode_text`` / ``add_time_ids`` build both), or int class labels [B]
    (class-conditional DiT / U-ViT; ``num_classes`` is the DiT's null class). ``kwargs``
    pass on: ``control`` (the attention controller, docs/design.md "Controller as
    data") for every backbone; the U-Net's control residuals,
    ``capture_intermediates`` and ``mutable`` for the U-Net only. A learned-sigma
    transformer returns its noise half; ``variance=True`` (transformers only) returns its
    whole output, noise then variance channels (the DiT's learned-variance DDPM).
    """
    if is_transformer_backbone(pipe.unet):
        return _transformer_apply(pipe.unet, unet_params, x, t, cond, **kwargs)
    if "variance" in kwargs:
        raise ValueError("denoise(variance=...) is for learned-sigma transformers; this "
                         f"pipeline's denoiser is a {type(pipe.unet).__name__}.")
    if isinstance(cond, dict):
        kwargs["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"],
                                       "time_ids": cond["time_ids"]}
        cond = cond["context"]
    return pipe.unet.apply({"params": unet_params}, x, t, cond, **kwargs)


def is_transformer_backbone(module) -> bool:
    """A PixArt text DiT, a class-conditional DiT (``DiTPipeline``), or a text- or
    class-conditional U-ViT (``models.uvit``: in-memory pipelines only, e.g.
    bench/backbones_study.py; it has no diffusers layout to save)."""
    return isinstance(module.config, (PixArtConfig, UViTConfig, DiTConfig))


_PIXART_COND = frozenset({"context", "mask", "resolution", "aspect_ratio"})


def _transformer_apply(model, params, x, t, cond, control=None, variance=False, **kwargs):
    c = model.config
    pixart_dict = (isinstance(cond, dict) and isinstance(c, PixArtConfig)
                   and set(cond) <= _PIXART_COND)
    if kwargs or (isinstance(cond, dict) and not pixart_dict):
        what = sorted(kwargs) or ["SDXL's pooled text and time ids"]
        raise ValueError(f"this pipeline's denoiser is a {type(model).__name__}: {what[0]} is "
                         "U-Net only (a transformer takes latents, t, its condition -- text "
                         "embeddings or class labels -- and an attention controller).")
    if pixart_dict:  # PixArtAlphaPipeline's caption mask and micro-conditions
        added = ({k: cond[k] for k in ("resolution", "aspect_ratio")}
                 if "resolution" in cond else None)
        out = model.apply({"params": params}, x, t, cond["context"], added, control=control,
                          encoder_attention_mask=cond.get("mask"))
        return out[..., :c.in_channels] if c.learned_sigma and not variance else out
    if isinstance(c, UViTConfig):  # condition tokens concatenated with the patch tokens
        cond_kw = {"class_labels": cond} if c.num_classes > 0 else {"context": cond}
        return model.apply({"params": params}, x, t, control=control, **cond_kw)
    if isinstance(c, DiTConfig):  # class labels [B] (the null class: num_classes)
        out = model.apply({"params": params}, x, jnp.broadcast_to(t, (x.shape[0],)), cond,
                          control=control)
    else:
        out = model.apply({"params": params}, x, t, cond, control=control)
    return out[..., :c.in_channels] if c.learned_sigma and not variance else out
