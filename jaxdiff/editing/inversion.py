"""Inversion of real images into a DDIM trajectory, batched and jitted.

A *denoiser* here is ``denoise(x [B,h,w,C], t [] int, context [B,L,D]) -> model output``
(the UNet with its params closed over); a context may be a pytree (SDXL's ``{"context",
"text_embeds", "time_ids"}``, ``Pipeline.condition``), treated leaf by leaf. All functions
are pure, run as ``lax.scan`` loops, and treat every image of the batch independently, so
inverting B images in one call equals inverting each alone.

Timestep alignment follows the prompt-to-prompt reference (``NullInversion.ddim_loop``),
not diffusers' ``DDIMInverseScheduler`` (which is off by one step): with SD's schedule
and 50 steps the inversion evaluates the model at t = 1, 21, ..., 981, moving the latent
from the level of ``t - T/S`` to the level of ``t``; sampling then retraces the same
levels. The model output is converted with the alpha-bar of the latent it was evaluated
on, which makes v-prediction models invert correctly too.

References: Song et al. 2021 (DDIM); Mokady et al. 2022, "Null-text Inversion for
Editing Real Images"; Miyake et al. 2023, "Negative-prompt Inversion"; Ju et al. 2023,
"Direct Inversion: Boosting Diffusion-based Editing with 3 Lines of Code".
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jaxdiff.guidance import combine, guided_call
from jaxdiff.samplers.base import x0_eps_vp
from jaxdiff.samplers.ddim import DDIMTables, ddim_update
from jaxdiff.schedules import expand_like


def ddim_invert(denoise: Callable, tables: DDIMTables, z0, context, prediction_type: str):
    """DDIM inversion (conditional, no guidance).

    Args:
      z0: [B, h, w, C] scaled image latents.
      context: [B, L, D] source-prompt embeddings.
    Returns:
      trajectory [S + 1, B, h, w, C]: ``trajectory[0] = z0`` ... ``trajectory[S] = z_T``;
      ``trajectory[S - i]`` is the latent that sampling step ``i`` starts from.
    """
    to_x0_eps = x0_eps_vp(prediction_type)
    n = tables.timesteps.shape[0]

    def body(x, k):  # k runs S-1 .. 0: ascending timesteps
        out = denoise(x, tables.timesteps[k], context)
        x_next, _ = ddim_update(out, x, tables.alpha_prev[k], tables.alpha[k],
                                to_x0_eps=to_x0_eps)
        return x_next, x_next

    _, xs = jax.lax.scan(body, z0, jnp.arange(n - 1, -1, -1))
    return jnp.concatenate([z0[None], xs])


def step_of(tree, i):
    """Row ``i`` of every leaf of a per-step pytree (``nulls[i]`` for SDXL's pytrees)."""
    return jax.tree.map(lambda a: a[i], tree)


def ddim_sample(denoise: Callable, tables: DDIMTables, z_T, cond, nulls, guidance,
                prediction_type: str, offsets=None):
    """Deterministic DDIM sampling with per-step unconditional embeddings.

    Args:
      z_T: [B, h, w, C] start latents (the end of an inversion trajectory).
      cond: [B, L, D]; nulls: [S, B, L, D] per-step unconditional embeddings.
      guidance: CFG scale (traced).
      offsets: optional [S, B, h, w, C] added after each step (direct inversion).
    Returns:
      z0 [B, h, w, C].
    """
    to_x0_eps = x0_eps_vp(prediction_type)

    def body(x, i):
        out = guided_call(denoise, x, tables.timesteps[i], cond, step_of(nulls, i), guidance)
        x, _ = ddim_update(out, x, tables.alpha[i], tables.alpha_prev[i], to_x0_eps=to_x0_eps)
        if offsets is not None:
            x = x + offsets[i]
        return x, None

    x, _ = jax.lax.scan(body, z_T, jnp.arange(tables.timesteps.shape[0]))
    return x


def negative_prompt_nulls(cond, num_steps: int):
    """Negative-prompt inversion: the source prompt's embedding as every step's null."""
    return jax.tree.map(lambda c: jnp.broadcast_to(c, (num_steps,) + c.shape), cond)


def null_text_invert(denoise: Callable, tables: DDIMTables, trajectory, cond, uncond,
                     guidance, prediction_type: str, num_inner_steps: int = 10,
                     epsilon: float = 1e-5, lr: float = 1e-2, trainable=None):
    """Null-text inversion: per-step unconditional embeddings that retrace the trajectory.

    At sampling step i, Adam (lr ``lr * (1 - i/100)``, fresh state) optimises the null
    embedding so the guided DDIM step from the current latent lands on
    ``trajectory[S-1-i]``; up to ``num_inner_steps`` updates, stopping early per image
    once its loss (measured before the update) is below ``epsilon + i * 2e-5``. The
    early stop is a per-image mask inside ``lax.while_loop``: a batch inverts in one
    program, and each image follows exactly the updates it would get alone.

    Args:
      trajectory: [S + 1, B, ...] from ``ddim_invert``.
      cond, uncond: [B, L, D] source and empty-prompt embeddings (or pytrees of them).
      trainable: None (every leaf of ``uncond`` is optimised) or a pytree of bools like
        ``uncond``: the leaves that are (SDXL: the text embeddings, not the time ids).
    Returns:
      (nulls [S, B, L, D] (pytrees: every leaf with a leading [S]), inner_steps [S, B]
      int32 updates taken per image and step).
    """
    to_x0_eps = x0_eps_vp(prediction_type)
    n = tables.timesteps.shape[0]
    axes = tuple(range(1, trajectory.ndim - 1))

    def outer(carry, i):
        x, null = carry
        t, a, a_prev = tables.timesteps[i], tables.alpha[i], tables.alpha_prev[i]
        target = trajectory[n - 1 - i]
        out_c = jax.lax.stop_gradient(denoise(x, t, cond))
        opt = optax.adam(lr * (1.0 - i / 100.0))

        def losses(nl):
            out_u = denoise(x, t, nl)
            guided = combine(out_u, out_c, guidance)
            x_prev, _ = ddim_update(guided, x, a, a_prev, to_x0_eps=to_x0_eps)
            return jnp.mean((x_prev - target) ** 2, axis=axes)

        def keep_going(s):
            j, _, _, active, _ = s
            return (j < num_inner_steps) & jnp.any(active)

        def inner(s):
            j, nl, opt_state, active, taken = s
            loss, vjp = jax.vjp(losses, nl)
            (grad,) = vjp(jnp.ones_like(loss))
            if trainable is not None:  # Adam moves no leaf whose gradient is zero
                grad = jax.tree.map(lambda g, on: g if on else jnp.zeros_like(g), grad,
                                    trainable)
            updates, opt_state = opt.update(grad, opt_state, nl)
            nl = jax.tree.map(lambda v, u: jnp.where(expand_like(active, v), v + u, v), nl,
                              updates)
            taken = taken + active.astype(jnp.int32)
            active = active & ~(loss < epsilon + i * 2e-5)
            return j + 1, nl, opt_state, active, taken

        b = x.shape[0]
        init = (0, null, opt.init(null), jnp.ones((b,), bool), jnp.zeros((b,), jnp.int32))
        _, null, _, _, taken = jax.lax.while_loop(keep_going, inner, init)
        out = guided_call(denoise, x, t, cond, null, guidance)
        x_next, _ = ddim_update(out, x, a, a_prev, to_x0_eps=to_x0_eps)
        return (x_next, null), (null, taken)

    _, (nulls, taken) = jax.lax.scan(outer, (trajectory[-1], uncond), jnp.arange(n))
    return nulls, taken


def direct_offsets(denoise: Callable, tables: DDIMTables, trajectory, cond, nulls, guidance,
                   prediction_type: str):
    """Direct (PnP) inversion: per-step gaps ``z*_{t-1} - DDIM_step(z*_t)`` under guidance.

    Adding ``offsets[i]`` after sampling step i keeps the source branch exactly on the
    inversion trajectory; the target branch of an edit runs without them.
    Returns:
      offsets [S, B, h, w, C].
    """
    to_x0_eps = x0_eps_vp(prediction_type)
    n = tables.timesteps.shape[0]

    def one(i):
        x = trajectory[n - i]
        out = guided_call(denoise, x, tables.timesteps[i], cond, step_of(nulls, i), guidance)
        x_prev, _ = ddim_update(out, x, tables.alpha[i], tables.alpha_prev[i],
                                to_x0_eps=to_x0_eps)
        return trajectory[n - 1 - i] - x_prev

    return jax.lax.map(one, jnp.arange(n))
