"""Textual Inversion training: learn the embedding rows of new placeholder token(s).

Builds on ``jaxdiff.adapters.textual_inversion`` (tokens, separate ``new_rows [n, D]``
pytree, file format): the train state is created from ``new_rows`` alone, so parameters,
gradients and the optimizer state are ``[n, D]`` and every other weight is frozen by
construction.
Each step draws instance latents (VAE posterior means, cached once) and, per row, one
prompt template (``"a {}"`` -> ``"a <new-shape>"``, multi-vector placeholders expanded),
as diffusers' ``textual_inversion.py`` does with its "a photo of a {}" templates.
Instead of templates drawn independently of the image, ``captions`` gives one template per
image (``"a {} circle on a white background"`` for the circle image), paired with its image
in every row: the new token then carries only what the images share, not also what the
caption could say (kohya's and EveryDream's per-image caption files).
On SDXL the rows are ``{encoder name: [n, D_e]}``, one table per text encoder (both
tokenizers get the placeholder, as diffusers' ``textual_inversion_sdxl.py``), the UNet gets
time ids of the instance images' size, and ``save`` writes a ``clip_l`` / ``clip_g`` file.

References:
  Gal et al., 2022, "An Image is Worth One Word: Personalizing Text-to-Image Generation
  using Textual Inversion".
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import parallel, schedules
from jaxdiff.adapters import textual_inversion as ti
from jaxdiff.denoiser import denoise
from jaxdiff.pipeline import Pipeline
from jaxdiff.training import losses
from jaxdiff.training import state as state_lib
from jaxdiff.training.batching import host_slice, stream_indices
from jaxdiff.training.latents import encode_latents, mask_loss_weights
from jaxdiff.training.loop import train_loop
from jaxdiff.training.optim import constant_adamw
from jaxdiff.training.sample_grids import sample_grid_callback
from jaxdiff.training.step import make_train_step


class TIResult(NamedTuple):
    placeholder: str
    rows: np.ndarray          # [n, D] learned embeddings (SDXL: {encoder name: [n, D_e]})
    pipe: Pipeline            # pipeline whose tokenizer and table include the new tokens
    params: dict              # its params (table [V + n, D])


def template_prompts(templates: Sequence[str], placeholder: str, num_vectors: int,
                     what: str = "templates") -> list:
    """Templates with ``{}`` -> the placeholder expanded to all its tokens (``what``: the
    argument's name in the error)."""
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"{what} must be non-empty and each contain '{{}}', got "
                         f"{list(templates)!r}.")
    return [ti.expand_prompt(t.format(placeholder), placeholder, num_vectors)
            for t in templates]


def make_batch_fn(latents: np.ndarray, ids: np.ndarray, *, batch_size: int, seed: int,
                  paired: bool = False, weights: Optional[np.ndarray] = None) -> Callable:
    """``batch_fn(step) -> (latents [B,h,w,C], ids [B,L])`` (this host's rows) of
    ``make_ti_loss``. ``ids``: one row per template (each batch row draws one, independently
    of its latent) or, ``paired``, one row per latent (row i captions latent i: each batch
    row gets its own latent's caption). ``weights`` [N,h,w,1] (one per latent): the batch
    is ``(latents, ids, weights)``, each row its latent's loss weights."""
    def batch_fn(s):
        idx = host_slice(stream_indices(len(latents), batch_size, s, seed))
        which = idx if paired else host_slice(stream_indices(len(ids), batch_size, s, seed + 1))
        if weights is None:
            return latents[idx], ids[which]
        return latents[idx], ids[which], weights[idx]

    return batch_fn


def make_ti_loss(pipe, frozen_params, vocab_size: Optional[int] = None,
                 train_guidance: float = 1.0, uncond_ids=None) -> Callable:
    """Denoising loss as a function of the new rows only.

    Args:
      pipe: ``jaxdiff.Pipeline``.
      frozen_params: pipeline params (text encoder, UNet) held fixed.
      vocab_size: V of the frozen table (default: its row count); SDXL: ``{encoder
        name: V_e}``.
      train_guidance, uncond_ids: 1 (the paper's loss) regresses the conditional
        prediction ``c`` on the target; ``g != 1`` regresses the classifier-free-guided
        prediction ``u + g (c - u)`` instead, ``u`` the frozen model's prediction for the
        unconditional ids ``uncond_ids`` [1, L] (SDXL [1, E, L]; the tokenized ``""``),
        held constant: the rows are fitted to what sampling at guidance ``g`` draws (the
        conditional branch's target becomes ``u + (target - u) / g``).
    Returns:
      ``loss(new_rows, batch, rng) -> scalar``, with ``batch = (latents [B,h,w,C],
      ids [B,L])`` (scaled latents, ids from the tokenizer returned by ``ti.add_tokens``;
      SDXL: ids [B,E,L], time ids of the latents' image size), or ``(latents, ids,
      weights [B,h,w,1])``: each latent pixel's squared error weighted (``instance_masks``).
      Use with ``make_train_step`` on a state created from ``new_rows``.
    """
    sched = pipe.scheduler
    alphas = schedules.alphas_cumprod(sched)
    unet = lambda x, t, c: denoise(pipe, frozen_params["unet"], x, t, c)
    guided = train_guidance != 1.0
    if guided and (uncond_ids is None or not train_guidance > 0):
        raise ValueError(f"make_ti_loss: {train_guidance=} needs uncond_ids (the tokenized "
                         "empty prompt) and a value > 0 (1: the plain loss).")

    def guided_unet(x, t, contexts):
        cond, uncond = contexts
        u = jax.lax.stop_gradient(unet(x, t, uncond))
        return u + train_guidance * (unet(x, t, cond) - u)

    denoise_loss = losses.denoising_loss(guided_unet if guided else unet, alphas,
                                         sched.prediction_type)
    f = pipe.vae_scale_factor

    def loss(new_rows, batch, rng):
        latents, ids, *weights = batch
        encode = lambda i: pipe.add_time_ids(
            ti.encode_text(pipe, frozen_params, new_rows, i, vocab_size),
            latents.shape[1] * f, latents.shape[2] * f)
        context = encode(ids)
        if guided:
            u_ids = jnp.broadcast_to(uncond_ids, (latents.shape[0],) + uncond_ids.shape[1:])
            context = (context, encode(u_ids))
        return jnp.mean(denoise_loss(latents, context, rng, *weights))

    return loss


def train_textual_inversion(pipe: Pipeline, params, instance_images, workdir: str, *,
                            placeholder: str, initializer_token: str, num_vectors: int = 1,
                            templates: Optional[Sequence[str]] = None,
                            captions: Optional[Sequence[str]] = None,
                            instance_masks: Optional[np.ndarray] = None,
                            mask_weight: float = 0.0, steps: int, batch_size: int,
                            lr: float, warmup: int = 0, seed: int = 0, log_every: int = 10,
                            ckpt_every: int = 100, sample_folder: Optional[str] = None,
                            sample_every: int = 0, ema_decay: float = 0.0,
                            train_guidance: float = 1.0, mesh=None) -> TIResult:
    """Learns ``num_vectors`` rows for ``placeholder`` (resuming from ``workdir``).

    Args:
      pipe, params: the frozen pipeline.
      instance_images: uint8 [N, H, W, 3] images of the concept.
      placeholder: new token, e.g. ``"<new-shape>"`` (must not exist in the vocabulary).
      initializer_token: existing single-token word the rows start from (e.g. ``"circle"``).
      templates: prompt templates with ``{}`` for the placeholder, each row drawing one
        (default ``("a {}",)``).
      captions: instead of ``templates`` (not both): one template per instance image, in
        order, each row paired with its image's (per-image captions).
      instance_masks, mask_weight: masks [N, H, W] of the concept in each instance image
        (nonzero = concept) and a weight ``w`` > 0: each latent pixel's squared error is
        weighted by ``1 + w * (the share of it the mask covers)`` (normalised per image), so
        the concept's pixels count more than the background (a softened form of
        Break-A-Scene's masked diffusion loss, Avrahami et al. 2023). ``w = 0``: the plain
        loss (masks, if given, unused).
      steps, batch_size, lr, warmup: optimisation (``optim.constant_adamw``).
      sample_folder, sample_every: write a grid of the templates' (captions') generations
        every N steps.
      ema_decay: > 0 keeps an exponential moving average of the rows with this decay; it is
        what is returned and sampled. 0: the last step's rows (diffusers' script).
      train_guidance: 1 (the default, the paper's loss) fits the conditional prediction;
        ``g`` > 1 fits the prediction guided at ``g`` against the empty prompt
        (``make_ti_loss``). On the shapes model fine-tuned with colour mixup
        (``bench/colour_mixup.py``), ``g`` 1.5-2 keeps a taught in-between colour at
        sampling guidance 5 (bench/README.md, issue #22 point 4).
    Returns:
      ``TIResult`` with the learned rows and a pipeline that knows the new tokens.
    """
    state_lib.check_ema_decay(ema_decay)
    if captions is not None:
        if templates is not None:
            raise ValueError("give templates (drawn per row) or captions (one per image), "
                             "not both.")
        if isinstance(captions, str) or len(captions) != len(instance_images):
            got = "a string" if isinstance(captions, str) else f"{len(captions)} captions"
            raise ValueError(f"captions: {got} for {len(instance_images)} instance images; "
                             "give a sequence of one template per image.")
    weights = mask_loss_weights(instance_masks, mask_weight, instance_images,
                                pipe.vae_scale_factor)
    fields = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
    names = pipe.encoder_names
    toks = {n: ti.add_tokens(getattr(pipe, fields[n]), placeholder, num_vectors) for n in names}
    vocab = {n: len(getattr(pipe, fields[n])) for n in names}
    rows0 = {n: ti.init_embeddings(params, getattr(pipe, fields[n]), initializer_token,
                                   num_vectors, scope=n) for n in names}
    if not pipe.is_sdxl:  # SD 1.x / 2.x: one table, the rows are an array
        toks, vocab, rows0 = toks["text_encoder"], vocab["text_encoder"], rows0["text_encoder"]
    if captions is not None:
        prompts = template_prompts(captions, placeholder, num_vectors, what="captions")
    else:
        prompts = template_prompts(("a {}",) if templates is None else templates, placeholder,
                                   num_vectors)
    ids = _with_tokenizers(pipe, toks).tokenize(prompts)
    latents = encode_latents(pipe, params, instance_images)
    os.makedirs(workdir, exist_ok=True)
    batch_fn = make_batch_fn(latents, ids, batch_size=batch_size, seed=seed,
                             paired=captions is not None, weights=weights)

    sample_pipe, _ = merge_rows(pipe, params, toks, rows0)
    on_sample = None
    if sample_folder and sample_every:
        grid = sample_grid_callback(sample_pipe, prompts, sample_folder)
        on_sample = lambda st, s: grid(
            merge_rows(pipe, params, toks, state_lib.trained_weights(st))[1], s)
    opt = constant_adamw(lr, warmup)
    state = state_lib.create(rows0, opt, seed, ema=ema_decay > 0)
    uncond_ids = (_with_tokenizers(pipe, toks).tokenize([""]) if train_guidance != 1.0
                  else None)
    step_fn = make_train_step(make_ti_loss(pipe, params, vocab, train_guidance, uncond_ids),
                              opt, ema_decay)
    state = train_loop(step_fn, state, batch_fn, steps, workdir, log_every=log_every,
                       ckpt_every=ckpt_every, desc="textual_inversion", on_sample=on_sample,
                       sample_every=sample_every, mesh=mesh)
    rows = jax.tree.map(np.asarray, parallel.gather(state_lib.trained_weights(state)))
    _, merged = merge_rows(pipe, params, toks, rows)
    return TIResult(placeholder, rows, sample_pipe, merged)


def _with_tokenizers(pipe, toks):
    if not pipe.is_sdxl:
        return dataclasses.replace(pipe, tokenizer=toks)
    fields = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
    return dataclasses.replace(pipe, **{fields[n]: t for n, t in toks.items()})


def merge_rows(pipe, params, toks, rows):
    """``ti.merge_embeddings`` for every text encoder (``toks`` / ``rows``: one tokenizer
    and [n, D] array, or SDXL's ``{encoder name: ...}``): (pipe, params) knowing the tokens."""
    if not pipe.is_sdxl:
        return ti.merge_embeddings(pipe, params, toks, rows)
    for name in pipe.encoder_names:
        pipe, params = ti.merge_embeddings(pipe, params, toks[name], rows[name], scope=name)
    return pipe, params


def save(result: TIResult, path: str) -> str:
    """Writes ``learned_embeds.safetensors`` (``path``: a directory or a file name); SDXL:
    ``<path>/<placeholder>.safetensors`` with ``clip_l`` / ``clip_g`` (the file name is the
    placeholder when it is loaded back, ``adapters.textual_inversion.load_embeddings``)."""
    if isinstance(result.rows, dict):
        return ti.save_sdxl_embeds(path, result.placeholder, result.rows)
    return ti.save_learned_embeds(path, result.placeholder, result.rows)
