"""DiffEdit (Couairon et al. 2023): automatic mask from noise predictions, then a masked
DDIM-inversion edit.

Mask (diffusers ``StableDiffusionDiffEditPipeline.generate_mask`` semantics): the image
latent is noised ``num_maps`` times to the timestep of ``mask_strength`` (0.5); the guided
noise predictions for the target (query) and source (reference) prompts differ by
``|eps_q - eps_r|``, averaged over draws and channels; the map is clamped at
``threshold_ratio`` (3) times its mean, normalised and binarised at 0.5. The mean is per
image (diffusers takes it over the whole batch; the two agree for one image).

Edit: DDIM inversion conditioned on the source prompt (no guidance, the alignment of
``inversion.py``) up to ``strength`` (0.8), then guided DDIM sampling with the target
prompt; after every step the latent outside the mask is replaced by the inverted latent
*of the level the step arrived at*, so the background retraces the inversion and ends at
the input latent exactly. (diffusers inverts under guidance with ``DDIMInverseScheduler``
and blends with the level the step started from, one step off.) Strengths are traced and
per image (``partial_trajectory.py``).

References: Couairon et al., "DiffEdit: Diffusion-based semantic image editing with mask
guidance", ICLR 2023.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxdiff import schedules
from jaxdiff.editing import batch_inputs, partial_trajectory
from jaxdiff.guidance import guided_call
from jaxdiff.samplers.base import x0_eps_vp
from jaxdiff.samplers.ddim import ddim_tables, ddim_update
from jaxdiff.sampling import initial_noise, prompt_list


def diffedit_mask(denoise, tables, alphas_cumprod, z0, noise, cond_q, uncond_q, cond_r,
                  uncond_r, guidance, mask_strength, threshold_ratio=3.0):
    """DiffEdit's automatic mask.

    Args:
      tables: ``samplers.ddim.DDIMTables`` of the S-step schedule.
      z0: [B, h, w, C]; noise: [B, n, h, w, C] N(0, 1), one draw per map.
      cond_q/uncond_q, cond_r/uncond_r: [B, L, D] query (target) and reference (source)
        prompt embeddings with their negatives (or SDXL's pytrees, ``Pipeline.condition``).
      guidance, mask_strength, threshold_ratio: traced scalars (one encode timestep for
        the batch).
    Returns:
      (mask [B, h, w] float32 in {0, 1} (1 = edit), normalised map [B, h, w] in [0, 1]).
    """
    b, n = noise.shape[:2]
    s = tables.timesteps.shape[0]
    start = partial_trajectory.start_index(mask_strength, s)
    t = tables.timesteps[jnp.minimum(start, s - 1)]
    rep = lambda tree: jax.tree.map(lambda a: jnp.repeat(a, n, axis=0), tree)  # SDXL: pytrees
    x = schedules.add_noise(alphas_cumprod, rep(z0), noise.reshape((b * n,) + z0.shape[1:]), t)
    eps_q = guided_call(denoise, x, t, rep(cond_q), rep(uncond_q), guidance)
    eps_r = guided_call(denoise, x, t, rep(cond_r), rep(uncond_r), guidance)
    diff = jnp.abs(eps_q - eps_r).reshape((b, n) + z0.shape[1:]).mean(axis=(1, 4))
    clamp = diff.mean(axis=(1, 2), keepdims=True) * threshold_ratio
    norm = jnp.clip(diff, 0.0, clamp) / clamp
    return (norm > 0.5).astype(jnp.float32), norm


def partial_invert(denoise, tables, z0, cond, strength, prediction_type: str):
    """DDIM inversion of the last ``int(S * strength)`` sampling steps (per image).

    Returns:
      (start index [B], levels [S, B, h, w, C]: ``levels[i]`` is the latent at the level
      sampling step i starts from, for i >= start (earlier entries repeat the top one)).
    """
    to_x0_eps = x0_eps_vp(prediction_type)
    s = tables.timesteps.shape[0]
    start = partial_trajectory.start_index(strength, s)

    def step(x, k):  # inverts sampling step k: level alpha_prev[k] -> alpha[k]
        out = denoise(x, tables.timesteps[k], cond)
        x, _ = ddim_update(out, x, tables.alpha_prev[k], tables.alpha[k], to_x0_eps=to_x0_eps)
        return x

    _, xs = partial_trajectory.partial_scan(step, z0, start, jnp.arange(s - 1, -1, -1))
    return start, xs[::-1]


def masked_edit(denoise, tables, z0, levels, start, mask, cond, uncond, guidance,
                prediction_type: str):
    """Guided DDIM sampling from ``levels[start]`` with the background from ``levels``.

    Args:
      levels: [S, B, ...] from ``partial_invert``; mask: [B, h, w, 1] (1 = edit).
    Returns:
      (final latents [B, h, w, C], latents after every step [S, B, h, w, C]).
    """
    to_x0_eps = x0_eps_vp(prediction_type)
    s = tables.timesteps.shape[0]
    after = jnp.concatenate([levels[1:], z0[None]])  # level each step arrives at
    x = jnp.take_along_axis(levels, jnp.minimum(start, s - 1)[None, :, None, None, None],
                            axis=0)[0]
    x = jnp.where(schedules.expand_like(start < s, x), x, z0)

    def step(x, i):
        out = guided_call(denoise, x, tables.timesteps[i], cond, uncond, guidance)
        x, _ = ddim_update(out, x, tables.alpha[i], tables.alpha_prev[i], to_x0_eps=to_x0_eps)
        return mask * x + (1.0 - mask) * after[i]

    return partial_trajectory.partial_scan(step, x, start, jnp.arange(s))


@functools.lru_cache(maxsize=16)
def _compiled(pipe, steps, num_maps, mesh=None, zero_uncond=False):
    tables = ddim_tables(pipe.scheduler, steps)
    ac = jnp.asarray(schedules.alphas_cumprod(pipe.scheduler), jnp.float32)
    pt = pipe.scheduler.prediction_type

    def run(params, images, src_ids, tgt_ids, neg_ids, keys, masks, use_given, guidance,
            strength, mask_strength, threshold_ratio):
        den = batch_inputs.unet_denoiser(pipe, params)
        z0 = pipe.encode_images(params, images)
        size = images.shape[1:3]
        tgt, neg = pipe.encode_prompts(params, tgt_ids, neg_ids, *size, zero_uncond)
        src = pipe.condition(params, src_ids, *size)
        noise = initial_noise(keys, (num_maps,) + z0.shape[1:])
        auto, norm = diffedit_mask(den, tables, ac, z0, noise, tgt, neg, src, neg, guidance,
                                   mask_strength, threshold_ratio)
        given = batch_inputs.latent_mask(masks, z0.shape[1:3])[..., 0]
        mask = jnp.where(use_given[:, None, None], given, auto)
        start, levels = partial_invert(den, tables, z0, src, strength, pt)
        lat, _ = masked_edit(den, tables, z0, levels, start, mask[..., None], tgt, neg,
                             guidance, pt)
        return {"edited": pipe.decode_latents(params, lat),
                "reconstruction": pipe.decode_latents(params, z0), "latents": lat,
                "latent_mask": mask, "mask_map": norm}

    return batch_inputs.rows_program(run, mesh or batch_inputs.one_device_mesh(), shared=(
        "guidance", "mask_strength", "threshold_ratio"))


def diffedit(pipe, params, images, source_prompts, target_prompts, negative_prompts=None, *,
             masks=None, mask_given=None, strength=0.8, mask_strength=0.5, num_maps: int = 10,
             threshold_ratio=3.0, steps: int = 50, guidance_scale=7.5, seed=0, mesh=None,
             sample_index=None):
    """DiffEdit on a batch of images [B, H, W, 3] in [-1, 1].

    Args:
      source_prompts / target_prompts: the reference and query texts (one or one per image).
      masks: optional [B, H, W] masks (1 = edit) used instead of the automatic ones.
      mask_given: optional [B] bools: which images use their given mask (default: all
        when ``masks`` is given); the others get the automatic mask.
      mesh: the images are split over its ``data`` axis (default: all devices).
      sample_index: the images' indices in the whole job, which pick their noise
        (``batch_inputs.image_keys``; default 0..B-1).
    Returns:
      {"edited", "reconstruction": [B, H, W, 3] in [-1, 1]; "latents";
       "latent_mask": [B, h, w] the mask used; "mask_map": [B, h, w] normalised map}.
    """
    images = batch_inputs.check_images(images, pipe)
    b = images.shape[0]
    src = pipe.tokenize(prompt_list(source_prompts, b, "source prompts", per="image"))
    tgt = pipe.tokenize(prompt_list(target_prompts, b, "target prompts", per="image"))
    neg = pipe.tokenize(prompt_list(negative_prompts, b, "negative prompts", per="image"))
    use_given = (jnp.full((b,), masks is not None) if mask_given is None else
                 jnp.asarray(mask_given, bool).reshape(b))
    masks = jnp.zeros(images.shape[:3]) if masks is None else jnp.asarray(masks, jnp.float32)
    if masks.shape != images.shape[:3]:
        raise ValueError(f"masks have shape {masks.shape}; expected {images.shape[:3]}.")
    mesh = batch_inputs.edit_mesh(mesh)
    run = _compiled(pipe, int(steps), int(num_maps), mesh,
                    pipe.zeroes_negative(negative_prompts))
    keys = batch_inputs.image_keys(seed, b, sample_index)
    rows = dict(images=images, src_ids=src, tgt_ids=tgt, neg_ids=neg, keys=keys,
                masks=masks, use_given=use_given,
                strength=batch_inputs.per_image(strength, b, "strength"))
    return batch_inputs.run_rows(run, mesh, b, params, rows, dict(
        guidance=jnp.float32(guidance_scale), mask_strength=jnp.float32(mask_strength),
        threshold_ratio=jnp.float32(threshold_ratio)))
