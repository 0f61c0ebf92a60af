"""RePaint (Lugmayr et al. 2022): inpainting by resampling, with the known region taken
from the forward-noised original at every step.

The jump schedule (``get_schedule_jump``: every ``jump_length`` steps, go back up
``jump_length`` steps, ``jump_n_sample - 1`` times) is computed on the host as a static
index array, as diffusers' ``RePaintScheduler.set_timesteps``; the loop is one
``lax.scan`` over it with ``lax.cond`` choosing a denoising step (UNet) or an undo step
(forward noising, no UNet). Step math is ``RePaintScheduler.step`` / ``undo_step``:
timesteps ``j * T // S``, alpha-bar 1 below t = 0, ``eta`` (traced) scales the DDIM
variance, and one noise draw serves both the unknown part's variance and the known
part's noising. An undo step adds the ``T // S`` single-step noisings in one draw (the
same distribution as diffusers' ``T // S`` draws). Guidance is CFG (traced). The mask is
1 where the image is filled in (diffusers' RePaint mask is the opposite: 1 = keep).

References: Lugmayr et al., "RePaint: Inpainting using Denoising Diffusion Probabilistic
Models", CVPR 2022. Paper setting: S = 250, jump_length = 10, jump_n_sample = 10.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import schedules
from jaxdiff.editing import batch_inputs
from jaxdiff.guidance import cfg
from jaxdiff.samplers.base import clip_fn, x0_eps_vp
from jaxdiff.samplers.ddim import ddim_update
from jaxdiff.sampling import initial_noise


def jump_schedule(num_steps: int, jump_length: int, jump_n_sample: int,
                  num_train_timesteps: int) -> np.ndarray:
    """RePaint's timestep sequence (diffusers ``RePaintScheduler.set_timesteps``)."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}.")
    if jump_length < 1 or jump_n_sample < 1:
        raise ValueError(f"jump_length and jump_n_sample must be >= 1, got {jump_length=}, "
                         f"{jump_n_sample=}.")
    jumps = {j: jump_n_sample - 1 for j in range(0, num_steps - jump_length, jump_length)}
    out, t = [], num_steps
    while t >= 1:
        t -= 1
        out.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                out.append(t)
    return np.asarray(out, np.int64) * (num_train_timesteps // num_steps)


class RePaintTables(NamedTuple):
    """Per schedule entry k: ``down[k]`` (denoise at ``timestep[k]``) or undo;
    ``alpha``/``alpha_prev``: alpha-bar before/after a down step; ``undo_keep``: the
    alpha-bar ratio of an undo step (``prod(1 - beta)`` over the ``T // S`` steps)."""
    down: jax.Array
    timestep: jax.Array
    alpha: jax.Array
    alpha_prev: jax.Array
    undo_keep: jax.Array


def repaint_tables(cfg: schedules.SchedulerConfig, schedule: np.ndarray,
                   num_steps: int) -> RePaintTables:
    betas = schedules.betas(cfg).astype(np.float64)
    ac = schedules.alphas_cumprod(cfg)
    n = cfg.num_train_timesteps // num_steps
    t_last = np.concatenate([[schedule[0] + 1], schedule[:-1]])
    down = schedule < t_last
    prev = schedule - n
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], 1.0)
    keep = np.asarray([np.prod(1.0 - betas[tl:tl + n]) if not d else 1.0
                       for tl, d in zip(t_last, down)])
    return RePaintTables(jnp.asarray(down), jnp.asarray(schedule, jnp.int32),
                         jnp.asarray(ac[schedule], jnp.float32),
                         jnp.asarray(a_prev, jnp.float32), jnp.asarray(keep, jnp.float32))


def repaint_latents(guided: Callable, tables: RePaintTables, z0, mask, x_T, noise_fn: Callable,
                    eta, prediction_type: str, clip: Callable = lambda x0: x0):
    """RePaint in latent space.

    Args:
      guided: ``(x, t) -> model output`` (guidance and prompts closed over).
      z0: [B, h, w, C] original latents; mask: [B, h, w, 1] (1 = fill in, 0 = known).
      x_T: [B, h, w, C] start noise; noise_fn: ``k -> N(0, 1) [B, h, w, C]`` for entry k.
    Returns:
      [B, h, w, C]; where the mask is 0 the result is z0 (alpha-bar 1 after the last step).
    """
    to_x0_eps = x0_eps_vp(prediction_type)

    def body(x, k):
        z = noise_fn(k)

        def down(x):
            a, a_prev = tables.alpha[k], tables.alpha_prev[k]
            unknown, _ = ddim_update(guided(x, tables.timestep[k]), x, a, a_prev,
                                     to_x0_eps=to_x0_eps, clip=clip, eta=eta, noise=z)
            known = a_prev ** 0.5 * z0 + (1 - a_prev) ** 0.5 * z
            return mask * unknown + (1.0 - mask) * known

        def undo(x):
            c = tables.undo_keep[k]
            return c ** 0.5 * x + (1 - c) ** 0.5 * z

        return jax.lax.cond(tables.down[k], down, undo, x), None

    x, _ = jax.lax.scan(body, x_T, jnp.arange(tables.down.shape[0]))
    return x


@functools.lru_cache(maxsize=16)
def _compiled(pipe, steps, jump_length, jump_n_sample, mesh=None, zero_uncond=False):
    sch = jump_schedule(steps, jump_length, jump_n_sample, pipe.scheduler.num_train_timesteps)
    tables = repaint_tables(pipe.scheduler, sch, steps)

    def run(params, images, masks, ids, neg_ids, keys, guidance, eta):
        z0 = pipe.encode_images(params, images)
        m = batch_inputs.latent_mask(masks, z0.shape[1:3])
        contexts = pipe.encode_prompts(params, ids, neg_ids, *images.shape[1:3], zero_uncond)
        guided_unet = cfg(batch_inputs.unet_denoiser(pipe, params), guidance)
        guided = lambda x, t: guided_unet(x, t, contexts)
        noise_fn = lambda k: batch_inputs.step_noise(keys, k, z0.shape[1:])
        lat = repaint_latents(guided, tables, z0, m, initial_noise(keys, z0.shape[1:]),
                              noise_fn, eta, pipe.scheduler.prediction_type,
                              clip_fn(pipe.scheduler))
        return {"edited": pipe.decode_latents(params, lat),
                "reconstruction": pipe.decode_latents(params, z0), "latents": lat,
                "latent_mask": m[..., 0]}

    return batch_inputs.rows_program(run, mesh or batch_inputs.one_device_mesh(),
                                     shared=("guidance", "eta"))


def repaint(pipe, params, images, masks, prompts, negative_prompts=None, *, steps: int = 50,
            jump_length: int = 10, jump_n_sample: int = 10, guidance_scale=7.5, seed=0,
            eta=0.0, mesh=None, sample_index=None):
    """RePaint on a batch: images [B, H, W, 3] in [-1, 1], masks [B, H, W] (1 = fill in;
    averaged to the latent grid and binarised at 0.5). ``eta`` 0 as diffusers' default,
    1 for the paper's DDPM sampling. The batch is split over ``mesh``'s ``data`` axis
    (default: all devices); ``sample_index``: the images'
    indices in the whole job, which pick their noise (``batch_inputs.image_keys``).

    Returns:
      {"edited", "reconstruction": [B, H, W, 3] in [-1, 1]; "latents"; "latent_mask"}.
    """
    images = batch_inputs.check_images(images, pipe)
    b = images.shape[0]
    masks = batch_inputs.check_masks(masks, images)
    ids, neg = batch_inputs.tokenize_pair(pipe, prompts, negative_prompts, b)
    mesh = batch_inputs.edit_mesh(mesh)
    run = _compiled(pipe, int(steps), int(jump_length), int(jump_n_sample), mesh,
                    pipe.zeroes_negative(negative_prompts))
    keys = batch_inputs.image_keys(seed, b, sample_index)
    rows = dict(images=images, masks=masks, ids=ids, neg_ids=neg, keys=keys)
    return batch_inputs.run_rows(run, mesh, b, params, rows, dict(
        guidance=jnp.float32(guidance_scale), eta=jnp.float32(eta)))
