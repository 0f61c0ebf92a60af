"""Invert real images, then edit them with Prompt-to-Prompt — a batch in one program.

``p2p_edit`` is what ``edit/p2p.py`` and the benchmarks call: VAE encode -> DDIM inversion
-> (null-text optimisation | negative-prompt nulls | direct-inversion offsets) -> the P2P
source/target loop (optionally with LocalBlend) -> VAE decode, compiled once per
(pipeline, batch shape, steps, inversion, mode, LocalBlend on/off). Guidance, replace-step
fractions, reweight factors, blend threshold/start and the prompts are traced: changing
them does not recompile.

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

from jaxdiff import parallel
from jaxdiff.editing import batch_inputs
from jaxdiff.editing import inversion as inv
from jaxdiff.editing import local_blend as lb
from jaxdiff.editing import prompt_to_prompt as p2p
from jaxdiff.pipeline import from_uint8, to_uint8
from jaxdiff.samplers.ddim import ddim_tables

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


def edit_latents(pipe, params, z0, src_ids, tgt_ids, empty_ids, pair_image, control, blend,
                 guidance, *, steps: int, inversion: str, num_inner_steps: int):
    """The latent part of ``p2p_edit`` (pure; jit it): invert image latents z0 [M, h, w, C],
    then run P edits (edit p on ``z0[pair_image[p]]``) under ``control`` / ``blend``.

    Returns:
      (P2POutput of [P, h, w, C] latents, null-text inner steps [S, M]).
    """
    pt = pipe.scheduler.prediction_type
    tab = ddim_tables(pipe.scheduler, steps)
    unet = lambda x, t, c, ctrl=None: pipe.unet.apply({"params": params["unet"]}, x, t, c,
                                                      control=ctrl)
    den = lambda x, t, c: unet(x, t, c)
    cond, uncond = pipe.encode_text(params, src_ids), pipe.encode_text(params, empty_ids)
    traj = inv.ddim_invert(den, tab, z0, cond, pt)
    empty = jnp.broadcast_to(uncond, (steps,) + uncond.shape)
    taken = jnp.zeros((steps, z0.shape[0]), jnp.int32)
    offsets = None
    if inversion == "null_text":
        nulls, taken = inv.null_text_invert(den, tab, traj, cond, uncond, guidance, pt,
                                            num_inner_steps=num_inner_steps)
    elif inversion == "negative_prompt":
        nulls = inv.negative_prompt_nulls(cond, steps)
    else:
        nulls = empty
        if inversion == "direct":
            offsets = inv.direct_offsets(den, tab, traj, cond, empty, guidance, pt)[:, pair_image]
    edit_den = unet if blend is None else lb.capturing_denoiser(pipe.unet, params["unet"],
                                                                 blend.res)
    out = p2p.edit_loop(edit_den, tab, traj[-1][pair_image], cond[pair_image],
                        pipe.encode_text(params, tgt_ids), nulls[:, pair_image], guidance,
                        control, pt, src_offsets=offsets, blend=blend)
    return out, taken


@functools.lru_cache(maxsize=16)
def _compiled(pipe, steps: int, inversion: str, num_inner_steps: int):
    def run(params, images, src_ids, tgt_ids, empty_ids, pair_image, control, blend, guidance):
        z0 = pipe.encode_images(params, from_uint8(images))
        out, taken = edit_latents(pipe, params, z0, src_ids, tgt_ids, empty_ids, pair_image,
                                  control, blend, guidance, steps=steps, inversion=inversion,
                                  num_inner_steps=num_inner_steps)
        return (pipe.decode_latents(params, out.target), pipe.decode_latents(params, out.source),
                out.mask[..., 0] > 0, taken)

    return jax.jit(run)


def p2p_edit(pipe, params, images, sources: Sequence[str], targets: Sequence[str],
             settings: P2PSettings, pair_image: Optional[Sequence[int]] = None,
             mesh=None) -> P2PResult:
    """Inverts M images and applies P Prompt-to-Prompt edits in one compiled program.

    Args:
      images: uint8 [M, H, W, 3] at the model resolution.
      sources: M source prompts (captions of the images).
      targets: P target prompts; edit p edits image ``pair_image[p]`` (default: p).
      settings: P2PSettings.
      mesh: images and edits are split over its ``data`` axis (default: all devices);
        both are padded to a multiple of its batch devices by repeating the last one
        (the padding is edited and dropped), so results do not depend on the mesh.
    """
    batch_inputs.refuse_sdxl(pipe, "Prompt-to-Prompt / null-text inversion")
    settings.validate()
    images = np.asarray(images)
    m = images.shape[0]
    pair_image = np.arange(m) if pair_image is None else np.asarray(pair_image, np.int32)
    if len(sources) != m or len(targets) != len(pair_image):
        raise ValueError(f"{m} images, {len(sources)} source prompts, {len(targets)} target "
                         f"prompts for {len(pair_image)} edits.")
    mesh = parallel.make_mesh() if mesh is None else mesh
    p, k = len(pair_image), parallel.rows_multiple(mesh)
    m_pad, p_pad = -(-m // k) * k, -(-p // k) * k
    rows = lambda n, b: np.minimum(np.arange(n), b - 1)  # pad: repeat the last row
    images, sources = images[rows(m_pad, m)], [sources[i] for i in rows(m_pad, m)]
    pair_image, targets = pair_image[rows(p_pad, p)], [targets[i] for i in rows(p_pad, p)]
    if _per_pair(settings.blend_words):
        settings = dataclasses.replace(
            settings, blend_words=[settings.blend_words[i] for i in rows(p_pad, p)])
    pair_src = [sources[i] for i in pair_image]
    control = p2p.make_control(pipe, pair_src, list(targets), settings.steps,
                               mode=settings.mode,
                               cross_replace_steps=settings.cross_replace_steps,
                               self_replace_steps=settings.self_replace_steps,
                               reweight=settings.reweight)
    blend = None
    if settings.blend_words:
        blend = lb.make_local_blend(pipe, pair_src, list(targets), settings.steps,
                                    settings.blend_words, threshold=settings.blend_threshold,
                                    start_fraction=settings.blend_start)
    run = _compiled(pipe, settings.steps, settings.inversion, settings.num_inner_steps)
    images, src_ids, empty_ids = parallel.shard_rows(
        (images, pipe.tokenize(sources), pipe.tokenize([""] * m_pad)), mesh)
    tgt_ids, pair_image = parallel.shard_rows(
        (pipe.tokenize(targets), pair_image.astype(np.int32)), mesh)
    edited, rec, mask, taken = run(
        parallel.place_params(params, mesh), images, src_ids, tgt_ids, empty_ids, pair_image,
        control, blend, jnp.float32(settings.guidance))
    return P2PResult(to_uint8(np.asarray(edited)[:p]), to_uint8(np.asarray(rec)[:p]),
                     np.asarray(mask)[:p], np.asarray(taken)[:, :m])


def _per_pair(words) -> bool:
    return bool(words) and not isinstance(words[0], str)


def p2p_edit_chunked(pipe, params, images, sources, targets, settings: P2PSettings,
                     max_batch: int = 16, mesh=None) -> P2PResult:
    """Edit k applies ``targets[k]`` to ``images[k]`` (caption ``sources[k]``), in chunks of
    at most ``max_batch`` edits, each chunk one ``p2p_edit`` program call. The last chunk
    is padded by repeating its last edit, so all chunks share one compiled program. An
    image edited with several targets appears once per target (and is inverted once per
    target). ``mesh``: as ``p2p_edit``."""
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
                       [targets[i] for i in pad], chunk, mesh=mesh)
        k = len(idx)
        parts.append(P2PResult(out.edited[:k], out.reconstruction[:k], out.mask[:k],
                               out.inner_steps[:, :k]))
    return P2PResult(*(np.concatenate([getattr(p, f) for p in parts],
                                      axis=1 if f == "inner_steps" else 0)
                       for f in P2PResult._fields))
