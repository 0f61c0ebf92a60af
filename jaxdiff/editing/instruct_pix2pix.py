"""InstructPix2Pix (Brooks et al. 2023): edit an image by a written instruction.

The UNet takes the noisy latents and the source image's latents concatenated along
channels (an 8-channel UNet for a 4-channel VAE: ``Pipeline.is_instruct``). Sampling uses
two guidance scales, as diffusers' ``StableDiffusionInstructPix2PixPipeline``: three
branches in ONE UNet call per step, ``[text + image; image only; neither]`` (the
instruction's embeddings with the image latents; the negative prompt's with the image
latents; the negative prompt's with zero latents), combined as

    eps = eps_uncond + s_T (eps_text - eps_image) + s_I (eps_image - eps_uncond).

The formula holds for every (s_T, s_I); diffusers instead drops guidance altogether (the
text + image branch alone) when s_T <= 1 or s_I < 1, so the two agree there only at
s_T = s_I = 1 (where the formula is that branch).
The image latents are the VAE posterior's mode, unscaled (diffusers'
``latent_dist.mode()`` in ``prepare_image_latents``); the denoised latents are scaled as
usual. ``s_T`` (text guidance) and ``s_I`` (image guidance) are traced: a list of
(s_T, s_I) pairs is one ``jax.vmap`` sweep in one program sharing the parameters. Any
sampler of ``jaxdiff.samplers`` runs the loop (default Euler ancestral, the scheduler of
the released InstructPix2Pix checkpoint); the initial and per-step noise of image ``i``
come from ``fold_in(key(seed), i)`` as in ``jaxdiff.generate``. The batch is split over
the mesh, each device editing its own images with all three branches.

References: Brooks, Holynski, Efros, "InstructPix2Pix: Learning to Follow Image Editing
Instructions", CVPR 2023 (sec. 3.2.1, eq. 3).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import denoiser
from jaxdiff.editing import batch_inputs
from jaxdiff.guidance import combine
from jaxdiff.models import AutoencoderKL
from jaxdiff.pipeline import from_uint8, to_uint8
from jaxdiff.samplers import SAMPLERS, make_sampler
from jaxdiff.sampling import initial_noise

Scale = Union[float, Sequence[float]]


def image_latents(pipe, params, images) -> jax.Array:
    """images [B, H, W, 3] in [-1, 1] -> the VAE posterior's mode [B, h, w, C], unscaled
    (the InstructPix2Pix UNet's image condition, as diffusers computes it)."""
    mean, _ = pipe.vae.apply({"params": params["vae"]}, images, method=AutoencoderKL.encode)
    return mean


def instruct_denoiser(pipe, params) -> Callable:
    """``(x [B,h,w,C], t, (context [B,L,D], image [B,h,w,C])) -> model output``: the
    denoiser (``denoiser.denoise``: the UNet, or a widened text DiT with its condition
    pytree) on the noisy latents with the image latents appended along channels."""
    def denoise(x, t, cond):
        context, image = cond
        x_in = jnp.concatenate([x, image.astype(x.dtype)], axis=-1)
        return denoiser.denoise(pipe, params["unet"], x_in, t, context)
    return denoise


def dual_guidance(denoise: Callable, text_scale, image_scale) -> Callable:
    """InstructPix2Pix's classifier-free guidance over text and image (eq. 3).

    Args:
      denoise: ``instruct_denoiser``'s ``(x, t, (context, image)) -> output``.
      text_scale, image_scale: s_T and s_I (traced scalars). s_T = s_I = 1 gives the
        text + image branch alone.
    Returns:
      ``guided(x, t, (cond, uncond, image)) -> output``: one call on ``[x; x; x]`` with
      contexts ``[cond; uncond; uncond]`` and images ``[image; image; 0]`` (diffusers'
      branch order).
    """
    def guided(x, t, conditions):
        cond, uncond, image = conditions
        contexts = jax.tree.map(lambda c, u: jnp.concatenate([c, u, u]), cond, uncond)
        out = denoise(jnp.concatenate([x, x, x]), t,
                      (contexts, jnp.concatenate([image, image, jnp.zeros_like(image)])))
        out_text, out_image, out_uncond = jnp.split(out, 3)
        return combine(out_uncond, out_image, image_scale) + text_scale * (out_text - out_image)
    return guided


def instruct_latents(denoise: Callable, sampler, x, cond, uncond, image, text_scale,
                     image_scale, keys) -> jax.Array:
    """The sampling loop (one ``lax.scan``) in latent space.

    Args:
      denoise: ``instruct_denoiser``'s function.
      sampler: a ``jaxdiff.samplers.Sampler``.
      x: [B, h, w, C] initial latents, already multiplied by ``sampler.init_noise_sigma``.
      cond, uncond: [B, L, D] instruction and negative-prompt embeddings (a text DiT's
        condition pytrees, ``Pipeline.encode_prompts``).
      image: [B, h, w, C] ``image_latents`` of the source images.
      text_scale, image_scale: s_T, s_I (traced).
      keys: [B] per-image keys of the per-step noise (ancestral / stochastic samplers).
    Returns:
      [B, h, w, C] final (scaled) latents.
    """
    guided = dual_guidance(denoise, text_scale, image_scale)

    def body(state, i):
        out = guided(sampler.model_input(state, i), sampler.timesteps[i], (cond, uncond, image))
        noise = batch_inputs.step_noise(keys, i, x.shape[1:])
        return sampler.step(state, i, out, noise), None

    state, _ = jax.lax.scan(body, sampler.init(x), jnp.arange(sampler.num_evals))
    return sampler.latents(state)


@functools.lru_cache(maxsize=16)
def _compiled(pipe, sampler_name, steps, sweep, mesh=None):
    """image encode -> (vmapped) sampling loop -> decode, one program per (pipeline,
    sampler, steps, sweep or not, mesh); shapes pick the rest. A sweep's outputs are
    [B, S, ...] (the image axis first, as the rows program splits it)."""

    def run(params, images, ids, neg_ids, noise, keys, text_scale, image_scale, eta):
        sampler = make_sampler(sampler_name, pipe.scheduler, steps, eta=eta)
        image = image_latents(pipe, params, images)
        cond, uncond = pipe.encode_prompts(params, ids, neg_ids, *images.shape[1:3])
        x = noise * sampler.init_noise_sigma
        loop = lambda s_t, s_i: instruct_latents(instruct_denoiser(pipe, params), sampler, x,
                                                 cond, uncond, image, s_t, s_i, keys)
        lat = jnp.moveaxis(jax.vmap(loop)(text_scale, image_scale), 0, 1) if sweep else \
            loop(text_scale, image_scale)
        # One decoder call for the edits and the VAE round trip (one decoder to compile).
        flat = jnp.concatenate([lat.reshape((-1,) + lat.shape[-3:]),
                                pipe.encode_images(params, images)])
        decoded = pipe.decode_latents(params, flat)
        edited, recon = decoded[:-images.shape[0]], decoded[-images.shape[0]:]
        return {"edited": edited.reshape(lat.shape[:-3] + edited.shape[1:]),
                "reconstruction": recon, "latents": lat}

    return batch_inputs.rows_program(run, mesh or batch_inputs.one_device_mesh(),
                                     shared=("text_scale", "image_scale", "eta"))


def check_instruct(pipe) -> None:
    """One-line ValueError, before any compile, unless ``pipe`` is an InstructPix2Pix
    pipeline (SD 1.x / 2.x layout, UNet over noisy + image latents)."""
    if pipe.is_sdxl:
        raise ValueError("InstructPix2Pix for SDXL pipelines is not supported yet; load an "
                         "SD 1.x / 2.x InstructPix2Pix pipeline.")
    if not pipe.is_instruct:
        c = pipe.vae.config.latent_channels
        raise ValueError(f"this pipeline's UNet takes {pipe.unet.config.in_channels} input "
                         f"channels; InstructPix2Pix needs {2 * c} (noisy latents + image "
                         "latents): load an InstructPix2Pix pipeline (e.g. one trained by "
                         "train/instruct_pix2pix.py).")


def guidance_pairs(text_guidance: Scale, image_guidance: Scale):
    """(s_T, s_I, sweep): float32 scalars, or two [S] arrays for a sweep (a float is
    repeated against a sequence; two sequences must have the same length)."""
    t, i = np.asarray(text_guidance, np.float32), np.asarray(image_guidance, np.float32)
    for name, v in (("text_guidance", t), ("image_guidance", i)):
        if v.ndim > 1 or (v.ndim == 1 and v.size == 0):
            raise ValueError(f"{name} must be a float or a non-empty 1-D sequence, got shape "
                             f"{v.shape}.")
    if t.ndim == 0 and i.ndim == 0:
        return jnp.asarray(t), jnp.asarray(i), False
    if t.ndim == 1 and i.ndim == 1 and t.size != i.size:
        raise ValueError(f"text_guidance has {t.size} values and image_guidance {i.size}; a "
                         "sweep pairs them one to one: give the same number (or one float).")
    n = max(t.size, i.size)
    return jnp.asarray(np.broadcast_to(t, (n,))), jnp.asarray(np.broadcast_to(i, (n,))), True


def edit_outputs(pipe, params, images, prompts, *, steps: int = 100,
                 text_guidance: Scale = 7.5, image_guidance: Scale = 1.5, seed: int = 0,
                 negative_prompt="", sampler: str = "euler_a", eta: float = 0.0,
                 latents=None, mesh=None, sample_index=None) -> dict:
    """``edit``'s arrays: {"edited" [B, H, W, 3] in [-1, 1], "reconstruction" (the VAE
    round trip) [B, H, W, 3], "latents" [B, h, w, C]}; a sweep of S pairs gives "edited"
    and "latents" as [S, B, ...]. Arguments as ``edit``."""
    check_instruct(pipe)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}.")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps=}.")
    images = np.asarray(images)
    images = batch_inputs.check_images(
        from_uint8(images) if images.dtype == np.uint8 else images, pipe)
    b = images.shape[0]
    text_scale, image_scale, sweep = guidance_pairs(text_guidance, image_guidance)
    ids, neg = batch_inputs.tokenize_pair(pipe, prompts, negative_prompt, b)
    keys = batch_inputs.image_keys(seed, b, sample_index)
    shape = (b,) + pipe.latent_shape(*images.shape[1:3])
    noise = batch_inputs.given_noise(latents, shape, "latents")
    noise = initial_noise(keys, shape[1:]) if noise is None else noise
    mesh = batch_inputs.edit_mesh(mesh)
    run = _compiled(pipe, sampler, int(steps), sweep, mesh)
    rows = dict(images=images, ids=ids, neg_ids=neg, noise=noise, keys=keys)
    out = batch_inputs.run_rows(run, mesh, b, params, rows, dict(
        text_scale=text_scale, image_scale=image_scale, eta=jnp.float32(eta)))
    if sweep:
        out = dict(out, edited=jnp.moveaxis(out["edited"], 1, 0),
                   latents=jnp.moveaxis(out["latents"], 1, 0))
    return out


def edit(pipe, params, images, prompts, *, steps: int = 100, text_guidance: Scale = 7.5,
         image_guidance: Scale = 1.5, seed: int = 0, negative_prompt="",
         sampler: str = "euler_a", eta: float = 0.0, latents=None, mesh=None,
         sample_index=None, output: str = "uint8"):
    """Edits ``images`` by the instructions ``prompts`` (InstructPix2Pix sampling).

    Args:
      pipe, params: an InstructPix2Pix pipeline (``Pipeline.is_instruct``) and its params.
      images: [B, H, W, 3], uint8 or floats in [-1, 1].
      prompts: the instruction ("make the circle blue"): one string or one per image.
      steps: sampler steps (diffusers' default 100).
      text_guidance, image_guidance: s_T and s_I (diffusers' ``guidance_scale`` and
        ``image_guidance_scale``), each a float or a 1-D sequence: a sweep of S pairs
        (same length; a float is repeated) in one program. Traced: new values never
        recompile (a sweep's length is a shape).
      seed: initial and per-step noise of image i from ``fold_in(key(seed), i)`` (or of
        ``sample_index[i]``, its index in a whole job).
      negative_prompt: a string or one per image: the context of the image-only and
        unconditional branches (default empty, as diffusers).
      sampler: a name of ``jaxdiff.samplers.SAMPLERS`` (default Euler ancestral).
      eta: DDIM eta (traced; other samplers ignore it).
      latents: optional initial noise [B, h, w, C] (NHWC, not yet multiplied by the
        sampler's init sigma), as diffusers' ``latents=``; a sweep shares it.
      mesh: the images are split over its ``data`` axis (default: all devices).
      output: "uint8" (images) or "latents" (final latents, float32).
    Returns:
      uint8 [B, H, W, 3] ([S, B, H, W, 3] for a sweep); or the latents [(S,) B, h, w, C].
    """
    if output not in ("uint8", "latents"):
        raise ValueError(f"output={output!r}; use 'uint8' or 'latents'.")
    out = edit_outputs(pipe, params, images, prompts, steps=steps, text_guidance=text_guidance,
                       image_guidance=image_guidance, seed=seed,
                       negative_prompt=negative_prompt, sampler=sampler, eta=eta,
                       latents=latents, mesh=mesh, sample_index=sample_index)
    if output == "latents":
        return np.asarray(out["latents"])
    return to_uint8(np.asarray(out["edited"]))
