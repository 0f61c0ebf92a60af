"""CLIP guidance (SDG) on the embedded model with the empty prompt, JSON.

    python bench/clip_guidance.py [--num 32] [--scales 0,10,30,100] [--steps 20] \\
        [--mode x0] [--clip DIR] [--target text|image] [--normalize] [--recurrence K] \\
        [--views V] [--candidates N] [--model candidates/shapes_v1 --world v1] \\
        [--out results.json]

``--target text``: each image is guided towards "a {colour} {shape}" (colours in turn,
shapes drawn with a fixed seed); ``--target image``: towards the CLIP embedding of a
reference image, a held-out one-object world scene (its colour and shape are the target).
``jaxdiff.clip_guidance.generate_clip_guided`` runs it (DDIM, the empty prompt, no
classifier-free guidance, one vmapped program over the scales; ``--normalize``: unit-RMS
gradients, ``--recurrence``: self-recurrence, ``--candidates``: the best of N guided samples
by CLIP similarity); the shapes-world evaluator reads colour and shape back. Scale 0 is the
unconditional model (chance-level agreement). Prints one JSON object (also written
atomically to ``--out``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np

import jaxdiff
from jaxdiff import clip_guidance as cg
from jaxdiff.data.images import write_json
from jaxdiff.data.shapes import WORLDS, ShapeObject, caption, held_out_examples
from jaxdiff.eval import shapes_eval
from jaxdiff.weights.clip_format import SHAPES_CLIP, load_clip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num", type=int, default=32, help="guided images per scale")
    p.add_argument("--scales", default="0,10,30,100", help="comma-separated CLIP scales")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--mode", default="x0", choices=cg.MODES)
    p.add_argument("--clip", default=SHAPES_CLIP, help="transformers CLIPModel folder")
    p.add_argument("--target", default="text", choices=("text", "image"),
                   help="guide towards a text or a reference image's embedding")
    p.add_argument("--normalize", action="store_true",
                   help="unit-RMS similarity gradients (scales ~1-2)")
    p.add_argument("--recurrence", type=int, default=1, help="self-recurrence rounds per step")
    p.add_argument("--views", type=int, default=1,
                   help="mode x0: similarity averaged over this many shifted views")
    p.add_argument("--backward-steps", type=int, default=0,
                   help="universal guidance backward steps on the predicted x0 per step")
    p.add_argument("--backward-size", type=float, default=0.1,
                   help="each backward step's size per unit of CLIP scale (unit RMS)")
    p.add_argument("--candidates", type=int, default=1,
                   help="guided samples per target, the CLIP's most similar kept (re-ranking)")
    p.add_argument("--model", default=None, help="pipeline folder (default: the embedded model)")
    p.add_argument("--world", default="v2",
                   help="shapes world of the targets (v2: the embedded model's | v1)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    pipe, params = jaxdiff.load_pipeline(args.model)
    clip, clip_params = load_clip(args.clip)
    spec = WORLDS[args.world]
    if args.target == "text":
        rng = np.random.default_rng(0)
        targets = [ShapeObject(spec.shapes[rng.integers(len(spec.shapes))],
                               spec.colour_names[i % len(spec.colour_names)], None, None)
                   for i in range(args.num)]
        texts = [caption([o], None, mention_size=False, mention_position=False)
                 for o in targets]
        what = dict(texts=texts)
    else:
        refs = held_out_examples(spec, args.num, num_objects=1)
        targets = [dataclasses.replace(ex["objects"][0], size=None, position=None)
                   for ex in refs]
        what = dict(images=np.stack([ex["image"] for ex in refs]))
    scales = [float(s) for s in args.scales.split(",")]
    t0 = time.perf_counter()
    images = cg.generate_clip_guided(pipe, params, clip, clip_params, clip_scale=scales,
                                     steps=args.steps, mode=args.mode,
                                     normalize=args.normalize, recurrence=args.recurrence,
                                     views=args.views, backward_steps=args.backward_steps,
                                     backward_size=args.backward_size,
                                     candidates=args.candidates, **what)
    result = {"num": args.num, "steps": args.steps, "mode": args.mode, "target": args.target,
              "normalize": args.normalize, "recurrence": args.recurrence, "views": args.views,
              "backward_steps": args.backward_steps, "backward_size": args.backward_size,
              "candidates": args.candidates,
              "model": args.model or "embedded", "world": args.world, "by_scale": {}}
    for s, row in zip(scales, images):
        reads = [shapes_eval.attribute_accuracy(img, [o], spec) for img, o in zip(row, targets)]
        result["by_scale"][str(s)] = {k: round(float(np.mean([r[k] for r in reads])), 4)
                                      for k in ("colour", "shape", "count")}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=1))
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
