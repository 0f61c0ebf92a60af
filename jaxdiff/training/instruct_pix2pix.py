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
* Pairs come from the world's exact renderer (``jaxdiff.data.instructions``) or from the
  embedded model with Prompt-to-Prompt (``p2p_pairs``: both captions sampled from the
  same noise with cross/self-attention injection, kept when the evaluator reads the
  source and edited scenes right and the preserved region did not change), or both:
  ``"p2p+renderer"`` keeps every triple, its generated pair where the filter passed it and
  the renderer's exact pair where it did not (P2P cannot move an object or repaint the
  background, so those kinds come mostly from the renderer).
* ``run_instruct_pix2pix``: ``configs/instruct_pix2pix.py`` -> a diffusers
  ``StableDiffusionInstructPix2PixPipeline`` folder (8-channel UNet).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff import parallel, schedules
from jaxdiff.data import instructions, shapes
from jaxdiff.denoiser import denoise
from jaxdiff.editing import prompt_to_prompt as p2p
from jaxdiff.eval import shapes_eval
from jaxdiff.models.pixart import PixArtConfig
from jaxdiff.pipeline import Pipeline, from_uint8, to_uint8
from jaxdiff.samplers.ddim import ddim_tables
from jaxdiff.training import batching, losses
from jaxdiff.training import state as state_lib
from jaxdiff.training.latents import encode_latents, mask_loss_weights, posterior_mean
from jaxdiff.training.loop import train_loop
from jaxdiff.training.optim import adamw_with_warmup
from jaxdiff.training.step import make_train_step
from jaxdiff.weights import load_pipeline, save_pipeline

PIPELINE_CLASS = "StableDiffusionInstructPix2PixPipeline"
# The denoiser layers that read the input latents (U-Net, text DiT's patch embedding).
INPUT_LAYERS = ("conv_in", "pos_embed")
SOURCES = ("renderer", "p2p", "p2p+renderer")


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
    weights = mask_loss_weights(object_masks, object_weight, source, pipe.vae_scale_factor)
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


# ------------------------------------------------------------ generated (P2P) pairs

@functools.lru_cache(maxsize=8)
def _p2p_program(pipe: Pipeline, steps: int):
    """Samples source and edited captions from the same noise under P2P control."""
    def run(params, z_T, src_ids, tgt_ids, empty_ids, control, guidance):
        tab = ddim_tables(pipe.scheduler, steps)
        unet = lambda x, t, c, ctrl=None: denoise(pipe, params["unet"], x, t, c, control=ctrl)
        h, w = (n * pipe.vae_scale_factor for n in z_T.shape[1:3])
        uncond = pipe.condition(params, empty_ids, h, w, negative=True)
        nulls = jax.tree.map(lambda u: jnp.broadcast_to(u, (steps,) + u.shape), uncond)
        out = p2p.edit_loop(unet, tab, z_T, pipe.condition(params, src_ids, h, w),
                            pipe.condition(params, tgt_ids, h, w), nulls, guidance, control,
                            pipe.scheduler.prediction_type)
        return pipe.decode_latents(params, out.source), pipe.decode_latents(params, out.target)
    return jax.jit(run)


def psnr(a, b, region) -> float:
    """PSNR (dB) of two uint8 images [H, W, 3] over a bool region [H, W] (inf if equal)."""
    if not region.any():
        return float("inf")
    err = np.mean((a[region].astype(np.float64) - b[region].astype(np.float64)) ** 2)
    return float("inf") if err == 0 else float(10 * np.log10(255.0 ** 2 / err))


def read_pair(spec: shapes.WorldSpec, triple, source_image, edited_image) -> dict:
    """The evaluator's verdict on an (source, edited) image pair for ``triple``:
    {"source_ok", "edit_ok": the images read as the source / edited scene, "psnr": over
    the region the edit must preserve, located from the evaluator's masks}."""
    src = shapes_eval.attribute_accuracy(source_image, triple.objects, spec, triple.background)
    dst = shapes_eval.attribute_accuracy(edited_image, triple.edited_objects, spec,
                                         triple.edited_background)
    out = {"source_ok": src["all"], "edit_ok": dst["all"], "psnr": float("nan")}
    if src["count"] and dst["count"]:
        m_src = np.stack([o["mask"] for o in shapes_eval.evaluate(source_image, spec)["objects"]])
        m_dst = np.stack([o["mask"] for o in shapes_eval.evaluate(edited_image, spec)["objects"]])
        region = instructions.preserved_region(triple, m_src, m_dst)
        out["psnr"] = psnr(source_image, edited_image, region)
    return out


def object_masks(spec: shapes.WorldSpec, source_image, edited_image) -> np.ndarray:
    """bool [H, W]: where the evaluator finds an object in either image of a pair."""
    found = (shapes_eval.evaluate(source_image, spec)["objects"]
             + shapes_eval.evaluate(edited_image, spec)["objects"])
    out = np.zeros(source_image.shape[:2], bool)
    for o in found:
        out |= o["mask"]
    return out


def keep_pair(reading: dict, min_psnr: float = 25.0) -> bool:
    """The filter of generated pairs on a ``read_pair`` result: both scenes read right and
    the preserved region at >= ``min_psnr`` dB (False when it could not be located)."""
    return bool(reading["source_ok"] and reading["edit_ok"] and reading["psnr"] >= min_psnr)


def p2p_pairs(pipe: Pipeline, params, triples, *, seed: int = 0, steps: int = 20,
              guidance: float = 7.5, cross_replace_steps: float = 0.8,
              self_replace_steps: float = 0.4, min_psnr: float = 25.0,
              batch_size: int = 64, world: str = "v1") -> dict:
    """Generated pairs for ``triples``: each (caption, edited caption) sampled by the base
    model from one noise with Prompt-to-Prompt (replace mode: the captions differ by
    swapped words), kept when ``read_pair`` finds both scenes right and the preserved
    region at >= ``min_psnr`` dB (the evaluator reads them as scenes of ``world``, the
    triples' world). Returns {"source", "edited": uint8 [K, H, W, 3], "instruction": list,
    "masks": bool [K, H, W] (the evaluator's objects of either image), "triples": the
    kept triples, "kept": bool [N]}."""
    spec = shapes.world(world, image_size=pipe.image_size)
    run = _p2p_program(pipe, steps)
    empty = pipe.tokenize([""], warn=False)
    h = pipe.latent_shape(pipe.image_size, pipe.image_size)
    src_all, dst_all, kept = [], [], []
    for start in range(0, len(triples), batch_size):
        chunk = triples[start:start + batch_size]
        n = len(chunk)
        caps, edits = [t.caption for t in chunk], [t.edited_caption for t in chunk]
        control = p2p.make_control(pipe, caps, edits, steps, mode="replace",
                                   cross_replace_steps=cross_replace_steps,
                                   self_replace_steps=self_replace_steps)
        z = jax.random.normal(jax.random.fold_in(jax.random.key(seed), start), (n,) + h)
        src, dst = run(params, z, pipe.tokenize(caps, warn=False),
                       pipe.tokenize(edits, warn=False), np.repeat(empty, n, 0), control,
                       jnp.float32(guidance))
        src, dst = to_uint8(src), to_uint8(dst)
        for t, a, b in zip(chunk, src, dst):
            kept.append(keep_pair(read_pair(spec, t, a, b), min_psnr))
        src_all.append(src)
        dst_all.append(dst)
    kept = np.array(kept, bool)
    src_all, dst_all = np.concatenate(src_all)[kept], np.concatenate(dst_all)[kept]
    keep_t = [t for t, k in zip(triples, kept) if k]
    masks = np.stack([object_masks(spec, a, b) for a, b in zip(src_all, dst_all)]
                     ) if len(src_all) else np.zeros((0,) + src_all.shape[1:3], bool)
    return {"source": src_all, "edited": dst_all, "masks": masks,
            "instruction": [t.instruction for t in keep_t], "triples": keep_t, "kept": kept}


# ----------------------------------------------------------------------------- recipe

def make_pairs(config, pipe: Pipeline, params) -> dict:
    """The training pairs of ``config.data`` (``source``: "renderer" or "p2p")."""
    d = config.data
    if d.source not in SOURCES:
        raise ValueError(f"config.data.source={d.source!r}; use one of {list(SOURCES)}.")
    spec = shapes.world(d.world, image_size=pipe.image_size)
    if d.source == "renderer":
        return instructions.renderer_dataset(config.seed, spec, d.num_pairs)
    ts = instructions.triples(config.seed, spec, d.num_pairs, "train")
    pairs = p2p_pairs(pipe, params, ts, seed=config.seed, world=d.world,
                      **config.p2p.to_dict())
    if d.source == "p2p":
        return pairs
    return fill_from_renderer(spec, ts, pairs)


def fill_from_renderer(spec: shapes.WorldSpec, triples, pairs: dict) -> dict:
    """``p2p_pairs``' result for ``triples`` with every rejected triple's pair replaced by
    the renderer's exact one (same order as ``triples``; ``"kept"``: bool [N], which pairs
    are the model's)."""
    kept = np.asarray(pairs["kept"], bool)
    src, dst, masks, k = [], [], [], 0
    for t, ok in zip(triples, kept):
        if ok:
            src.append(pairs["source"][k])
            dst.append(pairs["edited"][k])
            masks.append(pairs["masks"][k])
            k += 1
        else:
            a, b, m_a, m_b = instructions.render_pair(spec, t)
            src.append(a)
            dst.append(b)
            masks.append(m_a.any(0) | m_b.any(0))
    return {"source": np.stack(src), "edited": np.stack(dst), "masks": np.stack(masks),
            "instruction": [t.instruction for t in triples], "triples": list(triples),
            "kept": kept}


def run_instruct_pix2pix(config, workdir: str) -> str:
    """``configs/instruct_pix2pix.py`` -> an InstructPix2Pix pipeline folder; returns it."""
    os.makedirs(workdir, exist_ok=True)
    pipe, params = load_pipeline(config.model or None)
    pairs = make_pairs(config, pipe, params)
    if len(pairs["source"]) == 0:
        raise ValueError("no training pairs survived the evaluator's filter; raise "
                         "config.data.num_pairs or lower config.p2p.min_psnr.")
    print(f"{len(pairs['source'])} training pairs ({config.data.source}"
          + (f", {int(np.sum(pairs['kept']))} generated" if "kept" in pairs else "") + ")")
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
