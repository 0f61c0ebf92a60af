"""Text-to-image sampling as one jitted SPMD program: encode text -> scan -> decode.

Shapes (batch, resolution, steps, number of guidance scales) select the compiled program;
guidance scale, guidance rescale, eta, prompts and seeds are traced inputs and never
recompile. The batch is sharded over the mesh's ``data`` axis; each sample's noise comes
from ``fold_in(key(seed), sample_index)``, so results do not depend on the device count.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import parallel
from jaxdiff.guidance import cfg
from jaxdiff.pipeline import Pipeline, to_uint8
from jaxdiff.samplers import SAMPLERS, make_sampler


def sample_keys(seed, n: int, offset: int = 0) -> jax.Array:
    """Per-sample PRNG keys [n] derived from (seed, offset + sample index)."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(offset + jnp.arange(n))


def initial_noise(keys, shape) -> jax.Array:
    """Standard normal initial latents [n, *shape], one key per sample."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape))(keys)


def denoise_loop(pipe: Pipeline, sampler, params, x, contexts, scale, rescale, keys):
    """Runs the sampler's ``lax.scan`` from initial latents ``x`` (already sigma-scaled).

    Args:
      contexts: (cond [B,L,D], uncond [B,L,D]) text embeddings.
      keys: [B] per-sample keys for stochastic samplers.
    Returns:
      final latents [B, h, w, C].
    """
    unet = lambda x_, t_, c_: pipe.unet.apply({"params": params["unet"]}, x_, t_, c_)
    guided = cfg(unet, scale, rescale)

    def body(state, i):
        out = guided(sampler.model_input(state, i), sampler.timesteps[i], contexts)
        noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i + 1),
                                                     x.shape[1:]))(keys)
        return sampler.step(state, i, out, noise), None

    state, _ = jax.lax.scan(body, sampler.init(x), jnp.arange(len(sampler.timesteps)))
    return sampler.latents(state)


def _program(pipe, sampler_name, steps, sweep):
    """The whole job as one pure function of (params, ids, neg_ids, noise, keys, scalars)."""

    def run(params, ids, neg_ids, noise, keys, scale, rescale, eta):
        sampler = make_sampler(sampler_name, pipe.scheduler, steps, eta=eta)
        cond, uncond = pipe.encode_text(params, ids), pipe.encode_text(params, neg_ids)
        loop = lambda s: denoise_loop(pipe, sampler, params, noise * sampler.init_noise_sigma,
                                      (cond, uncond), s, rescale, keys)
        latents = jax.vmap(loop)(scale) if sweep else loop(scale)
        flat = latents.reshape((-1,) + latents.shape[-3:])
        images = pipe.decode_latents(params, flat)
        return images.reshape(latents.shape[:-3] + images.shape[-3:]), latents

    return run


@functools.lru_cache(maxsize=32)
def _compiled(pipe, sampler_name, steps, sweep, mesh):
    data, rep = parallel.batch_sharded(mesh), parallel.replicated(mesh)
    out_batch = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(None, parallel.DATA) if sweep else
        jax.sharding.PartitionSpec(parallel.DATA))
    return jax.jit(_program(pipe, sampler_name, steps, sweep),
                   in_shardings=(rep, data, data, data, data, rep, rep, rep),
                   out_shardings=(out_batch, out_batch))


def generate(pipe: Pipeline, params, prompts: Union[str, Sequence[str]],
             negative_prompts: Optional[Union[str, Sequence[str]]] = None, sampler: str = "ddim",
             steps: int = 50, guidance_scale: Union[float, Sequence[float]] = 7.5, seed: int = 0,
             latents=None, height: Optional[int] = None, width: Optional[int] = None,
             eta: float = 0.0, guidance_rescale: float = 0.0, mesh=None,
             output: str = "uint8", sample_offset: int = 0):
    """Generates images for ``prompts``.

    Args:
      prompts: one prompt or a list (the batch).
      negative_prompts: None (empty prompt), one string, or one per prompt.
      sampler: a name from ``jaxdiff.samplers.SAMPLERS``.
      guidance_scale: a float, or a sequence of floats evaluated as one vmapped sweep.
      seed: per-sample noise is ``fold_in(key(seed), sample_offset + index)``, so a
        large job split into chunks (``sample_offset``) gives the same images.
      latents: optional initial noise [B, h, w, C] (NHWC, not yet multiplied by the
        sampler's init sigma), as diffusers' ``latents=``.
      mesh: a ``jax.sharding.Mesh`` with a ``data`` axis (default: all devices).
      output: "uint8" (images) or "latents" (final latents, float32).
    Returns:
      uint8 [B, H, W, 3] images (or [S, B, H, W, 3] for a sweep of S scales); for
      ``output="latents"`` the final latents with the same leading axes.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    b = len(prompts)
    negative = prompt_list(negative_prompts, b, "negative prompts")
    height = pipe.image_size if height is None else height
    width = pipe.image_size if width is None else width
    check_request(pipe, b, steps, height, width, sampler)
    mesh = mesh or parallel.make_mesh()
    n = parallel.padded_batch(b, mesh)
    shape = pipe.latent_shape(height, width)
    keys = sample_keys(seed, n, sample_offset)
    if latents is None:
        noise = initial_noise(keys, shape)
    else:
        noise = jnp.asarray(latents, jnp.float32)
        if noise.shape != (b,) + shape:
            raise ValueError(f"latents has shape {noise.shape}; expected {(b,) + shape} "
                             "(NHWC) for this batch and resolution.")
        noise = _pad(noise, n)
    ids, neg_ids = _pad(pipe.tokenize(prompts), n), _pad(pipe.tokenize(negative), n)
    sweep = not np.isscalar(guidance_scale) and np.ndim(guidance_scale) == 1
    scale = jnp.asarray(guidance_scale, jnp.float32)
    run = _compiled(pipe, sampler, int(steps), sweep, mesh)
    images, final = run(params, ids, neg_ids, noise, keys, scale,
                        jnp.float32(guidance_rescale), jnp.float32(eta))
    if output == "latents":
        return np.asarray(final)[..., :b, :, :, :]
    return to_uint8(np.asarray(images)[..., :b, :, :, :])


def prompt_list(prompts: Union[str, Sequence[str], None], b: int, name: str,
                default: str = "", per: str = "prompt") -> list:
    """One prompt per sample: a string is repeated, None gives ``default``, a sequence
    must have ``b`` entries (else a one-line ValueError naming ``name`` and ``per``)."""
    if prompts is None:
        return [default] * b
    if isinstance(prompts, str):
        return [prompts] * b
    prompts = list(prompts)
    if len(prompts) != b:
        raise ValueError(f"got {len(prompts)} {name} for {b} {per}s; give one, or one per "
                         f"{per}.")
    return prompts


def check_request(pipe: Pipeline, b: int, steps: int, height: int, width: int,
                  sampler: str) -> None:
    """One-line ValueError for a request ``generate`` cannot run (before any compile)."""
    if b < 1:
        raise ValueError("no prompts given; pass at least one prompt.")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps=}.")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}.")
    pipe.check_size(height, width)


def _pad(x, n):
    x = jnp.asarray(x)
    if x.shape[0] == n:
        return x
    reps = jnp.repeat(x[-1:], n - x.shape[0], axis=0)
    return jnp.concatenate([x, reps])
