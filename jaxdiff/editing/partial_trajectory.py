"""Partial trajectories with a *traced* strength: shapes stay static, strength never recompiles.

img2img-style methods (SDEdit, blended latent diffusion, DiffEdit) run only the last
``int(S * strength)`` of S sampling steps, as diffusers' ``get_timesteps``. Here the scan
always has S iterations: step ``i`` is *active* for an image when ``i >= start`` (its start
index); the UNet is evaluated only when some image of the batch is active (``lax.cond``
on ``any(active)``, so a low strength does skip the work), and inactive images keep their
latent (``where``). Strength may differ per image, and a batch equals its images run alone.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxdiff import schedules


def start_index(strength, num_steps: int):
    """diffusers' ``t_start = S - min(int(S * strength), S)``, traced, per image.

    A float32 product can fall just below an integer that float64 reaches (0.7 * 10), so
    1e-4 is added before the floor; a strength within 1e-4 / S below a step boundary
    therefore rounds up (diffusers would round down).
    Args:
      strength: scalar or [B] in [0, 1].
    Returns:
      int32 with the shape of ``strength``: index of the first step run (S: none).
    """
    s = jnp.clip(jnp.asarray(strength, jnp.float32), 0.0, 1.0)
    n = jnp.minimum(jnp.floor(s * num_steps + 1e-4), num_steps)
    return (num_steps - n).astype(jnp.int32)


def noised_start(alphas_cumprod, timesteps, z0, noise, start):
    """The start latent of a partial run: z0 noised to the level of its first step.

    Images that run no step (``start == S``) start (and end) at z0 itself.
    Args:
      alphas_cumprod: [T]; timesteps: [S] int; z0, noise: [B, h, w, C]; start: [B] int32.
    """
    s = timesteps.shape[0]
    t = jnp.asarray(timesteps)[jnp.minimum(start, s - 1)]
    x = schedules.add_noise(alphas_cumprod, z0, noise, t)
    return jnp.where(schedules.expand_like(start < s, z0), x, z0)


def partial_scan(step: Callable, x, start, indices):
    """``lax.scan`` over ``indices`` running ``x = step(x, i)`` only where ``i >= start``.

    Args:
      step: ``(x [B, ...], i) -> x``; evaluated (for the whole batch) only when some
        image is active, and its result kept only for the active images.
      start: [B] int32 first active index per image.
      indices: [N] step indices in the order to run them.
    Returns:
      (final x, all intermediate x [N, B, ...] after each index).
    """
    def body(x, i):
        active = i >= start
        new = jax.lax.cond(jnp.any(active), lambda v: step(v, i), lambda v: v, x)
        x = jnp.where(schedules.expand_like(active, x), new, x)
        return x, x

    return jax.lax.scan(body, x, indices)
