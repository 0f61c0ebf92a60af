"""Fine-tuning editors (Imagic, UniTune) beside Prompt-to-Prompt on held-out shapes-world
images: size, position and colour edits scored against the known truth, as JSON.

    python bench/finetune_edit_quality.py [--model DIR] [--world v2|v1] [--num 100]
        [--kinds size position colour] [--etas 0.5 0.7 0.9 1.0] [--strengths 0.5 0.7 0.9]
        [--methods imagic unitune p2p] [--out results.json]

Every held-out one-object image gets, per kind, one edit of its fully stated caption
("a small red circle on the left on a black background"): size small <-> big, position
left <-> right / top <-> bottom / centre -> left, colour -> the next palette colour that
is not the background. Per method, setting and kind:

- ``success``: the world's evaluator (``shapes_eval.attribute_accuracy``) reads the edited
  attribute right on the edited image; ``all``: every attribute of the target scene
  (shape, colour, size, position, background, one object);
- ``psnr_outside_db``: PSNR against the input over the pixels outside the union of the
  old object's mask and the target object's mask (the world's renderer draws the target),
  both dilated by ``--dilate`` px (60 dB cap).
Imagic runs every eta from one fine-tuned model per image (one program: the eta sweep is
a traced vector); UniTune every strength likewise; P2P is null-text inversion + word swap
(replace, cross/self 0.8/0.4), issue #6's editor, with and without LocalBlend.
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
from jaxdiff.data import held_out_examples
from jaxdiff.data.shapes import caption, palette, render, world
from jaxdiff.editing import imagic, unitune
from jaxdiff.editing import p2p_pipeline as pp
from jaxdiff.eval import shapes_eval
from jaxdiff.pipeline import from_uint8, to_uint8

KINDS = ("size", "position", "colour")
OTHER_POSITION = {"left": "right", "right": "left", "top": "bottom", "bottom": "top",
                  "centre": "left"}


def edit_of(ex, spec, kind):
    """(source caption, target caption, target object, background, LocalBlend words)."""
    (obj,) = ex["objects"]
    bg = spec.background_names[int(ex["background"])]
    if kind == "size":
        new = dataclasses.replace(obj, size="big" if obj.size == "small" else "small")
        words = [obj.shape, obj.shape]  # LocalBlend: the object's region
    elif kind == "position":
        new = dataclasses.replace(obj, position=OTHER_POSITION[obj.position], offset=(0, 0))
        words = [obj.shape, obj.shape]
    else:
        names = list(palette(spec, bg))
        new = dataclasses.replace(obj, colour=names[(names.index(obj.colour) + 1) % len(names)],
                                  rgb=None)
        words = [obj.colour, new.colour]
    return caption([obj], bg), caption([new], bg), new, bg, words


def score(edited, examples, targets, spec, dilate):
    """Success of the edited attribute, every attribute, PSNR outside both objects."""
    succ, every, outside = [], [], []
    for img, ex, (_, _, new, bg, _), kind in zip(edited, examples, targets["edits"],
                                                 targets["kinds"]):
        acc = shapes_eval.attribute_accuracy(img, [new], spec, background=bg)
        succ.append(acc[kind])
        every.append(acc["all"])
        _, new_mask = render(spec, [new], bg)
        region = ndimage.binary_dilation(ex["masks"][0] | new_mask[0], iterations=dilate)
        diff = (img.astype(np.float64) - ex["image"])[~region]
        outside.append(min(60.0, 10 * np.log10(255.0 ** 2 / max(np.mean(diff ** 2), 1e-10))))
    r = lambda v: round(float(np.mean(v)), 3)
    return dict(success=r(succ), all=r(every), psnr_outside_db=round(float(np.mean(outside)), 2))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--num", type=int, default=100)
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--methods", nargs="+", default=["imagic", "unitune", "p2p"])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--etas", type=float, nargs="+", default=[0.0, 0.5, 0.7, 0.9, 1.0])
    ap.add_argument("--strengths", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    ap.add_argument("--embedding-steps", type=int, default=imagic.Stages().embedding_steps)
    ap.add_argument("--finetune-steps", type=int, default=imagic.Stages().finetune_steps)
    ap.add_argument("--lora-rank", type=int, default=imagic.Stages().lora_rank)
    ap.add_argument("--draws", type=int, default=imagic.Stages().draws)
    ap.add_argument("--embedding-lr", type=float, default=1e-3)
    ap.add_argument("--finetune-lr", type=float, default=1e-3)
    ap.add_argument("--chunk", type=int, default=50, help="images per program call")
    ap.add_argument("--dilate", type=int, default=1)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--world", default="v2",
                    help="shapes world of the held-out images (v2: the embedded model's | v1)")
    args = ap.parse_args()

    pipe, params = jaxdiff.load_pipeline(args.model)
    spec = world(args.world, image_size=pipe.image_size)
    examples = held_out_examples(spec, args.num, num_objects=1, named=True)
    jobs = [(ex, kind) for kind in args.kinds for ex in examples]
    targets = {"edits": [edit_of(ex, spec, k) for ex, k in jobs], "kinds": [k for _, k in jobs]}
    images = from_uint8(np.stack([ex["image"] for ex, _ in jobs]))
    sources = [e[0] for e in targets["edits"]]
    tgt = [e[1] for e in targets["edits"]]
    stages = imagic.Stages(args.embedding_steps, args.finetune_steps, args.lora_rank, args.draws)
    result = dict(bench="finetune_edit_quality", num_images=args.num, kinds=args.kinds,
                  steps=args.steps, guidance=args.guidance, stages=stages._asdict(),
                  embedding_lr=args.embedding_lr, finetune_lr=args.finetune_lr,
                  dilate=args.dilate, methods={})

    def chunked(fn):
        outs = [fn(images[i:i + args.chunk], tgt[i:i + args.chunk], sources[i:i + args.chunk])
                for i in range(0, len(jobs), args.chunk)]
        return np.concatenate([to_uint8(np.asarray(o)) for o in outs])

    def report(name, setting, edited):
        rows = {}
        for kind in args.kinds:
            idx = [i for i, k in enumerate(targets["kinds"]) if k == kind]
            sub = {"edits": [targets["edits"][i] for i in idx], "kinds": [kind] * len(idx)}
            rows[kind] = score(edited[idx], [jobs[i][0] for i in idx], sub, spec, args.dilate)
        rec = dict(setting, **rows)
        result["methods"].setdefault(name, []).append(rec)
        print(json.dumps({name: rec}), flush=True)

    common = dict(stages=stages, steps=args.steps, guidance_scale=args.guidance,
                  finetune_lr=args.finetune_lr)
    if "imagic" in args.methods:
        t0 = time.perf_counter()
        edited = chunked(lambda x, t, s: imagic.imagic(
            pipe, params, x, t, etas=args.etas, embedding_lr=args.embedding_lr,
            **common)["edited"])
        secs = round((time.perf_counter() - t0) / len(jobs), 3)
        for k, eta in enumerate(args.etas):
            report("imagic", dict(eta=eta, seconds_per_image_all_etas=secs),
                   edited[:, k])
    if "unitune" in args.methods:
        t0 = time.perf_counter()
        edited = chunked(lambda x, t, s: unitune.unitune(
            pipe, params, x, t, strengths=args.strengths, **dict(
                common, stages=stages._replace(embedding_steps=0)))["edited"])
        secs = round((time.perf_counter() - t0) / len(jobs), 3)
        for k, s in enumerate(args.strengths):
            report("unitune", dict(strength=s, seconds_per_image_all_strengths=secs),
                   edited[:, k])
    if "p2p" in args.methods:
        words = [e[4] for e in targets["edits"]]
        for blend in (False, True):
            settings = pp.P2PSettings(inversion="null_text", steps=args.steps,
                                      guidance=args.guidance,
                                      blend_words=words if blend else None)
            t0 = time.perf_counter()
            out = pp.p2p_edit_chunked(pipe, params, np.stack([ex["image"] for ex, _ in jobs]),
                                      sources, tgt, settings, max_batch=args.chunk)
            secs = round((time.perf_counter() - t0) / len(jobs), 3)
            report("p2p_null_text" + ("+local_blend" if blend else ""),
                   dict(seconds_per_image=secs), np.asarray(out.edited))
    print(json.dumps(result))
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            json.dump(result, f, indent=2)
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
