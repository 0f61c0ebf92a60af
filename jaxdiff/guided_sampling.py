"""Text-to-image sampling with classifier guidance, as one jitted program per shape.

``generate_guided`` runs any jaxdiff sampler with ``guidance.classifier`` wrapped around
the UNet (or around ``guidance.cfg``'s guided UNet when a CFG scale is given), the
gradient of a ``models.noisy_classifier.NoisyClassifier`` taken by ``jax.grad`` inside the
``lax.scan``: text encoding -> guided loop -> VAE decode in one program. The classifier
scale is traced; a sequence of scales is one vmapped sweep sharing the parameters. The
initial noise is ``generate``'s (``sampling.sample_keys`` / ``initial_noise``, with its
``sample_offset``), so a run with classifier scale 0 is ``generate``'s run.

The batch is data-parallel over a mesh as ``generate``'s: ``guided_program`` jits a
program with its per-image inputs split over the mesh's ``data`` axis and the parameters
replicated (``padded_inputs`` pads the batch to a multiple of the axis), so 8 devices give
the images 1 device gives (``clip_guidance`` uses the same two helpers).
"""
from __future__ import annotations

import functools
from typing import Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import parallel, schedules
from jaxdiff import denoiser
from jaxdiff.guidance import cfg, classifier, classifier_grad
from jaxdiff.pipeline import Pipeline, to_uint8
from jaxdiff.samplers import make_sampler
from jaxdiff.sampling import check_request, initial_noise, prompt_list, sample_keys


# fold_in tag of the self-recurrence re-noising stream (the sampler's noise uses i + 1).
RECURRENCE_TAG = 0x5E1F


def scan_sampler(sampler, denoise, noise, keys, contexts, recurrence: int = 1, renoise=None):
    """Final latents of ``sampler`` run over all its timesteps with ``denoise(x, t,
    contexts)`` in one ``lax.scan``, from ``noise``; step ``i``'s fresh noise (ancestral
    samplers) is ``normal(fold_in(key, i + 1))`` per image, as ``generate`` draws it.

    ``recurrence`` k > 1 is universal guidance's self-recurrence (Bansal et al. 2023,
    Algorithm 1): each step is taken k times, the first k - 1 results put back at the
    step's noise level by ``renoise(x_next, i, n) -> x`` (fresh N(0, 1) ``n`` per round,
    ``fold_in(fold_in(key, RECURRENCE_TAG), i * k + r)``); the guidance gradient gets k
    chances per noise level. Static (it sets the loop)."""
    def draw(i, tag=None, r=0):
        def one(k):
            k = jax.random.fold_in(k, i + 1) if tag is None else jax.random.fold_in(
                jax.random.fold_in(k, tag), i * recurrence + r)
            return jax.random.normal(k, noise.shape[1:])
        return jax.vmap(one)(keys)

    def step(state, i):
        out = denoise(sampler.model_input(state, i), sampler.timesteps[i], contexts)
        return sampler.step(state, i, out, draw(i))

    def body(state, i):
        if recurrence == 1:
            return step(state, i), None

        def round_(r, st):  # one copy of the guided step in the program, k rounds
            nxt = step(st, i)
            back = sampler.init(renoise(sampler.latents(nxt), i, draw(i, RECURRENCE_TAG, r))
                                .astype(noise.dtype))
            return jax.tree.map(lambda b, n: jnp.where(r < recurrence - 1, b, n), back, nxt)
        return jax.lax.fori_loop(0, recurrence, round_, state), None

    state, _ = jax.lax.scan(body, sampler.init(noise * sampler.init_noise_sigma),
                            jnp.arange(len(sampler.timesteps)))
    return sampler.latents(state)


def label_log_prob(model, clf_params, labels: Mapping[str, jax.Array]):
    """``log_p(x, t) -> [B]``: sum over the heads in ``labels`` of log softmax at the
    wanted class (a label < 0 leaves that head out for that sample)."""
    def log_p(x, t):
        logits = model.apply({"params": clf_params}, x, t)
        total = 0.0
        for name, y in labels.items():
            lp = jax.nn.log_softmax(logits[name].astype(jnp.float32), axis=-1)
            pick = jnp.take_along_axis(lp, jnp.maximum(y, 0)[:, None], axis=-1)[:, 0]
            total = total + jnp.where(y >= 0, pick, 0.0)
        return total
    return log_p


def _program(pipe: Pipeline, model, sampler_name: str, steps: int, sweep: bool,
             use_cfg: bool):
    ac = schedules.alphas_cumprod(pipe.scheduler)

    def run(params, clf_params, ids, neg_ids, noise, keys, labels, clf_scale, cfg_scale, eta):
        sampler = make_sampler(sampler_name, pipe.scheduler, steps, eta=eta)
        unet = lambda x, t, c: denoiser.denoise(pipe, params["unet"], x, t, c)
        h = pipe.image_size  # a micro-conditioned text DiT's resolution / aspect ratio
        cond, uncond = pipe.encode_prompts(params, ids, neg_ids, h, h)
        if use_cfg:
            denoise, contexts = cfg(unet, cfg_scale), (cond, uncond)
        else:
            denoise, contexts = unet, cond
        grad = classifier_grad(label_log_prob(model, clf_params, labels))

        def loop(scale):
            guided = classifier(denoise, grad, scale, ac, pipe.scheduler.prediction_type)
            return scan_sampler(sampler, guided, noise, keys, contexts)

        latents = jax.vmap(loop)(clf_scale) if sweep else loop(clf_scale)
        flat = latents.reshape((-1,) + latents.shape[-3:])
        images = pipe.decode_latents(params, flat)
        return images.reshape(latents.shape[:-3] + images.shape[-3:]), latents

    return run


def guided_program(run, mesh, sweep: bool, params_args: int, batch_args: int,
                   scalar_args: int, outputs: int):
    """``jax.jit(run)`` data-parallel over ``mesh``: its first ``params_args`` arguments
    (parameters) replicated, the next ``batch_args`` (per-image inputs, pytrees allowed) split
    along their leading axis over ``data``, the last ``scalar_args`` (scales, eta)
    replicated; its ``outputs`` results split along the image axis (axis 1 of a sweep's
    [S, B, ...])."""
    rep, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    rows = jax.sharding.PartitionSpec(None, parallel.DATA) if sweep else \
        jax.sharding.PartitionSpec(parallel.DATA)
    out = jax.sharding.NamedSharding(mesh, rows)
    ins = (rep,) * params_args + (data,) * batch_args + (rep,) * scalar_args
    return jax.jit(run, in_shardings=ins, out_shardings=(out,) * outputs if outputs > 1 else out)


def padded_inputs(b: int, mesh, seed: int, sample_offset: int, latent_shape, rows):
    """(n, keys [n], noise [n, ...], ``rows`` (a pytree) padded to n): ``generate``'s
    per-image keys and initial noise for images ``sample_offset ..`` of ``seed``, the batch
    padded to ``n``, a multiple of the mesh's data axis (padding repeats the last row; it is
    dropped after)."""
    n = parallel.padded_batch(b, mesh)
    keys = sample_keys(seed, n, sample_offset)
    return n, keys, initial_noise(keys, latent_shape), parallel.pad_rows(rows, n)


@functools.lru_cache(maxsize=16)
def _compiled(pipe, model, sampler_name, steps, sweep, use_cfg, mesh):
    # (params, clf_params | ids, neg_ids, noise, keys, labels | scales, eta)
    return guided_program(_program(pipe, model, sampler_name, steps, sweep, use_cfg), mesh,
                          sweep, 2, 5, 3, 2)


def generate_guided(pipe: Pipeline, params, model, clf_params,
                    labels: Mapping[str, Sequence[int]],
                    prompts: Union[None, str, Sequence[str]] = None,
                    classifier_scale: Union[float, Sequence[float]] = 1.0,
                    guidance_scale: Optional[float] = None,
                    negative_prompts: Union[None, str, Sequence[str]] = None,
                    sampler: str = "ddim", steps: int = 50, seed: int = 0, eta: float = 0.0,
                    output: str = "uint8", sample_offset: int = 0, mesh=None):
    """Generates one image per label row, steered by a noisy classifier.

    Args:
      model, clf_params: a ``NoisyClassifier`` (on this pipeline's latents) and its params.
      labels: ``{head: [B] class indices}`` (-1: no guidance from that head for that
        image); heads not named are not used.
      prompts: None (the empty prompt: the unconditional model), one, or B prompts.
      classifier_scale: a float, or a sequence of floats evaluated as one vmapped sweep.
      guidance_scale: None (no CFG: one UNet call per step on the prompt), or the CFG
        scale (two-branch call with ``negative_prompts``, as ``generate``).
      sampler, steps, seed, eta, sample_offset: as ``sampling.generate`` (the same
        initial noise; ``sample_offset`` numbers a chunk's images within a larger job).
      mesh: a ``jax.sharding.Mesh`` with a ``data`` axis (default: all devices); the batch
        is split over it.
    Returns:
      uint8 [B, H, W, 3] (or [S, B, ...] for a sweep), or the final latents for
      ``output="latents"``.
    """
    heads = dict(model.config.heads)
    unknown = set(labels) - set(heads)
    if unknown:
        raise ValueError(f"labels name unknown classifier heads {sorted(unknown)}; the "
                         f"classifier has {sorted(heads)}.")
    rows = {k: np.asarray(v, np.int32).reshape(-1) for k, v in labels.items()}
    sizes = {len(v) for v in rows.values()}
    if len(sizes) != 1:
        raise ValueError(f"labels: every head needs one class per image, got lengths {sizes}.")
    b = sizes.pop()
    for k, v in rows.items():
        if v.max(initial=-1) >= heads[k]:
            raise ValueError(f"labels[{k!r}] has class {int(v.max())}; the head has "
                             f"{heads[k]} classes (0..{heads[k] - 1}, or -1 for none).")
    prompts = prompt_list(prompts, b, "prompts", per="image")
    negative = prompt_list(negative_prompts, b, "negative prompts", per="image")
    h = pipe.image_size
    check_request(pipe, b, steps, h, h, sampler)
    if pipe.is_sdxl:
        raise ValueError("classifier guidance supports SD 1.x/2.x pipelines (not SDXL) so far.")
    if output not in ("uint8", "latents"):
        raise ValueError(f"output={output!r}; use 'uint8' or 'latents'.")
    mesh = mesh or parallel.make_mesh()
    _, keys, noise, (ids, neg_ids, rows) = padded_inputs(
        b, mesh, seed, sample_offset, pipe.latent_shape(h, h),
        (pipe.tokenize(prompts), pipe.tokenize(negative), rows))
    sweep = not np.isscalar(classifier_scale) and np.ndim(classifier_scale) == 1
    run = _compiled(pipe, model, sampler, int(steps), sweep, guidance_scale is not None, mesh)
    images, final = run(params, clf_params, ids, neg_ids, noise, keys,
                        {k: jnp.asarray(v) for k, v in rows.items()},
                        jnp.asarray(classifier_scale, jnp.float32),
                        jnp.float32(1.0 if guidance_scale is None else guidance_scale),
                        jnp.float32(eta))
    if output == "latents":
        return np.asarray(final)[..., :b, :, :, :]
    return to_uint8(np.asarray(images)[..., :b, :, :, :])
