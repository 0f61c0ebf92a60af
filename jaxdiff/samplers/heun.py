"""Heun's second-order sampler (Karras et al. 2022, Algorithm 1 without churn), matching
diffusers' ``HeunDiscreteScheduler``.

``steps`` sigmas give ``2 * steps - 1`` model evaluations: even evaluations take an Euler
step to the next sigma (and remember derivative, dt and the sample); odd ones correct it
with the derivative at the predicted point. The last step (to sigma 0) is Euler only.

References: Karras et al., "Elucidating the Design Space of Diffusion-Based Generative
Models", 2022.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import schedules
from jaxdiff.samplers.base import (Sampler, clip_fn, k_init_noise_sigma, k_model_input,
                                   table, x0_ve)


class HeunState(NamedTuple):
    """x: current sample; derivative, dt, sample: the pending first-order step."""
    x: jax.Array
    derivative: jax.Array
    dt: jax.Array
    sample: jax.Array


def _tables(sig):
    """Per-evaluation tables from the [n + 1] sigmas (float32).

    Returns (sigma_eval [2n-1]: the noise level of the evaluated point, used for the
    model input, the x0 conversion and the derivative; dt [2n-1]; first [2n-1] bool;
    all_sigmas [2n]: diffusers' repeated sigma table).
    """
    n = len(sig) - 1
    rep = np.concatenate([sig[:1], np.repeat(sig[1:-1], 2), sig[-1:]]).astype(np.float32)
    k = np.arange(2 * n - 1)
    first = k % 2 == 0
    dt = np.where(first, rep[np.minimum(k + 1, 2 * n - 1)] - rep[k], 0).astype(np.float32)
    return rep[:-1], dt, first, rep


def make_heun(cfg: schedules.SchedulerConfig, num_steps: int) -> Sampler:
    """Heun sampler; ``cfg.use_karras_sigmas`` selects Karras spacing. State: HeunState."""
    if cfg.rescale_betas_zero_snr:
        raise ValueError("heun does not support rescale_betas_zero_snr (neither does "
                         "diffusers' HeunDiscreteScheduler); use euler or dpmpp_2m.")
    ts, sig = schedules.k_sigmas(cfg, num_steps)
    sig_eval, dt_tab, first_tab, rep = _tables(sig)
    sigmas, dts, firsts = table(sig_eval), table(dt_tab), jnp.asarray(first_tab)
    timesteps = np.concatenate([ts[:1], np.repeat(ts[1:], 2)]).astype(np.float32)
    to_x0, clip = x0_ve(cfg.prediction_type), clip_fn(cfg)

    def init(x):
        zero = jnp.zeros_like(x)
        return HeunState(x, zero, jnp.zeros((), x.dtype), zero)

    def step(state, i, model_output, noise):
        del noise
        x, sigma, first = state.x, sigmas[i], firsts[i]
        derivative = (x - clip(to_x0(model_output, x, sigma))) / sigma
        avg = (state.derivative + derivative) / 2
        dt = jnp.where(first, dts[i], state.dt)
        base = jnp.where(first, x, state.sample)
        x_new = base + jnp.where(first, derivative, avg) * dt
        keep = lambda v, like: jnp.where(first, v, 0).astype(like.dtype)
        return HeunState(x_new.astype(x.dtype), keep(derivative, state.derivative),
                         keep(dt, state.dt), keep(x, state.sample))

    return Sampler(timesteps=table(timesteps), init_noise_sigma=k_init_noise_sigma(cfg, rep),
                   init=init, model_input=k_model_input(sigmas), step=step,
                   latents=lambda s: s.x)
