"""Training an InstructPix2Pix model (Brooks et al. 2023) from a text-to-image pipeline.

* ``widen_unet``: the base UNet with ``conv_in`` taking 4 more input channels (the source
  image's latents), their kernel slices zero, so the widened model computes exactly the
  base model's output before training, whatever the image channels hold (a PixArt text
  DiT: its patch embedding, the same way). The loss and the P2P pair sampler call the
  denoiser through ``denoiser.denoise``, so either backbone trains.
* ``make_instruct_loss``: the denoising loss on the edited image's latents with the
  source image's latents concatenated to the noisy input (``[x_t, image]`` on the
  channel axis, as diffusers' pipeline and training script), and the paper's condition
  dropout (``condition_dropout``): 5 % of examples lose the instruction only, 5 % both,
  5 % the image only (the image latents become zeros, the instruction the empty
  prompt), so that both classifier-free guidances can be sampled.
* The image condition is the VAE posterior mean *unscaled* (diffusers'
  ``StableDiffusionInstructPix2PixPipeline.prepare_image_latents`` and its training
  script use ``latent_dist.mode()`` without the scaling factor); the edited image's
  latents are scaled as in text-to-image training.
* ``instruct_optimizer``: AdamW whose ``conv_in`` / ``pos_embed`` (the only weights reading
  the image, zero at the start) may step faster (``input_lr_multiplier``); with Min-SNR
  weighting (``snr_gamma``) this is what makes the embedded model learn to keep its input.
* Pairs come from the world's exact renderer (``jaxdiff.data.instructions``), from the
  embedded model with Prompt-to-Prompt filtered by the evaluator, or both
  (``jaxdiff.training.instruct_pairs``).
* ``run_instruct_pix2pix``: ``configs/instruct_pix2pix.py`` -> a diffusers
  ``StableDiffusionInstructPix2PixPipeline`` folder (8-channel UNet); from a base
  pipeline (widened) or from an InstructPix2Pix pipeline (trained further as it is).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff import parallel, schedules
from jaxdiff.denoiser import denoise
from jaxdiff.models.pixart import PixArtConfig
from jaxdiff.pipeline import Pipeline, from_uint8
from jaxdiff.training import batching, losses
from jaxdiff.training import state as state_lib
from jaxdiff.training.instruct_pairs import make_pairs
from jaxdiff.training.latents import encode_latents, mask_loss_weights, posterior_mean
from jaxdiff.training.loop import train_loop
from jaxdiff.training.optim import adamw_with_warmup
from jaxdiff.training.step import make_train_step
from jaxdiff.weights import load_pipeline, save_pipeline

PIPELINE_CLASS = "StableDiffusionInstructPix2PixPipeline"
# The denoiser layers that read the input latents (U-Net, text DiT's patch embedding).
INPUT_LAYERS = ("conv_in", "pos_embed")


# --------------------------------------------------------------------------- the model

def widen_unet(pipe: Pipeline, params, extra_channels: int = 4):
    """(pipeline, params) whose denoiser takes ``in_channels + extra_channels`` inputs; the
    new input channels' kernel slice is zero (the output equals the base denoiser's).

    U-Net: ``conv_in``. Text DiT (``PixArtTransformer2DModel``): the patch embedding
    ``pos_embed.proj``; a learned-sigma output (``out_channels = 2 x in_channels``) is cut
    to its noise half (``proj_out``'s columns of the noise channels), which is all any
    pipeline reads, so the widened model's output equals the base model's noise
    prediction (a widened ``in_channels = 2 x out_channels`` model is what
    ``Pipeline.is_instruct`` and diffusers' InstructPix2Pix layout expect)."""
    if pipe.is_sdxl:
        raise ValueError("InstructPix2Pix training needs an SD 1.x / 2.x base pipeline.")
    if isinstance(pipe.unet.config, PixArtConfig):
        return _widen_pixart(pipe, params, extra_channels)
    if pipe.is_transformer:
        raise ValueError(f"InstructPix2Pix training: the {type(pipe.unet).__name__} backbone "
                         "is not supported (U-Net or PixArt text DiT only).")
    cfg = pipe.unet.config
    unet = pipe.unet.clone(config=dataclasses.replace(
        cfg, in_channels=cfg.in_channels + extra_channels))
    kernel = params["unet"]["conv_in"]["kernel"]  # [3, 3, C_in, C_out]
    pad = jnp.zeros(kernel.shape[:2] + (extra_channels,) + kernel.shape[3:], kernel.dtype)
    conv_in = dict(params["unet"]["conv_in"], kernel=jnp.concatenate([kernel, pad], axis=2))
    return (dataclasses.replace(pipe, unet=unet),
            dict(params, unet=dict(params["unet"], conv_in=conv_in)))


def _widen_pixart(pipe: Pipeline, params, extra_channels: int):
    cfg, net = pipe.unet.config, params["unet"]
    kernel = net["pos_embed"]["proj"]["kernel"]  # [p, p, C_in, D]
    pad = jnp.zeros(kernel.shape[:2] + (extra_channels,) + kernel.shape[3:], kernel.dtype)
    proj = dict(net["pos_embed"]["proj"], kernel=jnp.concatenate([kernel, pad], axis=2))
    net = dict(net, pos_embed=dict(net["pos_embed"], proj=proj))
    out = cfg.in_channels
    if cfg.learned_sigma:  # proj_out columns are (patch row, patch column, channel)
        p, d = cfg.patch_size, net["proj_out"]["kernel"].shape[0]
        keep = lambda a, lead: a.reshape(lead + (p, p, 2 * out))[..., :out].reshape(
            lead + (p * p * out,))
        net["proj_out"] = {"kernel": keep(net["proj_out"]["kernel"], (d,)),
                           "bias": keep(net["proj_out"]["bias"], ())}
    elif cfg.output_channels != out:
        raise ValueError(f"InstructPix2Pix training: this text DiT predicts "
                         f"{cfg.output_channels} channels from {out} latent channels; "
                         "need out_channels = in_channels or 2 x in_channels.")
    wide = dataclasses.replace(cfg, in_channels=out + extra_channels, out_channels=out)
    return (dataclasses.replace(pipe, unet=pipe.unet.clone(config=wide)),
            dict(params, unet=net))


def condition_dropout(rng, batch: int, prob: float = 0.05):
    """(drop_text, drop_image) bool [batch]: u < p text only, p <= u < 2p both,
    2p <= u < 3p image only (diffusers' ``train_instruct_pix2pix.py``)."""
    u = jax.random.uniform(rng, (batch,))
    return u < 2 * prob, (u >= prob) & (u < 3 * prob)


def make_instruct_loss(pipe: Pipeline, frozen_params, dropout: float = 0.05,
                       snr_gamma: float | None = None):
    """``loss(p, (edited_latents, image_latents, ids[, weights]), rng) -> scalar`` for the
    widened ``pipe``; ``p`` holds "unet" and optionally "text_encoder" (else the frozen
    one); ``weights`` [B, h, w, 1] weight each latent pixel's squared error (normalised
    by their sum, ``losses.denoising_loss``), e.g. objects up-weighted."""
    empty = jnp.asarray(pipe.tokenize([""], warn=False)[0])
    alphas = schedules.alphas_cumprod(pipe.scheduler)

    def loss(p, batch, rng):
        x0, image, ids = batch[:3]
        weight = batch[3] if len(batch) > 3 else None
        k_drop, k_loss = jax.random.split(rng)
        drop_text, drop_image = condition_dropout(k_drop, ids.shape[0], dropout)
        ids = jnp.where(drop_text[:, None], empty[None], ids)
        image = jnp.where(drop_image[:, None, None, None], 0.0, image)
        text_params = p.get("text_encoder", frozen_params["text_encoder"])
        f = pipe.vae_scale_factor  # a text DiT's caption mask / micro-conditions too
        context = pipe.condition({"text_encoder": text_params}, ids, x0.shape[1] * f,
                                 x0.shape[2] * f)

        def with_image(x, t, cond):
            ctx, img = cond
            return denoise(pipe, p["unet"], jnp.concatenate([x, img], -1), t, ctx)

        per = losses.denoising_loss(with_image, alphas, pipe.scheduler.prediction_type,
                                    snr_gamma)(
            x0, (context, image), k_loss, weight)
        return jnp.mean(per)

    return loss


def instruct_optimizer(trainable, lr: float, warmup: int, steps: int,
                       input_lr_multiplier: float = 1.0):
    """``adamw_with_warmup`` whose UNet ``conv_in`` / text DiT ``pos_embed`` (the only
    weights that read the image latents, zero-initialised) steps ``input_lr_multiplier``
    times faster; 1 = plain.

    Adam moves a weight by at most about lr per step: at lr 3e-4 the zero-initialised
    image slice of ``conv_in`` needs hundreds of steps of same-signed gradients to reach
    the size of the noisy-latent slice (RMS 0.16 on the embedded model), and its gradient
    is noisy, so 1000 plain steps left it at RMS 0.0065 (bench/README.md, issue 16)."""
    if input_lr_multiplier == 1.0:
        return adamw_with_warmup(lr, warmup, steps)
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "input" if any(getattr(k, "key", None) in INPUT_LAYERS for k in path)
        and getattr(path[0], "key", None) == "unet" else "rest", trainable)
    return optax.multi_transform(
        {"input": adamw_with_warmup(lr * input_lr_multiplier, warmup, steps),
         "rest": adamw_with_warmup(lr, warmup, steps)}, labels)


def encode_pairs(pipe: Pipeline, params, source, edited, batch_size: int = 256):
    """uint8 pairs [N, H, W, 3] -> (scaled latents of ``edited``, unscaled posterior means
    of ``source``), both [N, h, w, C]."""
    target = encode_latents(pipe, params, edited, batch_size)
    image = np.concatenate([np.asarray(posterior_mean(pipe, params["vae"],
                                                      from_uint8(source[i:i + batch_size])))
                            for i in range(0, len(source), batch_size)])
    return target, image


def train_instruct(pipe: Pipeline, params, source, edited, instruction_texts: Sequence[str],
                   workdir: str, *, steps: int, batch_size: int, lr: float,
                   warmup: int = 100, dropout: float = 0.05,
                   train_text_encoder: bool = True, ema_decay: float = 0.995,
                   snr_gamma: float | None = None, input_lr_multiplier: float = 1.0,
                   object_masks=None, object_weight: float = 0.0, seed: int = 0,
                   log_every: int = 50, ckpt_every: int = 500, mesh=None,
                   rules: Sequence = parallel.DEFAULT_RULES, fsdp_min_size: int = 0):
    """Trains the widened ``pipe`` on uint8 pairs (source, edited) [N, H, W, 3] and their
    instructions; resumes from ``workdir``'s checkpoints (a checkpoint of another
    ``input_lr_multiplier`` == 1 / != 1 choice has another optimizer state: use a new
    ``workdir``). ``snr_gamma``: Min-SNR loss weighting (None: plain MSE);
    ``input_lr_multiplier``: ``instruct_optimizer``'s; ``object_masks`` bool [N, H, W]
    and ``object_weight`` > 0: each latent pixel's error weighted ``1 + object_weight x``
    the share of it the mask covers (``latents.mask_loss_weights``; objects are a small
    share of a shapes-world image, so the plain loss is mostly background). Returns params
    with the EMA weights of the trained parts."""
    os.makedirs(workdir, exist_ok=True)
    if pipe.unet.config.in_channels != 2 * pipe.unet.config.out_channels:
        raise ValueError("train_instruct needs the widened UNet (widen_unet).")
    weights = mask_loss_weights(object_masks, object_weight, source, pipe.vae_scale_factor,
                                names=("object_weight", "object_masks"))
    target, image = encode_pairs(pipe, params, source, edited)
    ids = pipe.tokenize(list(instruction_texts), warn=False)
    trainable = {"unet": params["unet"]}
    if train_text_encoder:
        trainable["text_encoder"] = params["text_encoder"]
    opt = instruct_optimizer(trainable, lr, warmup, steps, input_lr_multiplier)

    def batch_fn(s):
        idx = batching.host_slice(batching.batch_indices(len(target), batch_size, s, seed))
        out = (jnp.asarray(target[idx]), jnp.asarray(image[idx]), jnp.asarray(ids[idx]))
        return out if weights is None else out + (jnp.asarray(weights[idx]),)

    state = state_lib.create(trainable, opt, seed)
    state = train_loop(make_train_step(make_instruct_loss(pipe, params, dropout, snr_gamma),
                                       opt, ema_decay),
                       state, batch_fn, steps, workdir, log_every=log_every,
                       ckpt_every=ckpt_every, desc="instruct_pix2pix", mesh=mesh, rules=rules,
                       fsdp_min_size=fsdp_min_size)
    return dict(params, **parallel.gather(state.ema_params))


def save_instruct_pipeline(pipe: Pipeline, params, out_dir: str, dtype=np.float32) -> str:
    """Writes a diffusers ``StableDiffusionInstructPix2PixPipeline`` folder (atomically); a
    widened text DiT keeps ``save_pipeline``'s ``PixArtAlphaPipeline`` layout (diffusers
    has no InstructPix2Pix transformer pipeline; jaxdiff loads it as an instruct pipeline
    by its 8 input channels). ``dtype``: the tensors' (float16 for the shipped model)."""
    save_pipeline(pipe, params, out_dir, dtype=dtype)
    if pipe.is_transformer:
        return out_dir
    path = os.path.join(out_dir, "model_index.json")
    with open(path) as f:
        index = json.load(f)
    index["_class_name"] = PIPELINE_CLASS
    with open(path + ".tmp", "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)
    return out_dir


# ----------------------------------------------------------------------------- recipe

def run_instruct_pix2pix(config, workdir: str) -> str:
    """``configs/instruct_pix2pix.py`` -> an InstructPix2Pix pipeline folder; returns it."""
    os.makedirs(workdir, exist_ok=True)
    pipe, params = load_pipeline(config.model or None)
    further = pipe.is_instruct  # an InstructPix2Pix pipeline: trained further as it is
    if further and config.data.source != "renderer":
        raise ValueError(f"config.model {config.model!r} is an InstructPix2Pix pipeline: "
                         "training it further takes data.source='renderer' (P2P pairs "
                         "need a text-to-image base).")
    pairs = make_pairs(config, pipe, params)
    if len(pairs["source"]) == 0:
        raise ValueError("no training pairs survived the evaluator's filter; raise "
                         "config.data.num_pairs or lower config.p2p.min_psnr.")
    print(f"{len(pairs['source'])} training pairs ({config.data.source}"
          + (f", {int(np.sum(pairs['kept']))} generated" if "kept" in pairs else "") + ")")
    if not further:
        pipe, params = widen_unet(pipe, params)
    params = train_instruct(
        pipe, params, pairs["source"], pairs["edited"], pairs["instruction"],
        os.path.join(workdir, "instruct_pix2pix"), object_masks=pairs["masks"],
        seed=config.seed,
        log_every=config.log_every, ckpt_every=config.checkpoint_every,
        mesh=parallel.make_mesh(fsdp=config.mesh.fsdp),
        rules=[tuple(r) for r in config.mesh.rules], fsdp_min_size=config.mesh.fsdp_min_size,
        **config.train.to_dict())
    return save_instruct_pipeline(pipe, params,
                                  config.export_dir or os.path.join(workdir, "export"),
                                  dtype=np.dtype(config.export_dtype))
