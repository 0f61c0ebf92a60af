"""Each sampler's noise levels per model evaluation, for guidance that works on x0.

``apg_levels`` gives the ``x = alpha x0 + sigma eps`` levels of the UNet input at every
evaluation of a sampler, from the sampler's own schedule, so adaptive projected guidance
(``guidance.adaptive_projection``) converts outputs to x0 exactly as the sampler does.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxdiff import schedules


# Samplers with one model evaluation per step (Heun's two would advance APG's momentum twice
# a step and mix predictor and corrector levels).
APG_SAMPLERS = ("ddim", "ddpm", "dpmpp_2m", "euler", "euler_a")


def check_apg_sampler(sampler: str, name: str = "adaptive_projection") -> None:
    """One-line ValueError naming ``name`` unless ``sampler`` is one of ``APG_SAMPLERS``."""
    if sampler not in APG_SAMPLERS:
        raise ValueError(f"{name} works with the {', '.join(APG_SAMPLERS)} samplers, not "
                         f"{sampler!r}.")


def apg_levels(sampler: str, cfg, steps: int):
    """float32 (alpha [M], sigma [M]) of each evaluation's UNet input ``x = alpha x0 + sigma
    eps``, from the sampler's own schedule, so APG converts outputs to x0 as the sampler
    does: alpha-bar at DDIM's / DDPM's timesteps; for the sigma-based samplers (DPM-Solver++,
    Euler, Euler-ancestral) the input is ``x_ve / sqrt(s^2 + 1)`` at their sigma s, i.e.
    alpha = 1 / sqrt(s^2 + 1), sigma = s alpha (``x0_ve`` is ``x0_eps_vp`` there)."""
    check_apg_sampler(sampler)
    if sampler in ("ddim", "ddpm"):
        ac = schedules.alphas_cumprod(cfg)[schedules.timesteps(cfg, steps, "ddim")]
        return jnp.asarray(ac ** 0.5, jnp.float32), jnp.asarray((1 - ac) ** 0.5, jnp.float32)
    if sampler == "dpmpp_2m":
        sig = schedules.dpm_sigmas(cfg, steps)[1][:-1]
    else:  # euler_a never uses Karras sigmas (as diffusers' EulerAncestralDiscreteScheduler)
        sig = schedules.k_sigmas(cfg, steps, use_karras=False if sampler == "euler_a" else
                                 None)[1][:-1]
    alpha = (1 / (sig ** 2 + 1) ** np.float32(0.5)).astype(np.float32)
    return jnp.asarray(alpha), jnp.asarray(sig * alpha, jnp.float32)
