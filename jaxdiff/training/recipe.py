"""The text-to-image recipe behind ``train/text_to_image.py``: config -> trained pipeline.

Builds the data (TFDS ``array_record``), the tokenizer and a randomly initialised
pipeline from the config's upstream-named model dicts, trains the autoencoder, fixes
the latent ``scaling_factor`` (1 / std of the latents, as SD did), trains text encoder +
UNet, and exports a diffusers-layout directory. Every stage resumes from its Orbax
checkpoints, so re-running the same command after a kill continues where it stopped.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from jaxdiff import parallel
from jaxdiff.models import (AutoencoderKL, CLIPTextConfig, CLIPTextModel, UNet2DConditionModel,
                            UNetConfig, VAEConfig)
from jaxdiff.pipeline import Pipeline, from_uint8, init_params
from jaxdiff.training import data as data_lib
from jaxdiff.training import text_to_image as t2i


def build_pipeline(model_cfg, tokenizer) -> Pipeline:
    """A pipeline of jaxdiff modules from upstream-named config dicts."""
    from jaxdiff.schedules import SchedulerConfig
    text = dict(model_cfg["text_encoder"], vocab_size=len(tokenizer))
    return Pipeline(
        unet=UNet2DConditionModel(UNetConfig.from_dict(dict(model_cfg["unet"]), "config.unet")),
        vae=AutoencoderKL(VAEConfig.from_dict(dict(model_cfg["vae"]), "config.vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_dict(text, "config.text_encoder")),
        tokenizer=tokenizer,
        scheduler=SchedulerConfig.from_dict(dict(model_cfg["scheduler"])),
        scheduler_class="DDIMScheduler")


def latent_scaling_factor(pipe: Pipeline, params, source, num: int = 1024) -> float:
    """1 / std of the posterior-mean latents of ``num`` examples (unit-variance latents)."""
    images, _ = data_lib.read_batch(source, range(min(num, len(source))))
    from jaxdiff.models.vae import AutoencoderKL as _VAE
    mean, _ = jax.jit(lambda p, x: pipe.vae.apply({"params": p}, x, method=_VAE.encode))(
        params["vae"], from_uint8(images))
    return float(1.0 / np.std(np.asarray(mean)))


def with_scaling_factor(pipe: Pipeline, factor: float) -> Pipeline:
    cfg = dataclasses.replace(pipe.vae.config, scaling_factor=round(factor, 5))
    return dataclasses.replace(pipe, vae=pipe.vae.clone(config=cfg))


def train_and_evaluate(config, workdir: str) -> str:
    """Runs the configured stages; returns the export directory."""
    from jaxdiff import save_pipeline
    from jaxdiff.data import tfds_shapes
    from jaxdiff.data.tokenizer import build_tokenizer, load_tokenizer

    os.makedirs(workdir, exist_ok=True)
    data_dir = config.data.data_dir or os.path.join(workdir, "tfds")
    builder = tfds_shapes.prepare(data_dir, tfds_shapes.ShapesConfig(
        name=f"px{config.data.image_size}_n{config.data.num_train}",
        image_size=config.data.image_size, num_train=config.data.num_train,
        num_test=config.data.num_test, seed=config.seed,
        p_two_objects=config.data.p_two_objects))
    source = builder.as_data_source()["train"]
    if config.init_from:
        # Fine-tune an existing pipeline: its modules, tokenizer, latent scaling factor and
        # weights replace config.model (which is then ignored).
        from jaxdiff import load_pipeline
        pipe, params = load_pipeline(None if config.init_from == "embedded"
                                     else config.init_from)
    else:
        tok_dir = build_tokenizer(os.path.join(workdir, "tokenizer"),
                                  model_max_length=config.model.tokenizer_max_length)
        pipe = build_pipeline(config.model.to_dict(), load_tokenizer(tok_dir))
        params = init_params(pipe, config.seed)
    stages = [s.strip() for s in config.stages.split(",") if s.strip()]
    unknown = set(stages) - {"autoencoder", "diffusion"}
    if unknown:
        raise ValueError(f"config.stages: unknown stage(s) {sorted(unknown)}; use "
                         "'autoencoder' and/or 'diffusion'.")
    common = dict(log_every=config.log_every, ckpt_every=config.checkpoint_every,
                  seed=config.seed, mesh=parallel.make_mesh(fsdp=config.mesh.fsdp),
                  rules=[tuple(r) for r in config.mesh.rules],
                  fsdp_min_size=config.mesh.fsdp_min_size)
    if "autoencoder" in stages:
        params = t2i.train_autoencoder(pipe, params, source, os.path.join(workdir, "autoencoder"),
                                       **config.autoencoder.to_dict(), **common)
        pipe = with_scaling_factor(pipe, latent_scaling_factor(pipe, params, source))
    if "diffusion" in stages:
        params = t2i.train_diffusion(
            pipe, params, source, os.path.join(workdir, "diffusion"),
            **config.diffusion.to_dict(), **common,
            on_sample=_sampler_callback(pipe, config, workdir),
            sample_every=config.sample_every)
    export = config.export_dir or os.path.join(workdir, "export")
    save_pipeline(pipe, params, export)
    return export


def _sampler_callback(pipe, config, workdir):
    """Writes a grid of generations for ``config.sample_prompts`` at a given step."""
    from PIL import Image

    from jaxdiff.data.images import make_grid
    from jaxdiff.sampling import generate

    def on_sample(params, step):
        images = generate(pipe, params, list(config.sample_prompts), sampler="dpmpp_2m",
                          steps=20, guidance_scale=5.0, seed=0)
        os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
        Image.fromarray(make_grid(images, len(images))).save(
            os.path.join(workdir, "samples", f"step_{step:06d}.png"))

    return on_sample
