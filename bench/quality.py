"""Quality of a text-to-image pipeline on the shapes world, scored against ground truth.

    python bench/quality.py                          # the embedded model
    python bench/quality.py --model runs/shapes/export --num-one 50 --num-two 50
    python bench/quality.py --model candidates/shapes_v1 --world v1   # model v1

Prints one JSON object (also written to ``--out``):

* ``generation``: per guidance scale, the share of generated images whose count / shape /
  colour / size / position / background read back right, and ``all`` (everything asked
  right), for four rows of prompts:
  ``one_object`` and ``two_object``: held-out scenes, full captions;
  ``colour_free``: "a SHAPE on a BACKGROUND background" (every shape on every background,
  cycled): the asked shape and background (and one object);
  ``shape_free``: "a COLOUR object on a BACKGROUND background" (every colour allowed on
  every background, cycled): the asked colour and background (and one object).
  All scales are one vmapped sweep per chunk of prompts; every prompt has its own noise
  (``seed``, ``sample_offset``; the rows run in this order), so chunking does not change
  the images and adding rows leaves the earlier rows' images as they were.
* ``vae``: autoencoder round-trip PSNR (dB, uint8) on held-out images of ``--world``.
* ``evaluator_on_real``: the evaluator on those real images against their ground truth
  (unnamed colours not scored), a sanity line (should be ~1.0: generation scores are only
  as good as the reader).
* ``evaluator_on_vae``: the evaluator on the same images after the autoencoder round trip
  (posterior mean, decoder): what a model that drew exactly the real images' latents would
  score, a ceiling that the decoder sets.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="diffusers-layout pipeline directory "
                   "(default: the embedded shapes model)")
    p.add_argument("--num-one", type=int, default=200, help="one-object prompts (default 200)")
    p.add_argument("--num-two", type=int, default=100, help="two-object prompts (default 100)")
    p.add_argument("--num-colour-free", type=int, default=200,
                   help="'a square on a gray background' prompts (default 200)")
    p.add_argument("--num-shape-free", type=int, default=200,
                   help="'a red object on a gray background' prompts (default 200)")
    p.add_argument("--world", default="v2", help="shapes world of the real images and of "
                   "the evaluator: v2 (default: the embedded model's) or v1")
    p.add_argument("--num-real", type=int, default=200,
                   help="held-out world images for VAE PSNR and the evaluator check")
    p.add_argument("--guidance", type=float, nargs="+", default=[3.0, 5.0, 7.5])
    p.add_argument("--guidance-interval", type=float, nargs=2, default=(0.0, 1.0),
                   metavar=("START", "END"), help="fractions of the steps where CFG acts "
                   "(jaxdiff.generate's guidance_interval; default 0 1: every step)")
    p.add_argument("--condition-annealing", type=float, nargs=4, default=None,
                   metavar=("TAU1", "TAU2", "NOISE", "PSI"), help="CADS on the conditional "
                   "embedding (jaxdiff.generate's condition_annealing; e.g. 0.6 0.9 0.25 1; "
                   "default off)")
    p.add_argument("--apg", type=float, nargs=3, default=None,
                   metavar=("ETA", "THRESHOLD", "MOMENTUM"), help="adaptive projected "
                   "guidance on the x0 predictions (jaxdiff.generate's adaptive_projection; "
                   "1 0 0 is CFG; e.g. 0 0 -0.5; default off: CFG)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=50, help="prompts per generate call")
    p.add_argument("--out", default=None, help="also write the JSON here")
    return p.parse_args(argv)


def generate_all(pipe, params, prompts, args):
    """uint8 [S, N, H, W, 3]: every prompt at every guidance scale, in fixed-size chunks."""
    import jaxdiff

    n, chunk = len(prompts), max(1, min(args.chunk, len(prompts)))
    if n == 0:   # every row 0: only the autoencoder lines (--num-real)
        size = pipe.image_size
        return np.zeros((len(args.guidance), 0, size, size, 3), np.uint8)
    out = []
    for start in range(0, n, chunk):
        batch = prompts[start:start + chunk]
        real = len(batch)
        batch = batch + [batch[-1]] * (chunk - real)   # one shape -> one compile
        images = jaxdiff.generate(pipe, params, batch, sampler=args.sampler, steps=args.steps,
                                  guidance_scale=list(args.guidance), seed=args.seed,
                                  sample_offset=start,
                                  guidance_interval=args.guidance_interval,
                                  condition_annealing=args.condition_annealing,
                                  adaptive_projection=args.apg)
        out.append(images[:, :real])
        print(f"generated {start + real}/{n}", file=sys.stderr, flush=True)
    return np.concatenate(out, axis=1)


def single_attribute_cases(spec, num: int, drop: str) -> list:
    """``num`` one-object prompts that name one attribute and the background, cycled.

    drop="colour": "a SHAPE on a BACKGROUND background" (targets: shape, background);
    drop="shape": "a COLOUR object on a BACKGROUND background" (targets: colour,
    background). Returns ``generation.PromptCase``s.
    """
    from jaxdiff.data.shapes import ShapeObject, caption, palette
    from jaxdiff.eval.generation import PromptCase

    if drop == "colour":
        looks = [(ShapeObject(s, None, None, None), bg)
                 for bg in spec.background_names for s in spec.shapes]
    elif drop == "shape":
        looks = [(ShapeObject(None, c, None, None), bg)
                 for bg in spec.background_names for c in palette(spec, bg)]
    else:
        raise ValueError(f"drop must be 'colour' or 'shape', got {drop=}")
    out = []
    for k in range(num):
        obj, bg = looks[k % len(looks)]
        # caption() needs a whole object; the dropped attribute is never said.
        said = ShapeObject(obj.shape or "circle", obj.colour or "red", None, None)
        text = caption([said], bg, mention_size=False, mention_position=False,
                       mention_colour=drop != "colour", mention_shape=drop != "shape")
        out.append(PromptCase(text, (obj,), bg))
    return out


def main(argv=None):
    args = parse_args(argv)
    import dataclasses

    import jaxdiff
    from jaxdiff.data.shapes import UNNAMED, held_out_examples, world
    from jaxdiff.eval import generation as gen

    pipe, params = jaxdiff.load_pipeline(args.model)
    spec = world(args.world, image_size=pipe.image_size)
    result = {"model": args.model or "embedded", "world": args.world,
              "image_size": spec.image_size, "sampler": args.sampler, "steps": args.steps,
              "seed": args.seed, "guidance": list(args.guidance),
              "guidance_interval": list(args.guidance_interval),
              "condition_annealing": args.condition_annealing, "apg": args.apg}

    cases = gen.prompt_set(spec, args.num_one, args.num_two)
    groups = gen.split_by_objects(cases)
    for name, num, drop in (("colour_free", args.num_colour_free, "colour"),
                            ("shape_free", args.num_shape_free, "shape")):
        extra = single_attribute_cases(spec, num, drop)
        groups[name] = list(range(len(cases), len(cases) + len(extra)))
        cases += extra
    t0 = time.perf_counter()
    images = generate_all(pipe, params, [c.prompt for c in cases], args)
    t1 = time.perf_counter()
    scores = {}
    for name, idx in groups.items():
        if not idx:
            continue
        scores[name] = {"n": len(idx),
                        "unique_prompts": len({cases[i].prompt for i in idx}),
                        "by_guidance": {}}
        for g, imgs in zip(args.guidance, images):
            s = gen.score_images(imgs[idx], [cases[i] for i in idx], spec)
            s.pop("n")
            scores[name]["by_guidance"][f"{g:g}"] = {k: round(v, 4) for k, v in s.items()}
    result["generation"] = scores
    result["timing_s"] = {"generate": round(t1 - t0, 1),
                          "score": round(time.perf_counter() - t1, 1)}

    if args.num_real > 0:
        real = held_out_examples(spec, args.num_real)
        real_images = np.stack([ex["image"] for ex in real])
        result["vae"] = {k: (round(v, 3) if isinstance(v, float) else v)
                         for k, v in gen.vae_psnr(pipe, params, real_images).items()}
        round_trip = gen.vae_reconstruct(pipe, params, real_images)
        truth = [([dataclasses.replace(o, colour=None) if o.colour == UNNAMED else o
                   for o in ex["objects"]], spec.background_names[int(ex["background"])])
                 for ex in real]
        result["evaluator_on_real"] = {k: round(v, 4)
                                       for k, v in gen.score_images(real_images, truth,
                                                                    spec).items()}
        result["evaluator_on_vae"] = {k: round(v, 4)
                                      for k, v in gen.score_images(round_trip, truth,
                                                                   spec).items()}

    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
