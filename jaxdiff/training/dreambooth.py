"""DreamBooth: fine-tune on a few subject images with a prior-preservation loss.

The loss of one step, as in diffusers' ``train_dreambooth.py`` (Ruiz et al. 2023):

    L = mean_i ||f(x_t^inst, t, c_inst) - target||^2
        + lambda * mean_j ||f(x_t^class, t, c_class) - target||^2

where the instance prompt carries a rare identifier ("a sks circle") and the class images
are the model's own generations of the class prompt ("a circle",
``class_images.class_images``). Instance and class rows go through the UNet as one batch.
``lambda`` (``prior_loss_weight``) is a traced per-row value of the batch, so changing it
never recompiles the step. The target is the scheduler's prediction type (epsilon or
v-prediction, ``losses.diffusion_target``).

What trains is its own pytree, merged functionally into the frozen params:
  * full fine-tuning: ``{"unet": ...}`` (plus ``"text_encoder"`` if trained);
  * ``lora_rank > 0``: only LoRA adapters (``adapters.lora.init_lora``) on the UNet
    attention projections (and the text encoder's, if trained), merged with scale
    alpha / rank.
The optimizer state therefore holds only what trains. VAE latents (posterior means) are
computed once; with a frozen text encoder so are the prompt embeddings.

The instance prompt is one prompt for every image, or per-image captions (one prompt per
instance image, "a sks circle on a white background" for the circle image, as kohya's and
EveryDream's caption files): each instance row of a batch carries its own image's prompt,
so the identifier need not also explain what differs between the images.

References:
  Ruiz et al., 2023, "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for
  Subject-Driven Generation".
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import parallel, schedules
from jaxdiff.adapters import lora as lora_lib
from jaxdiff.denoiser import denoise
from jaxdiff.pipeline import Pipeline
from jaxdiff.training import losses
from jaxdiff.training import state as state_lib
from jaxdiff.training.batching import host_slice, stream_indices
from jaxdiff.training.latents import encode_latents, mask_loss_weights
from jaxdiff.training.loop import train_loop
from jaxdiff.training.optim import constant_adamw
from jaxdiff.training.step import make_train_step


class Trainable(NamedTuple):
    """What trains and how it becomes full pipeline params again."""
    params: dict                       # the trainable pytree (optimizer state mirrors it)
    merge: Callable[[dict], dict]      # trainable -> full pipeline params
    lora_alpha: Optional[float]        # None in full fine-tuning


def make_trainable(params, *, train_text_encoder: bool = False, lora_rank: int = 0,
                   lora_alpha: Optional[float] = None, seed: int = 0) -> Trainable:
    """Splits pipeline params into a trainable pytree and a frozen rest.

    Args:
      params: pipeline params ``{"text_encoder", "unet", "vae"}``.
      train_text_encoder: also train the text encoder (or its LoRA adapters).
      lora_rank: 0 = full fine-tuning; r > 0 = rank-r LoRA adapters only.
      lora_alpha: LoRA alpha (default: the rank, i.e. scale 1).
    """
    if lora_rank < 0:
        raise ValueError(f"lora_rank must be >= 0 (0 = full fine-tuning), got {lora_rank}.")
    texts = [k for k in ("text_encoder", "text_encoder_2") if k in params]  # SDXL: both
    if lora_rank == 0:
        parts = ("unet", *texts) if train_text_encoder else ("unet",)
        return Trainable({k: params[k] for k in parts}, lambda tr: dict(params, **tr), None)
    key = jax.random.key(seed)
    adapters = lora_lib.init_lora(params, lora_rank, key=jax.random.fold_in(key, 0))
    for i, scope in enumerate(texts if train_text_encoder else ()):
        adapters.update(lora_lib.init_lora(params, lora_rank, key=jax.random.fold_in(key, 1 + i),
                                           scope=scope))
    alpha = float(lora_rank if lora_alpha is None else lora_alpha)
    scale = lora_lib.lora_scale(alpha, lora_rank)
    return Trainable(adapters, lambda tr: lora_lib.merge_lora(params, tr, scale), alpha)


def compute_pipe(pipe: Pipeline, dtype: str = "float32", remat: bool = False) -> Pipeline:
    """``pipe`` with its denoiser computing in ``dtype`` ("float32" | "bfloat16"; params,
    gradients and optimizer state stay float32) and, ``remat`` (U-Net only), its resnet
    and transformer blocks rematerialised in the backward pass (configs/dreambooth.py's
    memory plan)."""
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dreambooth: dtype={dtype!r} must be 'float32' or 'bfloat16' "
                         "(config.dtype).")
    if remat and pipe.is_transformer:
        raise ValueError("dreambooth: remat=True is U-Net only; use remat=False.")
    extra = {} if pipe.is_transformer else {"remat": remat}
    return dataclasses.replace(pipe, unet=pipe.unet.clone(dtype=jnp.dtype(dtype), **extra))


def make_dreambooth_loss(pipe: Pipeline, merge: Callable, *, train_text_encoder: bool,
                         prior_preservation: bool) -> Callable:
    """``loss(trainable, batch, rng) -> scalar`` (module docstring).

    ``batch`` holds ``instance_latents [B,h,w,C]`` and ``instance_text`` (token ids
    ``[B,L]`` if the text encoder trains, else cached embeddings ``[B,L,D]``; SDXL: ids
    ``[B,2,L]`` or the cached ``{"context", "text_embeds"}``, with time ids of the latents'
    image size added here); with prior preservation also ``class_latents``, ``class_text``
    and ``prior_weight [B]`` (lambda, the same value in every row; traced); with masks
    ``instance_weights [B,h,w,1]`` (each instance latent pixel's loss weight; class rows
    keep the plain loss).
    """
    sched = pipe.scheduler
    alphas = schedules.alphas_cumprod(sched)

    def loss(trainable, batch, rng):
        p = merge(trainable)
        x0, text = batch["instance_latents"], batch["instance_text"]
        if prior_preservation:
            x0 = jnp.concatenate([x0, batch["class_latents"]])
            text = jax.tree.map(lambda a, c: jnp.concatenate([a, c]), text, batch["class_text"])
        context = pipe.encode_text(p, text) if train_text_encoder else text
        f = pipe.vae_scale_factor
        context = pipe.add_time_ids(context, x0.shape[1] * f, x0.shape[2] * f)
        unet = lambda x, t, c: denoise(pipe, p["unet"], x, t, c)
        b = batch["instance_latents"].shape[0]
        weight = batch.get("instance_weights")
        if weight is not None and prior_preservation:  # class rows: the plain loss
            weight = jnp.concatenate([weight, jnp.ones((x0.shape[0] - b,) + weight.shape[1:],
                                                       weight.dtype)])
        per = losses.denoising_loss(unet, alphas, sched.prediction_type)(x0, context, rng,
                                                                           weight)
        out = jnp.mean(per[:b])
        if prior_preservation:
            out = out + jnp.mean(batch["prior_weight"] * per[b:])
        return out

    return loss


def encode_prompts(pipe: Pipeline, params, prompts: Sequence[str], train_text_encoder: bool):
    """Prompts -> what ``make_dreambooth_loss``'s batch carries per row: token ids ``[P, L]``
    if the text encoder trains, else the frozen encoder's embeddings (cached once, host
    arrays; SDXL: ids ``[P, 2, L]`` / ``{"context", "text_embeds"}``)."""
    ids = pipe.tokenize(list(prompts))
    if train_text_encoder:
        return ids
    return jax.tree.map(np.asarray, pipe.encode_text(params, ids))


def make_batch_fn(latents: dict, texts: dict, *, batch_size: int, seed: int,
                  prior_loss_weight: float = 1.0, paired: Sequence[str] = (),
                  weights: Optional[np.ndarray] = None, caption_dropout: float = 0.0,
                  uncond_text=None) -> Callable:
    """``batch_fn(step) -> batch`` of ``make_dreambooth_loss`` (this host's rows).

    Args:
      latents: ``{"instance": [N,h,w,C]}``, plus ``"class": [M,h,w,C]`` with prior
        preservation (then the batch holds ``prior_weight``).
      texts: the same keys, each ``encode_prompts`` of one prompt (every row gets it) or,
        for the keys in ``paired``, of one prompt per latent (row i captions latent i: each
        batch row gets its own latent's prompt).
      batch_size, seed: rows per key and step, drawn by ``stream_indices`` (seed + k for
        the k-th key).
      weights: [N,h,w,1] loss weights of the instance latents (masked loss): the batch
        holds ``instance_weights``, each row its latent's.
      caption_dropout, uncond_text: each instance row's prompt is replaced by ``uncond_text``
        (``encode_prompts`` of the empty prompt) with this probability (drawn per global
        row and step from ``seed``).
    """
    def batch_fn(s):
        out = {}
        for i, name in enumerate(latents):
            idx = stream_indices(len(latents[name]), batch_size, s, seed + i)
            drop = np.zeros(len(idx), bool)
            if name == "instance" and caption_dropout > 0:
                drop = np.random.default_rng((seed, s, 7)).random(len(idx)) < caption_dropout
            idx, drop = host_slice(idx), host_slice(drop)
            rows = idx if name in paired else np.zeros(len(idx), np.int64)
            out[f"{name}_latents"] = latents[name][idx]
            text = jax.tree.map(lambda v: v[rows], texts[name])
            if drop.any():  # those rows carry the empty prompt's ids / embeddings
                text = jax.tree.map(lambda v, u: np.where(
                    drop.reshape((-1,) + (1,) * (v.ndim - 1)), u[0], v), text, uncond_text)
            out[f"{name}_text"] = text
            if name == "instance" and weights is not None:
                out["instance_weights"] = weights[idx]
        if "class" in latents:
            out["prior_weight"] = np.full((len(idx),), prior_loss_weight, np.float32)
        return out

    return batch_fn


def train_dreambooth(pipe: Pipeline, params, instance_images, workdir: str, *,
                     instance_prompt: Union[str, Sequence[str]], steps: int,
                     batch_size: int, lr: float,
                     class_images=None, class_prompt: str = "",
                     prior_loss_weight: float = 1.0, train_text_encoder: bool = False,
                     lora_rank: int = 0, lora_alpha: Optional[float] = None, seed: int = 0,
                     warmup: int = 0, log_every: int = 10, ckpt_every: int = 100,
                     on_sample: Optional[Callable] = None, sample_every: int = 0,
                     dtype: str = "float32", remat: bool = False,
                     instance_masks: Optional[np.ndarray] = None, mask_weight: float = 0.0,
                     ema_decay: float = 0.0, caption_dropout: float = 0.0, mesh=None):
    """Runs DreamBooth (resuming from ``workdir``'s checkpoints).

    Args:
      pipe, params: the pipeline to personalise.
      instance_images: uint8 [N, H, W, 3] subject images (``data.image_folder``).
      instance_prompt: e.g. ``"a sks circle"`` for every image, or a sequence of N prompts,
        one per instance image in order (per-image captions, each batch row paired with
        its image's prompt).
      steps, batch_size, lr, warmup: optimisation (``batch_size`` instance rows, plus as
        many class rows with prior preservation; ``optim.constant_adamw``).
      class_images: uint8 [M, H, W, 3] or None (no prior preservation).
      class_prompt: the class prompt, e.g. ``"a circle"``.
      prior_loss_weight: lambda (traced; 0 makes the class rows irrelevant).
      train_text_encoder, lora_rank, lora_alpha: see ``make_trainable``.
      on_sample: ``on_sample(params, step)`` with full (merged) params, every
        ``sample_every`` steps.
      dtype, remat: the denoiser's compute dtype and block rematerialisation in the
        train step (``compute_pipe``).
      instance_masks, mask_weight: the subject's masks [N, H, W] (nonzero = subject) and
        ``w`` > 0: each instance latent pixel's squared error weighted by ``1 + w * (the
        share of it the mask covers)`` (``latents.mask_loss_weights``; class rows
        unweighted), the subject counting more than its background (kohya's masked loss,
        Break-A-Scene's softened). ``w = 0``: the plain loss.
      ema_decay: > 0 keeps an exponential moving average of the trained weights (LoRA
        factors, or the UNet / text encoder) with this decay; it is what is returned and
        what ``on_sample`` sees. 0: the last step's weights (diffusers' DreamBooth).
      caption_dropout: the share of instance rows trained under the empty prompt (the
        unconditional branch of classifier-free guidance) instead of their instance
        prompt (kohya's ``--caption_dropout_rate``); 0 (diffusers' DreamBooth): the
        unconditional branch never sees the subject. The empty prompt then draws the
        subject too (bench/README.md, off-palette colours).
      mesh: ``parallel.make_mesh(...)`` (default: all devices, data parallel; with
        ``fsdp > 1`` the train state is FSDP-sharded).
    Returns:
      ``(params, lora)``: the fine-tuned pipeline params (LoRA merged at scale 1) and the
      adapter pytree (None in full fine-tuning).
    """
    state_lib.check_ema_decay(ema_decay)
    if not 0.0 <= caption_dropout < 1.0:
        raise ValueError(f"caption_dropout={caption_dropout}: use a share in [0, 1).")
    if len(instance_images) < 1:
        raise ValueError("no instance images given.")
    paired = not isinstance(instance_prompt, str)
    if paired and len(instance_prompt) != len(instance_images):
        raise ValueError(f"instance_prompt: {len(instance_prompt)} prompts for "
                         f"{len(instance_images)} instance images; give one per image, or "
                         "one string for all.")
    weights = mask_loss_weights(instance_masks, mask_weight, instance_images,
                                pipe.vae_scale_factor)
    prior = class_images is not None
    if prior and not class_prompt:
        raise ValueError("prior preservation needs a class_prompt (e.g. 'a circle').")
    os.makedirs(workdir, exist_ok=True)
    trainable = make_trainable(params, train_text_encoder=train_text_encoder,
                               lora_rank=lora_rank, lora_alpha=lora_alpha, seed=seed)
    loss_fn = make_dreambooth_loss(compute_pipe(pipe, dtype, remat), trainable.merge,
                                   train_text_encoder=train_text_encoder,
                                   prior_preservation=prior)
    prompts = {"instance": list(instance_prompt) if paired else [instance_prompt]}
    if prior:
        prompts["class"] = [class_prompt]
    texts = {k: encode_prompts(pipe, params, v, train_text_encoder) for k, v in prompts.items()}
    latents = {"instance": encode_latents(pipe, params, instance_images)}
    if prior:
        latents["class"] = encode_latents(pipe, params, class_images)
    uncond = encode_prompts(pipe, params, [""], train_text_encoder) if caption_dropout else None
    batch_fn = make_batch_fn(latents, texts, batch_size=batch_size, seed=seed,
                             prior_loss_weight=prior_loss_weight,
                             paired=("instance",) if paired else (), weights=weights,
                             caption_dropout=caption_dropout, uncond_text=uncond)

    opt = constant_adamw(lr, warmup)
    state = state_lib.create(trainable.params, opt, seed, ema=ema_decay > 0)
    sample_cb = None
    if on_sample is not None:
        sample_cb = lambda st, s: on_sample(
            trainable.merge(state_lib.trained_weights(st)), s)
    state = train_loop(make_train_step(loss_fn, opt, ema_decay), state, batch_fn, steps,
                       workdir, log_every=log_every, ckpt_every=ckpt_every, desc="dreambooth",
                       on_sample=sample_cb, sample_every=sample_every, mesh=mesh)
    # the EMA when one is kept; gathered across hosts of an FSDP-sharded state too
    trained = parallel.gather(state_lib.trained_weights(state))
    lora = trained if lora_rank > 0 else None
    return trainable.merge(trained), lora
