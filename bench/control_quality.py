"""Spatial control on the shapes world, scored against the condition each image was given.

    python bench/control_quality.py --controlnet shipped --adapter shipped --gligen shipped
    python bench/control_quality.py --controlnet runs/controlnet/export \
        --adapter runs/adapter/export
    python bench/control_quality.py --gligen runs/gligen/export --num 200 --num-two 100
    python bench/control_quality.py --model runs/shapes_v2/export --controlnet DIR --world v2

Prints one JSON object (also written to ``--out``), scored by ``jaxdiff.eval.control_eval``
on held-out scenes of ``--world`` (v2 by default) at the model's image size:

* ``controlnet`` (segmentation-map conditions) / ``adapter`` (edge maps): for ``--num``
  held-out scenes (caption as prompt, the scene's condition image), ``control`` and
  ``baseline`` (the same compiled program at control scale 0, which equals generation
  without control; the same start noise per scene): ``mask_iou`` (mean IoU of the object
  mask the evaluator reads from the image with the condition's object mask),
  ``iou_at_least_0.5`` and ``attributes`` (shares of the caption's stated attributes
  read back right; ``all``: everything stated).
* ``gligen``: ``--num`` one-object layouts (half ``named``: a box around the captioned
  position; half ``unnamed``: a box at a corner or an off-grid centre and size, the
  prompt without position or size), ``--num-two`` ``two_object`` layouts (a box per
  object of a held-out scene, whose caption names their positions) and
  ``--num-two-unnamed`` ``two_unnamed`` ones (two objects in boxes at corners or off-grid
  centres, the prompt naming neither position); per group ``centre_in_box`` (some
  object's centre in the box), ``right_object_in_box`` (an object of the phrase's shape and colour) and
  ``layout_right`` (every box of the image right), grounded (``--gligen-beta``) and as
  ``baseline`` with the fusers off (beta 0, the same program).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="base pipeline directory or embedded[:NAME] "
                   "(default: the embedded shapes model)")
    p.add_argument("--controlnet", default=None, help="ControlNet folder (segmentation maps), "
                   "or 'shipped' (jaxdiff/assets/shapes_controlnet_seg)")
    p.add_argument("--adapter", default=None, help="T2I-Adapter folder (edge maps), or "
                   "'shipped' (jaxdiff/assets/shapes_adapter_edges)")
    p.add_argument("--gligen", default=None, help="GLIGEN UNet, pipeline or layers folder, or "
                   "'shipped' (jaxdiff/assets/shapes_gligen)")
    p.add_argument("--world", default="v2", help="shapes world: v1 or v2 (default)")
    p.add_argument("--jitter", type=float, default=0.0,
                   help="ControlNet / adapter scenes with objects moved up to this fraction "
                   "of the side off their named positions (captions still name them; "
                   "default 0: the world's own scenes)")
    p.add_argument("--unnamed-layout", action="store_true",
                   help="ControlNet / adapter prompts without position and size words, so "
                   "only the condition gives the layout")
    p.add_argument("--num", type=int, default=200,
                   help="held-out scenes (ControlNet / adapter) and one-object layouts (GLIGEN)")
    p.add_argument("--num-two", type=int, default=100,
                   help="GLIGEN two-object layouts at the positions their captions name")
    p.add_argument("--num-two-unnamed", type=int, default=100,
                   help="GLIGEN two-object layouts at positions no caption names")
    p.add_argument("--control-scale", type=float, default=1.0)
    p.add_argument("--gligen-beta", type=float, default=0.3,
                   help="gligen_scheduled_sampling_beta (default 0.3, diffusers')")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=50, help="scenes per generate call")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if not (args.controlnet or args.adapter or args.gligen):
        p.error("give at least one of --controlnet, --adapter, --gligen.")
    return args


def _chunks(n: int, size: int):
    size = max(1, min(size, n))
    for start in range(0, n, size):
        idx = np.arange(start, min(start + size, n))
        yield idx, np.concatenate([idx, np.full(size - len(idx), idx[-1])])  # one shape


def control_images(pipe, params, cases, models, args):
    """{name: uint8 [N, H, W, 3]} for "baseline" and each (name, kind, module, params) of
    ``models``: one generate program for all (per-row control scales), the same start noise
    for a scene in every row group."""
    import jaxdiff
    from jaxdiff.control import Control
    from jaxdiff.sampling import initial_noise, sample_keys

    names = ["baseline"] + [m[0] for m in models]
    out = {name: [] for name in names}
    noise = np.asarray(initial_noise(sample_keys(args.seed, len(cases)),
                                     pipe.latent_shape(pipe.image_size, pipe.image_size)))
    for idx, rows in _chunks(len(cases), args.chunk):
        g = len(names)
        prompts = [cases[i].prompt for i in rows] * g
        controls = []
        for k, (_, kind, module, mparams) in enumerate(models):
            scale = np.zeros((g, len(rows)), np.float32)
            scale[k + 1] = args.control_scale
            images = np.stack([cases[i].conditions[kind] for i in rows] * g)
            controls.append(Control(module, mparams, images, scale.reshape(-1)))
        imgs = jaxdiff.generate(pipe, params, prompts, sampler=args.sampler, steps=args.steps,
                                guidance_scale=args.guidance, latents=np.tile(noise[rows],
                                                                              (g, 1, 1, 1)),
                                control=controls)
        for k, name in enumerate(names):
            out[name].append(imgs[k * len(rows):k * len(rows) + len(idx)])
        print(f"generated {idx[-1] + 1}/{len(cases)} scenes", file=sys.stderr, flush=True)
    return {k: np.concatenate(v) for k, v in out.items()}


def gligen_images(pipe, params, cases, args):
    """{"grounded", "baseline" (fusers off)}: uint8 [N, H, W, 3] each, the same noise."""
    from jaxdiff.gligen_sampling import generate_gligen

    out = {"grounded": [], "baseline": []}
    for idx, rows in _chunks(len(cases), args.chunk):
        kw = dict(sampler=args.sampler, steps=args.steps, guidance_scale=args.guidance,
                  seed=args.seed, sample_offset=int(idx[0]))
        prompts = [cases[i].prompt for i in rows]
        phrases = [list(cases[i].phrases) for i in rows]
        boxes = [list(cases[i].boxes) for i in rows]
        for name, beta in (("grounded", args.gligen_beta), ("baseline", 0.0)):
            imgs = generate_gligen(pipe, params, prompts, phrases, boxes,
                                   gligen_scheduled_sampling_beta=beta, **kw)
            out[name].append(imgs[:len(idx)])
    return {k: np.concatenate(v) for k, v in out.items()}


def _rounded(tree):
    if isinstance(tree, dict):
        return {k: _rounded(v) for k, v in tree.items()}
    return round(tree, 4) if isinstance(tree, float) else tree


def main(argv=None):
    args = parse_args(argv)
    import jaxdiff
    from jaxdiff.data.images import write_json
    from jaxdiff.data.shapes import world
    from jaxdiff.eval import control_eval as ce
    from jaxdiff.weights.control import (SHAPES_ADAPTER, SHAPES_CONTROLNET, load_controlnet,
                                         load_t2i_adapter)
    from jaxdiff.weights.gligen import SHAPES_GLIGEN, with_gligen

    for name, shipped in (("controlnet", SHAPES_CONTROLNET), ("adapter", SHAPES_ADAPTER),
                          ("gligen", SHAPES_GLIGEN)):
        if getattr(args, name) == "shipped":
            setattr(args, name, shipped)

    pipe, params = jaxdiff.load_pipeline(args.model)
    spec = world(args.world, image_size=pipe.image_size)
    result = {"model": args.model or "embedded", "world": args.world,
              "image_size": spec.image_size, "sampler": args.sampler, "steps": args.steps,
              "guidance": args.guidance, "seed": args.seed, "num": args.num}
    t0 = time.perf_counter()
    models = [(name, kind, *load(folder)) for name, kind, folder, load in (
        ("controlnet", "segmentation", args.controlnet, load_controlnet),
        ("adapter", "edges", args.adapter, load_t2i_adapter)) if folder]
    if models:
        cases = ce.condition_cases(dataclasses.replace(spec, jitter=args.jitter), args.num,
                                   name_layout=not args.unnamed_layout)
        result.update(jitter=args.jitter, unnamed_layout=args.unnamed_layout)
        images = control_images(pipe, params, cases, models, args)
        for name, kind, _, _ in models:
            result[name] = {"dir": getattr(args, name), "condition": kind,
                            "control_scale": args.control_scale,
                            "control": ce.score_condition(images[name], cases, kind, spec),
                            "baseline": ce.score_condition(images["baseline"], cases, kind,
                                                           spec)}
    if args.gligen:
        gpipe, gparams = with_gligen(pipe, params, args.gligen)
        cases = ce.grounding_cases(spec, args.num, args.num_two,
                                   num_two_unnamed=args.num_two_unnamed)
        images = gligen_images(gpipe, gparams, cases, args)
        result["gligen"] = {"dir": args.gligen, "beta": args.gligen_beta,
                            "num_two": args.num_two, "num_two_unnamed": args.num_two_unnamed,
                            "grounded": ce.score_grounding(images["grounded"], cases, spec),
                            "baseline": ce.score_grounding(images["baseline"], cases, spec)}
    result["timing_s"] = round(time.perf_counter() - t0, 1)
    result = _rounded(result)
    print(json.dumps(result, indent=1))
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
