"""End-to-end sampling: jaxdiff.generate vs diffusers' StableDiffusionPipeline, same weights.

    python bench/sample.py                                   # CPU: tiny and reduced, a few minutes
    python bench/sample.py --sizes sd15 --dtype bfloat16 --steps 50 --batch 4   # GPU
    python bench/sample.py --sizes sdxl-reduced              # SDXL architecture, CPU
    python bench/sample.py --sizes sdxl --dtype bfloat16 --steps 30 --batch 4   # GPU, 1024²

SDXL sizes compare with diffusers' ``StableDiffusionXLPipeline`` (two text encoders, pooled
embeddings and time ids, zero negative embeddings as its ``force_zeros_for_empty_prompt``).
Both sides run text encoding -> classifier-free guided denoising -> VAE decode to uint8
images on the same random weights, from the same initial latents, with the same sampler
(DDIM; DPM-Solver++ 2M, diffusers' scheduler built with ``from_config`` from the
pipeline's scheduler config), steps, guidance scale and batch. Prints one JSON object per
(size, sampler):

* ``jaxdiff_img_per_s`` / ``torch_img_per_s``: images per second (median of ``--repeats``
  timed calls after a warm-up call; the two sides are called alternately so load from
  other processes hits both alike), ``speedup`` = jaxdiff / torch throughput.
* ``jaxdiff_compile_s``: first call minus a steady-state call (tracing + XLA compile; the
  persistent compilation cache is switched off so this is a cold compile).
* ``latents_max_abs_diff``: max |jaxdiff - diffusers| of the final latents (before the VAE),
  next to ``latents_max_abs`` for scale; ``image_max_abs_diff`` in uint8 levels. A built-in
  correctness check: the timed programs are the ones that produced these outputs.

Weights are diffusers' init perturbed by ``torchref.models.perturb`` (its exact zeros make XLA
CPU take slow paths; real checkpoints have none). The tokenizer is torchref.models'
character-level CLIP tokenizer: token ids differ from SD's BPE but the shapes (77 tokens)
and the work are the same.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

# Torch and JAX share one accelerator here: JAX must not grab 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402


_SD_BLOCKS = dict(down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
_VAE4 = dict(down_block_types=("DownEncoderBlock2D",) * 4,
             up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4)

SIZES = {
    # name: dict(unet=, vae=, text=) diffusers/transformers kwargs, token length, image side
    "tiny": dict(
        unet=None, vae=None, text=None,  # torchref.models' "sd1" configs
        max_length=16, side=32),
    "reduced": dict(
        unet=dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2,
                  cross_attention_dim=256, attention_head_dim=8, sample_size=32,
                  **_SD_BLOCKS),
        vae=dict(block_out_channels=(32, 64, 64, 64), layers_per_block=2, norm_num_groups=32,
                 sample_size=256, scaling_factor=0.18215, **_VAE4),
        text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu"),
        max_length=77, side=256),
    "sd15": dict(
        unet=dict(sample_size=64),  # diffusers' default UNet config is SD 1.x's
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 sample_size=512, scaling_factor=0.18215, **_VAE4),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77,
                  hidden_act="quick_gelu"),  # CLIP ViT-L/14 text tower
        max_length=77, side=512),
}

_XL_BLOCKS = dict(down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
                  up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",))
_XL_UNET = dict(use_linear_projection=True, addition_embed_type="text_time", **_XL_BLOCKS)

# SDXL architecture (StableDiffusionXLPipeline: text_time UNet, two text encoders, the
# second with projection): "sdxl-reduced" with reduced widths and depths for CPU, "sdxl"
# at SDXL 1.0 base's sizes (stabilityai/stable-diffusion-xl-base-1.0's configs).
XL_SIZES = {
    "sdxl-reduced": dict(
        unet=dict(block_out_channels=(64, 128, 256), layers_per_block=2,
                  attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 2, 4),
                  cross_attention_dim=128 + 256, addition_time_embed_dim=64,
                  projection_class_embeddings_input_dim=256 + 6 * 64, sample_size=32,
                  **_XL_UNET),
        vae=SIZES["reduced"]["vae"],
        text=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu"),
        text_2=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                    num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
                    projection_dim=256),
        max_length=77, side=256),
    "sdxl": dict(
        unet=dict(block_out_channels=(320, 640, 1280), layers_per_block=2,
                  attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                  cross_attention_dim=2048, addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816, sample_size=128, **_XL_UNET),
        vae=dict(SIZES["sd15"]["vae"], sample_size=1024, scaling_factor=0.13025),
        text=SIZES["sd15"]["text"],
        text_2=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                    num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                    projection_dim=1280),
        max_length=77, side=1024),
}
SIZES.update(XL_SIZES)

SAMPLERS = {"ddim": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}
PROMPTS = ["a red circle", "a blue square", "green star", "two cats"]


def build_pipeline(size, folder, seed=0):
    """Saves a perturbed random diffusers StableDiffusionPipeline of ``size`` in ``folder``
    (an SDXL size: a StableDiffusionXLPipeline)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from torchref import models as ref
    if size in XL_SIZES:
        return build_sdxl_pipeline(size, folder, seed)
    spec = SIZES[size]
    torch.manual_seed(seed)
    unet = ref.perturb(UNet2DConditionModel(**(spec["unet"] or ref.UNET_CONFIGS["sd1"])),
                       seed=seed)
    vae = ref.perturb(AutoencoderKL(**(spec["vae"] or ref.VAE_CONFIGS["sd1"])), seed=seed + 1)
    vocab = len(ref.tiny_vocab())
    text_cfg = CLIPTextConfig(vocab_size=vocab, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                              pad_token_id=vocab - 1,
                              **(spec["text"] or ref.TEXT_CONFIGS["sd1"]))
    text = ref.perturb(CLIPTextModel(text_cfg), seed=seed + 2)
    tokenizer = ref.write_tiny_tokenizer(os.path.join(folder, "_tok"), spec["max_length"])
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer,
        scheduler=DDIMScheduler(**ref.SCHEDULER_SD1), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def build_sdxl_pipeline(size, folder, seed=0):
    """Saves a perturbed random diffusers StableDiffusionXLPipeline of ``size`` in
    ``folder`` (character-level tokenizers; the second pads with '!' as SDXL's)."""
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from torchref import models as ref
    spec = XL_SIZES[size]
    torch.manual_seed(seed)
    vocab = len(ref.tiny_vocab())
    ids = dict(vocab_size=vocab, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
               pad_token_id=vocab - 1)
    pipe = StableDiffusionXLPipeline(
        unet=ref.perturb(UNet2DConditionModel(**spec["unet"]), seed=seed),
        vae=ref.perturb(AutoencoderKL(**spec["vae"]), seed=seed + 1),
        text_encoder=ref.perturb(CLIPTextModel(CLIPTextConfig(**ids, **spec["text"])),
                                 seed=seed + 2),
        text_encoder_2=ref.perturb(CLIPTextModelWithProjection(
            CLIPTextConfig(**ids, **spec["text_2"])), seed=seed + 3),
        tokenizer=ref.write_tiny_tokenizer(os.path.join(folder, "_tok"), spec["max_length"]),
        tokenizer_2=ref.write_tiny_tokenizer(os.path.join(folder, "_tok2"), spec["max_length"],
                                             pad_token="!"),
        scheduler=DDIMScheduler(**ref.SCHEDULER_SD1), force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def _interleaved(fns, repeats):
    """{name: (median seconds, last result)}, calling the functions in turn ``repeats``
    times so load from other processes on a shared machine hits every side alike."""
    times = {name: [] for name in fns}
    last = {}
    for _ in range(max(repeats, 1)):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            last[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (float(np.median(t)), last[name]) for name, t in times.items()}


def bench_size(size, samplers, steps, batch, guidance, repeats, dtype_name, torch_threads=0):
    import diffusers
    import jax
    import jax.numpy as jnp
    import torch

    import jaxdiff

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    if device == "cuda" and dtype_name == "float32":
        # JAX's default f32 matmul/conv precision on NVIDIA GPUs uses TF32: match it.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    with tempfile.TemporaryDirectory() as folder:
        tp = build_pipeline(size, folder)
        pipe, params = jaxdiff.load_pipeline(folder)
    if dtype_name == "bfloat16":
        pipe = pipe.with_dtype(jnp.bfloat16)
    params = jax.device_put(params)
    tp = tp.to(device=device, dtype=None if dtype_name == "float32" else tdtype)
    if torch_threads:
        torch.set_num_threads(torch_threads)
    torch.set_flush_denormal(True)  # XLA:CPU flushes denormals too (see bench/models.py)
    tp.set_progress_bar_config(disable=True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    side = SIZES[size]["side"]
    f = pipe.vae_scale_factor
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    noise = np.random.default_rng(0).standard_normal(
        (batch, pipe.unet.config.in_channels, side // f, side // f)).astype(np.float32)
    noise_nhwc = noise.transpose(0, 2, 3, 1)
    torch_config = tp.scheduler.config
    rows = []
    for name in samplers:
        tp.scheduler = getattr(diffusers, SAMPLERS[name]).from_config(torch_config)
        kw = dict(sampler=name, steps=steps, guidance_scale=guidance, latents=noise_nhwc,
                  height=side, width=side)

        t0 = time.perf_counter()
        jax_latents = jaxdiff.generate(pipe, params, prompts, output="latents", **kw)
        first_s = time.perf_counter() - t0

        final = {}

        def keep_latents(_pipe, i, _t, cb_kwargs):
            if i == steps - 1:
                final["latents"] = cb_kwargs["latents"].float().cpu().numpy()
            return cb_kwargs

        def torch_run(callback=None):
            with torch.no_grad():
                out = tp(prompts, num_inference_steps=steps, guidance_scale=guidance,
                         latents=torch.tensor(noise, device=device, dtype=tdtype),
                         height=side, width=side, output_type="np",
                         callback_on_step_end=callback).images
            sync()
            return np.round(np.clip(out, 0, 1) * 255).astype(np.uint8)

        torch_run(keep_latents)  # warm-up; keeps the final latents for the check
        med = _interleaved({"jaxdiff": lambda: jaxdiff.generate(pipe, params, prompts, **kw),
                            "torch": torch_run}, repeats)
        (jax_s, jax_images), (torch_s, torch_images) = med["jaxdiff"], med["torch"]

        want = final["latents"].transpose(0, 2, 3, 1)
        rows.append(dict(
            bench="sample", size=size, sampler=name, steps=steps, guidance=guidance,
            batch=batch, height=side, width=side, dtype=dtype_name,
            device=jax.devices()[0].platform, torch_device=device,
            torch_threads=torch.get_num_threads(),
            jaxdiff_img_per_s=round(batch / jax_s, 4), torch_img_per_s=round(batch / torch_s, 4),
            speedup=round(torch_s / jax_s, 3), jaxdiff_compile_s=round(first_s - jax_s, 2),
            jaxdiff_s=round(jax_s, 4), torch_s=round(torch_s, 4),
            latents_max_abs_diff=float(f"{np.abs(jax_latents - want).max():.3g}"),
            latents_max_abs=round(float(np.abs(want).max()), 3),
            image_max_abs_diff=int(np.abs(jax_images.astype(int)
                                          - torch_images.astype(int)).max()),
            loadavg_1m=round(os.getloadavg()[0], 2)))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "reduced"], choices=list(SIZES))
    ap.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=2, help="images per call (default 2)")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per side (median)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="torch.set_num_threads (default: torch's own); torch's OpenMP pool "
                         "degrades badly when other processes hold the cores")
    args = ap.parse_args(argv)
    import jax
    jax.config.update("jax_enable_compilation_cache", False)  # measure cold compiles
    for size in args.sizes:
        bench_size(size, args.samplers, args.steps, args.batch, args.guidance, args.repeats,
                   args.dtype, args.torch_threads)


if __name__ == "__main__":
    main()
