"""Blended latent diffusion (Avrahami et al. 2023): text-guided edit inside a mask.

As the reference (omriav/blended-latent-diffusion, ``text_editing_stable_diffusion.py``):
sampling starts from N(0, 1) noise at step ``int(S * blending_percentage)`` of S; after
every step the latent outside the (latent-resolution) mask is replaced by the source
latent noised with fresh noise to that step's timestep ``t`` (the reference's choice; the
latent after a step is at the next, lower level). ``blending_percentage`` is traced (see
``partial_trajectory.py``), per image. The mask is 1 where the image is edited.

References: Avrahami, Fried & Lischinski, "Blended Latent Diffusion", SIGGRAPH 2023.
PIE-Bench setting: ``blending_percentage = 0.25``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxdiff import schedules
from jaxdiff.editing import batch_inputs, partial_trajectory
from jaxdiff.guidance import cfg
from jaxdiff.samplers import SampleState, make_sampler
from jaxdiff.sampling import initial_noise

SAMPLERS = ("ddim", "ddpm")


def blend_start(blending_percentage, num_steps: int):
    """Index of the first step run: ``int(S * blending_percentage)`` (traced, per image)."""
    p = jnp.clip(jnp.asarray(blending_percentage, jnp.float32), 0.0, 1.0)
    return jnp.minimum(jnp.floor(p * num_steps + 1e-4), num_steps).astype(jnp.int32)


def blended_latents(denoise, sampler, alphas_cumprod, z0, mask, noise, cond, uncond,
                    blending_percentage, guidance, keys):
    """Blended latent diffusion in latent space.

    Args:
      denoise: ``(x, t, context) -> model output``; sampler: DDIM or DDPM ``Sampler``.
      z0: [B, h, w, C] source latents; mask: [B, h, w, 1] (1 = edit, 0 = keep).
      noise: [B, h, w, C] N(0, 1) start latents.
      blending_percentage: [B] fraction of the steps skipped at the start.
      keys: [B] keys for the per-step source noise (and DDPM/eta noise).
    Returns:
      (final latents [B, h, w, C], latents after every step [S, B, h, w, C]).
    """
    s = sampler.num_evals
    start = blend_start(blending_percentage, s)
    guided = cfg(denoise, guidance, rescale=0.0)
    src_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1_000_003))(keys)

    def step(x, i):
        t = sampler.timesteps[i]
        out = guided(x, t, (cond, uncond))
        x = sampler.latents(sampler.step(SampleState(x), i, out,
                                         batch_inputs.step_noise(keys, i, x.shape[1:])))
        src = schedules.add_noise(alphas_cumprod, z0,
                                  batch_inputs.step_noise(src_keys, i, x.shape[1:]), t)
        return mask * x + (1.0 - mask) * src

    return partial_trajectory.partial_scan(step, noise, start, jnp.arange(s))


@functools.lru_cache(maxsize=16)
def _compiled(pipe, sampler_name, steps, mesh=None, zero_uncond=False):
    """``zero_uncond``: SDXL's zero negative embeddings (no negative prompt)."""
    ac = jnp.asarray(schedules.alphas_cumprod(pipe.scheduler), jnp.float32)

    def run(params, images, masks, ids, neg_ids, keys, percentage, guidance, eta):
        sampler = make_sampler(sampler_name, pipe.scheduler, steps, eta=eta)
        z0 = pipe.encode_images(params, images)
        m = batch_inputs.latent_mask(masks, z0.shape[1:3])
        cond, uncond = pipe.encode_prompts(params, ids, neg_ids, *images.shape[1:3],
                                           zero_uncond)
        noise = initial_noise(keys, z0.shape[1:])
        lat, _ = blended_latents(batch_inputs.unet_denoiser(pipe, params), sampler, ac, z0, m,
                                 noise, cond, uncond, percentage, guidance, keys)
        return {"edited": pipe.decode_latents(params, lat),
                "reconstruction": pipe.decode_latents(params, z0), "latents": lat,
                "latent_mask": m[..., 0]}

    return batch_inputs.rows_program(run, mesh or batch_inputs.one_device_mesh(),
                                     shared=("guidance", "eta"))


def blended(pipe, params, images, masks, prompts, negative_prompts=None, *,
            blending_percentage=0.25, steps: int = 50, guidance_scale=7.5, seed=0, eta=0.0,
            sampler: str = "ddim", mesh=None, sample_index=None):
    """Blended latent diffusion on a batch: images [B, H, W, 3] in [-1, 1], masks
    [B, H, W] (1 = edit; averaged to the latent grid and binarised at 0.5); the batch is
    split over ``mesh``'s ``data`` axis (default: all devices); ``sample_index``: the images'
    indices in the whole job, which pick their noise (``batch_inputs.image_keys``).

    Returns:
      {"edited", "reconstruction": [B, H, W, 3] in [-1, 1]; "latents"; "latent_mask"}.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"blended diffusion supports samplers {SAMPLERS}, got {sampler!r}.")
    images = batch_inputs.check_images(images, pipe)
    b = images.shape[0]
    masks = batch_inputs.check_masks(masks, images)
    ids, neg = batch_inputs.tokenize_pair(pipe, prompts, negative_prompts, b)
    mesh = batch_inputs.edit_mesh(mesh)
    run = _compiled(pipe, sampler, int(steps), mesh, pipe.zeroes_negative(negative_prompts))
    keys = batch_inputs.image_keys(seed, b, sample_index)
    rows = dict(images=images, masks=masks, ids=ids, neg_ids=neg, keys=keys,
                percentage=batch_inputs.per_image(blending_percentage, b,
                                                  "blending_percentage"))
    return batch_inputs.run_rows(run, mesh, b, params, rows, dict(
        guidance=jnp.float32(guidance_scale), eta=jnp.float32(eta)))
