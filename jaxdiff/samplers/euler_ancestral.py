"""Euler-ancestral sampler, matching diffusers' ``EulerAncestralDiscreteScheduler``.

Each step goes down to ``sigma_down`` deterministically and adds ``sigma_up * noise``.
As in diffusers, ``use_karras_sigmas`` is ignored (that scheduler has no such option).
diffusers refuses ``prediction_type="sample"``; here it means x0 = model output.

References: Karras et al. 2022; Crowson, k-diffusion ``sample_euler_ancestral``.
"""
from __future__ import annotations

import numpy as np

from jaxdiff import schedules
from jaxdiff.samplers.base import (Sampler, SampleState, k_init_noise_sigma, k_model_input,
                                   state_x, table, x0_ve)


def _ancestral(sig):
    """float32 (sigma_up, sigma_down) [n] for steps sigma_i -> sigma_{i+1}."""
    s_from, s_to = sig[:-1], sig[1:]
    up = (s_to ** 2 * (s_from ** 2 - s_to ** 2) / s_from ** 2) ** 0.5
    down = (s_to ** 2 - up ** 2) ** 0.5
    return up.astype(np.float32), down.astype(np.float32)


def make_euler_ancestral(cfg: schedules.SchedulerConfig, num_steps: int) -> Sampler:
    """Euler-ancestral sampler. State: ``SampleState(x)`` (VE-scaled sample)."""
    ts, sig = schedules.k_sigmas(cfg, num_steps, use_karras=False)
    up, down = _ancestral(sig)
    sigmas, sigma_up, sigma_down = table(sig), table(up), table(down)
    to_x0 = x0_ve(cfg.prediction_type)

    def step(state, i, model_output, noise):
        x, sigma = state.x, sigmas[i]
        derivative = (x - to_x0(model_output, x, sigma)) / sigma
        x_new = x + derivative * (sigma_down[i] - sigma) + noise * sigma_up[i]
        return SampleState(x_new.astype(x.dtype))

    return Sampler(timesteps=table(ts), init_noise_sigma=k_init_noise_sigma(cfg, sig),
                   init=SampleState, model_input=k_model_input(sigmas), step=step,
                   latents=state_x)
