"""Sampling with one ControlNet: jaxdiff vs diffusers' StableDiffusionControlNetPipeline.

    python bench/control_speed.py                 # CPU: tiny and reduced (see bench/sample.py)
    python bench/control_speed.py --sizes sd15 --dtype bfloat16 --steps 50 --batch 1  # GPU

Both libraries run the whole job (text encoding -> classifier-free guided denoising ->
VAE decode to uint8 images) on the same random weights (``bench/sample.py``'s pipelines),
from the same initial latents, with DDIM, the same steps, guidance scale and batch, four
ways: plain generation and generation with one ControlNet (``controlnet_conditioning_scale``
1, one condition image per prompt). The ControlNet is diffusers' ``ControlNetModel.from_unet``
of the pipeline's UNet, perturbed like the other weights (so its zero convolutions are not
zero and the residuals really change the result), saved and read by
``jaxdiff.weights.control.load_controlnet``. Prints one JSON object per size:

* ``jaxdiff_img_per_s`` / ``torch_img_per_s`` (with the ControlNet) and
  ``jaxdiff_plain_img_per_s`` / ``torch_plain_img_per_s``: images per second, median of
  ``--repeats`` timed calls after a warm-up call; the four calls are interleaved so load
  from other processes hits all alike. ``speedup``: jaxdiff / torch throughput with the
  ControlNet.
* ``jaxdiff_control_overhead`` / ``torch_control_overhead``: seconds per call with the
  ControlNet / seconds per plain call (the issue's GPU target: <= 1.35 for jaxdiff).
* ``latents_max_abs_diff``: max |jaxdiff - diffusers| of the final latents with the
  ControlNet (``latents_max_abs`` for scale), ``control_effect``: max |controlled - plain|
  of jaxdiff's final latents (the ControlNet acts), ``image_max_abs_diff`` in uint8 levels.
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

import sample as sample_bench  # noqa: E402  (bench/sample.py: sizes and pipelines)

EMBEDDING = (16, 32, 96, 256)   # diffusers' default condition embedding widths


def _interleaved(fns, repeats):
    """{name: (median seconds, last result)}, the functions called in turn."""
    times = {name: [] for name in fns}
    last = {}
    for _ in range(max(repeats, 1)):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            last[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (float(np.median(t)), last[name]) for name, t in times.items()}


def bench_size(size, steps, batch, guidance, repeats, dtype_name, torch_threads=0):
    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from PIL import Image

    import jaxdiff
    from jaxdiff.control import Control
    from jaxdiff.weights.control import load_controlnet
    from torchref import models as ref

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    if device == "cuda" and dtype_name == "float32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    with tempfile.TemporaryDirectory() as folder:
        tp = sample_bench.build_pipeline(size, os.path.join(folder, "pipe"))
        factor = 2 ** (len(tp.vae.config.block_out_channels) - 1)
        n = int(np.log2(factor)) + 1
        torch.manual_seed(5)
        tcn = ref.perturb(ControlNetModel.from_unet(
            tp.unet, conditioning_embedding_out_channels=EMBEDDING[:n]), seed=5)
        tcn.save_pretrained(os.path.join(folder, "cn"), safe_serialization=True)
        pipe, params = jaxdiff.load_pipeline(os.path.join(folder, "pipe"))
        cn, cn_params = load_controlnet(os.path.join(folder, "cn"))
    if dtype_name == "bfloat16":
        pipe = pipe.with_dtype(jnp.bfloat16)
        cn = cn.clone(dtype=jnp.bfloat16)
    params, cn_params = jax.device_put(params), jax.device_put(cn_params)
    tcp = StableDiffusionControlNetPipeline(
        vae=tp.vae, text_encoder=tp.text_encoder, tokenizer=tp.tokenizer, unet=tp.unet,
        controlnet=tcn, scheduler=tp.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    tdt = None if dtype_name == "float32" else tdtype
    tp, tcp = tp.to(device=device, dtype=tdt), tcp.to(device=device, dtype=tdt)
    if torch_threads:
        torch.set_num_threads(torch_threads)
    torch.set_flush_denormal(True)
    for p in (tp, tcp):
        p.set_progress_bar_config(disable=True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    side = sample_bench.SIZES[size]["side"]
    f = pipe.vae_scale_factor
    prompts = [sample_bench.PROMPTS[i % len(sample_bench.PROMPTS)] for i in range(batch)]
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((batch, pipe.unet.config.in_channels, side // f,
                                 side // f)).astype(np.float32)
    noise_nhwc = noise.transpose(0, 2, 3, 1)
    cond = rng.integers(0, 256, (batch, side, side, 3), dtype=np.uint8)
    pil = [Image.fromarray(c) for c in cond]
    kw = dict(sampler="ddim", steps=steps, guidance_scale=guidance, latents=noise_nhwc,
              height=side, width=side)
    control = Control(cn, cn_params, cond, 1.0)

    t0 = time.perf_counter()
    jax_latents = jaxdiff.generate(pipe, params, prompts, output="latents", control=control,
                                   **kw)
    compile_s = time.perf_counter() - t0
    plain_latents = jaxdiff.generate(pipe, params, prompts, output="latents", **kw)

    final = {}

    def keep(_pipe, i, _t, cb):
        if i == steps - 1:
            final["latents"] = cb["latents"].float().cpu().numpy()
        return cb

    def torch_run(p, callback=None, **extra):
        with torch.no_grad():
            out = p(prompts, num_inference_steps=steps, guidance_scale=guidance,
                    latents=torch.tensor(noise, device=device, dtype=tdtype), height=side,
                    width=side, output_type="np", callback_on_step_end=callback,
                    **extra).images
        sync()
        return np.round(np.clip(out, 0, 1) * 255).astype(np.uint8)

    torch_run(tcp, keep, image=pil, controlnet_conditioning_scale=1.0)  # warm-up + check
    torch_run(tp)
    med = _interleaved({
        "jaxdiff": lambda: jaxdiff.generate(pipe, params, prompts, control=control, **kw),
        "torch": lambda: torch_run(tcp, image=pil, controlnet_conditioning_scale=1.0),
        "jaxdiff_plain": lambda: jaxdiff.generate(pipe, params, prompts, **kw),
        "torch_plain": lambda: torch_run(tp)}, repeats)
    s = {k: v[0] for k, v in med.items()}
    want = final["latents"].transpose(0, 2, 3, 1)
    row = dict(
        bench="control_speed", size=size, sampler="ddim", steps=steps, guidance=guidance,
        batch=batch, height=side, width=side, dtype=dtype_name,
        device=jax.devices()[0].platform, torch_device=device,
        torch_threads=torch.get_num_threads(), repeats=repeats,
        jaxdiff_img_per_s=round(batch / s["jaxdiff"], 4),
        torch_img_per_s=round(batch / s["torch"], 4),
        speedup=round(s["torch"] / s["jaxdiff"], 3),
        jaxdiff_plain_img_per_s=round(batch / s["jaxdiff_plain"], 4),
        torch_plain_img_per_s=round(batch / s["torch_plain"], 4),
        jaxdiff_control_overhead=round(s["jaxdiff"] / s["jaxdiff_plain"], 3),
        torch_control_overhead=round(s["torch"] / s["torch_plain"], 3),
        jaxdiff_compile_s=round(compile_s - s["jaxdiff"], 2),
        latents_max_abs_diff=float(f"{np.abs(jax_latents - want).max():.3g}"),
        latents_max_abs=round(float(np.abs(want).max()), 3),
        control_effect=float(f"{np.abs(jax_latents - plain_latents).max():.3g}"),
        image_max_abs_diff=int(np.abs(med["jaxdiff"][1].astype(int)
                                      - med["torch"][1].astype(int)).max()),
        loadavg_1m=round(os.getloadavg()[0], 2))
    print(json.dumps(row), flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "reduced"],
                    choices=list(sample_bench.SIZES))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=2, help="images per call (default 2)")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per side (median)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--out", default="", help="also write the JSON rows to this file")
    args = ap.parse_args(argv)
    import jax
    jax.config.update("jax_enable_compilation_cache", False)  # measure cold compiles
    rows = [bench_size(size, args.steps, args.batch, args.guidance, args.repeats, args.dtype,
                       args.torch_threads) for size in args.sizes]
    if args.out:
        from jaxdiff.data.images import write_json
        write_json(args.out, rows)


if __name__ == "__main__":
    main()
