"""Text-to-image sampling as one jitted SPMD program: encode text -> scan -> decode.

Shapes (batch, resolution, steps, number of guidance scales, which control models) select
the compiled program; guidance scale, guidance rescale, the guidance interval, eta, prompts,
seeds, condition images, control scales and control step windows are traced inputs and never
recompile.
Spatial control (``Control``: diffusers ControlNets and T2I-Adapters, several at once) runs
inside the same scan, as diffusers' ``StableDiffusionControlNetPipeline`` /
``StableDiffusionAdapterPipeline`` do. SDXL's base -> refiner hand-off
(``denoising_end`` / ``denoising_start``) runs a static range of the steps in one program.
The batch is sharded over the mesh's ``data`` axis; each sample's noise comes from
``fold_in(key(seed), sample_index)``, so results do not depend on the device count.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import parallel
from jaxdiff.guidance import cfg
from jaxdiff.models.controlnet import ControlNetModel
from jaxdiff.models.t2i_adapter import T2IAdapter
from jaxdiff.pipeline import Pipeline, denoise, to_uint8
from jaxdiff.samplers import SAMPLERS, make_sampler


def sample_keys(seed, n: int, offset: int = 0) -> jax.Array:
    """Per-sample PRNG keys [n] derived from (seed, offset + sample index)."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(offset + jnp.arange(n))


def initial_noise(keys, shape) -> jax.Array:
    """Standard normal initial latents [n, *shape], one key per sample."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape))(keys)


@dataclasses.dataclass(frozen=True, eq=False)
class Control:
    """One ControlNet or T2I-Adapter applied while sampling (``generate(control=...)``).

    Attributes:
      model: a ``models.controlnet.ControlNetModel`` or ``models.t2i_adapter.T2IAdapter``
        (its config must fit the pipeline's UNet and VAE: checked before any compile).
      params: its parameter pytree (e.g. from ``jaxdiff.weights.control.load_controlnet``).
      image: condition image(s) at the generated size: uint8 [H, W, C] (one for every
        image) or [B, H, W, C] (one per image), or floats in [0, 1].
      scale: ``conditioning_scale`` / ``adapter_conditioning_scale``: a float or one per
        image [B] (traced: a sweep over scales is a batch, never a recompile).
      start, end: fraction of the steps where control acts (diffusers'
        ``control_guidance_start/end``: step i is kept unless i/N < start or (i+1)/N > end);
        traced.
      guess_mode: ControlNet guess mode (static): the ControlNet sees only the conditional
        half of the guided batch, its residuals weighted 0.1 .. 1 from shallow to deep.
    """
    model: Any
    params: Any
    image: Any
    scale: Any = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False


def control_keep(i, n, start, end):
    """1.0 where step ``i`` of ``n`` lies in [start, end] (diffusers' controlnet_keep)."""
    i = jnp.asarray(i, jnp.float32)
    return 1.0 - jnp.logical_or(i / n < start, (i + 1) / n > end).astype(jnp.float32)


def _tile(a, r: int):
    """``r`` copies of ``a`` stacked along the batch axis (``[a; a; ...]``)."""
    return a if r == 1 else jnp.concatenate([a] * r)


def adapter_features(specs, arrays) -> tuple:
    """Per control: its T2I-Adapter's features at scale 1 for the images (None for a
    ControlNet), computed once per program (they do not depend on the step)."""
    return tuple(model.apply({"params": arr["params"]}, arr["image"])
                 if isinstance(model, T2IAdapter) else None
                 for (model, _), arr in zip(specs, arrays))


def control_residuals(specs, arrays, adapter_feats, x, t, context, i, n) -> dict:
    """The UNet's control keyword arguments (``down_block_additional_residuals``,
    ``mid_block_additional_residual``, ``down_intrablock_additional_residuals``) for a
    batch ``x`` made of ``r`` groups of the B images' rows.

    ``specs``: static (model, guess_mode) per control; ``arrays``: its traced (params,
    image [B], scale [B], start, end); ``adapter_feats``: ``adapter_features``. Each group
    of B rows gets the same condition images and scales: r = 2 for the ``[uncond; cond]``
    batch of ``guidance.cfg``, 1 for an unguided call, 4 for Prompt-to-Prompt's four
    branches. ``i``, ``n``: step index and step count of ``control_keep`` (scalars, or [B]
    per image). Guess mode: the ControlNet sees only the second half of the batch (the
    conditional rows), zero residuals for the first half. Residuals of several models add
    up.
    """
    down = mid = intra = None
    for (model, guess), arr, feats in zip(specs, arrays, adapter_feats):
        w = arr["scale"] * control_keep(i, n, arr["start"], arr["end"])
        r = x.shape[0] // w.shape[0]
        if isinstance(model, T2IAdapter):
            wr = _tile(w, r).reshape((-1, 1, 1, 1))
            f = [_tile(v, r) * wr for v in feats]
            intra = f if intra is None else [a + c for a, c in zip(intra, f)]
            continue
        img = arr["image"]
        if guess:
            h = x.shape[0] // 2
            d, m = model.apply({"params": arr["params"]}, x[h:], t, context[h:],
                               _tile(img, r // 2), _tile(w, r // 2), guess_mode=True)
            d = [jnp.concatenate([jnp.zeros_like(v), v]) for v in d]
            m = jnp.concatenate([jnp.zeros_like(m), m])
        else:
            d, m = model.apply({"params": arr["params"]}, x, t, context, _tile(img, r),
                               _tile(w, r))
        down = d if down is None else [a + c for a, c in zip(down, d)]
        mid = m if mid is None else mid + m
    return dict(down_block_additional_residuals=down, mid_block_additional_residual=mid,
                down_intrablock_additional_residuals=intra)


def controlled_unet(pipe: Pipeline, params, specs, arrays, adapter_feats, i, n):
    """The guided-batch denoiser ``(x [2B], t, context [2B]) -> output`` with control.

    The batch is ``[uncond; cond]`` as ``guidance.cfg`` builds it: ControlNets see both
    halves (the condition images repeated), in guess mode only the conditional half;
    adapter features are added to both halves (``control_residuals``; ``i``, ``n``: the
    step index and count, scalars or [B]).
    """
    def unet(x, t, context):
        return denoise(pipe, params["unet"], x, t, context, **control_residuals(
            specs, arrays, adapter_feats, x, t, context, i, n))
    return unet


def denoise_loop(pipe: Pipeline, sampler, params, x, contexts, scale, rescale, keys,
                 control=None, span=None, interval=None):
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
    Returns:
      final latents [B, h, w, C].
    """
    unet = lambda x_, t_, c_: denoise(pipe, params["unet"], x_, t_, c_)
    n = len(sampler.timesteps)

    def body(state, i):
        denoise = unet if control is None else controlled_unet(pipe, params, *control, i, n)
        s = scale if interval is None else jnp.where(control_keep(i, n, *interval) > 0,
                                                     scale, 1.0)
        out = cfg(denoise, s, rescale)(sampler.model_input(state, i), sampler.timesteps[i],
                                       contexts)
        noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i + 1),
                                                     x.shape[1:]))(keys)
        return sampler.step(state, i, out, noise), None

    first, stop = span or (0, n)
    state, _ = jax.lax.scan(body, sampler.init(x), jnp.arange(first, stop))
    return sampler.latents(state)


def _program(pipe, sampler_name, steps, sweep, specs=(), zero_uncond=False, span=None):
    """The whole job as one pure function of (params, ids, neg_ids, noise, keys, scalars
    (scale, rescale, eta, the guidance interval [2]), control arrays, SDXL time ids [2, K]
    or None for the defaults). ``zero_uncond``: SDXL's zero negative embeddings. ``span``: None, or
    (first, stop, handed): the step range (``step_span``); ``handed``: ``noise`` are the
    latents at step ``first`` (not scaled by the init sigma). A range that stops before
    the last step returns its latents in place of images (no VAE decode)."""

    def run(params, ids, neg_ids, noise, keys, scale, rescale, eta, interval, arrays=(),
            time_ids=None):
        sampler = make_sampler(sampler_name, pipe.scheduler, steps, eta=eta)
        size = (noise.shape[1] * pipe.vae_scale_factor, noise.shape[2] * pipe.vae_scale_factor)
        cond, uncond = pipe.encode_prompts(params, ids, neg_ids, *size, zero_uncond, time_ids)
        control = (specs, arrays, adapter_features(specs, arrays)) if specs else None
        handed = span is not None and span[2]
        x = noise if handed else noise * sampler.init_noise_sigma
        loop = lambda s: denoise_loop(pipe, sampler, params, x, (cond, uncond), s, rescale,
                                      keys, control, span and span[:2],
                                      (interval[0], interval[1]))
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
                   in_shardings=(rep, data, data, data, data, rep, rep, rep, rep, arrays, rep),
                   out_shardings=(out_batch, out_batch))


def generation_program(pipe: Pipeline, sampler: str = "ddim", steps: int = 50,
                       sweep: bool = False, mesh=None):
    """The jitted program ``generate`` runs (the same cached object), for ahead-of-time
    ``.lower(params, ids, neg_ids, noise, keys, scale, rescale, eta, interval, (), None)`` from
    abstract shapes (``bench/roofline.py``); no control models, default SDXL time ids."""
    # The same positional arguments as ``generate`` (lru_cache keys on their form).
    return _compiled(pipe, sampler, int(steps), sweep, mesh or parallel.make_mesh(), (), False,
                     None)


def generate(pipe: Pipeline, params, prompts: Union[str, Sequence[str]],
             negative_prompts: Optional[Union[str, Sequence[str]]] = None, sampler: str = "ddim",
             steps: int = 50, guidance_scale: Union[float, Sequence[float]] = 7.5, seed: int = 0,
             latents=None, height: Optional[int] = None, width: Optional[int] = None,
             eta: float = 0.0, guidance_rescale: float = 0.0,
             guidance_interval: Sequence[float] = (0.0, 1.0), mesh=None,
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
        noise = _pad(noise, n)
    ids, neg_ids = _pad(pipe.tokenize(prompts), n), _pad(pipe.tokenize(negative), n)
    scale = jnp.asarray(guidance_scale, jnp.float32)
    run = _compiled(pipe, sampler, int(steps), sweep, mesh, specs,
                    pipe.zeroes_negative(negative_prompts), span)
    images, final = run(params, ids, neg_ids, noise, keys, scale,
                        jnp.float32(guidance_rescale), jnp.float32(eta), interval, arrays,
                        None if time_ids is None else jnp.asarray(time_ids))
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


def control_inputs(pipe: Pipeline, control, b: int, n: int, height: int, width: int):
    """(static specs, traced arrays) for ``control``, checked before any compile: each
    model must fit the UNet (one-line ValueError naming both values), each image be
    ``height`` x ``width`` with the model's channels, one or ``b`` images and scales."""
    if control is None:
        return (), ()
    controls = [control] if isinstance(control, Control) else list(control)
    specs, arrays = [], []
    for k, c in enumerate(controls):
        what = f"control {k} ({type(c.model).__name__})"
        if isinstance(c.model, ControlNetModel):
            c.model.config.check_matches(pipe.unet.config, pipe.vae_scale_factor, source=what)
            channels = c.model.config.conditioning_channels
        elif isinstance(c.model, T2IAdapter):
            c.model.config.check_matches(pipe.unet.config, pipe.vae_scale_factor, source=what)
            channels = c.model.config.in_channels
        else:
            raise TypeError(f"{what}: model must be a ControlNetModel or a T2IAdapter.")
        image = np.asarray(c.image)
        image = image[None] if image.ndim == 3 else image
        if (image.ndim != 4 or image.shape[1:] != (height, width, channels)
                or image.shape[0] not in (1, b)):
            raise ValueError(f"{what}: condition image of shape {image.shape}; expected "
                             f"[{height}, {width}, {channels}] or [1 or {b}, {height}, {width}, "
                             f"{channels}] (resize it to the generated size).")
        image = (image.astype(np.float32) / 255.0 if image.dtype == np.uint8
                 else image.astype(np.float32))
        scale = np.asarray(c.scale, np.float32)
        if scale.ndim > 1 or scale.size not in (1, b):
            raise ValueError(f"{what}: scale must be a float or {b} floats, got shape "
                             f"{scale.shape}.")
        if not 0.0 <= float(c.start) < float(c.end) <= 1.0:
            raise ValueError(f"{what}: need 0 <= start < end <= 1, got start={c.start}, "
                             f"end={c.end}.")
        guess = bool(c.guess_mode) or (isinstance(c.model, ControlNetModel)
                                        and c.model.config.global_pool_conditions)
        specs.append((c.model, guess))
        arrays.append((c, np.broadcast_to(image, (b,) + image.shape[1:]),
                       np.broadcast_to(scale.reshape(-1), (b,))))
    arrays = [dict(params=c.params, image=_pad(image, n), scale=_pad(scale, n),
                   start=jnp.float32(c.start), end=jnp.float32(c.end))
              for c, image, scale in arrays]
    return tuple(specs), tuple(arrays)


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


def _pad(x, n):
    x = jnp.asarray(x)
    if x.shape[0] == n:
        return x
    reps = jnp.repeat(x[-1:], n - x.shape[0], axis=0)
    return jnp.concatenate([x, reps])
