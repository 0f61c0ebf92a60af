"""DDPM ancestral sampling (Ho et al. 2020), matching diffusers' ``DDPMScheduler``
with ``variance_type="fixed_small"``.

The previous timestep is the next entry of ``timesteps`` (alpha-bar 1 after the last);
no noise is added at ``t == 0``.

References: Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models", 2020.
"""
from __future__ import annotations

import numpy as np

from jaxdiff import schedules
from jaxdiff.samplers.base import (Sampler, SampleState, clip_fn, identity_input, state_x,
                                   table, x0_eps_vp)


def _tables(cfg, num_steps):
    """Per-step float32 coefficients, in diffusers' order of operations."""
    ts = schedules.timesteps(cfg, num_steps, "ddim")
    ac = schedules.alphas_cumprod(cfg)
    a_t = ac[ts]
    a_prev = np.concatenate([ac[ts[1:]], np.ones(1, np.float32)])
    beta_t, beta_prev = 1 - a_t, 1 - a_prev
    cur_alpha = a_t / a_prev
    cur_beta = 1 - cur_alpha
    variance = np.maximum(beta_prev / beta_t * cur_beta, np.float32(1e-20))
    return dict(
        ts=ts, sqrt_a=a_t ** 0.5, sqrt_1ma=beta_t ** 0.5,
        c_x0=a_prev ** 0.5 * cur_beta / beta_t,
        c_x=cur_alpha ** 0.5 * beta_prev / beta_t,
        std=np.where(ts > 0, variance ** 0.5, 0).astype(np.float32))


def make_ddpm(cfg: schedules.SchedulerConfig, num_steps: int) -> Sampler:
    """DDPM sampler over ``num_steps`` spaced timesteps. State: ``SampleState(x)``."""
    tab = _tables(cfg, num_steps)
    sqrt_a, sqrt_1ma, c_x0, c_x, std = (table(tab[k]) for k in
                                        ("sqrt_a", "sqrt_1ma", "c_x0", "c_x", "std"))
    to_x0_eps, clip = x0_eps_vp(cfg.prediction_type), clip_fn(cfg)

    def step(state, i, model_output, noise):
        x0, _ = to_x0_eps(model_output, state.x, sqrt_a[i], sqrt_1ma[i])
        x0 = clip(x0)
        x = c_x0[i] * x0 + c_x[i] * state.x + std[i] * noise
        return SampleState(x.astype(state.x.dtype))

    return Sampler(timesteps=table(tab["ts"], np.int32), init_noise_sigma=1.0,
                   init=SampleState, model_input=identity_input, step=step, latents=state_x)
