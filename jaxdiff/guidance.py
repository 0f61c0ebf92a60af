"""Classifier-free guidance as a wrapper around a denoiser (DESIGN contract 6).

A *denoiser* is ``denoise(x [B,h,w,C], t [] or [B], context [B,L,D]) -> model output``.
``cfg`` turns it into a guided denoiser over a ``(cond, uncond)`` context pair, evaluated
as one UNet call on the concatenated batch (as diffusers does). ``scale`` and ``rescale``
are traced values, so a sweep over scales is a ``jax.vmap`` sharing one parameter pytree.
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp


def rescale_noise_cfg(guided, cond, rescale):
    """Guidance rescale (Lin et al. 2023, sec. 3.4), as diffusers' ``rescale_noise_cfg``.

    Matches the per-sample std of the guided output to the conditional one, then mixes.
    """
    axes = tuple(range(1, guided.ndim))
    std_cond = jnp.std(cond, axis=axes, keepdims=True, ddof=1)
    std_cfg = jnp.std(guided, axis=axes, keepdims=True, ddof=1)
    rescaled = guided * (std_cond / std_cfg)
    return rescale * rescaled + (1.0 - rescale) * guided


def cfg(denoise: Callable, scale, rescale=0.0) -> Callable:
    """Classifier-free guidance: ``u + scale * (c - u)`` (optionally rescaled).

    Args:
      denoise: the conditional denoiser ``(x, t, context) -> output``.
      scale: guidance weight (traced; 1.0 means the conditional output only).
      rescale: guidance-rescale factor phi in [0, 1] (traced; 0 disables it).
    Returns:
      ``guided(x, t, (cond, uncond)) -> output``.
    """

    def guided(x, t, contexts):
        cond, uncond = contexts
        out = denoise(jnp.concatenate([x, x]), t, jnp.concatenate([uncond, cond]))
        out_uncond, out_cond = jnp.split(out, 2)
        g = out_uncond + scale * (out_cond - out_uncond)
        return jnp.where(rescale > 0, rescale_noise_cfg(g, out_cond, rescale), g)

    return guided
