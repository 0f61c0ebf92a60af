"""InstructPix2Pix editing: jaxdiff.editing.instruct_pix2pix vs diffusers'
StableDiffusionInstructPix2PixPipeline, same weights.

    python bench/instruct_speed.py                        # CPU: tiny (and --sizes reduced)
    python bench/instruct_speed.py --sizes sd15 --steps 100 --batch 1 8   # GPU, the paper's

Both sides run text encoding -> image encoding (the VAE posterior's mode) -> three-branch
guided denoising (one UNet call on 3 x batch per step) -> VAE decode to uint8 images, on
the same random 8-channel weights (bench/sample.py's sizes with ``in_channels=8``), from
the same initial latents, with the same sampler, steps and scales. The default sampler is
Euler (deterministic, so the outputs can be compared; Euler ancestral costs the same plus
one normal draw per step). Prints one JSON object per (size, batch):

* ``jaxdiff_img_per_s`` / ``torch_img_per_s`` and ``speedup`` = jaxdiff / torch throughput
  (median of ``--repeats`` calls after a warm-up, the two sides called alternately so
  load from other processes hits both alike); jaxdiff's time includes the VAE round trip
  of the source image it also returns (one more decode per image);
* ``jaxdiff_compile_s``: first call minus a steady call (persistent cache off: cold);
* ``latents_max_abs_diff`` (next to ``latents_max_abs``): the final latents of the two.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import sample as sample_bench  # noqa: E402  (bench/sample.py: sizes, prompts, pipelines)

SCHEDULERS = {"euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
              "ddim": "DDIMScheduler"}


def build_instruct_pipeline(size, folder, seed=0):
    """Saves a perturbed random diffusers InstructPix2Pix pipeline of ``size`` (bench/sample.py's
    components, the UNet with 8 input channels) in ``folder``."""
    import torch
    from diffusers import StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel

    from torchref import models as ref
    base = sample_bench.build_pipeline(size, os.path.join(folder, "_base"), seed)
    torch.manual_seed(seed)
    unet = ref.perturb(UNet2DConditionModel(**dict(base.unet.config, in_channels=8)), seed=seed)
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet,
        scheduler=base.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def bench_size(size, sampler, steps, batches, text_guidance, image_guidance, repeats,
               torch_threads=0):
    import diffusers
    import jax
    import torch

    import jaxdiff
    from jaxdiff.editing import instruct_pix2pix

    with tempfile.TemporaryDirectory() as folder:
        tp = build_instruct_pipeline(size, folder)
        pipe, params = jaxdiff.load_pipeline(folder)
    params = jax.device_put(params)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tp = tp.to(device)
    tp.scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_config(tp.scheduler.config)
    tp.set_progress_bar_config(disable=True)
    if torch_threads:
        torch.set_num_threads(torch_threads)
    torch.set_flush_denormal(True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    side, f = sample_bench.SIZES[size]["side"], pipe.vae_scale_factor
    rows = []
    for batch in batches:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (batch, side, side, 3), dtype=np.uint8)
        noise = rng.standard_normal((batch, side // f, side // f, 4)).astype(np.float32)
        prompts = [sample_bench.PROMPTS[i % len(sample_bench.PROMPTS)] for i in range(batch)]
        kw = dict(steps=steps, text_guidance=text_guidance, image_guidance=image_guidance,
                  sampler=sampler, latents=noise)
        timg = torch.tensor(images.transpose(0, 3, 1, 2) / 255.0, dtype=torch.float32,
                            device=device)
        tlat = torch.tensor(noise.transpose(0, 3, 1, 2), device=device)

        def torch_run(output_type="np"):
            with torch.no_grad():
                out = tp(prompts, image=timg, num_inference_steps=steps,
                         guidance_scale=text_guidance, image_guidance_scale=image_guidance,
                         latents=tlat, output_type=output_type).images
            sync()
            return out

        t0 = time.perf_counter()
        got = instruct_pix2pix.edit(pipe, params, images, prompts, output="latents", **kw)
        first_s = time.perf_counter() - t0
        want = torch_run("latent").float().cpu().numpy().transpose(0, 2, 3, 1)
        torch_run()  # warm-up
        times = {"jaxdiff": [], "torch": []}
        for _ in range(max(repeats, 1)):  # alternately, so outside load hits both alike
            for name, fn in (("jaxdiff", lambda: instruct_pix2pix.edit(pipe, params, images,
                                                                       prompts, **kw)),
                             ("torch", torch_run)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        jax_s, torch_s = (float(np.median(times[k])) for k in ("jaxdiff", "torch"))
        rows.append(dict(
            bench="instruct_pix2pix", size=size, sampler=sampler, steps=steps, batch=batch,
            text_guidance=text_guidance, image_guidance=image_guidance, height=side,
            width=side, device=jax.devices()[0].platform, torch_device=device,
            torch_threads=torch.get_num_threads(),
            jaxdiff_img_per_s=round(batch / jax_s, 4), torch_img_per_s=round(batch / torch_s, 4),
            speedup=round(torch_s / jax_s, 3), jaxdiff_compile_s=round(first_s - jax_s, 2),
            latents_max_abs_diff=float(f"{np.abs(got - want).max():.3g}"),
            latents_max_abs=round(float(np.abs(want).max()), 3),
            loadavg_1m=round(os.getloadavg()[0], 2)))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny"], choices=list(sample_bench.SIZES))
    ap.add_argument("--sampler", default="euler", choices=list(SCHEDULERS))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, nargs="+", default=[2], help="images per call")
    ap.add_argument("--text-guidance", type=float, default=7.5)
    ap.add_argument("--image-guidance", type=float, default=1.5)
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per side (median)")
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="torch.set_num_threads (default: torch's own)")
    args = ap.parse_args(argv)
    import jax
    jax.config.update("jax_enable_compilation_cache", False)  # measure cold compiles
    for size in args.sizes:
        bench_size(size, args.sampler, args.steps, args.batch, args.text_guidance,
                   args.image_guidance, args.repeats, args.torch_threads)


if __name__ == "__main__":
    main()
