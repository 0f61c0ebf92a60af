"""The sampler interface and the prediction-type adapters shared by all samplers.

A sampler is a bundle of pure functions over an explicit state pytree (docs/design.md,
"Traced vs static"). A denoising loop is::

    sampler = make_euler(cfg, 30)
    state = sampler.init(noise * sampler.init_noise_sigma)
    def body(state, i):
        out = unet(sampler.model_input(state, i), sampler.timesteps[i], context)
        return sampler.step(state, i, out, noise_for_step_i), None
    state, _ = jax.lax.scan(body, state, jnp.arange(len(sampler.timesteps)))
    x0 = sampler.latents(state)

``i`` may be traced: everything a step needs is a table indexed by ``i``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

State = Any  # a pytree; each sampler documents its own


@dataclasses.dataclass(frozen=True, eq=False)  # holds arrays and closures: identity only
class Sampler:
    """Pure functions of one sampling algorithm for a fixed number of steps.

    Attributes:
      timesteps: [M] UNet timestep of each model evaluation (M = steps, or 2 * steps - 1
        for Heun); int32 for DDIM/DDPM/DPM-Solver, float32 for Euler/Heun.
      init_noise_sigma: scale of the N(0, 1) initial latents (diffusers' value).
      init: ``x -> state``; x are the initial latents already scaled by init_noise_sigma.
      model_input: ``(state, i) -> x`` to feed the UNet at evaluation i.
      step: ``(state, i, model_output, noise) -> state``; noise ~ N(0, 1) shaped like x,
        ignored by deterministic samplers.
      latents: ``state -> x``, the current sample.
    """
    timesteps: jax.Array
    init_noise_sigma: float
    init: Callable[[jax.Array], State]
    model_input: Callable[[State, Any], jax.Array]
    step: Callable[[State, Any, jax.Array, jax.Array], State]
    latents: Callable[[State], jax.Array]

    @property
    def num_evals(self) -> int:
        """Number of model evaluations (the scan length)."""
        return int(self.timesteps.shape[0])


class SampleState(NamedTuple):
    """State of one-step samplers (DDIM, DDPM, Euler, Euler-ancestral): the sample."""
    x: jax.Array


def identity_input(state, i):
    del i
    return state.x


def state_x(state):
    return state.x


def x0_eps_vp(prediction_type: str) -> Callable:
    """``(out, x, alpha, sigma) -> (x0, eps)`` for ``x = alpha x0 + sigma eps``.

    ``alpha = sqrt(abar)``, ``sigma = sqrt(1 - abar)``. Resolved once, outside jit.
    """
    if prediction_type == "epsilon":
        return lambda out, x, a, s: ((x - s * out) / a, out)
    if prediction_type == "v_prediction":
        return lambda out, x, a, s: (a * x - s * out, a * out + s * x)
    if prediction_type == "sample":
        return lambda out, x, a, s: (out, (x - a * out) / s)
    raise ValueError(f"unknown prediction_type {prediction_type!r}; use epsilon, "
                     "v_prediction or sample.")


def x0_ve(prediction_type: str) -> Callable:
    """``(out, x, sigma) -> x0`` for the VE-scaled sample ``x = x0 + sigma eps``.

    The sigma-based (Euler/Heun) samplers carry ``x_t / sqrt(abar)``; the UNet sees
    ``x / sqrt(sigma^2 + 1)``. Formulas are diffusers' (Euler/Heun ``step``).
    """
    if prediction_type == "epsilon":
        return lambda out, x, s: x - s * out
    if prediction_type == "v_prediction":
        return lambda out, x, s: out * (-s / (s ** 2 + 1) ** 0.5) + x / (s ** 2 + 1)
    if prediction_type == "sample":
        return lambda out, x, s: out
    raise ValueError(f"unknown prediction_type {prediction_type!r}; use epsilon, "
                     "v_prediction or sample.")


def clip_fn(cfg) -> Callable:
    """x0 clipping of ``cfg.clip_sample``, resolved once (identity when off)."""
    if not cfg.clip_sample:
        return lambda x0: x0
    r = float(cfg.clip_sample_range)
    return lambda x0: jnp.clip(x0, -r, r)


def table(values, dtype=jnp.float32) -> jax.Array:
    """A host table as a device constant of the given dtype."""
    return jnp.asarray(values, dtype)


def k_init_noise_sigma(cfg, sigmas) -> float:
    """diffusers' init_noise_sigma of the sigma-based schedulers.

    ``max(sigmas)`` for linspace/trailing spacing, ``sqrt(max^2 + 1)`` for leading (the
    latter is what diffusers uses, although the sample's std is max(sigmas)).
    """
    m = np.float32(np.max(sigmas))
    if cfg.timestep_spacing in ("linspace", "trailing"):
        return float(m)
    return float(np.sqrt(m * m + np.float32(1)))


def k_model_input(sigmas):
    """``(state, i) -> x / sqrt(sigma_i^2 + 1)``: the VP-scaled input the UNet expects."""
    def model_input(state, i):
        return state.x / (sigmas[i] ** 2 + 1) ** 0.5
    return model_input
