"""Textual Inversion training: learn the embedding rows of new placeholder token(s).

Builds on ``jaxdiff.adapters.textual_inversion`` (tokens, separate ``new_rows [n, D]``
pytree, file format): the train state is created from ``new_rows`` alone, so parameters,
gradients and the optimizer state are ``[n, D]`` and every other weight is frozen by
construction.
Each step draws instance latents (VAE posterior means, cached once) and, per row, one
prompt template (``"a {}"`` -> ``"a <new-shape>"``, multi-vector placeholders expanded),
as diffusers' ``textual_inversion.py`` does with its "a photo of a {}" templates.

References:
  Gal et al., 2022, "An Image is Worth One Word: Personalizing Text-to-Image Generation
  using Textual Inversion".
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, NamedTuple, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from jaxdiff import parallel, schedules
from jaxdiff.adapters import textual_inversion as ti
from jaxdiff.pipeline import Pipeline
from jaxdiff.training import losses
from jaxdiff.training import state as state_lib
from jaxdiff.training.batching import host_slice, stream_indices
from jaxdiff.training.latents import encode_latents
from jaxdiff.training.loop import train_loop
from jaxdiff.training.optim import constant_adamw
from jaxdiff.training.sample_grids import sample_grid_callback
from jaxdiff.training.step import make_train_step


class TIResult(NamedTuple):
    placeholder: str
    rows: np.ndarray          # [n, D] learned embeddings
    pipe: Pipeline            # pipeline whose tokenizer and table include the new tokens
    params: dict              # its params (table [V + n, D])


def template_prompts(templates: Sequence[str], placeholder: str, num_vectors: int) -> list:
    """Templates with ``{}`` -> the placeholder expanded to all its tokens."""
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"templates must be non-empty and each contain '{{}}', got "
                         f"{list(templates)!r}.")
    return [ti.expand_prompt(t.format(placeholder), placeholder, num_vectors)
            for t in templates]


def make_ti_loss(pipe, frozen_params, vocab_size: Optional[int] = None) -> Callable:
    """Denoising loss as a function of the new rows only.

    Args:
      pipe: ``jaxdiff.Pipeline``.
      frozen_params: pipeline params (text encoder, UNet) held fixed.
      vocab_size: V of the frozen table (default: its row count).
    Returns:
      ``loss(new_rows, batch, rng) -> scalar``, with ``batch = (latents [B,h,w,C],
      ids [B,L])`` (scaled latents, ids from the tokenizer returned by ``ti.add_tokens``).
      Use with ``make_train_step`` on a state created from ``new_rows``.
    """
    sched = pipe.scheduler
    alphas = schedules.alphas_cumprod(sched)
    unet = lambda x, t, c: pipe.unet.apply({"params": frozen_params["unet"]}, x, t, c)
    denoise_loss = losses.denoising_loss(unet, alphas, sched.prediction_type)

    def loss(new_rows, batch, rng):
        latents, ids = batch
        context = ti.encode_text(pipe, frozen_params, new_rows, ids, vocab_size)
        return jnp.mean(denoise_loss(latents, context, rng))

    return loss


def train_textual_inversion(pipe: Pipeline, params, instance_images, workdir: str, *,
                            placeholder: str, initializer_token: str, num_vectors: int = 1,
                            templates: Sequence[str] = ("a {}",), steps: int, batch_size: int,
                            lr: float, warmup: int = 0, seed: int = 0, log_every: int = 10,
                            ckpt_every: int = 100, sample_folder: Optional[str] = None,
                            sample_every: int = 0, mesh=None) -> TIResult:
    """Learns ``num_vectors`` rows for ``placeholder`` (resuming from ``workdir``).

    Args:
      pipe, params: the frozen pipeline.
      instance_images: uint8 [N, H, W, 3] images of the concept.
      placeholder: new token, e.g. ``"<new-shape>"`` (must not exist in the vocabulary).
      initializer_token: existing single-token word the rows start from (e.g. ``"circle"``).
      templates: prompt templates with ``{}`` for the placeholder.
      steps, batch_size, lr, warmup: optimisation (``optim.constant_adamw``).
      sample_folder, sample_every: write a grid of template generations every N steps.
    Returns:
      ``TIResult`` with the learned rows and a pipeline that knows the new tokens.
    """
    if pipe.is_sdxl:
        raise ValueError("Textual Inversion training supports SD 1.x / 2.x pipelines; SDXL "
                         "embeddings (clip_l / clip_g files) can be loaded, not trained yet.")
    tok = ti.add_tokens(pipe.tokenizer, placeholder, num_vectors)
    vocab = len(pipe.tokenizer)
    rows0 = ti.init_embeddings(params, pipe.tokenizer, initializer_token, num_vectors)
    prompts = template_prompts(templates, placeholder, num_vectors)
    ids = dataclasses.replace(pipe, tokenizer=tok).tokenize(prompts)
    latents = encode_latents(pipe, params, instance_images)
    os.makedirs(workdir, exist_ok=True)

    def batch_fn(s):
        idx = host_slice(stream_indices(len(latents), batch_size, s, seed))
        which = host_slice(stream_indices(len(ids), batch_size, s, seed + 1))
        return latents[idx], ids[which]

    sample_pipe, _ = ti.merge_embeddings(pipe, params, tok, rows0)
    on_sample = None
    if sample_folder and sample_every:
        grid = sample_grid_callback(sample_pipe, prompts, sample_folder)
        on_sample = lambda st, s: grid(ti.merge_embeddings(pipe, params, tok, st.params)[1], s)
    opt = constant_adamw(lr, warmup)
    state = state_lib.create(rows0, opt, seed, ema=False)
    state = train_loop(make_train_step(make_ti_loss(pipe, params, vocab), opt), state,
                       batch_fn, steps, workdir, log_every=log_every, ckpt_every=ckpt_every,
                       desc="textual_inversion", on_sample=on_sample,
                       sample_every=sample_every, mesh=mesh)
    rows = np.asarray(parallel.gather(state.params))
    _, merged = ti.merge_embeddings(pipe, params, tok, rows)
    return TIResult(placeholder, rows, sample_pipe, merged)


def save(result: TIResult, path: str) -> str:
    """Writes ``learned_embeds.safetensors`` (``path``: a directory or a file name)."""
    return ti.save_learned_embeds(path, result.placeholder, result.rows)
