"""The inputs of a batched edit program, shared by the mask/strength editing methods.

Each method file has a latent-space core (a pure function of a denoiser and arrays) and a
pipeline-level function that compiles image-encode -> edit -> decode into one program per
(pipeline, shapes, static options). These helpers check and convert what that function
is given (images, masks, prompts, per-image traced scalars, noise) and build the
pieces its program shares (the UNet as a denoiser, per-step noise, latent masks).
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxdiff import parallel
from jaxdiff.denoiser import denoise
from jaxdiff.control import control_inputs
from jaxdiff.sampling import prompt_list, sample_keys


def edit_mesh(mesh=None):
    """The mesh an edit runs on: ``mesh``, or (None) all devices as ``generate``."""
    return parallel.make_mesh() if mesh is None else mesh


def one_device_mesh():
    """A mesh of the first device: the program a ``_compiled`` call without a mesh gets."""
    return parallel.make_mesh(jax.devices()[:1])


def rows_program(run, mesh, shared: Sequence[str]):
    """``run(params, **rows, **shared)`` as one jitted program over ``mesh``, each device
    running ``run`` on its own rows (``parallel.per_device``: no cross-device collective).

    Keyword arguments named in ``shared`` (traced scalars) and ``params`` are given to
    every device whole; every other keyword argument is a per-image array whose leading
    axis is split over the mesh's batch axes (its length a multiple of
    ``parallel.rows_multiple(mesh)``). Every output has a leading image axis.
    """
    rows_spec = parallel.rows_spec(mesh)
    shared = frozenset(shared)
    body = lambda params, rows, common: run(params, **rows, **common)
    mapped = parallel.per_device(body, mesh, in_specs=(P(), rows_spec, P()),
                                 out_specs=rows_spec)

    def program(params, **kwargs):
        return mapped(params, {k: v for k, v in kwargs.items() if k not in shared},
                      {k: v for k, v in kwargs.items() if k in shared})

    return jax.jit(program)


def run_rows(run, mesh, b: int, params, rows: dict, shared: dict):
    """``run(params, **rows, **shared)`` data-parallel over ``mesh`` (``run`` from
    ``rows_program`` for that mesh): the per-image ``rows`` (leading axis ``b``) are
    padded to a multiple of the mesh's batch devices by repeating the last image and
    split over them, the params are replicated (or FSDP-sharded by
    ``parallel.DEFAULT_RULES`` on an ``fsdp`` mesh), ``shared`` scalars are broadcast;
    every output is trimmed back to ``b`` rows. Each image is independent in every edit
    program and each device edits its own images, so the result does not depend on the
    device count (up to float round-off of different per-device batch sizes)."""
    out = run(parallel.place_params(params, mesh), **parallel.shard_rows(rows, mesh), **shared)
    return parallel.trim_rows(out, b)


def image_keys(seed, b: int, sample_index=None) -> jax.Array:
    """Per-image keys [B]: ``fold_in(key(seed), sample_index[i])`` (default index i), so an
    image's noise depends on its index in the whole job (a manifest's edit number), not on
    which chunk, process or resumed run edits it."""
    if sample_index is None:
        return sample_keys(seed, b)
    idx = np.asarray(sample_index, np.int32).reshape(-1)
    if idx.shape != (b,):
        raise ValueError(f"sample_index has {idx.shape[0]} entries for {b} images.")
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(idx))


def unet_denoiser(pipe, params):
    """``(x, t, cond) -> model output`` with the UNet params closed over (``cond``: a
    context array, or SDXL's pytree as ``denoiser.denoise`` takes)."""
    return lambda x, t, c: denoise(pipe, params["unet"], x, t, c)


def spatial_control(pipe, control, b: int, height: int, width: int, method: str,
                    guess_mode: bool = True):
    """An edit program's ControlNets / T2I-Adapters (``control.Control``, one or a list;
    None: none), checked before any compile as ``generate`` checks them.

    Returns (static specs, per-image arrays: per control {"image" [B, H, W, C] floats,
    "scale" [B]}, shared arrays: per control {"params", "start", "end"}); ``((), (), ())``
    without control. ``guess_mode=False``: a method whose passes are not all guided
    batches refuses ControlNet guess mode.
    """
    if control is None:
        return (), (), ()
    if pipe.is_sdxl or pipe.is_transformer:
        raise ValueError(f"{method} with control= needs an SD 1.x/2.x U-Net pipeline "
                         "(ControlNets and T2I-Adapters of SDXL or text DiTs are not "
                         "supported yet).")
    specs, arrays = control_inputs(pipe, control, b, b, height, width)
    if not guess_mode and any(guess for _, guess in specs):
        raise ValueError(f"{method}: ControlNet guess mode (guess_mode=True, or a "
                         "global_pool_conditions ControlNet) is not supported here: its "
                         "inversion evaluates the model without guidance.")
    rows = tuple(dict(image=a["image"], scale=a["scale"]) for a in arrays)
    shared = tuple(dict(params=a["params"], start=a["start"], end=a["end"]) for a in arrays)
    return specs, rows, shared


def refuse_sdxl(pipe, method: str) -> None:
    """One-line ValueError, before any compile, for an edit method not ported to SDXL."""
    if pipe.is_sdxl:
        raise ValueError(f"{method} does not support SDXL pipelines yet (SD 1.x / 2.x only); "
                         "SDEdit, P2P / inversion, DiffEdit, blended, RePaint and ILVR do.")


def step_noise(keys, i, shape):
    """N(0, 1) [B, *shape] for loop step ``i`` (stream ``i + 1``; stream 0 is the start)."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i + 1), shape))(keys)


def tokenize_pair(pipe, prompts, negative_prompts, b: int):
    """Token ids [B, L] of the prompts and of the negative prompts ("" when None)."""
    return (pipe.tokenize(prompt_list(prompts, b, "prompts", per="image")),
            pipe.tokenize(prompt_list(negative_prompts, b, "negative prompts", per="image")))


def check_masks(masks, images) -> jax.Array:
    """Pixel masks float [B, H, W] matching images [B, H, W, 3]."""
    m = jnp.asarray(masks, jnp.float32)
    if m.shape != images.shape[:3]:
        raise ValueError(f"masks have shape {m.shape}; expected {images.shape[:3]}.")
    return m


def per_image(value, b: int, name: str) -> jax.Array:
    """A traced float32 [B] from a scalar or a length-B sequence."""
    v = np.asarray(value, np.float32)
    if v.ndim == 0:
        v = np.full((b,), v, np.float32)
    if v.shape != (b,):
        raise ValueError(f"{name} has shape {v.shape}; give a number or one per image ({b}).")
    return jnp.asarray(v)


def check_images(images, pipe) -> jax.Array:
    """images float [B, H, W, 3] in [-1, 1] with H, W valid for the model."""
    x = jnp.asarray(images, jnp.float32)
    if x.ndim != 4 or x.shape[-1] != 3 or x.shape[0] < 1:
        raise ValueError(f"images must be [B, H, W, 3] floats in [-1, 1], got {x.shape}.")
    pipe.check_size(x.shape[1], x.shape[2])
    return x


def given_noise(noise, shape, name="noise") -> Optional[jax.Array]:
    if noise is None:
        return None
    x = jnp.asarray(noise, jnp.float32)
    if x.shape != tuple(shape):
        raise ValueError(f"{name} has shape {x.shape}; expected {tuple(shape)} (NHWC latents).")
    return x


def latent_mask(masks, latent_hw) -> jax.Array:
    """Pixel masks [B, H, W] (1 = edit) -> latent masks [B, h, w, 1] by area averaging,
    binarised at 0.5 (a latent cell is edited when at least half its pixels are)."""
    m = jnp.asarray(masks, jnp.float32)
    if m.ndim != 3:
        raise ValueError(f"masks must be [B, H, W], got {m.shape}.")
    h, w = latent_hw
    if m.shape[1] % h or m.shape[2] % w:
        raise ValueError(f"mask size {m.shape[1:]} is not a multiple of the latent size {(h, w)}.")
    fh, fw = m.shape[1] // h, m.shape[2] // w
    area = m.reshape(m.shape[0], h, fh, w, fw).mean(axis=(2, 4))
    return (area >= 0.5).astype(jnp.float32)[..., None]
