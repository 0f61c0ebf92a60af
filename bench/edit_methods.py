"""SDEdit, DiffEdit, blended latent diffusion, RePaint and ILVR on held-out shapes-world
images (ground truth known), as JSON.

    python bench/edit_methods.py [--model DIR] [--world v2|v1] [--num 100] [--steps 50]
        [--methods sdedit diffedit blended repaint ilvr]

Each one-object held-out image (``--world v2``: one whose caption names its colour and
shape) gets a colour swap: the target prompt is its caption with
the object's colour replaced (the next colour of the palette that is not the background).
Scored with the shapes-world evaluator (``jaxdiff.eval.shapes_eval``):

- ``edit_success``: the evaluator reads the target colour on an object of the right shape
  (``colour_ok``/``shape_ok`` separately; ``all_ok`` = every attribute the caption states);
- ``psnr_outside_db``: PSNR over the pixels outside the ground-truth object mask, dilated
  by ``--dilate`` pixels (the regions methods may change), against the input image;
- DiffEdit: IoU of the automatic mask (latent resolution, nearest-upsampled) with the
  ground-truth object mask, and the same for the ground-truth mask's latent
  quantisation (the best any latent mask can do);
- blended / RePaint: the mask given is the dilated ground-truth object mask;
- ``--methods vae``: the VAE round trip scored against the *source* caption (what the
  evaluator reads on an unedited, VAE-blurred image: the ceiling for ``shape_kept``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
from scipy import ndimage

import jaxdiff
from jaxdiff.data import held_out_examples
from jaxdiff.data.shapes import caption, palette, world
from jaxdiff.editing import blended, diffedit, ilvr, repaint, sdedit
from jaxdiff.eval import shapes_eval
from jaxdiff.eval.generation import psnr
from jaxdiff.pipeline import from_uint8, to_uint8


def swap_colour(ex, spec):
    """(target caption, target ShapeObject) with the object's colour replaced."""
    obj = ex["objects"][0]
    bg = spec.background_names[int(ex["background"])]
    names = list(palette(spec, bg))
    new = names[(names.index(obj.colour) + 1) % len(names)]
    tgt = dataclasses.replace(obj, colour=new, rgb=None)
    cap = caption([tgt], bg if ex["mention_background"] else None,
                  mention_size=bool(ex["mention_size"]),
                  mention_position=bool(ex["mention_position"]))
    return cap, tgt


def score(edited, images, gt_masks, targets, spec, dilate):
    res = [shapes_eval.attribute_accuracy(e, [t], spec) for e, t in zip(edited, targets)]
    keep = ~np.stack([ndimage.binary_dilation(m, iterations=dilate) for m in gt_masks])
    outside = []
    for e, x, k in zip(edited, images, keep):
        mse = np.mean((e[k].astype(np.float64) - x[k].astype(np.float64)) ** 2)
        outside.append(min(60.0, 10 * np.log10(255.0 ** 2 / max(mse, 1e-12))))
    return {"edit_success_colour": round(float(np.mean([r["colour"] for r in res])), 3),
            "shape_kept": round(float(np.mean([r["shape"] for r in res])), 3),
            "all_attributes": round(float(np.mean([r["all"] for r in res])), 3),
            "psnr_outside_db": round(float(np.mean(outside)), 2),
            "psnr_whole_db": round(float(np.mean(np.minimum(psnr(edited, images), 60))), 2)}


def iou(a, b):
    return float((a & b).sum() / max((a | b).sum(), 1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--num", type=int, default=100)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--dilate", type=int, default=2)
    ap.add_argument("--world", default="v2",
                    help="shapes world of the held-out images (v2: the embedded model's | v1)")
    ap.add_argument("--methods", nargs="+",
                    default=["sdedit", "diffedit", "blended", "repaint", "ilvr"])
    ap.add_argument("--repaint-steps", type=int, default=25)
    ap.add_argument("--jump", type=int, default=5, help="RePaint jump_length = jump_n_sample")
    args = ap.parse_args()

    pipe, params = jaxdiff.load_pipeline(args.model)
    side = pipe.image_size
    spec = world(args.world, image_size=side)
    ex = held_out_examples(spec, args.num, num_objects=1, named=True)
    images = np.stack([e["image"] for e in ex])
    gt = np.stack([e["masks"][0] for e in ex])
    src = [e["caption"] for e in ex]
    tgt_caps, targets = zip(*[swap_colour(e, spec) for e in ex])
    tgt_caps = list(tgt_caps)
    x = from_uint8(images)
    region = np.stack([ndimage.binary_dilation(m, iterations=args.dilate) for m in gt])
    g, s = args.guidance, args.steps
    common = dict(num_images=len(ex), steps=s, guidance=g, dilate=args.dilate)

    def emit(name, settings, out, t0, **extra):
        edited = to_uint8(np.asarray(out["edited"]))
        rec = dict(bench="edit_methods", method=name, **common, **settings,
                   seconds=round(time.perf_counter() - t0, 1),
                   **score(edited, images, gt, targets, spec, args.dilate), **extra)
        print(json.dumps(rec), flush=True)

    if "vae" in args.methods:  # baseline: the VAE round trip scored against the *source*
        t0 = time.perf_counter()
        rec = {"edited": pipe.decode_latents(params, pipe.encode_images(params, x))}
        edited = to_uint8(np.asarray(rec["edited"]))
        print(json.dumps(dict(bench="edit_methods", method="vae_reconstruction_vs_source",
                              num_images=len(ex), dilate=args.dilate,
                              seconds=round(time.perf_counter() - t0, 1),
                              **score(edited, images, gt, [e["objects"][0] for e in ex],
                                      spec, args.dilate))), flush=True)
    if "sdedit" in args.methods:
        for strength in (0.3, 0.5, 0.8):
            t0 = time.perf_counter()
            out = sdedit.sdedit(pipe, params, x, tgt_caps, strength=strength, steps=s,
                                guidance_scale=g)
            emit("sdedit", dict(strength=strength), out, t0)
    if "diffedit" in args.methods:
        t0 = time.perf_counter()
        out = diffedit.diffedit(pipe, params, x, src, tgt_caps, steps=s, guidance_scale=g)
        lm = np.asarray(out["latent_mask"]) > 0.5
        up = side // lm.shape[1]
        auto = lm.repeat(up, 1).repeat(up, 2)
        quant = np.stack([m.reshape(lm.shape[1], up, lm.shape[2], up).mean((1, 3)) >= 0.5
                          for m in gt]).repeat(up, 1).repeat(up, 2)
        emit("diffedit", dict(strength=0.8, mask_strength=0.5, num_maps=10), out, t0,
             mask_iou=round(float(np.mean([iou(a, b) for a, b in zip(auto, gt)])), 3),
             mask_iou_dilated_gt=round(float(np.mean([iou(a, b) for a, b in
                                                      zip(auto, region)])), 3),
             mask_area_frac=round(float(auto.mean()), 3),
             gt_latent_quantised_iou=round(float(np.mean([iou(a, b) for a, b in
                                                          zip(quant, gt)])), 3))
    if "blended" in args.methods:
        t0 = time.perf_counter()
        out = blended.blended(pipe, params, x, region.astype(np.float32), tgt_caps,
                              blending_percentage=0.25, steps=s, guidance_scale=g)
        emit("blended", dict(blending_percentage=0.25), out, t0)
    if "repaint" in args.methods:
        t0 = time.perf_counter()
        out = repaint.repaint(pipe, params, x, region.astype(np.float32), tgt_caps,
                              steps=args.repaint_steps, jump_length=args.jump,
                              jump_n_sample=args.jump, guidance_scale=g)
        emit("repaint", dict(repaint_steps=args.repaint_steps, jump_length=args.jump,
                             jump_n_sample=args.jump), out, t0)
    if "ilvr" in args.methods:
        for factor in (2, 4):
            t0 = time.perf_counter()
            out = ilvr.ilvr(pipe, params, x, tgt_caps, factor=factor, steps=s,
                            guidance_scale=g)
            lp = lambda a, f=factor * pipe.vae_scale_factor: a.reshape(
                a.shape[0], side // f, f, side // f, f, 3).astype(np.float64).mean((2, 4))
            ed = to_uint8(np.asarray(out["edited"]))
            lp_psnr = 10 * np.log10(255.0 ** 2 / np.mean((lp(ed) - lp(images)) ** 2, (1, 2, 3)))
            emit("ilvr", dict(factor=factor), out, t0,
                 low_pass_psnr_db=round(float(np.mean(np.minimum(lp_psnr, 60))), 2))


if __name__ == "__main__":
    main()
