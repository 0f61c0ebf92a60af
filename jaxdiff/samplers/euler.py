"""Euler sampler (Karras et al. 2022, Algorithm 2 without churn), matching diffusers'
``EulerDiscreteScheduler`` (float timesteps, interpolated sigmas, optional Karras sigmas).

References: Karras et al., "Elucidating the Design Space of Diffusion-Based Generative
Models", 2022.
"""
from __future__ import annotations

from jaxdiff import schedules
from jaxdiff.samplers.base import (Sampler, SampleState, k_init_noise_sigma, k_model_input,
                                   state_x, table, x0_ve)


def make_euler(cfg: schedules.SchedulerConfig, num_steps: int) -> Sampler:
    """Euler sampler; ``cfg.use_karras_sigmas`` selects Karras spacing.

    State: ``SampleState(x)`` with x the VE-scaled sample (noise level sigma_i).
    """
    ts, sig = schedules.k_sigmas(cfg, num_steps)
    sigmas = table(sig)
    to_x0 = x0_ve(cfg.prediction_type)

    def step(state, i, model_output, noise):
        del noise
        x, sigma = state.x, sigmas[i]
        derivative = (x - to_x0(model_output, x, sigma)) / sigma
        return SampleState((x + derivative * (sigmas[i + 1] - sigma)).astype(x.dtype))

    return Sampler(timesteps=table(ts), init_noise_sigma=k_init_noise_sigma(cfg, sig),
                   init=SampleState, model_input=k_model_input(sigmas), step=step,
                   latents=state_x)
