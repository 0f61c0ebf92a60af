"""Inversion reconstruction on held-out shapes-world images (ground truth known), as JSON.

    python bench/edit_quality.py [--model DIR] [--world v2|v1] [--num 100] [--steps 50]

For each method the source image is inverted with its own caption and reconstructed
with DDIM; PSNR is measured in pixels against the original image, and against the VAE
reconstruction (which bounds every latent-space method). Published ordering to check:
DDIM at guidance 7.5 far below null-text, negative-prompt and direct inversion.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxdiff
from jaxdiff.data import held_out_examples
from jaxdiff.data.shapes import world
from jaxdiff.editing import batch_inputs, inversion as inv
from jaxdiff.eval.generation import psnr
from jaxdiff.pipeline import from_uint8, to_uint8
from jaxdiff.samplers.ddim import ddim_tables


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--num", type=int, default=100)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--world", default="v2",
                    help="shapes world of the held-out images (v2: the embedded model's | v1)")
    args = ap.parse_args()

    pipe, params = jaxdiff.load_pipeline(args.model)
    side = pipe.image_size
    ex = held_out_examples(world(args.world, image_size=side), args.num)
    images = np.stack([e["image"] for e in ex])
    pt, g, s = pipe.scheduler.prediction_type, args.guidance, args.steps
    tab = ddim_tables(pipe.scheduler, s)
    den = batch_inputs.unet_denoiser(pipe, params)

    @jax.jit
    def run(images, ids, empty_ids):
        z0 = pipe.encode_images(params, from_uint8(images))
        cond, uncond = pipe.encode_text(params, ids), pipe.encode_text(params, empty_ids)
        traj = inv.ddim_invert(den, tab, z0, cond, pt)
        empty = jnp.broadcast_to(uncond, (s,) + uncond.shape)
        nulls, taken = inv.null_text_invert(den, tab, traj, cond, uncond, g, pt)
        offsets = inv.direct_offsets(den, tab, traj, cond, empty, g, pt)
        sample = lambda nl, scale, off=None: inv.ddim_sample(den, tab, traj[-1], cond, nl,
                                                             scale, pt, off)
        lat = {"vae_only": z0, "ddim_g1": sample(empty, 1.0), "ddim_g7.5": sample(empty, g),
               "negative_prompt": sample(inv.negative_prompt_nulls(cond, s), g),
               "null_text": sample(nulls, g), "direct": sample(empty, g, offsets)}
        return {k: pipe.decode_latents(params, v) for k, v in lat.items()}, taken

    t0 = time.perf_counter()
    ids = pipe.tokenize([e["caption"] for e in ex])
    out, taken = run(images, ids, pipe.tokenize([""] * len(ex)))
    seconds = time.perf_counter() - t0
    vae = to_uint8(out["vae_only"])
    result = {"bench": "inversion_reconstruction", "model": args.model or "embedded",
              "world": args.world, "num_images": len(ex), "steps": s,
              "guidance": g, "seconds_total": round(seconds, 1),
              "null_text_mean_inner_steps": round(float(np.mean(np.asarray(taken))), 2)}
    for name, imgs in out.items():
        rec = to_uint8(imgs)
        result[name] = {"psnr_db": round(float(np.mean(np.minimum(psnr(rec, images), 60))), 2),
                        "psnr_vs_vae_db": round(float(np.mean(np.minimum(psnr(rec, vae), 60))),
                                                2)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
