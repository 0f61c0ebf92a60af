"""CLIP guidance (semantic diffusion guidance): steer sampling by the gradient of a CLIP
cosine similarity, as a denoiser wrapper of ``guidance.classifier``'s shape.

The score of an image x_t at step t is the cosine similarity between its CLIP image
embedding and a target: the embedding of a guidance text, or of a reference image
(Liu et al. 2023, "More Control for Free! Image Synthesis with Semantic Diffusion
Guidance"). Two ways to read x_t, both selectable:

* ``"xt"``: a noise-aware CLIP (``configs/clip.py:noisy``, trained on this pipeline's
  noised latents with the timestep as input) reads x_t itself;
* ``"x0"``: a clean CLIP reads the decoded prediction of x0 from the denoiser's output at
  x_t (the gradient flows back through the VAE decoder and the denoiser, as blended
  diffusion's CLIP loss does); works with any CLIP in transformers' layout, the decoded
  image is resized to the CLIP's input size.

``clip_guided(denoise, log_p, scale, ...)`` is ``guidance.classifier`` with
``log_p = similarity``: ``eps' = eps - scale * sqrt(1 - abar_t) * d cos / d x_t``; the scale
is traced (a vmap over scales is a sweep, 0 is the plain sampler) and the gradient is
``jax.grad`` inside the jitted loop. ``generate_clip_guided`` runs it as one program (text
encoding -> guided loop -> VAE decode) with ``generate``'s initial noise, its batch
data-parallel over a mesh as ``generate``'s (``guided_sampling.guided_program``). The
denoiser is any backbone through ``denoiser.denoise`` (U-Net, or a text DiT with its caption
mask and micro-conditions from ``Pipeline.encode_prompts``).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import denoiser, parallel, schedules
from jaxdiff.guidance import abar_at, cfg, classifier, classifier_grad, with_noise_change
from jaxdiff.guided_sampling import guided_program, padded_inputs, scan_sampler
from jaxdiff.pipeline import Pipeline, to_uint8
from jaxdiff.samplers import make_sampler
from jaxdiff.samplers.base import x0_eps_vp
from jaxdiff.samplers.ddim import ddim_tables
from jaxdiff.sampling import check_request, prompt_list
from jaxdiff.weights.clip_format import CLIP

MODES = ("x0", "xt")


def _fit(clip: CLIP, images):
    size = clip.image_size
    if images.shape[1:3] == (size, size):
        return images
    return jax.image.resize(images, (images.shape[0], size, size, images.shape[3]), "bilinear")


def image_target(clip: CLIP, clip_params, images, latents=None):
    """Reference images [B, H, W, 3] in [-1, 1] -> target embeddings [B, P]. A noise-aware
    CLIP reads the reference's (clean, t = 0) ``latents`` instead."""
    if clip.time_token is not None:
        if latents is None:
            raise ValueError("a noise-aware CLIP needs the reference image's latents.")
        return clip.image_embeds(clip_params, latents, jnp.zeros((latents.shape[0],)))
    return clip.image_embeds(clip_params, _fit(clip, images))


def text_target(clip: CLIP, clip_params, ids):
    """Guidance-text ids [B, L] (``clip.tokenize``) -> target embeddings [B, P]."""
    return clip.text_embeds(clip_params, ids)


def similarity_xt(clip: CLIP, clip_params, target) -> Callable:
    """``log_p(x_t, t) -> [B]``: cosine similarity of a noise-aware CLIP's embedding of
    x_t (at its timestep) with ``target`` [B, P]."""
    if clip.time_token is None:
        raise ValueError("mode 'xt' needs a noise-aware CLIP (trained with "
                         "configs/clip.py:noisy); use mode 'x0' with a clean CLIP.")
    return lambda x, t: jnp.sum(clip.image_embeds(clip_params, x, t) * target, axis=-1)


def shifted_views(images, views: int):
    """[B, H, W, C] -> [views * B, H, W, C]: the images, then ``views - 1`` copies of them
    translated by r = max(1, H // 16) pixels in directions spread evenly around the circle
    (edge pixels repeated into the gap): the differentiable augmentations CLIP-guided
    diffusion averages its score over, so that no pixel-exact pattern (an adversarial
    in-between form the CLIP happens to accept) scores in every view."""
    if views == 1:
        return images
    h, w = images.shape[1:3]
    r = max(1, h // 16)
    pad = jnp.pad(images, ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")
    out = [images]
    for k in range(views - 1):
        angle = 2.0 * np.pi * k / (views - 1)
        dy, dx = int(round(r * np.sin(angle))), int(round(r * np.cos(angle)))
        out.append(pad[:, r + dy:r + dy + h, r + dx:r + dx + w, :])
    return jnp.concatenate(out)


def similarity_decoded(clip: CLIP, clip_params, target, decode: Callable,
                       views: int = 1) -> Callable:
    """``score(z0) -> [B]``: cosine similarity of a clean CLIP's embedding of the decoded
    latents ``decode(z0)`` with ``target``; with ``views`` > 1 the mean over
    ``shifted_views`` of the decoded image."""
    def score(z0):
        image = _fit(clip, shifted_views(decode(z0), views))
        sim = jnp.sum(clip.image_embeds(clip_params, image).reshape(views, *target.shape)
                      * target, axis=-1)
        return jnp.mean(sim, axis=0)
    return score


def similarity_x0(clip: CLIP, clip_params, target, denoise: Callable, decode: Callable,
                  alphas_cumprod, prediction_type: str, views: int = 1) -> Callable:
    """``log_p(x_t, t) -> [B]``: ``similarity_decoded`` of x0_hat, predicted from
    ``denoise(x_t, t)``."""
    to_x0 = x0_eps_vp(prediction_type)
    table = jnp.asarray(alphas_cumprod, jnp.float32)
    score = similarity_decoded(clip, clip_params, target, decode, views)

    def log_p(x, t):
        a = abar_at(table, t, x)
        x0, _ = to_x0(denoise(x, t), x, jnp.sqrt(a), jnp.sqrt(1.0 - a))
        return score(x0)

    return log_p


def backward_guided(denoise: Callable, score: Callable, steps: int, step_size,
                    alphas_cumprod, prediction_type: str = "epsilon") -> Callable:
    """Universal guidance's backward step (Bansal et al. 2023, eq. 9 and Algorithm 1): the
    denoiser's predicted clean latents z0 are moved by ``steps`` ascent steps on
    ``score(z0) -> [B]`` (each step's gradient at unit RMS per sample, times
    ``step_size``; traced, 0 leaves ``denoise`` unchanged), and the output is the one
    whose prediction of z0 is the moved one: noise change ``-sqrt(abar / (1 - abar)) *
    delta_z0``, converted to the model's prediction type as ``guidance.classifier``'s.
    Only the score's model (decoder + CLIP) is differentiated, not the denoiser."""
    to_x0 = x0_eps_vp(prediction_type)
    table = jnp.asarray(alphas_cumprod, jnp.float32)
    ascent = unit_rms(lambda z, _: jax.grad(lambda v: jnp.sum(score(v)))(z))
    adjust = with_noise_change(prediction_type)

    def guided(x, t, cond):
        out = denoise(x, t, cond)
        a = abar_at(table, t, x)
        z0, _ = to_x0(out, x, jnp.sqrt(a), jnp.sqrt(1.0 - a))
        z = jax.lax.fori_loop(0, steps, lambda _, z: z + step_size * ascent(z, None), z0)
        eps_change = -jnp.sqrt(a / (1.0 - a)) * (z - z0)
        return adjust(out, eps_change.astype(out.dtype), a)

    return guided


def unit_rms(grad_fn: Callable) -> Callable:
    """``grad_fn`` with each sample's gradient rescaled to root-mean-square 1, so the
    guidance scale is the size of the push in noise units at every step (a CLIP
    similarity's raw gradient varies by orders of magnitude over the steps)."""
    def normalized(x, t):
        g = grad_fn(x, t)
        rms = jnp.sqrt(jnp.mean(jnp.square(g), axis=tuple(range(1, g.ndim)), keepdims=True))
        return g / jnp.maximum(rms, 1e-12)
    return normalized


def clip_guided(denoise: Callable, log_p: Callable, scale, alphas_cumprod,
                prediction_type: str = "epsilon", normalize: bool = False) -> Callable:
    """``guidance.classifier`` driven by a CLIP similarity ``log_p(x, t) -> [B]``
    (``normalize``: its gradient at unit RMS per sample, ``unit_rms``)."""
    grad = classifier_grad(log_p)
    return classifier(denoise, unit_rms(grad) if normalize else grad, scale, alphas_cumprod,
                      prediction_type)


def ddim_renoise(cfg, steps: int) -> Callable:
    """``renoise(x_next, i, n) -> x``: DDIM step i's output put back at step i's level,
    ``sqrt(a_t / a_next) x_next + sqrt(1 - a_t / a_next) n`` (the forward process from the
    next level; self-recurrence, Bansal et al. 2023)."""
    tables = ddim_tables(cfg, steps)

    def renoise(x_next, i, n):
        ratio = tables.alpha[i] / tables.alpha_prev[i]
        return jnp.sqrt(ratio) * x_next + jnp.sqrt(1.0 - ratio) * n

    return renoise


def _program(pipe: Pipeline, clip: CLIP, mode: str, by_image: bool, sampler_name: str,
             steps: int, sweep: bool, use_cfg: bool, normalize: bool = False,
             recurrence: int = 1, views: int = 1, backward_steps: int = 0,
             backward_size: float = 0.0):
    ac = schedules.alphas_cumprod(pipe.scheduler)
    pt = pipe.scheduler.prediction_type

    def run(params, clip_params, ids, neg_ids, target_in, noise, keys, clip_scale,
            cfg_scale, eta):
        sampler = make_sampler(sampler_name, pipe.scheduler, steps, eta=eta)
        renoise = ddim_renoise(pipe.scheduler, steps) if recurrence > 1 else None
        unet = lambda x, t, c: denoiser.denoise(pipe, params["unet"], x, t, c)
        h = pipe.image_size  # a micro-conditioned text DiT's resolution / aspect ratio
        cond, uncond = pipe.encode_prompts(params, ids, neg_ids, h, h)
        if by_image:
            latents = pipe.encode_images(params, target_in) if mode == "xt" else None
            target = image_target(clip, clip_params, target_in, latents)
        else:
            target = text_target(clip, clip_params, target_in)
        decode = lambda z: pipe.decode_latents(params, z)
        if mode == "xt":
            log_p = similarity_xt(clip, clip_params, target)
        else:
            log_p = similarity_x0(clip, clip_params, target, lambda x, t: unet(x, t, cond),
                                  decode, ac, pt, views)
        if use_cfg:
            denoise, contexts = cfg(unet, cfg_scale), (cond, uncond)
        else:
            denoise, contexts = unet, cond

        def loop(scale):
            guided = clip_guided(denoise, log_p, scale, ac, pt, normalize)
            if backward_steps:
                score = similarity_decoded(clip, clip_params, target, decode, views)
                guided = backward_guided(guided, score, backward_steps,
                                         scale * backward_size, ac, pt)
            return scan_sampler(sampler, guided, noise, keys, contexts, recurrence, renoise)

        latents = jax.vmap(loop)(clip_scale) if sweep else loop(clip_scale)
        flat = latents.reshape((-1,) + latents.shape[-3:])
        images = pipe.decode_latents(params, flat)
        return images.reshape(latents.shape[:-3] + images.shape[-3:]), latents

    return run


@functools.lru_cache(maxsize=16)
def _rank_program(clip: CLIP, by_image: bool):
    """``(clip_params, target_in [B, ...], images [..., B, N, H, W, 3] in [-1, 1]) ->
    [..., B, N]``: a clean CLIP's cosine similarity of every candidate to its target."""
    def run(clip_params, target_in, images):
        target = (image_target(clip, clip_params, target_in) if by_image
                  else text_target(clip, clip_params, target_in))
        flat = images.reshape((-1,) + images.shape[-3:])
        emb = clip.image_embeds(clip_params, _fit(clip, flat))
        emb = emb.reshape(images.shape[:-3] + emb.shape[-1:])
        return jnp.einsum("...bnp,bp->...bn", emb, target)
    return jax.jit(run)


@functools.lru_cache(maxsize=16)
def _compiled(pipe, clip, mode, by_image, sampler_name, steps, sweep, use_cfg, mesh,
              normalize=False, recurrence=1, views=1, backward_steps=0, backward_size=0.0):
    # (params, clip_params | ids, neg_ids, target_in, noise, keys | scales, eta)
    return guided_program(_program(pipe, clip, mode, by_image, sampler_name, steps, sweep,
                                   use_cfg, normalize, recurrence, views, backward_steps,
                                   backward_size),
                          mesh, sweep, 2, 5, 3, 2)


def generate_clip_guided(pipe: Pipeline, params, clip: CLIP, clip_params, *,
                         texts: Union[None, str, Sequence[str]] = None, images=None,
                         mode: str = "x0", prompts: Union[None, str, Sequence[str]] = None,
                         clip_scale: Union[float, Sequence[float]] = 100.0,
                         guidance_scale: Optional[float] = None,
                         negative_prompts: Union[None, str, Sequence[str]] = None,
                         sampler: str = "ddim", steps: int = 50, seed: int = 0,
                         eta: float = 0.0, output: str = "uint8", sample_offset: int = 0,
                         normalize: bool = False, recurrence: int = 1, views: int = 1,
                         backward_steps: int = 0, backward_size: float = 0.1,
                         candidates: int = 1, mesh=None) -> np.ndarray:
    """Generates one image per guidance text (or reference image), CLIP-guided.

    Args:
      clip, clip_params: a clean CLIP (mode "x0") or a noise-aware one on this pipeline's
        latents (mode "xt"), e.g. ``weights.clip_format.load_clip(folder)``.
      texts: guidance texts (B of them), or ``images``: reference images uint8
        [B, H, W, 3] at the pipeline's size.
      prompts: None (the empty prompt: the unconditional model), one, or B prompts.
      clip_scale: a float, or a sequence of floats evaluated as one vmapped sweep.
      guidance_scale: None (one UNet call per step on the prompt) or the CFG scale.
      sampler, steps, seed, eta, sample_offset: as ``sampling.generate`` (the same
        initial noise).
      normalize: rescale each sample's similarity gradient to unit RMS at every step
        (``unit_rms``): ``clip_scale`` is then the push in noise units (~1-2), the same at
        every noise level, where the raw gradient's size varies by orders of magnitude.
      recurrence: self-recurrence (Bansal et al. 2023): every step taken this many times,
        re-noised back to its level in between (``ddim_renoise``; DDIM only); costs that
        many times the steps. On the embedded model (``bench/README.md``) normalize with
        scale 1.5 and recurrence 3 reach the asked colour/shape far more often.
      views: mode "x0" only: the similarity averaged over this many ``shifted_views`` of
        the decoded prediction (1: the image alone); costs that many CLIP image passes.
      backward_steps: universal guidance's backward step (``backward_guided``): at every
        step the predicted clean latents take this many unit-RMS ascent steps of size
        ``backward_size * clip_scale`` on the decoded image's CLIP similarity (0: none).
        Needs a clean CLIP (its score reads decoded latents).
      candidates: N > 1 guides N samples per text / reference image (image i's are the
        samples ``(sample_offset + i) * N + j``, so a job split into chunks gives the same
        images) and keeps, for each, the one whose decoded image the CLIP finds most
        similar to the target (CLIP re-ranking, as DALL-E's); costs N times the sampling.
        Mode "x0" (a clean CLIP) only. On the embedded model, image guidance with N = 4
        at recurrence 3 reaches the reference's shape far more often than one sample at
        recurrence 12, the same cost (``bench/README.md``).
      mesh: a ``jax.sharding.Mesh`` with a ``data`` axis (default: all devices); the batch
        is split over it.
    Returns:
      uint8 [B, H, W, 3] (or [S, B, H, W, 3] for a sweep of S scales), or the final
      latents for ``output="latents"``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown CLIP guidance mode {mode!r}; use one of {MODES}.")
    if (texts is None) == (images is None):
        raise ValueError("give either texts= (guidance texts) or images= (reference images).")
    if images is not None:
        target = jnp.asarray(np.asarray(images, np.float32) / 127.5 - 1.0)
        b = target.shape[0]
    else:
        texts = [texts] if isinstance(texts, str) else list(texts)
        target, b = jnp.asarray(clip.tokenize(texts)), len(texts)
    prompts = prompt_list(prompts, b, "prompts", per="image")
    negative = prompt_list(negative_prompts, b, "negative prompts", per="image")
    h = pipe.image_size
    check_request(pipe, b, steps, h, h, sampler)
    if pipe.is_sdxl:
        raise ValueError("CLIP guidance supports SD 1.x/2.x pipelines (not SDXL) so far.")
    if output not in ("uint8", "latents"):
        raise ValueError(f"output={output!r}; use 'uint8' or 'latents'.")
    if int(recurrence) < 1 or (int(recurrence) > 1 and sampler != "ddim"):
        raise ValueError(f"recurrence={recurrence}: needs an integer >= 1, and > 1 only with "
                         f"sampler='ddim' (got {sampler!r}).")
    if int(views) < 1 or (int(views) > 1 and mode != "x0"):
        raise ValueError(f"views={views}: needs an integer >= 1, and > 1 only in mode 'x0' "
                         f"(got mode {mode!r}).")
    if int(backward_steps) < 0 or (int(backward_steps) > 0 and clip.time_token is not None):
        raise ValueError(f"backward_steps={backward_steps}: needs an integer >= 0, and > 0 "
                         "only with a clean CLIP (a noise-aware one reads x_t, not decoded "
                         "latents).")
    n_cand = int(candidates)
    if n_cand < 1 or (n_cand > 1 and clip.time_token is not None):
        raise ValueError(f"candidates={candidates}: needs an integer >= 1, and > 1 only with "
                         "a clean CLIP (mode 'x0'; it ranks the decoded images).")
    mesh = mesh or parallel.make_mesh()
    rank_target = target
    rows = (pipe.tokenize(prompts), pipe.tokenize(negative), target)
    if n_cand > 1:  # row i * N + j: target i's candidate j
        rows = tuple(np.repeat(np.asarray(r), n_cand, axis=0) for r in rows)
    _, keys, noise, (ids, neg_ids, target) = padded_inputs(
        b * n_cand, mesh, seed, sample_offset * n_cand, pipe.latent_shape(h, h), rows)
    sweep = not np.isscalar(clip_scale) and np.ndim(clip_scale) == 1
    images_given = images is not None
    run = _compiled(pipe, clip, mode, images_given, sampler, int(steps), sweep,
                    guidance_scale is not None, mesh, bool(normalize), int(recurrence),
                    int(views), int(backward_steps),
                    float(backward_size) if backward_steps else 0.0)
    images, final = run(params, clip_params, ids, neg_ids, target, noise, keys,
                        jnp.asarray(clip_scale, jnp.float32),
                        jnp.float32(1.0 if guidance_scale is None else guidance_scale),
                        jnp.float32(eta))
    images, final = np.asarray(images)[..., :b * n_cand, :, :, :], \
        np.asarray(final)[..., :b * n_cand, :, :, :]
    if n_cand > 1:
        images, final = (x.reshape(x.shape[:-4] + (b, n_cand) + x.shape[-3:])
                         for x in (images, final))
        scores = np.asarray(_rank_program(clip, images_given)(clip_params, rank_target,
                                                               images))
        best = np.argmax(scores, axis=-1)[..., None, None, None, None]
        images, final = (np.take_along_axis(x, best, axis=-4)[..., 0, :, :, :]
                         for x in (images, final))
    if output == "latents":
        return final
    return to_uint8(images)
