"""Text-to-image sampling as one jitted SPMD program: encode text -> scan -> decode.

Shapes (batch, resolution, steps, number of guidance scales, which control models) select
the compiled program; guidance scale, guidance rescale, the guidance interval, eta, prompts,
seeds, condition images, control scales and control step windows are traced inputs and never
recompile.
Spatial control (``control.Control``: diffusers ControlNets and T2I-Adapters, several at
once) runs inside the same scan, as diffusers' ``StableDiffusionControlNetPipeline`` /
``StableDiffusionAdapterPipeline`` do. SDXL's base -> refiner hand-off
(``denoising_end`` / ``denoising_start``) runs a static range of the steps in one program.
The batch is sharded over the mesh's ``data`` axis; each sample's noise comes from
``fold_in(key(seed), sample_index)``, so results do not depend on the device count.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import parallel
from jaxdiff.guidance import adaptive_projection, anneal_condition, cfg, check_annealing, \
    check_projection
from jaxdiff.control import Control, adapter_features, control_inputs, control_keep, \
    controlled_unet
from jaxdiff.denoiser import denoise
from jaxdiff.pipeline import Pipeline, to_uint8
from jaxdiff.samplers import SAMPLERS, make_sampler
from jaxdiff.samplers.levels import apg_levels, check_apg_sampler


def sample_keys(seed, n: int, offset: int = 0) -> jax.Array:
    """Per-sample PRNG keys [n] derived from (seed, offset + sample index)."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(offset + jnp.arange(n))


def initial_noise(keys, shape) -> jax.Array:
    """Standard normal initial latents [n, *shape], one key per sample."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape))(keys)


# fold_in tag of the condition-annealing noise stream (the sampler's noise uses i + 1).
ANNEAL_TAG = 0xCAD5


def denoise_loop(pipe: Pipeline, sampler, params, x, contexts, scale, rescale, keys,
                 control=None, span=None, interval=None, annealing=None, projection=None):
    """Runs the sampler's ``lax.scan`` from initial latents ``x`` (already sigma-scaled).

    Args:
      contexts: (cond, uncond): text embeddings [B,L,D], or SDXL's pytrees
        ``{"context", "text_embeds", "time_ids"}`` (``Pipeline.encode_text``).
      keys: [B] per-sample keys for stochastic samplers.
      control: None, or (specs, arrays, adapter features) as ``controlled_unet`` takes.
      span: None (every step), or static (first, stop) step indices: only evaluations
        ``first .. stop - 1`` run (``x`` is then the state at step ``first``).
      interval: None, or traced (start, end) fractions of the steps where guidance acts
        (``control_keep``'s rule); outside it the scale is 1 (the conditional output).
      annealing: None, or traced CADS parameters [4] (``guidance.anneal_condition``); the
        condition of step i is annealed at its diffusion time t = timestep /
        num_train_timesteps, with keys fold_in(fold_in(key, ANNEAL_TAG), i).
      projection: None (CFG), or APG's (traced values [3], alpha [M], sigma [M]): eta,
        norm threshold and momentum (``guidance.adaptive_projection``) and the sampler's
        ``x = alpha x0 + sigma eps`` levels of each evaluation (``apg_levels``). The
        momentum's running average is carried in the scan and advances only at guided
        steps (inside ``interval``), as diffusers' APG guider.
    Returns:
      final latents [B, h, w, C].
    """
    unet = lambda x_, t_, c_: denoise(pipe, params["unet"], x_, t_, c_)
    n = len(sampler.timesteps)

    def body(carry, i):
        denoise = unet if control is None else controlled_unet(pipe, params, *control, i, n)
        keep = None if interval is None else control_keep(i, n, *interval) > 0
        s = scale if keep is None else jnp.where(keep, scale, 1.0)
        ctx = contexts
        if annealing is not None:
            step_keys = jax.vmap(lambda k: jax.random.fold_in(
                jax.random.fold_in(k, ANNEAL_TAG), i))(keys)
            t_frac = sampler.timesteps[i] / pipe.scheduler.num_train_timesteps
            ctx = (anneal_condition(contexts[0], step_keys, t_frac, annealing), contexts[1])
        state = carry if projection is None else carry[0]
        x_in, t = sampler.model_input(state, i), sampler.timesteps[i]
        if projection is None:
            out = cfg(denoise, s, rescale)(x_in, t, ctx)
        else:
            values, alpha, sigma = projection
            out, average = adaptive_projection(
                denoise, s, rescale, values, pipe.scheduler.prediction_type, alpha[i],
                sigma[i])(x_in, t, ctx, carry[1])
            average = average if keep is None else jnp.where(keep, average, carry[1])
        noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i + 1),
                                                     x.shape[1:]))(keys)
        state = sampler.step(state, i, out, noise)
        return (state if projection is None else (state, average)), None

    first, stop = span or (0, n)
    init = sampler.init(x)
    carry, _ = jax.lax.scan(body, init if projection is None else (init, jnp.zeros_like(x)),
                            jnp.arange(first, stop))
    return sampler.latents(carry if projection is None else carry[0])


def _program(pipe, sampler_name, steps, sweep, specs=(), zero_uncond=False, span=None):
    """The whole job as one pure function of (params, ids, neg_ids, noise, keys, scalars
    (scale, rescale, eta, the guidance interval [2]), control arrays, SDXL time ids [2, K]
    or None for the defaults, CADS parameters [4] or None, APG parameters [3] or None).
    ``zero_uncond``: SDXL's zero negative embeddings. ``span``: None, or
    (first, stop, handed): the step range (``step_span``); ``handed``: ``noise`` are the
    latents at step ``first`` (not scaled by the init sigma). A range that stops before
    the last step returns its latents in place of images (no VAE decode)."""

    def run(params, ids, neg_ids, noise, keys, scale, rescale, eta, interval, arrays=(),
            time_ids=None, annealing=None, projection=None):
        sampler = make_sampler(sampler_name, pipe.scheduler, steps, eta=eta)
        size = (noise.shape[1] * pipe.vae_scale_factor, noise.shape[2] * pipe.vae_scale_factor)
        cond, uncond = pipe.encode_prompts(params, ids, neg_ids, *size, zero_uncond, time_ids)
        control = (specs, arrays, adapter_features(specs, arrays)) if specs else None
        handed = span is not None and span[2]
        x = noise if handed else noise * sampler.init_noise_sigma
        apg = projection if projection is None else (
            projection, *apg_levels(sampler_name, pipe.scheduler, steps))
        loop = lambda s: denoise_loop(pipe, sampler, params, x, (cond, uncond), s, rescale,
                                      keys, control, span and span[:2],
                                      (interval[0], interval[1]), annealing, apg)
        latents = jax.vmap(loop)(scale) if sweep else loop(scale)
        if span is not None and span[1] < sampler.num_evals:
            return latents, latents
        flat = latents.reshape((-1,) + latents.shape[-3:])
        images = pipe.decode_latents(params, flat)
        return images.reshape(latents.shape[:-3] + images.shape[-3:]), latents

    return run


@functools.lru_cache(maxsize=32)
def _compiled(pipe, sampler_name, steps, sweep, mesh, specs=(), zero_uncond=False, span=None):
    data, rep = parallel.batch_sharded(mesh), parallel.replicated(mesh)
    out_batch = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(None, parallel.DATA) if sweep else
        jax.sharding.PartitionSpec(parallel.DATA))
    arrays = tuple(dict(params=rep, image=data, scale=data, start=rep, end=rep) for _ in specs)
    return jax.jit(_program(pipe, sampler_name, steps, sweep, specs, zero_uncond, span),
                   in_shardings=(rep, data, data, data, data, rep, rep, rep, rep, arrays, rep,
                                 rep, rep),
                   out_shardings=(out_batch, out_batch))


def generation_program(pipe: Pipeline, sampler: str = "ddim", steps: int = 50,
                       sweep: bool = False, mesh=None):
    """The jitted program ``generate`` runs (the same cached object), for ahead-of-time
    ``.lower(params, ids, neg_ids, noise, keys, scale, rescale, eta, interval, (), None, None,
    None)`` from abstract shapes (``bench/roofline.py``); no control models, default SDXL
    time ids."""
    # The same positional arguments as ``generate`` (lru_cache keys on their form).
    return _compiled(pipe, sampler, int(steps), sweep, mesh or parallel.make_mesh(), (), False,
                     None)


def generate(pipe: Pipeline, params, prompts: Union[str, Sequence[str]],
             negative_prompts: Optional[Union[str, Sequence[str]]] = None, sampler: str = "ddim",
             steps: int = 50, guidance_scale: Union[float, Sequence[float]] = 7.5, seed: int = 0,
             latents=None, height: Optional[int] = None, width: Optional[int] = None,
             eta: float = 0.0, guidance_rescale: float = 0.0,
             guidance_interval: Sequence[float] = (0.0, 1.0),
             condition_annealing: Optional[Sequence[float]] = None,
             adaptive_projection: Optional[Sequence[float]] = None, mesh=None,
             output: str = "uint8", sample_offset: int = 0,
             control: Union[None, Control, Sequence[Control]] = None,
             denoising_start: Optional[float] = None, denoising_end: Optional[float] = None,
             **micro_conditioning):
    """Generates images for ``prompts``.

    Args:
      prompts: one prompt or a list (the batch).
      negative_prompts: None (empty prompt; SDXL with ``force_zeros_for_empty_prompt``:
        zero negative embeddings, as diffusers), one string, or one per prompt.
      sampler: a name from ``jaxdiff.samplers.SAMPLERS``.
      guidance_scale: a float, or a sequence of floats evaluated as one vmapped sweep.
      guidance_interval: (start, end) fractions of the steps where classifier-free guidance
        acts (Kynkaenniemi et al. 2024, "Applying Guidance in a Limited Interval"); step i
        is guided unless i/N < start or (i+1)/N > end (the rule of ``Control.start/end``),
        the other steps use the conditional output alone (scale 1). Traced. Default (0, 1):
        every step, as diffusers.
      condition_annealing: None, or CADS' (tau1, tau2, noise_scale, psi) (Sadat et al.
        2024; ``guidance.anneal_condition``): at the steps whose diffusion time t = timestep
        / num_train_timesteps is above tau1 the conditional embedding is mixed with per-sample Gaussian noise (all noise above
        tau2), rescaled to its own statistics, against the diversity collapse of strong
        guidance on under-specified prompts. Traced (new values never recompile; None and
        a value are two programs). The paper's defaults: 0.6 0.9 0.25 1.
      adaptive_projection: None (CFG), or APG's (eta, norm_threshold, momentum) (Sadat et
        al. 2025; ``guidance.apg_combine``): guidance acts on the denoised (x0)
        predictions, ``c + (w - 1) (orth + eta par)``, with the part of the update parallel
        to the conditional prediction weighted by eta, the update first averaged over the
        steps with ``momentum`` (the paper: -0.5; 0 off) and clipped to norm
        ``norm_threshold`` per image (0 off). (1, 0, 0) is CFG. High guidance scales then
        oversaturate less and keep thin objects: on the shapes_v2_brief model at guidance
        5 (dpmpp_2m, 20 steps), eta 0 reads the asked "a star on a white background" in
        0.75 of images against CFG's 0.45. Composes with ``guidance_interval`` (the
        average advances only at guided steps), scale sweeps and ``condition_annealing``.
        Every sampler but heun (``samplers.levels.APG_SAMPLERS``). Traced (None and a
        value are two programs).
      seed: per-sample noise is ``fold_in(key(seed), sample_offset + index)``, so a
        large job split into chunks (``sample_offset``) gives the same images.
      latents: optional initial noise [B, h, w, C] (NHWC, not yet multiplied by the
        sampler's init sigma), as diffusers' ``latents=``.
      mesh: a ``jax.sharding.Mesh`` with a ``data`` axis (default: all devices).
      output: "uint8" (images) or "latents" (final latents, float32).
      control: a ``Control`` or a sequence of them (ControlNets and T2I-Adapters mixed);
        their residuals add up. Condition images must be ``height`` x ``width``.
      denoising_end: a fraction in (0, 1): stop where the timesteps fall below
        ``(1 - denoising_end) * num_train_timesteps`` and return those latents (needs
        ``output="latents"``): SDXL's base before the refiner (diffusers' ``denoising_end``).
      denoising_start: a fraction in (0, 1): ``latents`` are the latents such a run
        returned (not noise); only the remaining steps run (diffusers'
        ``StableDiffusionXLImg2ImgPipeline(image=latents, denoising_start=...)``). The step
        range is static (``step_span``): another value may compile another program.
      micro_conditioning: SDXL only, diffusers' names (``pipeline.MICRO_CONDITIONING``):
        ``original_size`` / ``target_size`` (height, width), ``crops_coords_top_left``
        (top, left), their ``negative_*`` forms, and the refiner's ``aesthetic_score`` /
        ``negative_aesthetic_score``, with diffusers' defaults and rules
        (``Pipeline.time_id_pair``; ``denoising_start`` runs follow
        ``StableDiffusionXLImg2ImgPipeline``'s). Traced: new values never recompile. Given
        to another pipeline: a one-line ValueError.
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
    interval = check_interval(guidance_interval)
    annealing = check_annealing(condition_annealing)
    projection = check_projection(adaptive_projection)
    if projection is not None:
        check_apg_sampler(sampler)
    time_ids = pipe.time_id_pair(height, width, denoising_start is not None,
                                 **micro_conditioning)
    mesh = mesh or parallel.make_mesh()
    n = parallel.padded_batch(b, mesh)
    if control is not None and (pipe.is_sdxl or pipe.is_transformer):
        raise ValueError("control= is not supported for SDXL or text-DiT pipelines yet "
                         "(SD 1.x/2.x U-Net ControlNets and T2I-Adapters only).")
    specs, arrays = control_inputs(pipe, control, b, n, height, width)
    sweep = not np.isscalar(guidance_scale) and np.ndim(guidance_scale) == 1
    span = step_span(pipe, sampler, steps, denoising_start, denoising_end)
    if span is not None:
        check_handoff(sampler, span, sweep, output, latents, denoising_end)
    shape = pipe.latent_shape(height, width)
    keys = sample_keys(seed, n, sample_offset)
    if latents is None:
        noise = initial_noise(keys, shape)
    else:
        noise = jnp.asarray(latents, jnp.float32)
        if noise.shape != (b,) + shape:
            raise ValueError(f"latents has shape {noise.shape}; expected {(b,) + shape} "
                             "(NHWC) for this batch and resolution.")
        noise = parallel.pad_rows(noise, n)
    ids, neg_ids = parallel.pad_rows(pipe.tokenize(prompts), n), parallel.pad_rows(pipe.tokenize(negative), n)
    scale = jnp.asarray(guidance_scale, jnp.float32)
    run = _compiled(pipe, sampler, int(steps), sweep, mesh, specs,
                    pipe.zeroes_negative(negative_prompts), span)
    images, final = run(params, ids, neg_ids, noise, keys, scale,
                        jnp.float32(guidance_rescale), jnp.float32(eta), interval, arrays,
                        None if time_ids is None else jnp.asarray(time_ids), annealing,
                        projection)
    if output == "latents":
        return np.asarray(final)[..., :b, :, :, :]
    return to_uint8(np.asarray(images)[..., :b, :, :, :])


# Samplers whose scheduler is diffusers' ``order == 2`` (predictor + corrector evaluations).
SECOND_ORDER = frozenset({"heun"})


def step_span(pipe: Pipeline, sampler: str, steps: int, denoising_start=None,
              denoising_end=None):
    """The static step range ``(first, stop, handed)`` of a partial run, or None.

    As diffusers' SDXL pipelines: with T = num_train_timesteps, the base keeps the
    timesteps >= round(T - denoising_end * T); the refiner keeps those < round(T -
    denoising_start * T). ``handed``: the run starts from given latents (denoising_start).
    Ints, so the compiled program is keyed by the steps that run, not by the fraction.
    Heun (two evaluations per step, every timestep but the first repeated): the base
    stops after a predictor (Euler) evaluation, so its latents sit at the next sigma
    uncorrected; the refiner keeps one evaluation more when its count is even
    (diffusers' ``get_timesteps``: ``scheduler.order == 2``), so it starts with a whole
    Heun step from the base's last sigma — treating the handed latents as if at that
    sigma, exactly as ``StableDiffusionXLImg2ImgPipeline`` does.
    """
    if denoising_start is None and denoising_end is None:
        return None
    for name, v in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
        if v is not None and not 0.0 < float(v) < 1.0:
            raise ValueError(f"{name}={v} must be a fraction strictly between 0 and 1.")
    if denoising_start is not None and denoising_end is not None and \
            float(denoising_start) >= float(denoising_end):
        raise ValueError(f"denoising_start={denoising_start} must be below "
                         f"denoising_end={denoising_end}.")
    ts = np.asarray(make_sampler(sampler, pipe.scheduler, int(steps)).timesteps)
    t = pipe.scheduler.num_train_timesteps
    cut = lambda frac: int(round(t - float(frac) * t))
    first = 0
    if denoising_start is not None:
        left = int((ts < cut(denoising_start)).sum())
        if sampler in SECOND_ORDER and left % 2 == 0:
            left += 1  # diffusers: an order-2 scheduler starts on a whole (predictor) step
        first = len(ts) - left
    stop = len(ts) if denoising_end is None else int((ts >= cut(denoising_end)).sum())
    if first >= stop:
        raise ValueError(f"denoising_start={denoising_start} / denoising_end={denoising_end} "
                         f"leave no step of {steps} to run; use more steps or a wider range.")
    return first, stop, denoising_start is not None


def check_handoff(sampler: str, span, sweep: bool, output: str, latents, end) -> None:
    """One-line ValueError for a partial run ``generate`` cannot do (before any compile)."""
    if span[2] and latents is None:
        raise ValueError("denoising_start needs latents=: the latents a run with "
                         "denoising_end returned (output='latents').")
    if span[2] and sweep:
        raise ValueError("denoising_start takes one guidance scale, not a sweep (hand each "
                         "scale's latents over separately).")
    if end is not None and output != "latents":
        raise ValueError(f"denoising_end={end} returns partly denoised latents for a refiner: "
                         "pass output='latents'.")


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
    if pipe.is_instruct:
        raise ValueError("this is an InstructPix2Pix pipeline (its UNet also takes a source "
                         "image's latents): edit images with "
                         "jaxdiff.editing.instruct_pix2pix.edit or edit/instruct.py.")
    pipe.check_size(height, width)


def check_interval(interval, name: str = "guidance_interval") -> jax.Array:
    """``guidance_interval`` as a float32 [2], or a one-line ValueError naming ``name``."""
    start, end = (float(v) for v in interval)
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(f"{name} {start:g} {end:g}: need 0 <= start < end <= 1 "
                         "(fractions of the steps where guidance acts).")
    return jnp.asarray([start, end], jnp.float32)
