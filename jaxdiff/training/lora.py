"""LoRA training: the denoising loss of a pipeline with adapters merged into frozen params.

The adapters themselves (layers, merge, files) are ``jaxdiff.adapters.lora``; DreamBooth's
LoRA mode (``dreambooth.make_trainable``) trains them with its own prior-preservation loss.
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from jaxdiff import schedules
from jaxdiff.adapters.lora import merge_lora
from jaxdiff.denoiser import denoise
from jaxdiff.training import losses


def make_lora_loss(pipe, frozen_params, scale) -> Callable:
    """Denoising loss of the pipeline with adapters merged into frozen params.

    Args:
      pipe: ``jaxdiff.Pipeline``.
      frozen_params: pipeline params, not trained.
      scale: merge multiplier (``alpha / rank``).
    Returns:
      ``loss(lora, batch, rng) -> scalar``, with ``batch = (latents [B,h,w,C], ids [B,L])``
      (scaled latents from ``pipe.encode_images``; SDXL: ids [B,2,L], time ids of the
      latents' image size added here); gradients flow only to ``lora``, so an
      optimizer state built on ``lora`` holds only the adapters.
    """
    sched = pipe.scheduler
    alphas = schedules.alphas_cumprod(sched)

    def loss(lora, batch, rng):
        latents, ids = batch
        p = merge_lora(frozen_params, lora, scale)
        f = pipe.vae_scale_factor
        context = pipe.add_time_ids(pipe.encode_text(p, ids), latents.shape[1] * f,
                                    latents.shape[2] * f)
        unet = lambda x, t, c: denoise(pipe, p["unet"], x, t, c)
        per = losses.denoising_loss(unet, alphas, sched.prediction_type)(latents, context, rng)
        return jnp.mean(per)

    return loss
