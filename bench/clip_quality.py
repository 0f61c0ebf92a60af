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

A noise-aware CLIP (``configs/clip.py:noisy``) reads the embedded model's VAE latents of
the same scenes, noised to each of ``--timesteps`` (one fixed noise draw per timestep;
default 0,250,500,750,999): ``per_timestep`` holds the attribute accuracies and recalls at
each, and the top-level figures are those of the first timestep.
Prints one JSON object (also written atomically to ``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from jaxdiff.data.images import write_json
from jaxdiff.data.shapes import held_out_examples, world
from jaxdiff.eval import clip_zero_shot as zs
from jaxdiff.weights import load_pipeline
from jaxdiff.weights.clip_format import SHAPES_CLIP, load_clip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clip", default=SHAPES_CLIP, help="transformers CLIPModel folder")
    p.add_argument("--num", type=int, default=500, help="one-object scenes for attributes")
    p.add_argument("--num-retrieval", type=int, default=500, help="scenes for recall@1")
    p.add_argument("--world", default="v2", help="shapes world name (v1 | v2)")
    p.add_argument("--timesteps", default=None,
                   help="noise-aware CLIP only: comma-separated timesteps "
                        "(default 0,250,500,750,999)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    clip, params = load_clip(args.clip)
    # A noise-aware CLIP reads the embedded model's latents of its 32x32 scenes.
    spec = world(args.world) if clip.time_token else world(args.world, image_size=clip.image_size)
    shipped = os.path.abspath(args.clip) == os.path.abspath(SHAPES_CLIP)
    result = {"clip": "jaxdiff/assets/clip_shapes" if shipped else args.clip,
              "world": args.world,
              "num": args.num}
    one = held_out_examples(spec, args.num, num_objects=1)
    scenes = held_out_examples(spec, args.num_retrieval)
    if clip.time_token is None:
        if args.timesteps is not None:
            p.error(f"--timesteps: {args.clip} is a clean CLIP (no time_embedding); "
                    "leave --timesteps out or give a noise-aware one (configs/clip.py:noisy).")
        result.update(zs.attribute_accuracy(clip, params, one, spec))
        result.update(zs.retrieval_recall_at_1(clip, params, scenes))
    else:
        result["per_timestep"] = noisy_scores(clip, params, one, scenes, spec,
                                              args.timesteps or "0,250,500,750,999", p)
        result.update(next(iter(result["per_timestep"].values())))
    result = {k: _round(v) for k, v in result.items()}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        write_json(args.out, result)
    return result


def _round(v):
    if isinstance(v, dict):
        return {k: _round(x) for k, x in v.items()}
    return round(v, 4) if isinstance(v, float) else v


def noisy_scores(clip, params, one, scenes, spec, timesteps: str, parser) -> dict:
    """{t: attribute accuracies + recalls} of a noise-aware CLIP on the scenes' latents."""
    from jaxdiff import schedules
    from jaxdiff.training.latents import encode_latents
    try:
        ts = [int(t) for t in timesteps.split(",")]
    except ValueError:
        parser.error(f"--timesteps {timesteps!r}: give comma-separated integers.")
    pipe, pipe_params = load_pipeline(None)
    if clip.noise_schedule and dict(clip.noise_schedule) != pipe.scheduler.to_dict():
        parser.error("this noise-aware CLIP was trained on another noise schedule than the "
                     "embedded model's; score it with the pipeline it was trained on.")
    acp = schedules.alphas_cumprod(pipe.scheduler)
    if any(not 0 <= t < len(acp) for t in ts):
        parser.error(f"--timesteps {timesteps!r}: each must be in [0, {len(acp) - 1}].")
    lat_one = encode_latents(pipe, pipe_params, np.stack([e["image"] for e in one]))
    lat_scenes = encode_latents(pipe, pipe_params, np.stack([e["image"] for e in scenes]))
    out = {}
    for t in ts:
        row = zs.attribute_accuracy(clip, params, one, spec,
                                    features=zs.noised_latent_features(clip, params, lat_one,
                                                                       t, acp))
        row.update(zs.retrieval_recall_at_1(
            clip, params, scenes,
            features=zs.noised_latent_features(clip, params, lat_scenes, t, acp, seed=1)))
        out[str(t)] = row
    return out


if __name__ == "__main__":
    main()
