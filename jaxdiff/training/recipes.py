"""Config -> run: the recipes behind ``train/*.py``, and their shared command-line main.

* ``train_and_evaluate``: ``configs/shapes.py`` -> a text-to-image pipeline trained from
  scratch (or fine-tuned): TFDS data, tokenizer, autoencoder, latent scaling factor, text
  encoder + UNet, diffusers-layout export (``text_to_image.py`` holds the two stages).
* ``run_dreambooth``: ``configs/dreambooth.py`` -> a fine-tuned pipeline or a LoRA file
  (``dreambooth.py``).
* ``run_textual_inversion``: ``configs/textual_inversion.py`` ->
  ``learned_embeds.safetensors`` (``textual_inversion.py``).
* ``run_training_main(recipe)``: ``--config`` / ``--workdir`` flags, multi-host start-up,
  one-line errors; each ``train/*.py`` is this call.

The algorithms take plain values; only this module reads configs. Every recipe resumes
from its Orbax checkpoints, so re-running the same command after a kill continues where it
stopped.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Callable

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from jaxdiff import parallel
from jaxdiff.adapters.lora import save_lora
from jaxdiff.data import tfds_shapes
from jaxdiff.data.image_folder import load_image_folder, load_mask_folder
from jaxdiff.data.tokenizer import build_tokenizer, load_tokenizer
from jaxdiff.models import (AutoencoderKL, CLIPTextConfig, CLIPTextModel, UNet2DConditionModel,
                            UNetConfig, VAEConfig)
from jaxdiff.models.pixart import PixArtConfig, PixArtTransformer2DModel, reference_init
from jaxdiff.models.uvit import UViT, UViTConfig
from jaxdiff.models.uvit import reference_init as uvit_reference_init
from jaxdiff.pipeline import Pipeline, init_params
from jaxdiff.schedules import SchedulerConfig
from jaxdiff.training import class_images as class_lib
from jaxdiff.training import dreambooth, grow, text_to_image, textual_inversion
from jaxdiff.training.batching import read_batch
from jaxdiff.training.latents import latent_scaling_factor, with_scaling_factor
from jaxdiff.training.sample_grids import sample_grid_callback
from jaxdiff.weights import load_pipeline, save_pipeline

CONFIG_HELP = (
    "Python config file, FILE or FILE:variant (e.g. :tiny, smoke-sized). Override any "
    "field with --config.FIELD=VALUE (unknown fields are an error). Tuple fields take "
    "a Python tuple or list, quoted for the shell: "
    "--config.templates='(\"a {} square\", \"a photo of a {}\")'; a single string becomes "
    "a one-element tuple.")


# ------------------------------------------------------------------------- text-to-image

BACKBONES = ("unet", "dit", "uvit")


def build_denoiser(model_cfg, backbone: str, *, latent_size: int, latent_channels: int,
                   text_dim: int, text_len: int):
    """The denoiser of ``config.model.backbone``: "unet" (``model_cfg["unet"]``), "dit" (a
    PixArt-style text DiT, ``PixArtTransformer2DModel`` from ``model_cfg["dit"]``) or "uvit"
    (a text U-ViT from ``model_cfg["uvit"]``: caption tokens concatenated with the patch
    tokens). Sizes, channels and text width are filled in from the latent and text
    encoder, so the dicts hold only the network's own width, depth and heads."""
    if backbone not in BACKBONES:
        raise ValueError(f"config.model.backbone={backbone!r}: use one of {BACKBONES}.")
    if backbone == "unet":
        d = dict(model_cfg["unet"], sample_size=latent_size, in_channels=latent_channels,
                 out_channels=latent_channels, cross_attention_dim=text_dim)
        return UNet2DConditionModel(UNetConfig.from_dict(d, "config.model.unet"))
    if backbone == "dit":
        d = dict(dict(out_channels=None, use_additional_conditions=False),
                 **model_cfg["dit"], sample_size=latent_size, in_channels=latent_channels,
                 caption_channels=text_dim)
        d.setdefault("cross_attention_dim", d["num_attention_heads"] * d["attention_head_dim"])
        return PixArtTransformer2DModel(PixArtConfig.from_dict(d, "config.model.dit"))
    d = dict(model_cfg["uvit"], img_size=latent_size, in_chans=latent_channels,
             clip_dim=text_dim, num_clip_token=text_len)
    return UViT(UViTConfig(**d))


def build_pipeline(model_cfg, tokenizer) -> Pipeline:
    """A pipeline of jaxdiff modules from upstream-named config dicts."""
    text = dict(model_cfg["text_encoder"], vocab_size=len(tokenizer))
    vae = VAEConfig.from_dict(dict(model_cfg["vae"]), "config.vae")
    backbone = model_cfg.get("backbone") or "unet"
    if backbone == "unet":
        unet = UNet2DConditionModel(UNetConfig.from_dict(dict(model_cfg["unet"]), "config.unet"))
    else:
        unet = build_denoiser(model_cfg, backbone, latent_size=vae.sample_size // vae.downscale,
                              latent_channels=vae.latent_channels,
                              text_dim=text["hidden_size"],
                              text_len=text["max_position_embeddings"])
    return Pipeline(
        unet=unet,
        vae=AutoencoderKL(vae),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_dict(text, "config.text_encoder")),
        tokenizer=tokenizer,
        scheduler=SchedulerConfig.from_dict(dict(model_cfg["scheduler"])),
        scheduler_class="DDIMScheduler")


def train_and_evaluate(config, workdir: str) -> str:
    """Runs the stages of a ``configs/shapes.py`` config; returns the export directory.

    ``config.model.backbone`` ("" | "unet" | "dit"): see ``build_denoiser`` and the
    ``init_from`` note below ("uvit" is refused: no diffusers layout to export).
    """
    backbone = config.model.get("backbone", "")
    if backbone not in ("",) + BACKBONES or backbone == "uvit":
        raise ValueError(f"config.model.backbone={backbone!r}: use '', 'unet' or 'dit' ('uvit' "
                         "has no diffusers layout to export; bench/backbones_study.py trains "
                         "it in memory).")
    os.makedirs(workdir, exist_ok=True)
    data_dir = config.data.data_dir or os.path.join(workdir, "tfds")
    builder = tfds_shapes.prepare(data_dir, tfds_shapes.ShapesConfig(
        name=f"px{config.data.image_size}_n{config.data.num_train}",
        image_size=config.data.image_size, num_train=config.data.num_train,
        num_test=config.data.num_test, seed=config.seed,
        p_two_objects=config.data.p_two_objects, world=config.data.get("world", "v1")))
    source = builder.as_data_source()["train"]
    if config.init_from:
        # Fine-tune an existing pipeline: its modules, tokenizer, latent scaling factor and
        # weights replace config.model (which is then ignored) -- except with
        # config.model.backbone set: a fresh denoiser of that kind (from config.model)
        # replaces the loaded one and trains from scratch on its VAE and text encoder.
        pipe, params = load_pipeline(config.init_from)  # a folder or "embedded[:NAME]"
        if backbone:
            pipe, params = fresh_denoiser(pipe, params, config.model.to_dict(), backbone,
                                          config.seed, config.model.get("init", "flax"))
            # A text DiT reads the prompt's tokens only (PixArt's caption mask) unless
            # config.model.caption_mask is False (saved as "_caption_mask": false).
            pipe = dataclasses.replace(pipe, caption_mask=config.model.get("caption_mask",
                                                                           True))
        # config.scheduler_update: fields of the loaded scheduler to change (e.g. to move a
        # fine-tune to v-prediction with zero terminal SNR); {} keeps it.
        update = config.get("scheduler_update") or {}
        update = update.to_dict() if hasattr(update, "to_dict") else dict(update)
        unknown = set(update) - {f.name for f in dataclasses.fields(pipe.scheduler)}
        if unknown:
            raise ValueError(f"config.scheduler_update: unknown scheduler field(s) "
                             f"{sorted(unknown)}; see jaxdiff.schedules.SchedulerConfig.")
        if update:
            pipe = dataclasses.replace(pipe, scheduler=dataclasses.replace(pipe.scheduler,
                                                                           **update))
        if config.model.get("deepen", False):
            # One more layer per U-Net block, computing what the loaded U-Net did
            # (jaxdiff.training.grow): more capacity for the fine-tune.
            pipe, params = grow.deepen_unet(pipe, params, config.seed)
    else:
        tok_dir = build_tokenizer(os.path.join(workdir, "tokenizer"),
                                  model_max_length=config.model.tokenizer_max_length)
        pipe = build_pipeline(config.model.to_dict(), load_tokenizer(tok_dir))
        params = init_params(pipe, config.seed)
    stages = [s.strip() for s in config.stages.split(",") if s.strip()]
    unknown = set(stages) - {"autoencoder", "decoder", "diffusion"}
    if unknown:
        raise ValueError(f"config.stages: unknown stage(s) {sorted(unknown)}; use "
                         "'autoencoder', 'decoder' and/or 'diffusion'.")
    common = dict(log_every=config.log_every, ckpt_every=config.checkpoint_every,
                  seed=config.seed, mesh=parallel.make_mesh(fsdp=config.mesh.fsdp),
                  rules=[tuple(r) for r in config.mesh.rules],
                  fsdp_min_size=config.mesh.fsdp_min_size)
    if "autoencoder" in stages:
        params = text_to_image.train_autoencoder(
            pipe, params, source, os.path.join(workdir, "autoencoder"),
            **config.autoencoder.to_dict(), **common)
        images, _ = read_batch(source, range(min(1024, len(source))))
        pipe = with_scaling_factor(pipe, latent_scaling_factor(pipe, params, images))
    if "decoder" in stages:
        params = text_to_image.train_decoder(
            pipe, params, source, os.path.join(workdir, "decoder"),
            **config.decoder.to_dict(), **common)
    if "diffusion" in stages:
        grid = sample_grid_callback(pipe, list(config.sample_prompts),
                                    os.path.join(workdir, "samples"), per_prompt=1,
                                    columns=len(config.sample_prompts))
        params = text_to_image.train_diffusion(
            pipe, params, source, os.path.join(workdir, "diffusion"),
            **config.diffusion.to_dict(), **common, on_sample=grid,
            sample_every=config.sample_every)
    export = config.export_dir or os.path.join(workdir, "export")
    save_pipeline(pipe, params, export, dtype=np.dtype(config.get("export_dtype", "float32")))
    return export


def fresh_denoiser(pipe: Pipeline, params, model_cfg, backbone: str, seed: int = 0,
                   init: str = "flax"):
    """``pipe`` with a randomly initialised denoiser of ``backbone`` (``build_denoiser``)
    in place of its own; VAE, text encoder, tokenizer and scheduler kept. ``init``:
    "flax" (the modules' default initialisers) or, for a transformer, "reference" (its
    paper's code: ``pixart.reference_init`` for "dit", zero output and cross-attention
    projections; ``uvit.reference_init`` for "uvit", N(0, 0.02) Dense kernels)."""
    if init not in ("flax", "reference") or (init == "reference" and backbone == "unet"):
        raise ValueError(f"init={init!r} for backbone {backbone!r}: use 'flax', or "
                         "'reference' with 'dit' or 'uvit' (their papers' initialisation).")
    vae = pipe.vae.config
    unet = build_denoiser(model_cfg, backbone, latent_size=pipe.unet.config.sample_size,
                          latent_channels=vae.latent_channels,
                          text_dim=pipe.text_encoder.config.hidden_size,
                          text_len=pipe.tokenizer.model_max_length)
    pipe = dataclasses.replace(pipe, unet=unet)
    net = init_params(dataclasses.replace(pipe, text_encoder=None, vae=None), seed)["unet"]
    if init == "reference":
        reinit = reference_init if backbone == "dit" else uvit_reference_init
        net = reinit(net, jax.random.key(seed))
    return pipe, dict(params, unet=net)


# ----------------------------------------------------------------------- personalization

def instance_images(config, pipe: Pipeline):
    """The subject images of ``config.instance_dir`` at the model's size, uint8 [N,H,W,3],
    and their masks bool [N,H,W] from ``config.mask_dir`` (None when it is empty)."""
    if not config.instance_dir:
        raise ValueError("config.instance_dir is empty; pass --config.instance_dir=FOLDER "
                         "(a folder of 3-10 images of your subject).")
    size = (pipe.image_size, pipe.image_size)
    images, paths = load_image_folder(config.instance_dir, size, fit=config.fit)
    if config.mask_weight > 0 and not config.mask_dir:
        raise ValueError(f"config.mask_weight={config.mask_weight} needs masks; pass "
                         "--config.mask_dir=FOLDER (one mask per instance image, same name, "
                         "white where the subject is).")
    masks = load_mask_folder(config.mask_dir, paths, size, fit=config.fit) \
        if config.mask_dir else None
    return images, masks


def run_dreambooth(config, workdir: str) -> str:
    """DreamBooth from a ``configs/dreambooth.py`` config; returns what was exported (a
    diffusers pipeline directory, or the LoRA safetensors file in LoRA mode)."""
    pipe, params = load_pipeline(config.model or None)
    instances, masks = instance_images(config, pipe)
    classes = None
    if config.prior_preservation:
        cache = config.class_cache_dir or class_lib.default_cache_dir()
        classes, folder, generated = class_lib.class_images(
            pipe, params, config.class_prompt, config.num_class_images, cache,
            settings=config.class_sampling.to_dict())
        print(f"{'generated' if generated else 'reused'} {len(classes)} class images in "
              f"{folder}")
    grid = None
    if config.sample_every:
        prompts = list(config.sample_prompts) or [config.instance_prompt, config.class_prompt]
        grid = sample_grid_callback(pipe, prompts, os.path.join(workdir, "samples"))
    params, lora = dreambooth.train_dreambooth(
        pipe, params, instances, workdir, instance_prompt=config.instance_prompt,
        class_images=classes, class_prompt=config.class_prompt,
        prior_loss_weight=config.prior_loss_weight, steps=config.steps,
        batch_size=config.batch_size, lr=config.lr, warmup=config.warmup,
        train_text_encoder=config.train_text_encoder, lora_rank=config.lora_rank,
        lora_alpha=config.lora_alpha or None, seed=config.seed, log_every=config.log_every,
        ckpt_every=config.checkpoint_every, on_sample=grid,
        sample_every=config.sample_every, dtype=config.dtype, remat=config.remat,
        instance_masks=masks, mask_weight=config.mask_weight, ema_decay=config.ema_decay,
        caption_dropout=config.caption_dropout,
        mesh=parallel.make_mesh(fsdp=config.mesh.fsdp))
    export = config.export_dir or os.path.join(workdir, "export")
    if lora is not None:
        return save_lora(lora, export, alpha=config.lora_alpha or None)
    save_pipeline(pipe, params, export)
    return export


def run_textual_inversion(config, workdir: str) -> str:
    """Textual Inversion from a ``configs/textual_inversion.py`` config; returns the
    ``learned_embeds.safetensors`` file written."""
    pipe, params = load_pipeline(config.model or None)
    instances, masks = instance_images(config, pipe)
    result = textual_inversion.train_textual_inversion(
        pipe, params, instances, workdir, instance_masks=masks, mask_weight=config.mask_weight,
        placeholder=config.placeholder_token,
        initializer_token=config.initializer_token, num_vectors=config.num_vectors,
        templates=list(config.templates), steps=config.steps, batch_size=config.batch_size,
        lr=config.lr, warmup=config.warmup, seed=config.seed, log_every=config.log_every,
        ckpt_every=config.checkpoint_every,
        sample_folder=os.path.join(workdir, "samples"), sample_every=config.sample_every,
        ema_decay=config.ema_decay, train_guidance=config.train_guidance)
    export = config.export_dir or os.path.join(workdir, "export")
    return textual_inversion.save(result, export)


# -------------------------------------------------------------------------- command line

def run_training_main(recipe: Callable[[object, str], str]) -> None:
    """The body of every ``train/*.py``: parse ``--config FILE[:variant]`` (with
    ``--config.x=y`` overrides) and ``--workdir``, split the CPU into ``config.cpu_devices``
    XLA devices if the config sets it, start ``jax.distributed`` when the
    environment asks for it, run ``recipe(config, workdir)`` and print the export it
    returns. Bad input (ValueError / FileNotFoundError raised by the recipe) exits with a
    one-line ``error: ...`` message."""
    config = config_flags.DEFINE_config_file("config", None, CONFIG_HELP, lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, "Checkpoints, logs, samples and export.")
    flags.mark_flags_as_required(["config", "workdir"])
    for name in ("config", "workdir"):  # list them in the entrypoint's own --help
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])

    def main(argv):
        del argv
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
        parallel.set_cpu_devices(config.value.get("cpu_devices", 0))
        parallel.maybe_initialize_distributed()
        try:
            export = recipe(config.value, workdir.value)
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"error: {e}")
        print(f"exported {export}")

    app.run(main)
