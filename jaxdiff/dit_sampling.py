"""Class-conditional sampling with a DiT, as diffusers' ``DiTPipeline``: one jitted program
(scan over the sampler's steps, then an optional VAE decode).

Semantics are diffusers' (pipelines/dit/pipeline_dit.py):

- guidance (``guidance_scale > 1``) runs one transformer call on ``[x, x]`` with labels
  ``[labels, null]`` (the null class is ``num_embeds_ada_norm``; diffusers hard-codes 1000,
  the value of every DiT checkpoint), conditional half first; the guided noise is
  ``uncond + s (cond - uncond)`` over the ``in_channels`` noise channels only, and the
  learned-variance channels are left out of the mix;
- with learned sigma (``out_channels = 2 * in_channels``) the scheduler step sees only the
  noise half: the variance is dropped, as diffusers does; DDPM then takes its fixed-small
  variance;
- any sampler of ``jaxdiff.samplers`` runs the steps (DDIM / DDPM as DiT; the timesteps and
  alphas come from the pipeline's scheduler config);
- ``variance="learned"`` (DDPM only) instead samples as the DiT paper does: the step's
  variance is the model's, interpolated in log space between the posterior's fixed-small
  and the beta variance (diffusers' ``DDPMScheduler(variance_type="learned_range")``,
  Nichol & Dhariwal 2021); under guidance the variance is the conditional half's.

The DiT is called through ``denoiser.denoise`` (class labels as its condition, the whole
learned-sigma output), the interface every sampler and editing method uses.

Whether guidance runs (scale > 1) is static; the scale itself is traced, so a new scale
reuses the compiled program. Noise is per sample, ``fold_in(key(seed), index)``.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.denoiser import denoise
from jaxdiff.models.dit import check_class_labels, split_learned_sigma
from jaxdiff.models.vae import AutoencoderKL
from jaxdiff.samplers import SAMPLERS, make_sampler
from jaxdiff.samplers.ddpm_learned import make_learned_range_ddpm
from jaxdiff.sampling import initial_noise, sample_keys
from jaxdiff.weights.backbones import DiTPipeline


VARIANCES = ("fixed", "learned")


def guided_dit_output(pipe: DiTPipeline, params, x, t, labels, scale, guided: bool,
                      keep_variance: bool = False):
    """The output the scheduler steps with (``DiTPipeline``'s guidance and learned-sigma
    split). x: [B, h, w, C], labels: int [B] -> [B, h, w, C] (``keep_variance``: the
    model's variance channels after them, [B, h, w, 2C])."""
    c = pipe.transformer.config
    apply = lambda x_, l_: denoise(pipe, params["transformer"], x_, t, l_, variance=True)
    split = (lambda out: out) if keep_variance else functools.partial(split_learned_sigma, c)
    if not guided:
        return split(apply(x, labels))
    null = jnp.full_like(labels, c.num_classes)
    out = apply(jnp.concatenate([x, x]), jnp.concatenate([labels, null]))
    b, ch = x.shape[0], c.in_channels
    cond, uncond = out[:b, ..., :ch], out[b:, ..., :ch]
    eps = uncond + scale * (cond - uncond)
    return split(jnp.concatenate([eps, out[:b, ..., ch:]], axis=-1))


def _program(pipe, sampler_name, steps, guided, decode, variance, params, labels, x, keys,
             scale, eta):
    learned = variance == "learned"
    sampler = (make_learned_range_ddpm(pipe.scheduler, steps) if learned
               else make_sampler(sampler_name, pipe.scheduler, steps, eta=eta))

    def body(state, i):
        out = guided_dit_output(pipe, params, sampler.model_input(state, i),
                                sampler.timesteps[i], labels, scale, guided, learned)
        noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i + 1),
                                                     x.shape[1:]))(keys)
        return sampler.step(state, i, out, noise), None

    state, _ = jax.lax.scan(body, sampler.init(x * sampler.init_noise_sigma),
                            jnp.arange(sampler.num_evals))
    latents = sampler.latents(state)
    if not decode:
        return latents
    z = latents / pipe.vae.config.scaling_factor
    images = pipe.vae.apply({"params": params["vae"]}, z, method=AutoencoderKL.decode)
    return jnp.clip(images, -1.0, 1.0)


@functools.lru_cache(maxsize=16)
def _compiled(pipe: DiTPipeline, sampler_name: str, steps: int, guided: bool, decode: bool,
              variance: str):
    return jax.jit(functools.partial(_program, pipe, sampler_name, steps, guided, decode,
                                     variance))


def generate_classes(pipe: DiTPipeline, params, class_labels: Sequence[int], *,
                     steps: int = 50, guidance_scale: float = 4.0, sampler: str = "ddim",
                     eta: float = 0.0, seed: int = 0, latents: Optional[np.ndarray] = None,
                     output: str = "images", variance: str = "fixed") -> jax.Array:
    """Samples one image per class label, as diffusers' ``DiTPipeline.__call__``.

    Args:
      class_labels: ints in ``0 .. num_classes - 1`` (checked before any compile).
      guidance_scale: > 1 runs classifier-free guidance against the null class.
      sampler: a name of ``jaxdiff.samplers.SAMPLERS``; ``eta`` for DDIM.
      seed: per-sample noise ``fold_in(key(seed), index)`` (initial latents and the
        stochastic samplers' step noise).
      latents: optional initial latents [B, h, w, C] (N(0, 1); scaled by the sampler's
        init_noise_sigma here), e.g. to match diffusers with the same noise.
      output: "images" ([B, H, W, 3] in [-1, 1]) or "latents" (scaled, [B, h, w, C]).
      variance: "fixed" (diffusers' DiTPipeline: the learned variance is dropped) or
        "learned" (the DiT paper's DDPM with the model's variance; ``sampler="ddpm"`` and a
        learned-sigma model only).
    """
    c = pipe.transformer.config
    labels = check_class_labels(class_labels, c.num_classes)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid names: {sorted(SAMPLERS)}.")
    if output not in ("images", "latents"):
        raise ValueError(f"output={output!r}: use 'images' or 'latents'.")
    if variance not in VARIANCES:
        raise ValueError(f"variance={variance!r}: use one of {VARIANCES}.")
    if variance == "learned" and (sampler != "ddpm" or not c.learned_sigma):
        raise ValueError("variance='learned' needs sampler='ddpm' and a model with "
                         f"out_channels = 2 x in_channels (this one: {c.output_channels} "
                         f"from {c.in_channels}; sampler {sampler!r}).")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r}: need a positive number of sampling steps.")
    b = len(labels)
    keys = sample_keys(seed, b)
    shape = (c.sample_size, c.sample_size, c.in_channels)
    if latents is None:
        x = initial_noise(keys, shape)
    else:
        x = jnp.asarray(latents, jnp.float32)
        if x.shape[0] != b or x.shape[-1] != c.in_channels or x.ndim != 4:
            raise ValueError(f"latents: shape {tuple(x.shape)} does not fit {b} labels and "
                             f"{c.in_channels} latent channels ([B, h, w, C]).")
        if x.shape[1] % c.patch_size or x.shape[2] % c.patch_size:
            raise ValueError(f"latents: size {x.shape[1]}x{x.shape[2]} is not divisible by "
                             f"patch_size={c.patch_size}.")
    program = _compiled(pipe, sampler, steps, bool(guidance_scale > 1), output == "images",
                        variance)
    return program(params, jnp.asarray(labels), x, keys, jnp.float32(guidance_scale),
                   jnp.float32(eta))
