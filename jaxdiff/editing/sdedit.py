"""SDEdit / img2img (Meng et al. 2022): noise the image to ``strength``, denoise with guidance.

Matches diffusers' ``StableDiffusionImg2ImgPipeline`` given the same start noise: the
last ``int(S * strength)`` of S DDIM (or DDPM) steps run from
``add_noise(z0, noise, timesteps[t_start])``. Strength, guidance, eta and the seed are
traced (see ``partial_trajectory.py`` for how the number of steps varies without changing shapes);
strength may differ per image of a batch. On SDXL pipelines (base or refiner) it is
diffusers' ``StableDiffusionXLImg2ImgPipeline`` (time ids of the image size, the refiner's
aesthetic scores, zero negative embeddings where the pipeline asks for them). With
``control=`` (ControlNets / T2I-Adapters, ``control.Control``) it is diffusers'
``StableDiffusionControlNetImg2ImgPipeline``: per-image condition images and traced scales;
the control window (``start``, ``end``) counts the steps each image runs.

References: Meng et al., "SDEdit: Guided Image Synthesis and Editing with Stochastic
Differential Equations", ICLR 2022.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp

from jaxdiff import schedules
from jaxdiff.editing import batch_inputs, partial_trajectory
from jaxdiff.guidance import cfg
from jaxdiff.samplers import SampleState, make_sampler
from jaxdiff.control import adapter_features, controlled_unet
from jaxdiff.sampling import initial_noise

SAMPLERS = ("ddim", "ddpm")  # VP samplers whose state is the latent itself


def sdedit_latents(denoise, sampler, alphas_cumprod, z0, noise, cond, uncond, strength,
                   guidance, keys, rescale=0.0, denoise_at=None):
    """img2img in latent space.

    Args:
      denoise: ``(x, t, context) -> model output``.
      sampler: a DDIM or DDPM ``Sampler`` (state = the latent).
      z0, noise: [B, h, w, C] scaled image latents and N(0, 1) start noise.
      cond, uncond: [B, L, D] prompt and negative-prompt embeddings (SDXL: the pytrees
        ``{"context", "text_embeds", "time_ids"}``).
      strength: [B] in [0, 1]; guidance: CFG scale (traced).
      keys: [B] keys for the per-step noise of stochastic steps (eta > 0, DDPM).
      denoise_at: optional ``(i, start [B]) -> denoiser`` used at step ``i`` in place of
        ``denoise`` (control models, whose window counts the steps an image runs).
    Returns:
      [B, h, w, C] edited latents (exactly z0 where strength gives no step).
    """
    s = sampler.num_evals
    start = partial_trajectory.start_index(strength, s)
    x = partial_trajectory.noised_start(alphas_cumprod, sampler.timesteps, z0, noise, start)

    def step(x, i):
        den = denoise if denoise_at is None else denoise_at(i, start)
        out = cfg(den, guidance, rescale)(x, sampler.timesteps[i], (cond, uncond))
        n = batch_inputs.step_noise(keys, i, x.shape[1:])
        return sampler.latents(sampler.step(SampleState(x), i, out, n))

    x, _ = partial_trajectory.partial_scan(step, x, start, jnp.arange(s))
    return x


@functools.lru_cache(maxsize=16)
def _compiled(pipe, sampler_name, steps, mesh=None, zero_uncond=False, control=()):
    """``zero_uncond``: SDXL's zero negative embeddings (no negative prompt); ``control``:
    the static specs of ``batch_inputs.spatial_control`` (their arrays are the program's
    ``control_rows`` / ``control_shared``)."""
    ac = jnp.asarray(schedules.alphas_cumprod(pipe.scheduler), jnp.float32)

    def run(params, images, ids, neg_ids, noise, keys, strength, guidance, eta,
            control_rows=(), control_shared=()):
        sampler = make_sampler(sampler_name, pipe.scheduler, steps, eta=eta)
        z0 = pipe.encode_images(params, images)
        # SDXL: time ids of the image size, as diffusers' img2img
        cond, uncond = pipe.encode_prompts(params, ids, neg_ids, *images.shape[1:3], zero_uncond)
        noise = initial_noise(keys, z0.shape[1:]) if noise is None else noise
        denoise_at = None
        if control:
            arrays = tuple(dict(r, **c) for r, c in zip(control_rows, control_shared))
            feats = adapter_features(control, arrays)
            s = sampler.num_evals  # diffusers counts the window over the steps that run
            denoise_at = lambda i, start: controlled_unet(pipe, params, control, arrays, feats,
                                                          i - start, jnp.maximum(s - start, 1))
        lat = sdedit_latents(batch_inputs.unet_denoiser(pipe, params), sampler, ac, z0, noise,
                             cond, uncond, strength, guidance, keys, denoise_at=denoise_at)
        return {"edited": pipe.decode_latents(params, lat),
                "reconstruction": pipe.decode_latents(params, z0), "latents": lat}

    return batch_inputs.rows_program(run, mesh or batch_inputs.one_device_mesh(),
                                     shared=("guidance", "eta", "control_shared"))


def sdedit(pipe, params, images, prompts, negative_prompts=None, *, strength=0.8,
           steps: int = 50, guidance_scale=7.5, seed=0, eta=0.0, sampler: str = "ddim",
           noise=None, mesh=None, sample_index=None, control=None):
    """SDEdit on a batch of images, one compiled program per (pipeline, shapes, steps).

    Args:
      images: float [B, H, W, 3] in [-1, 1].
      prompts / negative_prompts: one string or one per image (negative: None = "").
      strength: a number or one per image, in [0, 1].
      seed: start/step noise from ``fold_in(key(seed), image index)``; or give ``noise``
        [B, h, w, C] (N(0, 1), as diffusers' img2img draws it) for the start latent.
      mesh: the images are split over its ``data`` axis (default: all devices).
      sample_index: the images' indices in the whole job, which pick their noise
        (``batch_inputs.image_keys``; default 0..B-1).
      control: None, or a ``control.Control`` or a list of them (ControlNets and
        T2I-Adapters): condition images at the images' size, one or one per image; scales
        a float or one per image (traced). Their ``start`` / ``end`` fractions count the
        steps that run (``int(steps * strength)``), as diffusers' ControlNet img2img.
    Returns:
      {"edited", "reconstruction" (VAE round trip): [B, H, W, 3] in [-1, 1];
       "latents": [B, h, w, C]}.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"SDEdit supports samplers {SAMPLERS}, got {sampler!r}.")
    images = batch_inputs.check_images(images, pipe)
    b = images.shape[0]
    ids, neg = batch_inputs.tokenize_pair(pipe, prompts, negative_prompts, b)
    noise = batch_inputs.given_noise(noise, (b,) + pipe.latent_shape(*images.shape[1:3]))
    specs, c_rows, c_shared = batch_inputs.spatial_control(pipe, control, b, *images.shape[1:3],
                                                           "SDEdit")
    mesh = batch_inputs.edit_mesh(mesh)
    run = _compiled(pipe, sampler, int(steps), mesh, pipe.zeroes_negative(negative_prompts),
                    specs)
    keys = batch_inputs.image_keys(seed, b, sample_index)
    rows = dict(images=images, ids=ids, neg_ids=neg, noise=noise, keys=keys,
                strength=batch_inputs.per_image(strength, b, "strength"))
    shared = dict(guidance=jnp.float32(guidance_scale), eta=jnp.float32(eta))
    if specs:
        rows["control_rows"], shared["control_shared"] = c_rows, c_shared
    return batch_inputs.run_rows(run, mesh, b, params, rows, shared)
