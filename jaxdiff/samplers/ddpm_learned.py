"""DDPM ancestral sampling with the model's own variance (a learned-sigma model such as
DiT), matching diffusers' ``DDPMScheduler(variance_type="learned_range")``.

Not in ``SAMPLERS``: its ``step`` takes twice the latent channels (noise prediction, then
the variance interpolation v in [-1, 1]), so only code that keeps the variance half uses
it (``jaxdiff.dit_sampling`` with ``variance="learned"``). Timesteps, the previous level
and no noise at ``t == 0`` are as in ``ddpm.py``.

References: Nichol & Dhariwal, "Improved Denoising Diffusion Probabilistic Models", ICML
2021; Peebles & Xie, "Scalable Diffusion Models with Transformers", ICCV 2023.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxdiff import schedules
from jaxdiff.samplers.base import (Sampler, SampleState, clip_fn, identity_input, state_x,
                                   x0_eps_vp)


def make_learned_range_ddpm(cfg: schedules.SchedulerConfig, num_steps: int) -> Sampler:
    """DDPM with the model's variance, diffusers' ``DDPMScheduler(variance_type=
    "learned_range")``: ``step`` takes [B, h, w, 2C] (noise prediction, then v in [-1, 1])
    and draws with ``log var = (v+1)/2 log beta_t + (1-v)/2 log beta~_t`` (clamped at
    1e-20). State: ``SampleState(x)``.
    """
    ts = schedules.timesteps(cfg, num_steps, "ddim")
    ac = schedules.alphas_cumprod(cfg)
    a_t = ac[ts]
    a_prev = np.concatenate([ac[ts[1:]], np.ones(1, np.float32)])
    beta_t, beta_prev = 1 - a_t, 1 - a_prev
    cur_alpha = a_t / a_prev
    cur_beta = 1 - cur_alpha
    tab = {k: jnp.asarray(v, jnp.float32) for k, v in dict(
        sqrt_a=a_t ** 0.5, sqrt_1ma=beta_t ** 0.5, c_x0=a_prev ** 0.5 * cur_beta / beta_t,
        c_x=cur_alpha ** 0.5 * beta_prev / beta_t, max_log=np.log(cur_beta),
        min_log=np.log(np.maximum(beta_prev / beta_t * cur_beta, np.float32(1e-20))),
        noisy=(ts > 0).astype(np.float32)).items()}
    to_x0_eps, clip = x0_eps_vp(cfg.prediction_type), clip_fn(cfg)

    def step(state, i, model_output, noise):
        ch = state.x.shape[-1]
        out, v = model_output[..., :ch], model_output[..., ch:]
        x0, _ = to_x0_eps(out, state.x, tab["sqrt_a"][i], tab["sqrt_1ma"][i])
        frac = (v + 1) / 2
        log_var = frac * tab["max_log"][i] + (1 - frac) * tab["min_log"][i]
        x = (tab["c_x0"][i] * clip(x0) + tab["c_x"][i] * state.x
             + tab["noisy"][i] * jnp.exp(0.5 * log_var) * noise)
        return SampleState(x.astype(state.x.dtype))

    return Sampler(timesteps=jnp.asarray(ts, jnp.int32), init_noise_sigma=1.0,
                   init=SampleState, model_input=identity_input, step=step, latents=state_x)
