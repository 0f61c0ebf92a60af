"""CLIP-text guidance (SDG) on the embedded model with the empty prompt, JSON.

    python bench/clip_guidance.py [--num 32] [--scales 0,10,30,100] [--steps 20] \\
        [--mode x0] [--clip DIR] [--out results.json]

Each image is guided towards "a {colour} {shape}" (colours in turn, shapes drawn with a
fixed seed) by ``jaxdiff.clip_guidance.generate_clip_guided`` (DDIM, the empty prompt,
no classifier-free guidance, one vmapped program over the scales); the shapes-world
evaluator reads colour and shape back. Scale 0 is the unconditional model (chance-level
agreement). Prints one JSON object (also written atomically to ``--out``).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

import jaxdiff
from jaxdiff import clip_guidance as cg
from jaxdiff.data.images import write_json
from jaxdiff.data.shapes import ShapeObject, WorldSpec, caption
from jaxdiff.eval import shapes_eval
from jaxdiff.weights.clip_format import SHAPES_CLIP, load_clip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num", type=int, default=32, help="guided images per scale")
    p.add_argument("--scales", default="0,10,30,100", help="comma-separated CLIP scales")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--mode", default="x0", choices=cg.MODES)
    p.add_argument("--clip", default=SHAPES_CLIP, help="transformers CLIPModel folder")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    pipe, params = jaxdiff.load_pipeline(None)
    clip, clip_params = load_clip(args.clip)
    spec = WorldSpec()  # the embedded model's world
    rng = np.random.default_rng(0)
    targets = [ShapeObject(spec.shapes[rng.integers(len(spec.shapes))],
                           spec.colour_names[i % len(spec.colour_names)], None, None)
               for i in range(args.num)]
    texts = [caption([o], None, mention_size=False, mention_position=False) for o in targets]
    scales = [float(s) for s in args.scales.split(",")]
    t0 = time.perf_counter()
    images = cg.generate_clip_guided(pipe, params, clip, clip_params, texts=texts,
                                     clip_scale=scales, steps=args.steps, mode=args.mode)
    result = {"num": args.num, "steps": args.steps, "mode": args.mode, "by_scale": {}}
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
