"""Classifier-free guidance, the one implementation (docs/design.md, "Traced vs static").

A *denoiser* is ``denoise(x [B,h,w,C], t [] or [B], context [B,L,D]) -> model output``.
``cfg`` turns it into a guided denoiser over a ``(cond, uncond)`` context pair, evaluated
as one UNet call on the concatenated batch (as diffusers does). ``scale`` and ``rescale``
are traced values, so a sweep over scales is a ``jax.vmap`` sharing one parameter pytree.
Loops that call the UNet themselves (editing: attention control, per-step null
embeddings) combine its raw ``[2B]`` output with ``guide``, or call ``guided_call``.
"""
from __future__ import annotations

from typing import Callable

import jax
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


def combine(out_uncond, out_cond, scale):
    """``u + scale * (c - u)`` for outputs computed apart (null-text's inner loop, where
    only the unconditional branch is differentiated)."""
    return out_uncond + scale * (out_cond - out_uncond)


def guide(out, scale, rescale=None):
    """Guided output from a raw ``[2B]`` model output ``[uncond; cond]``: ``u + s (c - u)``.

    Args:
      out: the denoiser's output on the concatenated batch, unconditional half first.
      scale: guidance weight, scalar or per-image [B] (broadcast against the latents).
      rescale: guidance-rescale factor (traced; 0 disables it) or None (no rescale code
        in the program at all).
    """
    out_uncond, out_cond = jnp.split(out, 2)
    g = combine(out_uncond, out_cond, scale)
    if rescale is None:
        return g
    return jnp.where(rescale > 0, rescale_noise_cfg(g, out_cond, rescale), g)


def guided_call(denoise: Callable, x, t, cond, uncond, scale, rescale=None):
    """One UNet call on the concatenated batch ``[x; x]`` with ``[uncond; cond]``, guided
    (conditions may be pytrees, e.g. SDXL's; concatenated leaf by leaf)."""
    both = jax.tree.map(lambda u, c: jnp.concatenate([u, c]), uncond, cond)
    return guide(denoise(jnp.concatenate([x, x]), t, both), scale, rescale)


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
        return guided_call(denoise, x, t, cond, uncond, scale, rescale)

    return guided
