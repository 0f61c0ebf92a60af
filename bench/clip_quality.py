"""Zero-shot quality of a shapes-world CLIP on held-out world-v2 scenes, JSON.

    python bench/clip_quality.py [--clip DIR] [--num 500] [--num-retrieval 500] \\
        [--world v2] [--out results.json]

``--clip``: a transformers ``CLIPModel`` folder (default: the shipped
``jaxdiff/assets/clip_shapes``). Figures (``jaxdiff.eval.clip_zero_shot``):

- ``colour_accuracy`` / ``shape_accuracy``: zero-shot attribute accuracy on ``--num``
  held-out one-object scenes with prompt ensembling over the caption grammar (colour:
  "a {colour} {shape}" over all shapes and "a {colour} object"; shape: "a {colour}
  {shape}" over all colours and "a {shape}"); unnamed colours are left out of the colour
  score (``num_colour`` says how many were scored); ``chance_*`` = 1 / classes;
- ``image_to_text_r1`` / ``text_to_image_r1``: retrieval recall@1 among
  ``--num-retrieval`` held-out scenes (one or two objects) and their captions (an identical
  caption string counts as right); ``chance_r1`` is the expected share of right answers
  of a random pick.
Prints one JSON object (also written atomically to ``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import time

from jaxdiff.data.images import write_json
from jaxdiff.data.shapes import held_out_examples, world
from jaxdiff.eval import clip_zero_shot as zs
from jaxdiff.weights.clip_format import SHAPES_CLIP, load_clip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clip", default=SHAPES_CLIP, help="transformers CLIPModel folder")
    p.add_argument("--num", type=int, default=500, help="one-object scenes for attributes")
    p.add_argument("--num-retrieval", type=int, default=500, help="scenes for recall@1")
    p.add_argument("--world", default="v2", help="shapes world name (v1 | v2)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    clip, params = load_clip(args.clip)
    spec = world(args.world, image_size=clip.image_size)
    shipped = os.path.abspath(args.clip) == os.path.abspath(SHAPES_CLIP)
    result = {"clip": "jaxdiff/assets/clip_shapes" if shipped else args.clip,
              "world": args.world,
              "num": args.num}
    result.update(zs.attribute_accuracy(clip, params,
                                        held_out_examples(spec, args.num, num_objects=1), spec))
    result.update(zs.retrieval_recall_at_1(clip, params,
                                           held_out_examples(spec, args.num_retrieval)))
    result = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
