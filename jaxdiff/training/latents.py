"""VAE latents for training: the cached latents of a dataset, masks at latent resolution and
the latent scaling factor.

Training steps run in latent space on latents computed once (posterior means, as
diffusers' scripts do when they cache); the compiled encoders are module-level jitted
functions keyed by the (hashable) pipeline.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from jaxdiff.models.vae import AutoencoderKL
from jaxdiff.pipeline import Pipeline, from_uint8


@functools.partial(jax.jit, static_argnames=("pipe",))
def encode_uint8(pipe: Pipeline, params, images) -> jax.Array:
    """uint8 images [B,H,W,3] -> scaled posterior-mean latents [B,h,w,C]."""
    return pipe.encode_images(params, from_uint8(images))


@functools.partial(jax.jit, static_argnames=("pipe",))
def posterior_mean(pipe: Pipeline, vae_params, images) -> jax.Array:
    """images [B,H,W,3] in [-1, 1] -> unscaled posterior means [B,h,w,C]."""
    mean, _ = pipe.vae.apply({"params": vae_params}, images, method=AutoencoderKL.encode)
    return mean


def encode_latents(pipe: Pipeline, params, images, batch_size: int = 64) -> np.ndarray:
    """uint8 images [N,H,W,3] -> scaled posterior-mean latents [N,h,w,C] (cached once)."""
    return np.concatenate([np.asarray(encode_uint8(pipe, params, images[i:i + batch_size]))
                           for i in range(0, len(images), batch_size)])


def mask_coverage(masks, factor: int) -> np.ndarray:
    """Masks [N, H, W] (nonzero = object) -> the share of each latent pixel they cover,
    [N, H/f, W/f, 1] float32 in [0, 1]: the masks average-pooled over ``factor`` x
    ``factor`` pixels (the VAE's downsampling; rows / columns past a multiple dropped)."""
    m = np.asarray(masks) != 0
    if m.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {m.shape}.")
    n, h, w = m.shape[0], m.shape[1] // factor, m.shape[2] // factor
    return (m[:, :h * factor, :w * factor].reshape(n, h, factor, w, factor)
            .mean(axis=(2, 4), dtype=np.float32)[..., None])


def mask_loss_weights(masks, weight: float, images, factor: int,
                      names=("mask_weight", "instance_masks")):
    """Per-latent-pixel loss weights [N, H/f, W/f, 1] = ``1 + weight * mask_coverage``
    for a masked loss (personalization's instance masks, InstructPix2Pix's object masks;
    None when ``weight`` is 0: the plain loss); one-line errors, naming the caller's
    arguments (``names``: the weight's and the masks'), for a negative weight, missing
    masks or masks that do not match ``images``."""
    weight_name, masks_name = names
    if weight < 0:
        raise ValueError(f"{weight_name} must be >= 0 (0: off), got {weight}.")
    if weight == 0:
        return None
    if masks is None:
        raise ValueError(f"{weight_name} > 0 needs {masks_name} [N, H, W], one per training "
                         "image.")
    masks = np.asarray(masks)
    if masks.shape != tuple(np.shape(images)[:3]):
        raise ValueError(f"{masks_name}: shape {masks.shape} does not match the training "
                         f"images' {tuple(np.shape(images)[:3])} (one [H, W] mask per image).")
    return 1.0 + weight * mask_coverage(masks, factor)


def latent_scaling_factor(pipe: Pipeline, params, images) -> float:
    """1 / std of the posterior-mean latents of uint8 ``images`` [N,H,W,3] (unit-variance
    latents, as Stable Diffusion chose its factor)."""
    mean = posterior_mean(pipe, params["vae"], from_uint8(images))
    return float(1.0 / np.std(np.asarray(mean)))


def with_scaling_factor(pipe: Pipeline, factor: float) -> Pipeline:
    """``pipe`` whose VAE config has ``scaling_factor = round(factor, 5)``."""
    cfg = dataclasses.replace(pipe.vae.config, scaling_factor=round(factor, 5))
    return dataclasses.replace(pipe, vae=pipe.vae.clone(config=cfg))
