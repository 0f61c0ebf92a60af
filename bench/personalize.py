"""Personalization on the embedded model (or ``--model DIR``): teach what the model lacks, measure.

The subject is a hollow red ring on white (the world has only filled shapes; the
evaluator's templates fit rings < 0.6). Five 32x32 instance images are drawn with PIL.

* DreamBooth ("a sks circle" / class "a circle"), full UNet, with prior_loss_weight
  lambda = 1 and lambda = 0 (same steps, same class images):
  - subject fidelity: share of "a sks circle" generations that show one red object with
    a hole (a ring: ``binary_fill_holes(mask)`` adds >= 8 % area);
  - language drift: class-prompt generations "a <colour> circle" (6 colours) before vs
    after: shape+colour accuracy from ``shapes_eval.attribute_accuracy`` and the share
    that came out as rings.
* Textual Inversion ("<ring>", initialised from "circle"): fidelity of "a <ring>".
* Textual Inversion of a concept the model can draw but the prompt does not name: five
  world images of stars (five colours, both sizes) taught as "<s>", initialised from
  "circle"; fidelity = share of "a <s>" generations the evaluator reads as one star
  (before training, i.e. the "circle" embedding: its star rate is reported too).
* Textual Inversion of a colour the world lacks: five pink circles on black taught as
  "<p>" (template "a {} circle", initialised from "red"); fidelity = share of "a <p>
  circle on a black background" generations that the evaluator, given the palette plus
  pink, reads as one pink object (vs "a red circle ...", the initial embedding).
* Off-palette colours (section ``colours``, issue #22 point 4; ``personalize_colours.py``
  says how): a dark and a light colour outside world v2's named colours and their shade
  spread, each taught from five world-v2 renders by Textual Inversion, DreamBooth (full
  UNet) and DreamBooth-LoRA; fidelity = share of generations whose object's median colour
  is within 40 RGB units of the taught colour, beside the base model's best named colour
  word; DreamBooth drift on colour-free prompts (class prompt "an object on a BG
  background", "a SHAPE on a BG background").
* Train-step speed (section ``speed``, ``personalize_speed.py``): one DreamBooth step
  (batch 4 instance + 4 class, full UNet, AdamW) and one Textual Inversion step (batch 4,
  one new row) in jaxdiff vs diffusers' PyTorch models on the same weights, as ratios.

The ring / star / pink sections score with the v1 world's evaluator (``WorldSpec()``),
the colours section with world v2's. ``--sections`` picks sections (default: all).

    python bench/personalize.py --steps 400 --lr 3e-4 --ti-steps 600 --ti-lr 1e-2
    python bench/personalize.py --model candidates/shapes_v2_brief --sections colours
    python bench/personalize.py --model candidates/shapes_v2_brief --sections colours \
        --colour-captions shape
    python bench/personalize.py --model candidates/shapes_v2_brief --sections colours \
        --colour-vae-scan

Prints JSON (and writes it with --out; the colours section writes what it has finished
there after each method, marked "partial": true, so a long run keeps its figures).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import numpy as np

COLOURS = ("red", "blue", "green", "yellow", "purple", "orange")


def draw_rings(folder: str, n: int = 5, size: int = 32):
    from PIL import Image, ImageDraw
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", (size, size), (255, 255, 255))
        d = ImageDraw.Draw(im)
        r, c = 9 + i % 3, 16 + (i % 2) - (i // 3)
        d.ellipse([c - r, c - r, c + r, c + r], outline=(220, 30, 30), width=3)
        im.save(os.path.join(folder, f"ring_{i}.png"))
    return folder


POSITIONS = ("centre", "left", "right", "top", "bottom")


def draw_world(folder: str, spec, name: str, shapes, colours, background: str, n: int = 5):
    """n world renders of one object each: shape ``shapes[i % len]``, colour
    ``colours[i % len]``, size alternating big/small, the five positions in turn; files
    ``<name>_<i>.png``."""
    from PIL import Image

    from jaxdiff.data.shapes import ShapeObject, render
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        obj = ShapeObject(shape=shapes[i % len(shapes)], colour=colours[i % len(colours)],
                          size=("big", "small")[i % 2], position=POSITIONS[i % 5])
        image, _ = render(spec, [obj], background)
        Image.fromarray(image).save(os.path.join(folder, f"{name}_{i}.png"))
    return folder


def draw_stars(folder: str, spec, n: int = 5):
    """Stars in five colours on white."""
    return draw_world(folder, spec, "star", ("star",),
                      ("red", "blue", "green", "yellow", "purple"), "white", n)


def star_rate(pipe, params, spec, prompt, seeds=32, steps=25) -> float:
    from jaxdiff import generate
    from jaxdiff.eval.shapes_eval import evaluate
    images = generate(pipe, params, [prompt] * seeds, sampler="dpmpp_2m", steps=steps,
                      guidance_scale=5.0, seed=3)
    reads = [evaluate(x, spec)["objects"] for x in images]
    return float(np.mean([len(o) == 1 and o[0]["shape"] == "star" for o in reads]))


NEW_COLOUR = ("pink", (250, 120, 190))  # not in the world's palette


def draw_new_colour(folder: str, spec, n: int = 5):
    """Pink circles (a colour the world's palette lacks) on black."""
    spec = dataclasses.replace(spec, colours=spec.colours + (NEW_COLOUR,))
    return draw_world(folder, spec, "pink", ("circle",), (NEW_COLOUR[0],), "black", n)


def colour_rate(pipe, params, spec, prompt, seeds=32, steps=25) -> dict:
    """Share of generations the evaluator (palette + pink) reads as one pink object / one
    pink circle, and the colours it read."""
    from jaxdiff import generate
    from jaxdiff.eval.shapes_eval import evaluate
    spec = dataclasses.replace(spec, colours=spec.colours + (NEW_COLOUR,))
    images = generate(pipe, params, [prompt] * seeds, sampler="dpmpp_2m", steps=steps,
                      guidance_scale=5.0, seed=4)
    reads = [evaluate(x, spec)["objects"] for x in images]
    one = [o[0] for o in reads if len(o) == 1]
    return dict(pink=float(np.mean([len(o) == 1 and o[0]["colour"] == "pink" for o in reads])),
                pink_circle=float(np.mean([len(o) == 1 and o[0]["colour"] == "pink"
                                           and o[0]["shape"] == "circle" for o in reads])),
                colours_read={c: sum(x["colour"] == c for x in one)
                              for c in sorted({x["colour"] for x in one})})


def is_ring(image, spec) -> bool:
    from scipy import ndimage

    from jaxdiff.eval.shapes_eval import evaluate
    objs = evaluate(image, spec)["objects"]
    if len(objs) != 1 or objs[0]["colour"] != "red":
        return False
    m = objs[0]["mask"]
    return ndimage.binary_fill_holes(m).sum() >= 1.08 * m.sum()


def evaluate_model(pipe, params, spec, prompt, seeds=16, steps=25):
    from jaxdiff import generate
    from jaxdiff.data.shapes import ShapeObject
    from jaxdiff.eval.shapes_eval import aggregate, attribute_accuracy
    subj = generate(pipe, params, [prompt] * seeds, sampler="dpmpp_2m", steps=steps,
                    guidance_scale=5.0, seed=1)
    cls_prompts = [f"a {c} circle" for c in COLOURS for _ in range(4)]
    cls = generate(pipe, params, cls_prompts, sampler="dpmpp_2m", steps=steps,
                   guidance_scale=5.0, seed=2)
    acc = aggregate([attribute_accuracy(img, [ShapeObject(shape="circle", colour=c, size=None, position=None)], spec)
                     for img, c in zip(cls, [c for c in COLOURS for _ in range(4)])])
    return dict(subject_fidelity=float(np.mean([is_ring(x, spec) for x in subj])),
                class_shape_acc=acc["shape"], class_colour_acc=acc["colour"],
                class_all_acc=acc["all"],
                class_ring_rate=float(np.mean([is_ring(x, spec) for x in cls])))


SECTIONS = ("ring", "star", "pink", "colours", "speed")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="diffusers-layout pipeline directory "
                    "(default: the embedded shapes model)")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated sections to run, from {','.join(SECTIONS)}")
    ap.add_argument("--steps", type=int, default=150, help="DreamBooth steps per run (ring)")
    ap.add_argument("--ti-steps", type=int, default=300,
                    help="Textual Inversion steps (ring, star, pink; 0: skip them)")
    ap.add_argument("--num-class", type=int, default=32, help="class images (ring)")
    ap.add_argument("--lr", type=float, default=1e-4, help="DreamBooth learning rate (ring)")
    ap.add_argument("--train-text-encoder", action="store_true",
                    help="ring: DreamBooth trains the text encoder too")
    ap.add_argument("--ti-lr", type=float, default=5e-3,
                    help="Textual Inversion learning rate (ring, star, pink)")
    ap.add_argument("--colours", default="dark violet,light lime",
                    help="colours: comma-separated colours to teach, from "
                    "personalize_colours.CANDIDATES")
    ap.add_argument("--colour-vae-scan", action="store_true",
                    help="colours: only the VAE round trip of every candidate colour")
    ap.add_argument("--colour-steps", type=int, default=1500,
                    help="colours: DreamBooth and DreamBooth-LoRA steps")
    ap.add_argument("--colour-lr", type=float, default=3e-4,
                    help="colours: DreamBooth (full UNet) learning rate")
    ap.add_argument("--colour-lora-lr", type=float, default=2e-3,
                    help="colours: DreamBooth-LoRA learning rate")
    ap.add_argument("--colour-lora-rank", type=int, default=4, help="colours: LoRA rank (= alpha)")
    ap.add_argument("--colour-lora-text-encoder", action=argparse.BooleanOptionalAction,
                    default=True, help="colours: DreamBooth-LoRA also adapts the text "
                    "encoder's attention (diffusers' --train_text_encoder)")
    ap.add_argument("--colour-ema", type=float, default=0.995,
                    help="colours: every method keeps the EMA of its trained weights with "
                    "this decay and is scored with it (0: the last step's weights)")
    ap.add_argument("--colour-caption-dropout", type=float, default=0.0,
                    help="colours: DreamBooth / DreamBooth-LoRA train this share of instance "
                    "rows under the empty prompt (kohya's caption dropout)")
    ap.add_argument("--colour-seed", type=int, default=0,
                    help="colours: training seed (initialisation and batch order)")
    ap.add_argument("--colour-ti-steps", type=int, default=2000,
                    help="colours: Textual Inversion steps")
    ap.add_argument("--colour-ti-lr", type=float, default=1e-2,
                    help="colours: Textual Inversion learning rate")
    ap.add_argument("--colour-ti-guidance", type=float, default=1.0,
                    help="colours: Textual Inversion fits the prediction guided at this scale "
                    "(train_textual_inversion's train_guidance; 1: the plain loss)")
    ap.add_argument("--colour-mask-weight", type=float, default=0.0,
                    help="colours: masked loss for every method, each instance latent pixel's "
                    "error x (1 + W x the object's coverage of it) (0: the plain loss)")
    ap.add_argument("--colour-methods", default="textual_inversion,dreambooth,dreambooth_lora",
                    help="colours: the methods to run, comma-separated")
    ap.add_argument("--colour-captions", default="both", choices=("object", "shape", "both"),
                    help="colours: 'object' = one caption for all five instance images "
                    "('a sks object on a BG background'), 'shape' = per-image captions "
                    "naming each image's shape ('a sks circle on a BG background'), 'both' = "
                    "each image twice, once with each")
    ap.add_argument("--colour-num-class", type=int, default=32, help="colours: class images")
    ap.add_argument("--colour-samples", type=int, default=8,
                    help="colours: generations per shape and prompt (5 shapes)")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--skip-speed", action="store_true", help="same as leaving out 'speed'")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    sections = set(args.sections.split(","))
    if not sections <= set(SECTIONS):
        ap.error(f"--sections: unknown {sorted(sections - set(SECTIONS))}; "
                 f"choose from {','.join(SECTIONS)}")
    if args.skip_speed:
        sections.discard("speed")
    if args.model is not None and not os.path.isfile(os.path.join(args.model,
                                                                  "model_index.json")):
        ap.error(f"--model {args.model}: no model_index.json there; give a diffusers-layout "
                 "pipeline directory (e.g. runs/shapes_v2/export)")

    import jaxdiff
    from jaxdiff.data.image_folder import load_image_folder
    from jaxdiff.data.images import write_json
    from jaxdiff.data.shapes import WorldSpec
    from jaxdiff.training import class_images as class_lib
    from jaxdiff.training import dreambooth as db
    from jaxdiff.training import textual_inversion as ti_train

    spec = WorldSpec()
    work = tempfile.mkdtemp(prefix="personalize_")
    pipe, params = jaxdiff.load_pipeline(args.model)
    root = args.model or os.path.join(os.path.dirname(jaxdiff.__file__), "assets", "shapes")
    result = dict(model=args.model or "embedded:shapes", sections=sorted(sections))
    t = time.perf_counter()
    if "ring" in sections:
        instances, _ = load_image_folder(draw_rings(os.path.join(work, "rings")), (32, 32))
        result.update(subject="hollow red ring, 5 images", instance_prompt="a sks circle",
                      class_prompt="a circle",
                      dreambooth=dict(steps=args.steps, lr=args.lr, batch=4,
                                      num_class_images=args.num_class,
                                      train_text_encoder=args.train_text_encoder))
        result["before"] = evaluate_model(pipe, params, spec, "a sks circle")
        classes, _, _ = class_lib.class_images(pipe, params, "a circle", args.num_class,
                                               os.path.join(work, "cache"))
        for lam in (1.0, 0.0):
            tuned, _ = db.train_dreambooth(
                pipe, params, instances, os.path.join(work, f"db_{lam}"),
                instance_prompt="a sks circle", class_images=classes, class_prompt="a circle",
                prior_loss_weight=lam, steps=args.steps, batch_size=4, lr=args.lr,
                train_text_encoder=args.train_text_encoder, log_every=max(1, args.steps),
                ckpt_every=10 ** 9)
            result[f"dreambooth_lambda_{lam:g}"] = evaluate_model(pipe, tuned, spec,
                                                                  "a sks circle")
        if args.ti_steps:
            r = ti_train.train_textual_inversion(
                pipe, params, instances, os.path.join(work, "ti"), placeholder="<ring>",
                initializer_token="circle", steps=args.ti_steps, batch_size=4, lr=args.ti_lr,
                log_every=max(1, args.ti_steps), ckpt_every=10 ** 9)
            ti_eval = evaluate_model(r.pipe, r.params, spec, "a <ring>")
            result["textual_inversion"] = dict(steps=args.ti_steps, lr=args.ti_lr,
                                               subject_fidelity=ti_eval["subject_fidelity"],
                                               class_ring_rate=ti_eval["class_ring_rate"])
    if "star" in sections and args.ti_steps:
        stars, _ = load_image_folder(draw_stars(os.path.join(work, "stars"), spec),
                                     (32, 32))
        r = ti_train.train_textual_inversion(
            pipe, params, stars, os.path.join(work, "ti_star"), placeholder="<s>",
            initializer_token="circle", steps=args.ti_steps, batch_size=4, lr=args.ti_lr,
            log_every=max(1, args.ti_steps), ckpt_every=10 ** 9)
        result["textual_inversion_star"] = dict(
            concept="star, 5 world images (5 colours, 2 sizes, 5 positions, white)",
            placeholder="<s>", initializer="circle", steps=args.ti_steps, lr=args.ti_lr,
            star_rate_before=star_rate(pipe, params, spec, "a circle"),
            star_rate_after=star_rate(r.pipe, r.params, spec, "a <s>"),
            star_rate_named=star_rate(pipe, params, spec, "a star"))
    if "pink" in sections and args.ti_steps:
        pinks, _ = load_image_folder(draw_new_colour(os.path.join(work, "pink"), spec),
                                     (32, 32))
        r = ti_train.train_textual_inversion(
            pipe, params, pinks, os.path.join(work, "ti_pink"), placeholder="<p>",
            initializer_token="red", templates=("a {} circle",), steps=args.ti_steps,
            batch_size=4, lr=args.ti_lr, log_every=max(1, args.ti_steps), ckpt_every=10 ** 9)
        result["textual_inversion_new_colour"] = dict(
            concept=f"{NEW_COLOUR[0]} {NEW_COLOUR[1]} (not in the palette), 5 circles on black",
            placeholder="<p>", initializer="red", template="a {} circle",
            before=colour_rate(pipe, params, spec, "a red circle on a black background"),
            after=colour_rate(r.pipe, r.params, spec, "a <p> circle on a black background"))
    if "colours" in sections:
        import personalize_colours
        def partial(section):  # each finished method reaches --out at once
            if args.out:
                write_json(args.out, dict(result, off_palette_colours=section, partial=True))
        result["off_palette_colours"] = personalize_colours.run(pipe, params, work, args,
                                                                partial)
    result["quality_wall_s"] = time.perf_counter() - t
    if "speed" in sections:
        from personalize_speed import step_speed, ti_step_speed
        result["train_step"] = step_speed(pipe, params, root, torch_threads=args.torch_threads)
        result["ti_train_step"] = ti_step_speed(pipe, params, root,
                                                torch_threads=args.torch_threads)
    print(json.dumps(result, indent=2))
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    sys.exit(main())
