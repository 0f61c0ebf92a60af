"""DPM-Solver++(2M) (Lu et al. 2022), matching diffusers' ``DPMSolverMultistepScheduler``
with its defaults: algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
lower_order_final=True, final_sigmas_type="zero" (``use_karras_sigmas`` from the config).

The first and the last step are first order (DPM-Solver++1 = DDIM in x0 form); the others
use the previous x0 prediction, which the state carries. A run started in the middle of the
schedule (SDXL's refiner after ``denoising_start``) has no previous prediction: its first
step is first order too, as diffusers' ``lower_order_nums`` makes it.

References: Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", 2022.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import schedules
from jaxdiff.samplers.base import Sampler, identity_input, table, x0_eps_vp


class DPMState(NamedTuple):
    """x: current sample; prev_x0: the previous step's x0 prediction; has_prev: whether a
    step of this run made it (bool scalar)."""
    x: jax.Array
    prev_x0: jax.Array
    has_prev: jax.Array


def _tables(sig):
    """float32 per-step coefficients: x' = ratio x - c0 m0 - c1 (m0 - m1).

    m0/m1 are the current/previous x0 predictions; c1 = 0 on first-order steps.
    Computed in float32 in diffusers' order of operations.
    """
    sig = sig.astype(np.float32)
    n = len(sig) - 1
    with np.errstate(divide="ignore"):
        alpha = (1 / (sig ** 2 + 1) ** np.float32(0.5)).astype(np.float32)
        sigma = sig * alpha
        lam = np.log(alpha) - np.log(sigma)           # +inf at the final sigma 0
    s, t = np.arange(n), np.arange(1, n + 1)
    h = lam[t] - lam[s]
    ratio = sigma[t] / sigma[s]
    c0 = alpha[t] * (np.exp(-h) - 1)
    second = (s > 0) & (s < n - 1)
    h0 = lam[s] - lam[np.maximum(s - 1, 0)]
    with np.errstate(divide="ignore", invalid="ignore"):
        c1 = np.where(second, 0.5 * c0 * (h / h0), 0)
    return (alpha[:-1], sigma[:-1], ratio.astype(np.float32), c0.astype(np.float32),
            c1.astype(np.float32))


def make_dpmpp_2m(cfg: schedules.SchedulerConfig, num_steps: int) -> Sampler:
    """DPM-Solver++(2M) sampler. State: ``DPMState(x, prev_x0)``; init sigma is 1."""
    ts, sig = schedules.dpm_sigmas(cfg, num_steps)
    alpha, sigma, ratio, c0, c1 = (table(v) for v in _tables(sig))
    to_x0_eps = x0_eps_vp(cfg.prediction_type)

    def init(x):
        return DPMState(x, jnp.zeros_like(x), jnp.zeros((), bool))

    def step(state, i, model_output, noise):
        del noise
        x0, _ = to_x0_eps(model_output, state.x, alpha[i], sigma[i])
        x0 = x0.astype(state.x.dtype)
        c1_i = jnp.where(state.has_prev, c1[i], 0.0)
        x = ratio[i] * state.x - c0[i] * x0 - c1_i * (x0 - state.prev_x0)
        return DPMState(x.astype(state.x.dtype), x0, jnp.ones((), bool))

    return Sampler(timesteps=table(ts, jnp.int32), init_noise_sigma=1.0, init=init,
                   model_input=identity_input, step=step, latents=lambda s: s.x)
