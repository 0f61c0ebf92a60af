"""Spatial control while sampling: ControlNets and T2I-Adapters (``Control``) as the
UNet's extra residuals, the way diffusers' ``StableDiffusionControlNetPipeline`` /
``StableDiffusionAdapterPipeline`` apply them.

``control_inputs`` checks and packs the user's ``Control``s before any compile into static
specs (model, guess mode) and traced arrays (params, condition images, scales, step window);
``control_residuals`` / ``controlled_unet`` turn them into the UNet's keyword arguments
inside a jitted loop (``sampling.generate``, SDEdit, the Prompt-to-Prompt program).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxdiff import parallel
from jaxdiff.denoiser import denoise
from jaxdiff.models.controlnet import ControlNetModel
from jaxdiff.models.t2i_adapter import T2IAdapter
from jaxdiff.pipeline import Pipeline


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
    arrays = [dict(params=c.params, image=parallel.pad_rows(image, n), scale=parallel.pad_rows(scale, n),
                   start=jnp.float32(c.start), end=jnp.float32(c.end))
              for c, image, scale in arrays]
    return tuple(specs), tuple(arrays)
