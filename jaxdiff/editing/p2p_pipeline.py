"""Invert real images, then edit them with Prompt-to-Prompt — a batch in one program.

``p2p_edit`` is what ``edit/p2p.py`` and the benchmarks call: VAE encode -> DDIM inversion
-> (null-text optimisation | negative-prompt nulls | direct-inversion offsets) -> the P2P
source/target loop (optionally with LocalBlend) -> VAE decode, compiled once per
(pipeline, mesh, batch shape, steps, inversion, mode, LocalBlend on/off). Guidance,
replace-step fractions, reweight factors, blend threshold/start and the prompts are
traced: changing them does not recompile. Over a mesh every device inverts its own images
and runs their edits (``device_layout``) with all their branches, so the program holds no
cross-device collective.

With ``control=`` (ControlNets / T2I-Adapters, ``control.Control``: one condition image
per source image or one for all, traced scales) the control acts on every model call: the
inversion, the null-text optimisation and both branches of the edit, so the source
branch still retraces the (controlled) inversion.

The source branch of the edit is the reconstruction (for null-text and direct
inversion it retraces the inversion; for DDIM inversion under guidance it drifts, which
is the published weakness of that method).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Dict, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxdiff import parallel
from jaxdiff import denoiser
from jaxdiff.editing import batch_inputs
from jaxdiff.editing import inversion as inv
from jaxdiff.editing import local_blend as lb
from jaxdiff.editing import prompt_to_prompt as p2p
from jaxdiff.pipeline import from_uint8, to_uint8
from jaxdiff.samplers.ddim import ddim_tables
from jaxdiff.control import adapter_features, control_residuals

INVERSIONS = ("ddim", "null_text", "negative_prompt", "direct")
MODES = ("replace", "refine", "reweight")


@dataclasses.dataclass(frozen=True)
class P2PSettings:
    """Settings of an inversion + Prompt-to-Prompt edit (reference values as defaults).

    blend_words: None (no LocalBlend), a list of words looked up in both prompts, or one
      list per edit pair.
    """
    inversion: str = "null_text"
    mode: str = "replace"
    steps: int = 50
    guidance: float = 7.5
    cross_replace_steps: Union[float, Dict[str, float]] = 0.8
    self_replace_steps: float = 0.4
    reweight: Optional[Dict[str, float]] = None
    blend_words: Optional[Sequence] = None
    blend_threshold: float = 0.3
    blend_start: float = 0.2
    num_inner_steps: int = 10

    def validate(self):
        if self.inversion not in INVERSIONS:
            raise ValueError(f"unknown inversion {self.inversion!r}; use one of {INVERSIONS}.")
        if self.mode not in MODES:
            raise ValueError(f"unknown P2P mode {self.mode!r}; use one of {MODES}.")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}.")
        fracs = dict(self.cross_replace_steps) if isinstance(self.cross_replace_steps, dict) \
            else {"cross_replace_steps": self.cross_replace_steps}
        fracs.update(self_replace_steps=self.self_replace_steps,
                     blend_start=self.blend_start, blend_threshold=self.blend_threshold)
        for name, v in fracs.items():
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}.")


class P2PResult(NamedTuple):
    """uint8 [P, H, W, 3] edits and reconstructions (one per pair), LocalBlend masks
    bool [P, h, w] (latent resolution; all True without LocalBlend), and null-text
    inner Adam steps [S, M] per image (zeros for other inversions)."""
    edited: np.ndarray
    reconstruction: np.ndarray
    mask: np.ndarray
    inner_steps: np.ndarray


def with_spatial_control(denoise, spatial, timesteps):
    """``denoise(x, t, context, *rest)`` with the residuals of ``spatial`` (None: ``denoise``
    itself): (specs, arrays, adapter features) as ``control.control_residuals`` takes, the
    rows of ``x`` being groups of the arrays' B rows. The control window's step is the
    index of ``t`` among the sampling ``timesteps`` (an inversion evaluation at a sampling
    step's timestep counts as that step)."""
    if spatial is None:
        return denoise
    specs, arrays, feats = spatial
    n = timesteps.shape[0]

    def controlled(x, t, context, *rest):
        i = jnp.argmax(timesteps == t)
        return denoise(x, t, context, *rest,
                       **control_residuals(specs, arrays, feats, x, t, context, i, n))

    return controlled


def _spatial_rows(spatial, idx):
    """``spatial`` for the rows ``idx`` of its images (the edits' source images)."""
    if spatial is None:
        return None
    specs, arrays, feats = spatial
    arrays = tuple(dict(a, image=a["image"][idx], scale=a["scale"][idx]) for a in arrays)
    feats = tuple(None if f is None else [v[idx] for v in f] for f in feats)
    return specs, arrays, feats


def edit_latents(pipe, params, z0, src_ids, tgt_ids, empty_ids, pair_image, control, blend,
                 guidance, *, steps: int, inversion: str, num_inner_steps: int,
                 spatial=None):
    """The latent part of ``p2p_edit`` (pure; jit it): invert image latents z0 [M, h, w, C],
    then run P edits (edit p on ``z0[pair_image[p]]``) under ``control`` / ``blend``.

    SDXL: the conditions are ``Pipeline.condition``'s pytrees (time ids of the image size;
    the unconditional ones zero where the pipeline zeroes an absent negative prompt);
    null-text inversion optimises the null's text embeddings (context and pooled), not its
    time ids; negative-prompt inversion's nulls keep the negative half's time ids.
    ``spatial``: None, or ControlNets / T2I-Adapters for the M images (specs, arrays,
    adapter features; ``with_spatial_control``), applied to every model call.
    Returns:
      (P2POutput of [P, h, w, C] latents, null-text inner steps [S, M]).
    """
    pt = pipe.scheduler.prediction_type
    tab = ddim_tables(pipe.scheduler, steps)
    unet = lambda x, t, c, ctrl=None, **kw: denoiser.denoise(pipe, params["unet"], x, t, c,
                                                             control=ctrl, **kw)
    den = with_spatial_control(lambda x, t, c, **kw: unet(x, t, c, **kw), spatial,
                               tab.timesteps)
    size = (z0.shape[1] * pipe.vae_scale_factor, z0.shape[2] * pipe.vae_scale_factor)
    cond, uncond = pipe.encode_prompts(params, src_ids, empty_ids, *size,
                                       pipe.zeroes_negative(None))
    rows = lambda tree, idx: jax.tree.map(lambda a: a[idx], tree)
    traj = inv.ddim_invert(den, tab, z0, cond, pt)
    empty = inv.negative_prompt_nulls(uncond, steps)  # the empty prompt at every step
    taken = jnp.zeros((steps, z0.shape[0]), jnp.int32)
    offsets = None
    if inversion == "null_text":
        # Only embeddings are optimised: never SDXL's time ids or a text DiT's caption mask,
        # resolution or aspect ratio.
        trainable = ({k: k in ("context", "text_embeds") for k in uncond}
                     if isinstance(uncond, dict) else None)
        nulls, taken = inv.null_text_invert(den, tab, traj, cond, uncond, guidance, pt,
                                            num_inner_steps=num_inner_steps,
                                            trainable=trainable)
    elif inversion == "negative_prompt":
        source = dict(cond, time_ids=uncond["time_ids"]) if pipe.is_sdxl else cond
        nulls = inv.negative_prompt_nulls(source, steps)
    else:
        nulls = empty
        if inversion == "direct":
            offsets = inv.direct_offsets(den, tab, traj, cond, empty, guidance, pt)[:, pair_image]
    edit_den = unet if blend is None else lb.capturing_denoiser(pipe, params["unet"], blend.res)
    edit_den = with_spatial_control(edit_den, _spatial_rows(spatial, pair_image), tab.timesteps)
    out = p2p.edit_loop(edit_den, tab, traj[-1][pair_image], rows(cond, pair_image),
                        pipe.condition(params, tgt_ids, *size),
                        rows(nulls, (slice(None), pair_image)), guidance, control, pt,
                        src_offsets=offsets, blend=blend)
    return out, taken


@functools.lru_cache(maxsize=16)
def _compiled(pipe, steps: int, inversion: str, num_inner_steps: int, mesh=None,
              spatial=()):
    """The edit program over ``mesh`` (default: the first device): every device inverts
    its own images and runs the edits of them (``pair_image`` holds indices among the
    device's own images), so no step loop holds a cross-device collective. ``spatial``:
    the static specs of ``batch_inputs.spatial_control``; the program then takes its
    per-image and shared arrays as two more arguments."""
    mesh = mesh or parallel.make_mesh(jax.devices()[:1])

    def run(params, images, src_ids, tgt_ids, empty_ids, pair_image, control, blend, guidance,
            spatial_rows=(), spatial_shared=()):
        control = control.replace(num_pairs=tgt_ids.shape[0])  # this device's pairs
        if blend is not None:  # words arrive [2, pairs, L]: source rows, then target rows
            blend = blend.replace(words=blend.words.reshape(-1, blend.words.shape[-1]))
        z0 = pipe.encode_images(params, from_uint8(images))
        cn = None
        if spatial:
            arrays = tuple(dict(r, **c) for r, c in zip(spatial_rows, spatial_shared))
            cn = (spatial, arrays, adapter_features(spatial, arrays))
        out, taken = edit_latents(pipe, params, z0, src_ids, tgt_ids, empty_ids, pair_image,
                                  control, blend, guidance, steps=steps, inversion=inversion,
                                  num_inner_steps=num_inner_steps, spatial=cn)
        return (pipe.decode_latents(params, out.target), pipe.decode_latents(params, out.source),
                out.mask[..., 0] > 0, taken)

    rows, pairs = parallel.rows_spec(mesh), parallel.rows_spec(mesh, 1)

    def specs(control, blend):
        ctrl = control.replace(step=P(), cross_mapper=rows, cross_alpha=pairs, equalizer=rows,
                               refine_index=rows, refine_alpha=rows, self_steps=P())
        return ((P(), rows, rows, rows, rows, rows, ctrl,
                 None if blend is None else blend.replace(words=pairs, threshold=P(), start=P()),
                 P()) + ((rows, P()) if spatial else ()), (rows, rows, rows, pairs))

    def program(params, images, src_ids, tgt_ids, empty_ids, pair_image, control, blend,
                guidance, *spatial_arrays):
        in_specs, out_specs = specs(control, blend)
        return parallel.per_device(run, mesh, in_specs, out_specs)(
            params, images, src_ids, tgt_ids, empty_ids, pair_image, control, blend, guidance,
            *spatial_arrays)

    return jax.jit(program)


def device_layout(pair_image, m: int, k: int):
    """Where the images and edits of a ``p2p_edit`` go on ``k`` devices (each device's
    edits only of its own images, so that the program needs no cross-device traffic).

    Images are split in contiguous blocks of ``ceil(m / k)`` (the last image repeated to
    fill them); each device gets the edits of its images, padded to the largest count by
    repeating its last one (a device without edits repeats edit 0 on its first image;
    padding is edited and dropped).
    Returns:
      (image rows [k * m_loc]: index of the image in each row; edit rows [k * p_loc]:
      index of the edit in each row; local image index of each edit row [k * p_loc];
      row of each edit [P]).
    """
    pair_image = np.asarray(pair_image, np.int64)
    m_loc = -(-m // k)
    device = pair_image // m_loc
    mine = [np.flatnonzero(device == d) for d in range(k)]
    p_loc = max(max(len(e) for e in mine), 1)
    pair_rows = np.concatenate([np.pad(e, (0, p_loc - len(e)), mode="edge") if len(e)
                                else np.zeros(p_loc, np.int64) for e in mine])
    device_of_row = np.repeat(np.arange(k), p_loc)
    local = np.where(np.repeat([len(e) > 0 for e in mine], p_loc),
                     pair_image[pair_rows] - device_of_row * m_loc, 0)
    where = np.empty(len(pair_image), np.int64)
    for d, e in enumerate(mine):
        where[e] = d * p_loc + np.arange(len(e))
    return (np.minimum(np.arange(k * m_loc), m - 1), pair_rows, local.astype(np.int32),
            where)


def p2p_edit(pipe, params, images, sources: Sequence[str], targets: Sequence[str],
             settings: P2PSettings, pair_image: Optional[Sequence[int]] = None,
             mesh=None, control=None) -> P2PResult:
    """Inverts M images and applies P Prompt-to-Prompt edits in one compiled program.

    Args:
      images: uint8 [M, H, W, 3] at the model resolution.
      sources: M source prompts (captions of the images).
      targets: P target prompts; edit p edits image ``pair_image[p]`` (default: p).
      settings: P2PSettings.
      mesh: images are split over its ``data`` axis (default: all devices), each device
        editing its own images (``device_layout``); images and edits are padded by
        repeating one (the padding is edited and dropped), so results do not depend on
        the mesh.
      control: None, or a ``control.Control`` or a list of them (ControlNets and
        T2I-Adapters, no guess mode): condition images at the images' size, one for all or
        one per image (M); scales a float or one per image (traced). Applied to the
        inversion and to both branches of every edit of that image.
    """
    settings.validate()
    m = np.shape(images)[0]
    run, args, where = _program_and_args(pipe, params, images, sources, targets, settings,
                                         pair_image, mesh, control)
    edited, rec, mask, taken = run(*args)
    return P2PResult(to_uint8(np.asarray(edited)[where]), to_uint8(np.asarray(rec)[where]),
                     np.asarray(mask)[where], np.asarray(taken)[:, :m])


def _program_and_args(pipe, params, images, sources, targets, settings, pair_image, mesh,
                      control=None):
    """``p2p_edit``'s compiled program, its arguments (placed on the mesh) and the row of
    each edit among its outputs."""
    images = np.asarray(images)
    m = images.shape[0]
    pair_image = np.arange(m) if pair_image is None else np.asarray(pair_image, np.int32)
    if len(sources) != m or len(targets) != len(pair_image):
        raise ValueError(f"{m} images, {len(sources)} source prompts, {len(targets)} target "
                         f"prompts for {len(pair_image)} edits.")
    if len(pair_image) and (pair_image.min() < 0 or pair_image.max() >= m):
        raise ValueError(f"pair_image has indices outside the {m} images.")
    specs, c_rows, c_shared = batch_inputs.spatial_control(
        pipe, control, m, images.shape[1], images.shape[2], "Prompt-to-Prompt",
        guess_mode=False)
    mesh = parallel.make_mesh() if mesh is None else mesh
    img_rows, pair_rows, local, where = device_layout(pair_image, m, parallel.rows_multiple(mesh))
    pair_src = [sources[i] for i in pair_image[pair_rows]]
    images, sources = images[img_rows], [sources[i] for i in img_rows]
    targets = [targets[i] for i in pair_rows]
    if _per_pair(settings.blend_words):
        settings = dataclasses.replace(
            settings, blend_words=[settings.blend_words[i] for i in pair_rows])
    control = p2p.make_control(pipe, pair_src, targets, settings.steps,
                               mode=settings.mode,
                               cross_replace_steps=settings.cross_replace_steps,
                               self_replace_steps=settings.self_replace_steps,
                               reweight=settings.reweight)
    blend = None
    if settings.blend_words:
        blend = lb.make_local_blend(pipe, pair_src, targets, settings.steps,
                                    settings.blend_words, threshold=settings.blend_threshold,
                                    start_fraction=settings.blend_start)
        blend = blend.replace(words=blend.words.reshape(2, len(targets), -1))
    run = _compiled(pipe, settings.steps, settings.inversion, settings.num_inner_steps, mesh,
                    specs)
    images, src_ids, empty_ids = parallel.shard_rows(
        (images, pipe.tokenize(sources), pipe.tokenize([""] * len(sources))), mesh)
    tgt_ids, local = parallel.shard_rows((pipe.tokenize(targets), local), mesh)
    args = (parallel.place_params(params, mesh), images, src_ids, tgt_ids, empty_ids, local,
            control, blend, jnp.float32(settings.guidance))
    if specs:
        c_rows = jax.tree.map(lambda a: jnp.asarray(a)[img_rows], c_rows)
        args += (parallel.shard_rows(c_rows, mesh), c_shared)
    return run, args, where


def _per_pair(words) -> bool:
    return bool(words) and not isinstance(words[0], str)


def _control_chunk(control, idx, n: int):
    """``control`` (None, a ``Control`` or a list) for the images ``idx`` of ``n``: per-image
    condition images and scales are taken at ``idx``, shared ones kept."""
    if control is None:
        return None
    one = not isinstance(control, (list, tuple))
    out = []
    for c in [control] if one else control:
        image, scale = np.asarray(c.image), np.asarray(c.scale)
        out.append(dataclasses.replace(
            c, image=image[idx] if image.ndim == 4 and image.shape[0] == n else image,
            scale=scale[idx] if scale.ndim == 1 and scale.shape[0] == n else scale))
    return out[0] if one else out


def p2p_edit_chunked(pipe, params, images, sources, targets, settings: P2PSettings,
                     max_batch: int = 16, mesh=None, control=None) -> P2PResult:
    """Edit k applies ``targets[k]`` to ``images[k]`` (caption ``sources[k]``), in chunks of
    at most ``max_batch`` edits, each chunk one ``p2p_edit`` program call. The last chunk
    is padded by repeating its last edit, so all chunks share one compiled program. An
    image edited with several targets appears once per target (and is inverted once per
    target). ``mesh``, ``control`` (one condition image / scale per edit, or one for all):
    as ``p2p_edit``."""
    n = len(images)
    size = min(max_batch, n)
    parts = []
    for lo in range(0, n, size):
        idx = np.arange(lo, min(lo + size, n))
        pad = np.concatenate([idx, np.full(size - len(idx), idx[-1])])
        chunk = settings
        if _per_pair(settings.blend_words):
            chunk = dataclasses.replace(settings,
                                        blend_words=[settings.blend_words[i] for i in pad])
        out = p2p_edit(pipe, params, np.asarray(images)[pad], [sources[i] for i in pad],
                       [targets[i] for i in pad], chunk, mesh=mesh,
                       control=_control_chunk(control, pad, n))
        k = len(idx)
        parts.append(P2PResult(out.edited[:k], out.reconstruction[:k], out.mask[:k],
                               out.inner_steps[:, :k]))
    return P2PResult(*(np.concatenate([getattr(p, f) for p in parts],
                                      axis=1 if f == "inner_steps" else 0)
                       for f in P2PResult._fields))
