"""Prompt-to-Prompt LocalBlend: keep the target branch equal to the source outside the
region the blend words attend to — as data inside the jitted edit loop.

Reference (google/prompt-to-prompt ``LocalBlend``): the conditional cross-attention maps
of the blend words (source words in the source prompt, target words in the target
prompt), stored before the edit, summed over all steps so far, averaged over heads and
the selected layers at 16x16 (SD at 512 px: latents 64x64, so latent/4; the mid block is
excluded), 3x3 max-pool, nearest up-sampling to the latent size, division by the
per-image maximum, ``> threshold`` (0.3); the target mask is the union of the source's
and the target's; from step ``int(0.2 * S)`` on, after every step
``x_tgt = x_src + mask * (x_tgt - x_src)``.

Capture without a mutable controller: the UNet is applied with flax's
``capture_intermediates`` for the ``to_q``/``to_k`` projections of every cross-attention
(``attn2``) at the chosen resolution, and the maps are ``softmax(q k^T / sqrt(d))``
recomputed from them — the unedited maps, as the reference stores them. No change to
the model code.

Resolution: ``blend_resolution`` takes latent/4 when that is >= 8 (16 for SD at 512 px,
as the reference) and otherwise the latent resolution itself — for the embedded model
(8x8 latents; its layers run at 8x8 and 4x4) that is 8x8, the three cross-attention
layers of ``down_blocks_0`` and ``up_blocks_1``: a 2x2 map would not localise anything.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.editing import alignment
from jaxdiff import denoiser


@flax.struct.dataclass
class LocalBlend:
    """LocalBlend data (a pytree; threshold and start are traced).

    Attributes:
      words: [2N, L] token weights: rows 0..N-1 select the blend words' tokens in the
        source prompts, rows N..2N-1 in the target prompts.
      threshold: mask threshold on the max-normalised map (0.3).
      start: first sampling step (0-based) whose result is blended (``int(0.2 * S)``).
      res: side of the attention maps used (static).
      pool: max-pool half-width (static; 1 = 3x3).
    """
    words: jax.Array
    threshold: jax.Array
    start: jax.Array
    res: int = flax.struct.field(pytree_node=False)
    pool: int = flax.struct.field(pytree_node=False, default=1)


def blend_resolution(latent_side: int) -> int:
    """Attention-map side used by LocalBlend for a given latent side (see module doc)."""
    return latent_side // 4 if latent_side // 4 >= 8 else latent_side


def _word_weights(tokenizer, prompt: str, words: Sequence[str], length: int) -> np.ndarray:
    w = np.zeros(length, np.float32)
    for word, pos in zip(prompt.split(), alignment.word_token_indices(tokenizer, prompt)):
        if word in words:
            w[[p for p in pos if p < length]] = 1.0
    return w


def make_local_blend(pipe, sources: Sequence[str], targets: Sequence[str], num_steps: int,
                     blend_words: Union[Sequence[str], Sequence[Sequence[str]]], *,
                     threshold: float = 0.3, start_fraction: float = 0.2,
                     res: Optional[int] = None) -> LocalBlend:
    """Builds LocalBlend data for N (source, target) pairs.

    Args:
      blend_words: words looked up in both prompts of every pair (e.g. ``["red", "blue"]``
        for "a red circle" -> "a blue circle"), or one such list per pair. A pair whose
        prompts contain none of its words is an error.
      threshold, start_fraction: reference values 0.3 and 0.2.
      res: attention-map side (default ``blend_resolution`` of the model's latents).
    """
    if pipe.is_transformer:
        raise ValueError("LocalBlend reads the U-Net's cross-attention maps per resolution; "
                         "this pipeline's denoiser is a text DiT: edit without blend words.")
    n, length = len(sources), pipe.max_length
    per_pair = (blend_words if blend_words and not isinstance(blend_words[0], str)
                else [blend_words] * n)
    if len(per_pair) != n:
        raise ValueError(f"{len(per_pair)} blend-word lists for {n} prompt pairs.")
    rows = [[], []]
    for s, t, words in zip(sources, targets, per_pair):
        ws, wt = (_word_weights(pipe.word_tokenizer, p, words, length) for p in (s, t))
        if not ws.any() and not wt.any():
            raise ValueError(f"blend words {list(words)} occur in neither {s!r} nor {t!r}; "
                             "give words of the prompts (whitespace-separated).")
        rows[0].append(ws)
        rows[1].append(wt)
    side = res or blend_resolution(pipe.unet.config.sample_size)
    return LocalBlend(words=jnp.asarray(np.stack(rows[0] + rows[1])),
                      threshold=jnp.float32(threshold),
                      start=jnp.int32(int(start_fraction * num_steps)), res=side)


def capturing_denoiser(pipe, unet_params, res: int) -> Callable:
    """``(x, t, context, control, **unet_kwargs) -> (model output, maps [B, res, res, L])``
    of the pipeline's UNet (``context``: as ``denoiser.denoise`` takes it, SDXL's pytree
    too; ``unet_kwargs``: e.g. ControlNet residuals, passed on to it).

    ``maps`` are the cross-attention probabilities averaged over heads and over every
    ``attn2`` layer (mid block excluded) whose query grid is ``res x res``.
    """
    heads = {s["name"]: s["heads"] for s in pipe.unet.plan()}

    def want(mdl, method):
        return (method == "__call__" and mdl.name in ("to_q", "to_k")
                and getattr(mdl.parent, "name", None) == "attn2")

    def denoise(x, t, context, control=None, **unet_kwargs):
        out, state = denoiser.denoise(pipe, unet_params, x, t, context, control=control,
                                      capture_intermediates=want, mutable=["intermediates"],
                                      **unet_kwargs)
        maps = []
        for stage, blocks in state["intermediates"].items():
            if stage == "mid_block":
                continue
            for attn in blocks.values():
                for block in attn.values():
                    q = block["attn2"]["to_q"]["__call__"][0]
                    k = block["attn2"]["to_k"]["__call__"][0]
                    if q.shape[1] != res * res:
                        continue
                    maps.append(_head_mean_probs(q, k, heads[stage]))
        if not maps:
            raise ValueError(f"LocalBlend: the UNet has no cross-attention at {res}x{res}; "
                             "choose another resolution.")
        lk = (context["context"] if isinstance(context, dict) else context).shape[1]
        b = x.shape[0]
        return out, jnp.mean(jnp.stack(maps), axis=0).reshape(b, res, res, lk)

    return denoise


def _head_mean_probs(q, k, heads: int):
    """q [B, Lq, D], k [B, Lk, D] -> softmax(q k^T / sqrt(D/heads)) mean over heads."""
    b, lq, d = q.shape
    qh = q.reshape(b, lq, heads, d // heads).astype(jnp.float32)
    kh = k.reshape(b, k.shape[1], heads, d // heads).astype(jnp.float32)
    scores = jnp.einsum("bqnh,bknh->bnqk", qh, kh) * (d // heads) ** -0.5
    return jnp.mean(jax.nn.softmax(scores, axis=-1), axis=1)


def word_maps(blend: LocalBlend, cond_maps):
    """cond_maps [2N, res, res, L] (source rows, then target rows) -> [2N, res, res]."""
    return jnp.einsum("bhwl,bl->bhw", cond_maps, blend.words)


def blend_mask(blend: LocalBlend, summed, latent_hw) -> jax.Array:
    """summed [2N, res, res] word maps -> target masks [N, h, w, 1] (float 0/1)."""
    k = blend.pool
    pooled = jax.lax.reduce_window(summed, -jnp.inf, jax.lax.max, (1, 2 * k + 1, 2 * k + 1),
                                   (1, 1, 1), [(0, 0), (k, k), (k, k)])
    h, w = latent_hw
    rows = (np.arange(h) * blend.res) // h  # nearest, as torch's interpolate
    cols = (np.arange(w) * blend.res) // w
    up = pooled[:, rows][:, :, cols]
    up = up / jnp.maximum(jnp.max(up, axis=(1, 2), keepdims=True), 1e-20)
    m = up > blend.threshold
    n = m.shape[0] // 2
    return (m[:n] | m[n:]).astype(jnp.float32)[..., None]


def apply_blend(blend: LocalBlend, step, x_src, x_tgt, summed):
    """After sampling step ``step``: ``x_src + mask * (x_tgt - x_src)`` from ``blend.start``
    on (``x_tgt`` unchanged before). Returns (new x_tgt, mask [N, h, w, 1])."""
    mask = blend_mask(blend, summed, x_src.shape[1:3])
    blended = x_src + mask * (x_tgt - x_src)
    return jnp.where(step >= blend.start, blended, x_tgt), mask
