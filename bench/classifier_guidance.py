"""Classifier guidance on the embedded model: attribute accuracy vs classifier scale, beside CFG.

    python bench/classifier_guidance.py --classifier runs/classifier/export --out cg.json

Each of ``--num`` samples asks for a (colour, shape) pair (the 8 colours x 5 shapes in turn).
Rows, all from the same initial noise (``generate``'s, seed per sample):

* ``classifier_s``: the empty prompt (the unconditional model) steered by the noisy
  classifier (``guided_sampling.generate_guided``, labels = the pair) at scale s; the scales
  are one vmapped program (``--scales``, default 0 1 3 10; 0 is the unconditional model);
* ``cfg_g``: the prompt "a {colour} {shape}" with classifier-free guidance g (``--cfg``),
  no classifier;
* ``cfg_g+classifier_s``: both at once (``--combined`` scale s on top of the first CFG
  scale).

Every image is read back by ``eval.shapes_eval.attribute_accuracy`` (world v2's evaluator)
against one object of the asked colour and shape: ``colour`` / ``shape`` = some object has
it (``count`` is not scored: the unconditional model draws one or two objects), ``both`` =
one object has both. Chance for the unconditional row is about 1/8 (colour) and 1/5 (shape)
per object.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

import jaxdiff
from jaxdiff.data import shapes
from jaxdiff.data.images import make_grid, save_png, write_json
from jaxdiff.eval.shapes_eval import aggregate, attribute_accuracy
from jaxdiff.guided_sampling import generate_guided
from jaxdiff.models.noisy_classifier import load_classifier


def targets(num: int, spec):
    """[(colour, shape)] cycling over every pair (colour fastest)."""
    pairs = [(c, s) for s in spec.shapes for c in spec.colour_names]
    order = np.random.default_rng(0).permutation(len(pairs))
    return [pairs[order[i % len(pairs)]] for i in range(num)]


def score(images, pairs, spec):
    rows = []
    for img, (c, s) in zip(images, pairs):
        one = attribute_accuracy(img, [shapes.ShapeObject(shape=s, colour=c, size=None,
                                                           position=None)], spec)
        col = attribute_accuracy(img, [shapes.ShapeObject(shape=None, colour=c, size=None,
                                                          position=None)], spec)
        shp = attribute_accuracy(img, [shapes.ShapeObject(shape=s, colour=None, size=None,
                                                          position=None)], spec)
        rows.append({"colour": col["colour"], "shape": shp["shape"],
                     "both": one["colour"] and one["shape"]})
    return aggregate(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classifier", required=True, help="folder from train/classifier.py")
    p.add_argument("--num", type=int, default=80)
    p.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 3.0, 10.0])
    p.add_argument("--cfg", type=float, nargs="+", default=[1.0, 5.0])
    p.add_argument("--combined", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--batch", type=int, default=40)
    p.add_argument("--grid", default=None, help="PNG of the first 8 samples of every row")
    p.add_argument("--out", default=None, help="JSON file (written atomically)")
    args = p.parse_args(argv)
    pipe, params = jaxdiff.load_pipeline(None)
    model, cparams = load_classifier(args.classifier)
    names = dict(model.config.labels)
    spec = shapes.world("v2")
    pairs = targets(args.num, spec)
    rows, seconds, t0 = {}, {}, time.perf_counter()
    kw = dict(sampler=args.sampler, steps=args.steps)

    def run(name, fn):
        out, t = [], time.perf_counter()
        for s in range(0, args.num, args.batch):
            out.append(fn(pairs[s:s + args.batch], s))
        seconds[name] = time.perf_counter() - t
        return np.concatenate(out, axis=-4)

    def labels(chunk):
        return {"colour": [names["colour"].index(c) for c, _ in chunk],
                "shape": [names["shape"].index(s) for _, s in chunk]}

    sweep = run("classifier_sweep", lambda chunk, s: generate_guided(
        pipe, params, model, cparams, labels(chunk), None, list(args.scales), seed=s, **kw))
    for scale, images in zip(args.scales, sweep):
        rows[f"classifier_{scale:g}"] = (score(images, pairs, spec), images)
    prompts = lambda chunk: [f"a {c} {s}" for c, s in chunk]
    for g in args.cfg:
        images = run(f"cfg_{g:g}", lambda chunk, s: jaxdiff.generate(
            pipe, params, prompts(chunk), guidance_scale=g, seed=s, **kw))
        rows[f"cfg_{g:g}"] = (score(images, pairs, spec), images)
    g = args.cfg[-1]
    name = f"cfg_{g:g}+classifier_{args.combined:g}"
    images = run(name, lambda chunk, s: generate_guided(
        pipe, params, model, cparams, labels(chunk), prompts(chunk), args.combined,
        guidance_scale=g, seed=s, **kw))
    rows[name] = (score(images, pairs, spec), images)
    result = {"model": "embedded:shapes", "classifier": args.classifier, "num": args.num,
              "sampler": args.sampler, "steps": args.steps,
              "accuracy": {k: v[0] for k, v in rows.items()}, "seconds": seconds,
              "total_s": time.perf_counter() - t0}
    print(json.dumps(result, indent=1))
    if args.grid:
        save_png(args.grid, make_grid(np.concatenate([v[1][:8] for v in rows.values()]), 8))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        write_json(args.out, result)


if __name__ == "__main__":
    main()
