"""Prompt-to-Prompt (Hertz et al. 2022) as attention-controller *data*, inside one scan.

The edit runs N source/target pairs at once. The UNet batch of every step is
``[uncond_src (N), uncond_tgt (N), cond_src (N), cond_tgt (N)]``; the controller edits
only the conditional target maps, from the conditional source maps, as the reference
does. Everything that varies per edit (mappers, per-step word alphas, reweighting,
self-attention window) is an array, so one compiled program serves every edit of a
given shape.

References: Hertz et al., "Prompt-to-Prompt Image Editing with Cross Attention Control",
2022 (google/prompt-to-prompt ``ptp_utils.py``, ``seq_aligner.py``).
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.editing import alignment, local_blend
from jaxdiff.guidance import guide
from jaxdiff.samplers.base import x0_eps_vp
from jaxdiff.samplers.ddim import ddim_update


@flax.struct.dataclass
class P2PControl:
    """Controller data (a pytree). ``edit`` is called by every UNet attention layer.

    Attributes:
      step: current sampling step (traced int32, set by the loop).
      cross_mapper: [N, L, L] source->target token map (identity for reweight-only).
      cross_alpha: [S, N, L] per-step, per-target-token weight of the injected map.
      equalizer: [N, L] multiplies the injected cross-attention columns (reweight).
      refine_index: [N, L] int32 source position per target token (refine mode).
      refine_alpha: [N, L] 1 where a target token is aligned to a source token.
      self_steps: number of initial steps whose self-attention maps are injected.
      num_pairs: N (static).
      refine: refine mode instead of replace (static).
      self_max_tokens: self-attention is injected only in layers with <= this many
        query tokens (static; 32*32 in the reference notebook).
    """
    step: jax.Array
    cross_mapper: jax.Array
    cross_alpha: jax.Array
    equalizer: jax.Array
    refine_index: jax.Array
    refine_alpha: jax.Array
    self_steps: jax.Array
    num_pairs: int = flax.struct.field(pytree_node=False)
    refine: bool = flax.struct.field(pytree_node=False, default=False)
    self_max_tokens: int = flax.struct.field(pytree_node=False, default=32 * 32)

    def edit(self, probs, *, layer: int, cross: bool):
        del layer
        n = self.num_pairs
        src, tgt = probs[2 * n:3 * n], probs[3 * n:]
        if cross:
            if self.refine:
                idx = jnp.broadcast_to(self.refine_index[:, None, None, :], src.shape)
                a = self.refine_alpha[:, None, None, :]
                mapped = jnp.take_along_axis(src, idx, axis=-1) * a + tgt * (1 - a)
            else:
                mapped = jnp.einsum("nhqw,nwk->nhqk", src, self.cross_mapper)
            mapped = mapped * self.equalizer[:, None, None, :]
            alpha = self.cross_alpha[self.step][:, None, None, :]
            new = mapped * alpha + tgt * (1 - alpha)
        else:
            if probs.shape[-2] > self.self_max_tokens:
                return probs
            new = jnp.where(self.step < self.self_steps, src, tgt)
        return probs.at[3 * n:].set(new.astype(probs.dtype))


def word_alphas(tokenizer, target: str, num_steps: int, length: int,
                cross_replace_steps) -> np.ndarray:
    """[S, L] cross-attention injection weights, as prompt-to-prompt's
    ``get_time_words_attention_alpha``.

    Args:
      cross_replace_steps: a fraction f, a ``(start, end)`` pair of fractions, or a dict of
        them with ``"default_"`` (all tokens; default ``(0, 1)``) and per-target-word
        entries. As in the reference the fractions are of ``S + 1`` rows: a word's map is
        injected at steps ``int(start * (S + 1)) <= step < int(end * (S + 1))``.
    """
    steps = dict(cross_replace_steps) if isinstance(cross_replace_steps, dict) else {
        "default_": cross_replace_steps}
    steps.setdefault("default_", (0.0, 1.0))
    alpha = np.zeros((num_steps + 1, length), np.float32)

    def put(bounds, cols):
        start, end = (0.0, bounds) if np.ndim(bounds) == 0 else bounds
        alpha[:, cols] = 0.0
        alpha[int(start * (num_steps + 1)):int(end * (num_steps + 1)), cols] = 1.0

    put(steps["default_"], slice(None))
    positions = alignment.word_token_indices(tokenizer, target)
    for word, bounds in steps.items():
        if word != "default_":
            for w, pos in zip(target.split(), positions):
                if w == word:
                    put(bounds, [p for p in pos if p < length])
    return alpha[:num_steps]


def make_control(pipe, sources: Sequence[str], targets: Sequence[str], num_steps: int, *,
                 mode: str = "replace", cross_replace_steps=0.8, self_replace_steps=0.4,
                 reweight: Optional[Dict[str, float]] = None,
                 self_max_tokens: int = 32 * 32) -> P2PControl:
    """Builds the controller for N (source, target) prompt pairs.

    Args:
      mode: "replace" (word swap, same word count), "refine" (added words, aligned by
        Needleman-Wunsch) or "reweight" (same prompt, scaled attention on some words).
      cross_replace_steps: fraction of steps with injected cross-attention (of S + 1, as
        the reference), a ``(start, end)`` pair, or a dict ``{"default_": f, word: f}``
        per target word (``word_alphas``).
      self_replace_steps: fraction of steps with injected self-attention.
      reweight: ``{word: factor}`` applied to the target's attention on those words.
    """
    if mode not in ("replace", "refine", "reweight"):
        raise ValueError(f"unknown P2P mode {mode!r}; use replace, refine or reweight.")
    tok, length = pipe.word_tokenizer, pipe.max_length
    n = len(sources)
    if len(targets) != n:
        raise ValueError(f"{n} source prompts but {len(targets)} target prompts.")
    mappers, ridx, ralpha, alphas, eq = [], [], [], [], []
    for s, t in zip(sources, targets):
        if mode == "replace":
            mappers.append(alignment.replacement_mapper(tok, s, t, length))
        else:
            mappers.append(np.eye(length, dtype=np.float32))
        m, a = alignment.refinement_mapper(tok, s, t, length)
        ridx.append(m)
        ralpha.append(a)
        alphas.append(word_alphas(tok, t, num_steps, length, cross_replace_steps))
        e = np.ones(length, np.float32)
        for word, factor in (reweight or {}).items():
            for w, pos in zip(t.split(), alignment.word_token_indices(tok, t)):
                if w == word:
                    e[pos] = factor
        eq.append(e)
    return P2PControl(
        step=jnp.int32(0), cross_mapper=jnp.asarray(np.stack(mappers)),
        cross_alpha=jnp.asarray(np.stack(alphas, axis=1)), equalizer=jnp.asarray(np.stack(eq)),
        refine_index=jnp.asarray(np.stack(ridx)), refine_alpha=jnp.asarray(np.stack(ralpha)),
        self_steps=jnp.int32(int(self_replace_steps * num_steps)), num_pairs=n,
        refine=mode == "refine", self_max_tokens=self_max_tokens)


class P2POutput(NamedTuple):
    """Final latents of both branches, [N, h, w, C] each, and the LocalBlend mask
    [N, h, w, 1] of the last step (all ones without LocalBlend)."""
    source: jax.Array
    target: jax.Array
    mask: jax.Array


def edit_loop(denoise: Callable, tables, z_T, cond_src, cond_tgt, nulls, guidance,
              control: P2PControl, prediction_type: str, src_offsets=None, z_T_target=None,
              blend: Optional[local_blend.LocalBlend] = None) -> P2POutput:
    """Samples source and target branches together under P2P control.

    Args:
      denoise: ``(x, t, context, control) -> model output``; with ``blend`` it must also
        return the cross-attention maps: ``-> (output, maps [B, res, res, L])``
        (``local_blend.capturing_denoiser``).
      z_T: [N, h, w, C] inverted (or random) start latents, shared by both branches
        unless ``z_T_target`` is given.
      cond_src, cond_tgt: [N, L, D]; nulls: [S, N, L, D] per-step unconditional
        embeddings (null-text, negative-prompt or plain empty-prompt); or pytrees of them
        (SDXL's conditions, ``Pipeline.condition``), concatenated leaf by leaf.
      src_offsets: [S, N, h, w, C] direct-inversion offsets for the source branch.
      blend: LocalBlend data; after each step from ``blend.start`` on, the target
        latents outside the blend words' mask are set to the source latents.
    Returns:
      P2POutput(source, target, mask).
    """
    to_x0_eps = x0_eps_vp(prediction_type)
    n = z_T.shape[0]
    x0 = jnp.concatenate([z_T, z_T if z_T_target is None else z_T_target])
    cat = lambda *trees: jax.tree.map(lambda *a: jnp.concatenate(a), *trees)
    cond = cat(cond_src, cond_tgt)
    mask0 = jnp.ones(z_T.shape[:3] + (1,), z_T.dtype)
    acc0 = jnp.zeros((2 * n, blend.res, blend.res) if blend is not None else (0,), z_T.dtype)

    def body(carry, i):
        x, acc, mask = carry
        null = jax.tree.map(lambda a: jnp.concatenate([a[i], a[i]]), nulls)
        ctrl = control.replace(step=i)
        out = denoise(jnp.concatenate([x, x]), tables.timesteps[i], cat(null, cond), ctrl)
        if blend is not None:
            out, maps = out
            acc = acc + local_blend.word_maps(blend, maps[2 * n:])
        guided = guide(out, guidance)
        x, _ = ddim_update(guided, x, tables.alpha[i], tables.alpha_prev[i],
                           to_x0_eps=to_x0_eps)
        if src_offsets is not None:
            x = x.at[:n].add(src_offsets[i])
        if blend is not None:
            tgt, mask = local_blend.apply_blend(blend, i, x[:n], x[n:], acc)
            x = jnp.concatenate([x[:n], tgt])
        return (x, acc, mask), None

    (x, _, mask), _ = jax.lax.scan(body, (x0, acc0, mask0), jnp.arange(tables.timesteps.shape[0]))
    return P2POutput(x[:n], x[n:], mask)
