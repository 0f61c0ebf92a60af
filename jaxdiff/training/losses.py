"""Denoising and autoencoder losses as pure functions of (params, batch, rng)."""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp


def diffusion_target(prediction_type: str) -> Callable:
    """Returns ``target(x0, noise, alpha_bar_t) -> regression target`` for the UNet.

    Resolved once, outside jit: epsilon -> noise, v_prediction -> velocity, sample -> x0.
    """
    if prediction_type == "epsilon":
        return lambda x0, noise, a: noise
    if prediction_type == "v_prediction":
        return lambda x0, noise, a: jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * x0
    if prediction_type == "sample":
        return lambda x0, noise, a: x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}; use epsilon, "
                     "v_prediction or sample.")


def min_snr_weight(alpha_bar, prediction_type: str, snr_gamma: float):
    """Min-SNR-gamma loss weight per sample (Hang et al. 2023, "Efficient Diffusion
    Training via Min-SNR Weighting Strategy"), in the form diffusers' training scripts use.

    With SNR = a / (1 - a): epsilon targets get ``min(SNR, g) / SNR``, v-prediction
    ``min(SNR, g) / (SNR + 1)``, x0 targets ``min(SNR, g)``. ``snr_gamma`` may be traced.
    """
    snr = alpha_bar / (1.0 - alpha_bar)
    clipped = jnp.minimum(snr, snr_gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    if prediction_type == "sample":
        return clipped
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def denoising_loss(denoise: Callable, alphas_cumprod, prediction_type: str,
                   snr_gamma: Optional[float] = None, min_timestep: int = 0):
    """Standard DDPM loss ``E ||f(x_t, t, c) - target||^2`` per sample.

    Args:
      denoise: ``(x_t [B,h,w,C], t [B], context [B,L,D]) -> model output``.
      alphas_cumprod: [T] table of the training schedule.
      snr_gamma: if given (not None), each sample's error is weighted by
        ``min_snr_weight`` (faster convergence; the optimum is unchanged per timestep).
      min_timestep: timesteps are drawn uniformly from [min_timestep, T) (0: all of them;
        higher: only the noisier end, e.g. for layers that act only there).
    Returns:
      ``loss(x0, context, rng, weight=None) -> [B]`` per-sample (weighted) mean squared
      error; ``weight`` [B, h, w, 1] (or broadcastable) weights the squared error per
      latent pixel, normalised by its sum (e.g. object masks up-weighted).
    """
    target_fn = diffusion_target(prediction_type)
    alphas_cumprod = jnp.asarray(alphas_cumprod, jnp.float32)

    def loss(x0, context, rng, weight=None):
        k_t, k_n = jax.random.split(rng)
        t = jax.random.randint(k_t, (x0.shape[0],), min_timestep, alphas_cumprod.shape[0])
        noise = jax.random.normal(k_n, x0.shape, x0.dtype)
        a = alphas_cumprod[t][:, None, None, None]
        x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise
        pred = denoise(x_t, t, context).astype(jnp.float32)
        sq = (pred - target_fn(x0, noise, a)) ** 2
        if weight is None:
            err = jnp.mean(sq, axis=(1, 2, 3))
        else:
            w = jnp.broadcast_to(jnp.asarray(weight, jnp.float32), sq.shape)
            err = jnp.sum(w * sq, axis=(1, 2, 3)) / jnp.sum(w, axis=(1, 2, 3))
        if snr_gamma is None:
            return err
        return err * min_snr_weight(alphas_cumprod[t], prediction_type, snr_gamma)

    return loss


def vae_loss(recon, images, mean, logvar, kl_weight, weight=None):
    """L1 + L2 reconstruction plus a (small) KL term to N(0, I), per sample [B].

    ``weight`` (optional, [B, H, W, 1] or broadcastable) weights each pixel's
    reconstruction error, normalised by its sum (e.g. object pixels up-weighted).
    """
    axes = tuple(range(1, images.ndim))
    err = jnp.abs(recon - images) + (recon - images) ** 2
    if weight is None:
        rec = jnp.mean(err, axes)
    else:
        w = jnp.broadcast_to(jnp.asarray(weight, jnp.float32), err.shape)
        rec = jnp.sum(w * err, axes) / jnp.sum(w, axes)
    kl = 0.5 * jnp.mean(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar, tuple(range(1, mean.ndim)))
    return rec + kl_weight * kl
