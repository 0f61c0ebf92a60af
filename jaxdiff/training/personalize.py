"""Config -> run glue of the personalization entrypoints (DreamBooth, Textual Inversion).

``train/dreambooth.py`` and ``train/textual_inversion.py`` only parse flags and call
``run_dreambooth(config, workdir)`` / ``run_textual_inversion(config, workdir)``. The
algorithms are in ``dreambooth.py`` and ``ti_train.py`` and take plain values.
"""
from __future__ import annotations

import os
from typing import Sequence

from jaxdiff.data.image_folder import load_image_folder


def _load_model(model: str):
    from jaxdiff import load_pipeline
    return load_pipeline(model or None)


def _instances(config, pipe):
    if not config.instance_dir:
        raise ValueError("config.instance_dir is empty; pass --config.instance_dir=FOLDER "
                         "(a folder of 3-10 images of your subject).")
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    images, _ = load_image_folder(config.instance_dir, (side, side), fit=config.fit)
    return images


def sample_grid_callback(pipe, prompts: Sequence[str], folder: str, steps: int = 20,
                         guidance_scale: float = 5.0, per_prompt: int = 4):
    """``on_sample(params, step)`` writing ``<folder>/step_XXXXXX.png``: one row per prompt
    (the same seeds at every step, so grids are comparable over training)."""
    from PIL import Image

    from jaxdiff.data.images import make_grid
    from jaxdiff.sampling import generate
    batch = [p for p in prompts for _ in range(per_prompt)]

    def on_sample(params, step):
        images = generate(pipe, params, batch, sampler="dpmpp_2m", steps=steps,
                          guidance_scale=guidance_scale, seed=0)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"step_{step:06d}.png")
        Image.fromarray(make_grid(images, per_prompt)).save(path + ".tmp", format="PNG")
        os.replace(path + ".tmp", path)

    return on_sample


def run_dreambooth(config, workdir: str) -> str:
    """DreamBooth from a ``configs/dreambooth.py`` config; returns what was exported (a
    diffusers pipeline directory, or the LoRA safetensors file in LoRA mode)."""
    from jaxdiff import save_pipeline
    from jaxdiff.training import class_images as class_lib
    from jaxdiff.training import dreambooth
    from jaxdiff.training.lora import save_lora

    pipe, params = _load_model(config.model)
    instances = _instances(config, pipe)
    classes = None
    if config.prior_preservation:
        cache = config.class_cache_dir or class_lib.default_cache_dir()
        classes, folder, generated = class_lib.class_images(
            pipe, params, config.class_prompt, config.num_class_images, cache,
            settings=config.class_sampling.to_dict())
        print(f"{'generated' if generated else 'reused'} {len(classes)} class images in "
              f"{folder}")
    sample_cb = None
    if config.sample_every:
        prompts = list(config.sample_prompts) or [config.instance_prompt, config.class_prompt]
        sample_cb = sample_grid_callback(pipe, prompts, os.path.join(workdir, "samples"))
    params, lora = dreambooth.train_dreambooth(
        pipe, params, instances, workdir, instance_prompt=config.instance_prompt,
        class_images=classes, class_prompt=config.class_prompt,
        prior_loss_weight=config.prior_loss_weight, steps=config.steps,
        batch_size=config.batch_size, lr=config.lr, warmup=config.warmup,
        train_text_encoder=config.train_text_encoder, lora_rank=config.lora_rank,
        lora_alpha=config.lora_alpha or None, seed=config.seed, log_every=config.log_every,
        ckpt_every=config.checkpoint_every, on_sample=sample_cb,
        sample_every=config.sample_every)
    export = config.export_dir or os.path.join(workdir, "export")
    if lora is not None:
        return save_lora(lora, export, alpha=config.lora_alpha or None)
    save_pipeline(pipe, params, export)
    return export


def run_textual_inversion(config, workdir: str) -> str:
    """Textual Inversion from a ``configs/textual_inversion.py`` config; returns the
    ``learned_embeds.safetensors`` file written."""
    from jaxdiff.training import ti_train

    pipe, params = _load_model(config.model)
    instances = _instances(config, pipe)
    result = ti_train.train_textual_inversion(
        pipe, params, instances, workdir, placeholder=config.placeholder_token,
        initializer_token=config.initializer_token, num_vectors=config.num_vectors,
        templates=list(config.templates), steps=config.steps, batch_size=config.batch_size,
        lr=config.lr, warmup=config.warmup, seed=config.seed, log_every=config.log_every,
        ckpt_every=config.checkpoint_every,
        sample_folder=os.path.join(workdir, "samples"), sample_every=config.sample_every)
    export = config.export_dir or os.path.join(workdir, "export")
    return ti_train.save(result, export)
