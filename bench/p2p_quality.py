"""Prompt-to-Prompt edit quality on held-out shapes-world images (ground truth known), JSON.

    python bench/p2p_quality.py [--model DIR] [--world v2|v1] [--num 100] [--steps 50] [--blend] \\
        [--inversions ddim,negative_prompt,null_text,direct] [--out results.json]

Every held-out one-object image gets two word-swap edits (P2P replace, cross/self
replace steps 0.8/0.4, guidance 7.5): a colour swap ("a red circle ..." -> "a blue
circle ...") and a shape swap ("... circle ..." -> "... square ..."); new colours/shapes
are drawn with a fixed seed (never the background's colour). Per inversion method and
edit kind:

- ``success``: the evaluator reads the new colour (or shape) on the edited image;
  ``kept``: it also reads the unchanged attributes (shape/colour, size, position) and
  background right; ``source_correct``: how often the evaluator reads the *input*'s
  swapped attribute from the reconstruction (a ceiling-ish reference);
- ``background_psnr_db``: PSNR between edit and input outside the ground-truth object
  mask dilated by 2 px (the edited object may change its outline a little);
- ``position_err_px``: distance between the edited object's centre (evaluator) and the
  ground-truth centre, over edits where one object is found; ``position_kept``: share
  of edits with exactly one object found within 3 px of the ground-truth centre;
- ``reconstruction_psnr_db``: the source branch against the input.
With ``--blend`` every method is also run with LocalBlend on the swapped words.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np
from scipy import ndimage

import jaxdiff
from jaxdiff.data import WorldSpec, held_out_examples
from jaxdiff.data.shapes import caption, world
from jaxdiff.editing import p2p_pipeline as pp
from jaxdiff.eval import shapes_eval
from jaxdiff.eval.generation import psnr


def swap_edits(spec: WorldSpec, examples, seed: int = 0):
    """For each one-object example: (colour-swap, shape-swap) as (target caption,
    target object, swapped words)."""
    rng = np.random.default_rng(seed)
    out = []
    for ex in examples:
        (obj,) = ex["objects"]
        bg = spec.background_names[int(ex["background"])]
        colours = [c for c in spec.colour_names if c not in (obj.colour, bg)]
        shapes = [s for s in spec.shapes if s != obj.shape]
        new_c = dataclasses.replace(obj, colour=colours[rng.integers(len(colours))], rgb=None)
        new_s = dataclasses.replace(obj, shape=shapes[rng.integers(len(shapes))])
        kw = dict(mention_size=bool(ex["mention_size"]),
                  mention_position=bool(ex["mention_position"]))
        bg_word = bg if bool(ex["mention_background"]) else None
        src = caption([obj], bg_word, **kw)
        assert src == ex["caption"], (src, ex["caption"])
        out.append([(caption([new_c], bg_word, **kw), new_c, [obj.colour, new_c.colour]),
                    (caption([new_s], bg_word, **kw), new_s, [obj.shape, new_s.shape])])
    return out


def _centre(mask):
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean() + 0.5, ys.mean() + 0.5])


def score(spec, examples, edits, result, kind: int):
    """Metrics of edit kind 0 (colour) or 1 (shape) from a P2PResult over 2 edits/image."""
    attr, others = (("colour", ("shape", "size", "position")) if kind == 0 else
                    ("shape", ("colour", "size", "position")))
    succ, kept, src_ok, bg_psnr, pos_err, pos_kept, rec_psnr = ([] for _ in range(7))
    for i, ex in enumerate(examples):
        row = 2 * i + kind
        img, rec, edited = ex["image"], result.reconstruction[row], result.edited[row]
        target = edits[i][kind][1]
        bg = spec.background_names[int(ex["background"])]
        acc = shapes_eval.attribute_accuracy(edited, [target], spec, background=bg)
        succ.append(acc[attr])
        kept.append(all(acc.get(a, True) for a in others) and acc["background"]
                    and acc["count"])
        src_ok.append(shapes_eval.attribute_accuracy(rec, list(ex["objects"]), spec)[attr])
        outside = ~ndimage.binary_dilation(ex["masks"][0], iterations=2)
        diff = (edited.astype(np.float64) - img)[outside]
        bg_psnr.append(min(60.0, 10 * np.log10(255.0 ** 2 / max(np.mean(diff ** 2), 1e-10))))
        found = shapes_eval.evaluate(edited, spec)["objects"]
        truth = _centre(ex["masks"][0])
        if len(found) == 1:
            err = float(np.linalg.norm(np.array(found[0]["centre"]) - truth))
            pos_err.append(err)
            pos_kept.append(err <= 3.0)
        else:
            pos_kept.append(False)
        rec_psnr.append(min(60.0, float(psnr(rec[None], img[None])[0])))
    r = lambda v: round(float(np.mean(v)), 3) if len(v) else None
    return dict(success=r(succ), kept=r(kept), source_correct=r(src_ok),
                background_psnr_db=r(bg_psnr), position_err_px=r(pos_err),
                position_kept=r(pos_kept), reconstruction_psnr_db=r(rec_psnr))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--num", type=int, default=100)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--inversions", default="ddim,negative_prompt,null_text,direct")
    ap.add_argument("--blend", action="store_true", help="also run with LocalBlend")
    ap.add_argument("--blend-threshold", type=float, default=0.3)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--world", default="v2",
                    help="shapes world of the held-out images (v2: the embedded model's | v1)")
    args = ap.parse_args()

    pipe, params = jaxdiff.load_pipeline(args.model)
    spec = world(args.world, image_size=pipe.image_size)
    examples = held_out_examples(spec, args.num, num_objects=1, named=True)
    edits = swap_edits(spec, examples)
    images = np.stack([e["image"] for e in examples])
    rows = np.repeat(np.arange(len(examples)), 2)  # colour swap, shape swap per image
    targets = [t for pair in edits for t, _, _ in pair]
    words = [w for pair in edits for _, _, w in pair]
    result = {"bench": "p2p_edit_quality", "model": args.model or "embedded", "world": args.world,
              "num_images": len(examples), "steps": args.steps,
              "guidance": args.guidance, "blend_threshold": args.blend_threshold, "cross_replace_steps": 0.8,
              "self_replace_steps": 0.4, "methods": {}}
    for blend in ([False, True] if args.blend else [False]):
        for name in args.inversions.split(","):
            settings = pp.P2PSettings(inversion=name, steps=args.steps, guidance=args.guidance,
                                      blend_words=words if blend else None,
                                      blend_threshold=args.blend_threshold)
            t0 = time.perf_counter()
            out = pp.p2p_edit(pipe, params, images, [e["caption"] for e in examples],
                              targets, settings, pair_image=rows)
            seconds = time.perf_counter() - t0
            key = name + ("+local_blend" if blend else "")
            result["methods"][key] = {
                "colour_swap": score(spec, examples, edits, out, 0),
                "shape_swap": score(spec, examples, edits, out, 1),
                "seconds_incl_compile": round(seconds, 1)}
            if blend:
                result["methods"][key]["mask_fraction"] = round(float(out.mask.mean()), 3)
            print(json.dumps({key: result["methods"][key]}), flush=True)
    print(json.dumps(result))
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            json.dump(result, f, indent=2)
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
