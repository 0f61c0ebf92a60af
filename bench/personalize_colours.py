"""Personalization of off-palette colours (issue #22 point 4), run by ``bench/personalize.py``.

Colours the world never names, by default one dark and one light, each far outside every
named colour's shade spread (world v2: shades within 30 RGB units of the anchor; these
two are >= 99 units from every anchor, so a named-colour shade is >= 69 away):

    dark violet (90, 20, 140) on white    light lime (200, 255, 150) on black

``--colours`` picks others from ``CANDIDATES`` (dark ones on white, light ones on black;
all >= 80 units from every anchor); ``--colour-vae-scan`` only measures every candidate's
VAE round trip (``vae_scan``: seconds, no training), to check first that the model's
autoencoder can carry a colour at all.

Each is taught from five world-v2 renders (the five shapes, big/small alternating, the
five positions, anti-aliased, on its background) by

* Textual Inversion: placeholder ``<c1>`` / ``<c2>`` initialised from the nearest named
  colour word;
* DreamBooth, full UNet, and DreamBooth-LoRA (UNet attention adapters): identifier "sks",
  prior preservation (lambda = 1) with the colour- and shape-free class prompt "an object
  on a BG background" and class images the model draws for it.

with the captions ``--colour-captions`` picks (``CAPTIONS``):

* ``object``: one generic caption for all five images, the v2 grammar's shape-free form
  (the images show five shapes): Textual Inversion templates "a {} object on a BG
  background" and "a {} object", DreamBooth instance prompt "a sks object on a BG
  background";
* ``shape``: per-image captions naming each image's shape, "a {} circle on a BG
  background" / "a sks circle on a BG background" for the circle image, etc.
  (``captions=`` / a list ``instance_prompt``): the new word then carries only the colour;
* ``both`` (the default): the five images twice, once captioned "a {} object on a BG
  background" / "a sks object on a BG background", once with their shape caption
  (``teaching_set``): the word is seen beside "object" and beside every shape word, so
  the colour carries over to "a sks star" as well as to "a sks object".

``--colour-mask-weight W`` (default 0: the plain loss) trains every method with the masked
loss (``mask_weight=W``, the renders' exact object masks): each instance latent pixel's
error x (1 + W x the object's coverage of it). ``--colour-methods`` picks the methods.

DreamBooth-LoRA also trains rank-r adapters on the text encoder's attention
(``--colour-lora-text-encoder``, default on; diffusers' ``--train_text_encoder``), and
every method returns the EMA of its trained weights (``--colour-ema``, default 0.995;
0 = the last step's), as measured in bench/README.md.

Fidelity (``jaxdiff.eval.colour_fidelity``): for "a WORD SHAPE on a BG background", every
shape, ``--colour-samples`` seeds each, the generated object's median colour inside the
evaluator's mask; its RGB distance to the taught colour; the share within 40 units and
the median distance. Sampled twice from the same noise: ``SAMPLING`` (guidance 5 at every
step) and, under ``"interval"``, guidance limited to the first 60 % of the steps
(``INTERVAL``; Kynkaanniemi et al. 2024), which keeps late steps from shifting the
colour of thin shapes (crosses, stars). The base model's closest attempt is the best
named colour word
(every colour allowed on BG) in the same prompts. ``object_prompt``: the same for "a WORD
object on a BG background", the form the methods were taught with. ``vae_ceiling``: the same figures for
the five instance images after a VAE round trip (encoder mean, decoder): what reproducing
the instance latents exactly gives; a reference, not a bound (other latents can decode
nearer the colour); ``vae_ceiling_all``: the same over all 50 renders (every shape, size
and position). Shape-prompt rows also give ``by_shape``, each shape's share within 40.

DreamBooth drift, before vs after, with colour-free prompts the v2 model follows: the
class prompt "an object on a BG background" (background, one object, a world shape, and
the share that came out in the taught colour: the subject leaking into the class),
"a SHAPE on a BG background" for every shape (the evaluator's shape / background /
count accuracy) and the empty prompt (the share in the taught colour:
``--colour-caption-dropout`` trains the empty prompt on the subject).
"""
from __future__ import annotations

import os

import numpy as np

from jaxdiff import generate
from jaxdiff.data.image_folder import load_image_folder
from jaxdiff.data.images import save_png
from jaxdiff.data.shapes import SHAPES, UNNAMED, WORLD_V2, ShapeObject, palette, render
from jaxdiff.eval.colour_fidelity import WITHIN, anchor_distances, colour_distances, fidelity
from jaxdiff.eval.shapes_eval import aggregate, attribute_accuracy, evaluate
from jaxdiff.pipeline import to_uint8
from jaxdiff.training import class_images as class_lib
from jaxdiff.training import dreambooth as db
from jaxdiff.training import textual_inversion as ti_train
from jaxdiff.training.latents import encode_latents

SPEC = WORLD_V2
# Off-palette colours the section can teach (``--colours``): name -> (RGB, background);
# dark ones on white, light ones on black (the evaluator segments by contrast). Every one
# is >= 80 RGB units from every named anchor (>= 50 outside the shade spread).
CANDIDATES = {
    "dark violet": ((90, 20, 140), "white"), "crimson": ((160, 20, 80), "white"),
    "olive": ((110, 110, 20), "white"), "brown": ((110, 70, 20), "white"),
    "dark teal": ((20, 90, 90), "white"), "indigo": ((60, 40, 160), "white"),
    "navy": ((20, 30, 110), "white"), "dark green": ((20, 80, 30), "white"),
    "light lime": ((200, 255, 150), "black"), "peach": ((255, 190, 130), "black"),
    "lavender": ((200, 170, 255), "black"), "light sky": ((150, 200, 255), "black"),
}
DEFAULT_COLOURS = ("dark violet", "light lime")
METHODS = ("textual_inversion", "dreambooth", "dreambooth_lora")  # --colour-methods
CAPTIONS = ("object", "shape", "both")   # --colour-captions (module docstring)
POSITIONS = ("centre", "left", "right", "top", "bottom")
SAMPLING = dict(sampler="dpmpp_2m", steps=25, guidance_scale=5.0)
INTERVAL = (0.0, 0.6)   # the second protocol: guidance in the first 60 % of the steps only


def scenes(rgb, background: str) -> dict:
    """Five world-v2 renders of one object of colour ``rgb``: each shape once, big/small
    alternating, the five positions in turn; ``{shape: (image, mask [H, W])}``."""
    out = {}
    for i, shape in enumerate(SHAPES):
        obj = ShapeObject(shape=shape, colour=UNNAMED, size=("big", "small")[i % 2],
                          position=POSITIONS[i], rgb=tuple(rgb))
        image, masks = render(SPEC, [obj], background)
        out[shape] = (image, masks[0])
    return out


def draw(folder: str, rgb, background: str) -> str:
    """``scenes`` written to ``folder`` as ``SHAPE.png``."""
    os.makedirs(folder, exist_ok=True)
    for shape, (image, _) in scenes(rgb, background).items():
        save_png(os.path.join(folder, f"{shape}.png"), image)
    return folder


def masks_of(paths, rgb, background: str) -> np.ndarray:
    """The object masks [N, H, W] of ``draw``'s files at ``paths`` (named by shape)."""
    drawn = scenes(rgb, background)
    return np.stack([drawn[os.path.splitext(os.path.basename(p))[0]][1] for p in paths])


def teaching_set(mode: str, images, paths, background: str) -> tuple[np.ndarray, dict,
                                                                     str | list]:
    """(instance images, Textual Inversion keyword arguments, DreamBooth instance prompt)
    for caption mode ``mode``: ``teaching_captions`` for 'object' / 'shape'; 'both' repeats
    the five images, the first five captioned 'object', the repeats 'shape' (per image)."""
    if mode != "both":
        return (images, *teaching_captions(mode, paths, background))
    generic = f"a {{}} object on a {background} background"
    shaped, prompts = teaching_captions("shape", paths, background)
    return (np.concatenate([images, images]),
            dict(captions=[generic] * len(paths) + shaped["captions"]),
            [generic.format("sks")] * len(paths) + prompts)


def teaching_captions(mode: str, paths, background: str) -> tuple[dict, str | list]:
    """(Textual Inversion keyword arguments, DreamBooth instance prompt) for the instance
    images at ``paths`` (``draw``'s files, named by shape) in caption mode ``mode``
    ('object' or 'shape'; 'both' is ``teaching_set``'s)."""
    if mode == "object":
        return (dict(templates=(f"a {{}} object on a {background} background", "a {} object")),
                f"a sks object on a {background} background")
    if mode != "shape":
        raise ValueError(f"unknown caption mode {mode!r}; use one of {CAPTIONS}.")
    shapes = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if not set(shapes) <= set(SHAPES):
        raise ValueError(f"caption mode 'shape' needs files named by shape, got {shapes}.")
    return (dict(captions=[f"a {{}} {s} on a {background} background" for s in shapes]),
            [f"a sks {s} on a {background} background" for s in shapes])


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def shape_prompts(word: str, background: str, per_shape: int) -> list[str]:
    """"a WORD SHAPE on a BG background" (WORD "" = colour-free), ``per_shape`` each."""
    nouns = [f"{word} {s}".strip() for s in SHAPES]
    return [f"{_article(n)} {n} on a {background} background"
            for n in nouns for _ in range(per_shape)]


def colour_scores(pipe, params, word: str, rgb, background: str, per_shape: int,
                  object_prompt: bool = False, interval: bool = False) -> dict:
    """Fidelity of ``word`` to ``rgb`` over every shape (see the module docstring); with
    ``object_prompt`` also for "a WORD object on a BG background" (as many generations;
    the form the methods were taught with); with ``interval`` also the shape prompts
    sampled with guidance in ``INTERVAL`` only (same noise), under ``"interval"``."""
    prompts = shape_prompts(word, background, per_shape)
    images = generate(pipe, params, prompts, seed=5, **SAMPLING)
    out = with_shapes(colour_distances(images, rgb, SPEC), per_shape)
    if interval:
        images = generate(pipe, params, prompts, seed=5, guidance_interval=INTERVAL,
                          **SAMPLING)
        out["interval"] = with_shapes(colour_distances(images, rgb, SPEC), per_shape)
    if object_prompt:
        prompt = f"{_article(word)} {word} object on a {background} background"
        images = generate(pipe, params, [prompt] * len(prompts), seed=8, **SAMPLING)
        out["object_prompt"] = fidelity(colour_distances(images, rgb, SPEC))
    return out


def with_shapes(distances, per_shape: int) -> dict:
    """``fidelity`` of ``distances`` (``shape_prompts``' order: ``per_shape`` per shape)
    plus ``by_shape``: each shape's share within ``WITHIN``."""
    d = np.asarray(distances).reshape(len(SHAPES), per_shape)
    return dict(fidelity(d.ravel()),
                by_shape={s: float(np.mean(row <= WITHIN)) for s, row in zip(SHAPES, d)})


def vae_ceiling_all(pipe, params, rgb, background: str) -> dict:
    """``vae_ceiling`` over every render of one object of colour ``rgb``: the five shapes
    x both sizes x the five positions (50 images, ``by_shape``: 10 each). Thin shapes in
    dark colours lose colour in the autoencoder (decoded lighter), which the five instance
    images alone sample too sparsely to show."""
    images = np.stack([render(SPEC, [ShapeObject(shape=s, colour=UNNAMED, size=size,
                                                 position=p, rgb=tuple(rgb))], background)[0]
                       for s in SHAPES for size in ("big", "small") for p in POSITIONS])
    return with_shapes(colour_distances(round_trip(pipe, params, images), rgb, SPEC),
                       2 * len(POSITIONS))


def round_trip(pipe, params, images) -> np.ndarray:
    """uint8 ``images`` through the VAE (posterior mean, decoder), as uint8."""
    latents = encode_latents(pipe, params, images)
    return np.asarray(to_uint8(pipe.decode_latents(params, latents)))


def vae_ceiling(pipe, params, images, rgb) -> dict:
    """Fidelity of the five instance images after a VAE round trip (posterior mean): what
    reproducing their latents exactly gives (not a bound on generations)."""
    return fidelity(colour_distances(round_trip(pipe, params, images), rgb, SPEC))


def base_closest(pipe, params, rgb, background: str, per_shape: int) -> dict:
    """The base model's best named colour word for ``rgb`` (most generations within 40,
    then the smallest median distance) and every word's median distance."""
    scores = {w: colour_scores(pipe, params, w, rgb, background, per_shape)
              for w in palette(SPEC, background)}
    far = float("inf")
    best = max(scores, key=lambda w: (scores[w]["within"],
                                      -(scores[w]["median_distance"] or far)))
    best_scores = colour_scores(pipe, params, best, rgb, background, per_shape, True, True)
    return dict(word=best, **best_scores,
                median_distance_by_word={w: s["median_distance"] for w, s in scores.items()})


def drift(pipe, params, rgb, background: str, per_shape: int) -> dict:
    """Colour-free class prompt and shape prompts, read by the evaluator."""
    n = len(SHAPES) * per_shape
    cls = generate(pipe, params, [f"an object on a {background} background"] * n, seed=6,
                   **SAMPLING)
    reads = [evaluate(x, SPEC) for x in cls]
    shaped = generate(pipe, params, shape_prompts("", background, per_shape), seed=7,
                      **SAMPLING)
    targets = [ShapeObject(shape=s, colour=None, size=None, position=None)
               for s in SHAPES for _ in range(per_shape)]
    acc = aggregate([attribute_accuracy(x, [t], SPEC, background=background)
                     for x, t in zip(shaped, targets)])
    empty = generate(pipe, params, [""] * n, seed=9, **SAMPLING)
    return dict(
        class_background=float(np.mean([r["background"] == background for r in reads])),
        class_one_object=float(np.mean([len(r["objects"]) == 1 for r in reads])),
        class_world_shape=float(np.mean([len(r["objects"]) == 1 and r["objects"][0]["fit"]
                                         >= 0.6 for r in reads])),
        class_taught_colour=fidelity(colour_distances(cls, rgb, SPEC))["within"],
        shape_prompts_shape=acc["shape"], shape_prompts_background=acc["background"],
        shape_prompts_count=acc["count"],
        empty_prompt_taught_colour=fidelity(colour_distances(empty, rgb, SPEC))["within"])


def chosen(names) -> list[tuple[str, tuple, str, str]]:
    """(name, RGB, background, Textual Inversion placeholder ``<cK>``) for each of
    ``names`` (keys of ``CANDIDATES``), in order."""
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        raise ValueError(f"unknown colours {unknown}; known: {sorted(CANDIDATES)}")
    return [(n, *CANDIDATES[n], f"<c{i + 1}>") for i, n in enumerate(names)]


def vae_scan(pipe, params, work: str) -> dict:
    """``vae_ceiling`` and the nearest anchor of every ``CANDIDATES`` colour (cheap: no
    training, no generation): which colours the model's autoencoder can carry at all."""
    out = {}
    for name, (rgb, bg) in CANDIDATES.items():
        dist = anchor_distances(rgb, SPEC)
        nearest = min(dist, key=dist.get)
        folder = draw(os.path.join(work, "scan", name.replace(" ", "_")), rgb, bg)
        images, _ = load_image_folder(folder, (SPEC.image_size,) * 2)
        out[name] = dict(rgb=list(rgb), background=bg,
                         nearest_anchor=[nearest, round(dist[nearest], 1)],
                         vae_ceiling=vae_ceiling(pipe, params, images, rgb),
                         vae_ceiling_all=vae_ceiling_all(pipe, params, rgb, bg))
    return out


def run(pipe, params, work: str, args, on_colour=None) -> dict:
    """The whole section; ``args``: the ``--colour*`` flags of ``bench/personalize.py``
    (``--colour-vae-scan``: only ``vae_scan``). ``on_colour(out)``, if given, is called
    with the results so far after each method of each colour (a long run keeps what it
    finished)."""
    if args.colour_vae_scan:
        return dict(world="v2", within=WITHIN, vae_scan=vae_scan(pipe, params, work))
    per = args.colour_samples
    out = dict(world="v2", within=WITHIN, generations_per_row=len(SHAPES) * per,
               sampling=SAMPLING, interval=INTERVAL, captions=args.colour_captions,
               seed=args.colour_seed, ema_decay=args.colour_ema,
               caption_dropout=args.colour_caption_dropout,
               textual_inversion=dict(steps=args.colour_ti_steps, lr=args.colour_ti_lr,
                                      batch=4, train_guidance=args.colour_ti_guidance),
               mask_weight=args.colour_mask_weight,
               dreambooth=dict(steps=args.colour_steps, lr=args.colour_lr, batch="4 + 4",
                               prior_loss_weight=1.0, num_class_images=args.colour_num_class),
               dreambooth_lora=dict(steps=args.colour_steps, lr=args.colour_lora_lr,
                                    rank=args.colour_lora_rank, alpha=args.colour_lora_rank,
                                    text_encoder=args.colour_lora_text_encoder,
                                    batch="4 + 4", prior_loss_weight=1.0),
               colours={})
    report = on_colour or (lambda _: None)
    methods = set(args.colour_methods.split(","))
    unknown = methods - set(METHODS)
    if unknown:
        raise ValueError(f"--colour-methods: unknown {sorted(unknown)}; use some of {METHODS}.")
    for name, rgb, bg, placeholder in chosen(args.colours.split(",")):
        dist = anchor_distances(rgb, SPEC)
        nearest = min(dist, key=dist.get)
        folder = draw(os.path.join(work, placeholder.strip("<>")), rgb, bg)
        images, paths = load_image_folder(folder, (SPEC.image_size,) * 2)
        taught, ti_captions, instance_prompt = teaching_set(args.colour_captions, images,
                                                            paths, bg)
        row = dict(rgb=list(rgb), background=bg, nearest_anchor=[nearest, round(dist[nearest], 1)],
                   vae_ceiling=vae_ceiling(pipe, params, images, rgb),
                   vae_ceiling_all=vae_ceiling_all(pipe, params, rgb, bg),
                   base_closest=base_closest(pipe, params, rgb, bg, per))
        out["colours"][name] = row
        report(out)
        masks = np.concatenate([masks_of(paths, rgb, bg)] * (len(taught) // len(paths)))
        masked = dict(instance_masks=masks, mask_weight=args.colour_mask_weight)
        if "textual_inversion" in methods:
            r = ti_train.train_textual_inversion(
                pipe, params, taught, os.path.join(work, f"ti_{placeholder}"),
                placeholder=placeholder, initializer_token=nearest, **ti_captions,
                **masked, steps=args.colour_ti_steps,
                batch_size=4, lr=args.colour_ti_lr, log_every=max(1, args.colour_ti_steps),
                ckpt_every=10 ** 9, seed=args.colour_seed, ema_decay=args.colour_ema,
                train_guidance=args.colour_ti_guidance)
            row["textual_inversion"] = dict(placeholder=placeholder, initializer=nearest,
                                            **colour_scores(r.pipe, r.params, placeholder,
                                                            rgb, bg, per, True, True))
            report(out)
        if not {"dreambooth", "dreambooth_lora"} & methods:
            continue
        class_prompt = f"an object on a {bg} background"
        classes, _, _ = class_lib.class_images(pipe, params, class_prompt,
                                               args.colour_num_class,
                                               os.path.join(work, "class_cache"))
        row["drift_before"] = drift(pipe, params, rgb, bg, per)
        for mode, rank, lr in (("dreambooth", 0, args.colour_lr),
                               ("dreambooth_lora", args.colour_lora_rank, args.colour_lora_lr)):
            if mode not in methods:
                continue
            tuned, _ = db.train_dreambooth(
                pipe, params, taught, os.path.join(work, f"{mode}_{placeholder}"),
                instance_prompt=instance_prompt, class_images=classes,
                class_prompt=class_prompt, prior_loss_weight=1.0, steps=args.colour_steps,
                batch_size=4, lr=lr, lora_rank=rank, log_every=max(1, args.colour_steps),
                ckpt_every=10 ** 9, seed=args.colour_seed, ema_decay=args.colour_ema,
                train_text_encoder=rank > 0 and args.colour_lora_text_encoder,
                caption_dropout=args.colour_caption_dropout, **masked)
            row[mode] = dict(**colour_scores(pipe, tuned, "sks", rgb, bg, per, True, True),
                             drift=drift(pipe, tuned, rgb, bg, per))
            report(out)
    return out
