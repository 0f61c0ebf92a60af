"""DDIM (Song et al. 2021), matching diffusers' ``DDIMScheduler``.

``eta`` is an ordinary (traceable) value: pass a jax scalar -- typically an argument of
the jitted function that builds the sampler -- and changing it never recompiles. With
``eta > 0`` the step adds ``std * noise`` from the ``noise`` argument.

As in diffusers, the "previous" timestep of ``t`` is ``t - num_train_timesteps //
num_steps`` for every spacing (not the next entry of ``timesteps``), and below 0 its
alpha-bar is 1 (``set_alpha_to_one``) or ``alphas_cumprod[0]``.

References: Song, Meng & Ermon, "Denoising Diffusion Implicit Models", ICLR 2021.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import schedules
from jaxdiff.samplers.base import (Sampler, SampleState, clip_fn, identity_input, state_x,
                                   table, x0_eps_vp)


def ddim_update(model_output, x, alpha_prod_t, alpha_prod_prev, *, to_x0_eps: Callable,
                clip: Callable = lambda x0: x0, eta=0.0, noise=None):
    """One DDIM update of ``x`` from alpha-bar ``alpha_prod_t`` to ``alpha_prod_prev``.

    Args:
      model_output: UNet output at x.
      alpha_prod_t, alpha_prod_prev: alpha-bar now and after the step (scalars or arrays
        broadcastable to x). ``alpha_prod_prev < alpha_prod_t`` runs DDIM inversion.
      to_x0_eps: from ``base.x0_eps_vp(prediction_type)``.
      eta: stochasticity (0 = deterministic DDIM, 1 = DDPM-like); may be traced.
      noise: N(0, 1) like x, used when eta > 0 (None: no noise term).
    Returns:
      (x_prev, x0_prediction).
    """
    a_t, a_prev = alpha_prod_t, alpha_prod_prev
    beta_t = 1 - a_t
    x0, eps = to_x0_eps(model_output, x, a_t ** 0.5, beta_t ** 0.5)
    x0 = clip(x0)
    # Negative only when running backwards (inversion), where eta must be 0 anyway.
    variance = jnp.maximum((1 - a_prev) / beta_t * (1 - a_t / a_prev), 0.0)
    std = eta * variance ** 0.5
    x_prev = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * eps
    if noise is not None:
        x_prev = x_prev + std * noise
    return x_prev, x0


def ddim_step(alphas_cumprod, x, model_output, t, t_prev, *, prediction_type="epsilon",
              eta=0.0, noise=None, final_alpha_cumprod=1.0,
              clip_sample_range: Optional[float] = None):
    """DDIM step between integer timesteps (``t_prev > t`` inverts), for editing code.

    Args:
      alphas_cumprod: [T] alpha-bar table.
      x, model_output: [B, ...].
      t, t_prev: int timesteps, scalars or [B]; ``t_prev < 0`` uses final_alpha_cumprod.
      prediction_type: epsilon | v_prediction | sample (a Python string).
      clip_sample_range: clip x0 to [-r, r] (None: no clipping).
    Returns:
      (x at t_prev, x0 prediction).
    """
    ac = jnp.asarray(alphas_cumprod, jnp.float32)
    t, t_prev = jnp.asarray(t), jnp.asarray(t_prev)
    a_t = schedules.expand_like(ac[t], x)
    a_prev = schedules.expand_like(jnp.where(t_prev >= 0, ac[jnp.maximum(t_prev, 0)], final_alpha_cumprod), x)
    clip = (lambda x0: x0) if clip_sample_range is None else (
        lambda x0: jnp.clip(x0, -clip_sample_range, clip_sample_range))
    return ddim_update(model_output, x, a_t, a_prev, to_x0_eps=x0_eps_vp(prediction_type),
                       clip=clip, eta=eta, noise=noise)


class DDIMTables(NamedTuple):
    """DDIM levels in sampling order (descending t).

    timesteps: [S] int32 UNet timesteps; alpha: [S] alpha-bar at each timestep;
    alpha_prev: [S] alpha-bar after the step (the level of ``t - T/S``).
    """
    timesteps: jax.Array
    alpha: jax.Array
    alpha_prev: jax.Array


def ddim_tables(cfg: schedules.SchedulerConfig, num_steps: int) -> DDIMTables:
    """The DDIM levels of ``num_steps`` steps (shared by the sampler and inversion)."""
    ts = schedules.timesteps(cfg, num_steps, "ddim")
    ac = schedules.alphas_cumprod(cfg)
    final = np.float32(1.0) if cfg.set_alpha_to_one else ac[0]
    prev = ts - cfg.num_train_timesteps // num_steps
    return DDIMTables(table(ts, jnp.int32), table(ac[ts]),
                      table(np.where(prev >= 0, ac[np.maximum(prev, 0)], final)))


def make_ddim(cfg: schedules.SchedulerConfig, num_steps: int, eta=0.0) -> Sampler:
    """DDIM sampler. State: ``SampleState(x)``.

    Args:
      eta: a float or a (possibly traced) jax scalar; closed over by ``step``.
    """
    tables = ddim_tables(cfg, num_steps)
    to_x0_eps, clip = x0_eps_vp(cfg.prediction_type), clip_fn(cfg)

    def step(state, i, model_output, noise):
        x, _ = ddim_update(model_output, state.x, tables.alpha[i], tables.alpha_prev[i],
                           to_x0_eps=to_x0_eps, clip=clip, eta=eta, noise=noise)
        return SampleState(x.astype(state.x.dtype))

    return Sampler(timesteps=tables.timesteps, init_noise_sigma=1.0, init=SampleState,
                   model_input=identity_input, step=step, latents=state_x)
