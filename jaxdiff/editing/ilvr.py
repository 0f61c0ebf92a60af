"""ILVR (Choi et al. 2021): iterative latent variable refinement with a low-pass reference.

Each sampling step is followed by ``x <- x - LP(x) + LP(y)``, where ``y`` is the reference
noised (fresh noise) to the level the step arrived at and ``LP`` down-samples by the
factor N and up-samples back. Here ``LP`` is N x N box averaging followed by nearest
up-sampling (the reference uses a bicubic resizer): an orthogonal projection, so after
every refined step the low-pass of the sample *equals* that of the noised reference.
Runs in latent space (the reference is pixel-space DDPM) from N(0, 1) noise with DDIM
steps (``eta`` traced; eta = 1 is DDPM-like); refinement applies to the first
``int(S * refine_fraction)`` steps (``refine_fraction`` traced, per image; the paper's
"range_t" stops it early).

References: Choi et al., "ILVR: Conditioning Method for Denoising Diffusion Probabilistic
Models", ICCV 2021.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import schedules
from jaxdiff.editing import batch_inputs
from jaxdiff.guidance import cfg
from jaxdiff.samplers import SampleState, make_sampler
from jaxdiff.sampling import initial_noise

SAMPLERS = ("ddim",)  # eta = 1 gives DDPM-like steps; the level table is DDIM's


def low_pass(x, factor: int):
    """N x N box average, repeated back to full size. x: [B, h, w, C], h and w divisible."""
    b, h, w, c = x.shape
    if h % factor or w % factor:
        raise ValueError(f"ILVR factor {factor} does not divide the latent size {h}x{w}.")
    m = x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))
    return jnp.repeat(jnp.repeat(m, factor, axis=1), factor, axis=2)


def level_after_step(cfg: schedules.SchedulerConfig, timesteps: np.ndarray, num_steps: int):
    """alpha-bar [S] of the latent after each DDIM/DDPM step (the level of t - T/S)."""
    ac = schedules.alphas_cumprod(cfg)
    prev = np.asarray(timesteps) - cfg.num_train_timesteps // num_steps
    final = 1.0 if cfg.set_alpha_to_one else ac[0]
    return jnp.asarray(np.where(prev >= 0, ac[np.maximum(prev, 0)], final), jnp.float32)


def ilvr_latents(denoise, sampler, alpha_after, ref, x_T, factor: int, cond, uncond,
                 guidance, refine_fraction, keys):
    """ILVR in latent space.

    Args:
      sampler: a DDIM ``Sampler``; alpha_after: [S] from ``level_after_step``.
      ref: [B, h, w, C] reference latents; x_T: [B, h, w, C] N(0, 1) start.
      factor: down-sampling factor N (static).
      refine_fraction: [B] fraction of the steps (from the start) that are refined.
    Returns:
      (final latents, noised references of the last step [B, h, w, C]).
    """
    s = sampler.num_evals
    stop = jnp.floor(jnp.clip(refine_fraction, 0.0, 1.0) * s + 1e-4).astype(jnp.int32)
    guided = cfg(denoise, guidance)
    ref_keys = jax.vmap(lambda k: jax.random.fold_in(k, 2_000_003))(keys)

    def body(carry, i):
        x, _ = carry
        out = guided(x, sampler.timesteps[i], (cond, uncond))
        x = sampler.latents(sampler.step(SampleState(x), i, out,
                                         batch_inputs.step_noise(keys, i, x.shape[1:])))
        a = alpha_after[i]
        y = a ** 0.5 * ref + (1 - a) ** 0.5 * batch_inputs.step_noise(ref_keys, i, x.shape[1:])
        refined = x - low_pass(x, factor) + low_pass(y, factor)
        return (jnp.where(schedules.expand_like(i < stop, x), refined, x), y), None

    (x, y), _ = jax.lax.scan(body, (x_T, jnp.zeros_like(x_T)), jnp.arange(s))
    return x, y


@functools.lru_cache(maxsize=16)
def _compiled(pipe, sampler_name, steps, factor, mesh=None, zero_uncond=False):
    ts = schedules.timesteps(pipe.scheduler, steps, "ddim")
    alpha_after = level_after_step(pipe.scheduler, ts, steps)

    def run(params, images, ids, neg_ids, keys, guidance, fraction, eta):
        sampler = make_sampler(sampler_name, pipe.scheduler, steps, eta=eta)
        ref = pipe.encode_images(params, images)
        cond, uncond = pipe.encode_prompts(params, ids, neg_ids, *images.shape[1:3],
                                           zero_uncond)
        lat, _ = ilvr_latents(batch_inputs.unet_denoiser(pipe, params), sampler, alpha_after, ref,
                              initial_noise(keys, ref.shape[1:]), factor, cond, uncond,
                              guidance, fraction, keys)
        return {"edited": pipe.decode_latents(params, lat),
                "reconstruction": pipe.decode_latents(params, ref), "latents": lat}

    return batch_inputs.rows_program(run, mesh or batch_inputs.one_device_mesh(),
                                     shared=("guidance", "eta"))


def ilvr(pipe, params, images, prompts, negative_prompts=None, *, factor: int = 2,
         refine_fraction=1.0, steps: int = 50, guidance_scale=7.5, seed=0, eta=0.0,
         sampler: str = "ddim", mesh=None, sample_index=None):
    """ILVR on a batch of reference images [B, H, W, 3] in [-1, 1] (factor in latent cells),
    split over ``mesh``'s ``data`` axis (default: all devices); ``sample_index``: the images'
    indices in the whole job, which pick their noise (``batch_inputs.image_keys``).

    Returns:
      {"edited", "reconstruction": [B, H, W, 3] in [-1, 1]; "latents"}.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"ILVR supports samplers {SAMPLERS}, got {sampler!r}.")
    images = batch_inputs.check_images(images, pipe)
    b = images.shape[0]
    hw = pipe.latent_shape(*images.shape[1:3])[:2]
    if factor < 1 or hw[0] % factor or hw[1] % factor:
        raise ValueError(f"factor must be >= 1 and divide the latent size {hw}, got {factor}.")
    ids, neg = batch_inputs.tokenize_pair(pipe, prompts, negative_prompts, b)
    mesh = batch_inputs.edit_mesh(mesh)
    run = _compiled(pipe, sampler, int(steps), int(factor), mesh,
                    pipe.zeroes_negative(negative_prompts))
    keys = batch_inputs.image_keys(seed, b, sample_index)
    rows = dict(images=images, ids=ids, neg_ids=neg, keys=keys,
                fraction=batch_inputs.per_image(refine_fraction, b, "refine_fraction"))
    return batch_inputs.run_rows(run, mesh, b, params, rows, dict(
        guidance=jnp.float32(guidance_scale), eta=jnp.float32(eta)))
