"""``jaxdiff generate``'s gradient-guidance flags: a noisy classifier or a CLIP steering the
samples (``guided_sampling.generate_guided``, ``clip_guidance.generate_clip_guided``).

``add_arguments`` adds the flag group; ``load_guidance`` checks the flags against the
pipeline and loads the guiding model before anything is compiled or written (one-line
errors); ``generate_chunk`` runs one chunk of the job. Several scales are one vmapped
sweep: images come back as [S, B, H, W, 3].
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import numpy as np

from jaxdiff.clip_guidance import MODES, generate_clip_guided
from jaxdiff.data.images import load_image
from jaxdiff.guided_sampling import generate_guided
from jaxdiff.models.noisy_classifier import DEFAULT_CLASSIFIER, load_classifier
from jaxdiff.weights.clip_format import SHAPES_CLIP, load_clip

SHIPPED = "shipped"


def add_arguments(p) -> None:
    g = p.add_argument_group(
        "gradient guidance (a noisy classifier or a CLIP; --guidance 1 turns CFG off)")
    g.add_argument("--classifier", default=None, metavar="DIR",
                   help="noisy-latent classifier folder (train/classifier.py's export), or "
                   f"'{SHIPPED}' for jaxdiff/assets/shapes_classifier")
    g.add_argument("--class", dest="classes", action="append", default=[],
                   metavar="HEAD=NAME",
                   help="wanted class of a classifier head, e.g. shape=star (a class name or "
                   "index); give a head once for all prompts, or once per --prompt")
    g.add_argument("--classifier-scale", type=float, nargs="+", default=None, metavar="S",
                   help="classifier guidance scale(s); several: one sweep, one grid row per "
                   "scale (default 10)")
    g.add_argument("--clip", default=None, metavar="DIR",
                   help="CLIP folder (transformers CLIPModel layout), or "
                   f"'{SHIPPED}' for jaxdiff/assets/clip_shapes")
    g.add_argument("--clip-prompt", "--clip-guidance-text", dest="clip_prompt",
                   action="append", default=[], metavar="TEXT",
                   help="text the images should match in CLIP's eyes: once for all prompts, or "
                   "once per --prompt")
    g.add_argument("--clip-image", "--clip-guidance-image", dest="clip_image",
                   action="append", default=[], metavar="PNG",
                   help="reference image to match instead of a text: once, or once per "
                   "--prompt (resized to the model's size, see --fit)")
    g.add_argument("--clip-scale", type=float, nargs="+", default=None, metavar="S",
                   help="CLIP guidance scale(s); several: one sweep, one grid row per scale "
                   "(default 10)")
    g.add_argument("--clip-mode", default="x0", choices=MODES,
                   help="x0: a clean CLIP reads the decoded predicted x0 (default); xt: a "
                   "noise-aware CLIP (configs/clip.py:noisy) reads x_t")
    g.add_argument("--clip-normalize", action="store_true",
                   help="unit-RMS similarity gradient per image and step: --clip-scale is "
                   "then the push in noise units (try 1.5)")
    g.add_argument("--clip-recurrence", type=int, default=1, metavar="K",
                   help="self-recurrence: each step taken K times, re-noised in between "
                   "(--sampler ddim; K times the cost; default 1)")
    g.add_argument("--clip-views", type=int, default=1, metavar="V",
                   help="--clip-mode x0: CLIP's similarity averaged over V shifted views of the "
                   "decoded x0 (augmentations; V CLIP passes; default 1)")
    g.add_argument("--clip-candidates", type=int, default=1, metavar="N",
                   help="--clip-mode x0: guide N samples per image and keep the one CLIP finds "
                   "most similar to the target (re-ranking; N times the cost; default 1)")


@dataclasses.dataclass
class Guidance:
    """What ``load_guidance`` resolved: kind "classifier" or "clip", the model, its
    params, the per-prompt targets (labels {head: [P]}, texts [P] or images [P, H, W, 3])
    and the scales."""
    kind: str
    model: Any
    params: Any
    scales: tuple
    labels: Optional[dict] = None
    texts: Optional[list] = None
    images: Optional[np.ndarray] = None

    def settings(self, args) -> dict:
        if self.kind == "classifier":
            return dict(classifier=args.classifier, classes=args.classes,
                        classifier_scale=list(self.scales))
        return dict(clip=args.clip, clip_mode=args.clip_mode, clip_prompt=args.clip_prompt,
                    clip_image=args.clip_image, clip_scale=list(self.scales),
                    clip_normalize=args.clip_normalize,
                    clip_recurrence=args.clip_recurrence, clip_views=args.clip_views,
                    clip_candidates=args.clip_candidates)


def _per_prompt(values, n, flag):
    if len(values) not in (1, n):
        raise ValueError(f"{flag} given {len(values)} times for {n} prompts; give it once, or "
                         "once per --prompt.")
    return list(values) * n if len(values) == 1 else list(values)


def shipped_folder(value, shipped, flag):
    """``value``'s folder (``'shipped'``: ``shipped``); a one-line error if it is none."""
    folder = shipped if value == SHIPPED else value
    if value == SHIPPED and not os.path.isdir(folder):
        raise FileNotFoundError(f"{flag} {SHIPPED}: this jaxdiff ships no such model yet "
                                f"({folder} is missing); give a folder.")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{flag} {value}: no such directory (give a folder, or "
                                f"'{SHIPPED}').")
    return folder


def _labels(model, classes, n):
    """``--class HEAD=NAME`` flags -> {head: int [n]} for n prompts."""
    if not classes:
        raise ValueError("--classifier needs the wanted class: pass --class HEAD=NAME, e.g. "
                         "--class shape=star.")
    heads, names = dict(model.config.heads), dict(model.config.labels)
    given: dict = {}
    for item in classes:
        head, sep, name = item.partition("=")
        if not sep or head not in heads:
            raise ValueError(f"--class {item}: give HEAD=NAME with a head of the classifier "
                             f"({', '.join(heads)}).")
        known = list(names.get(head, ()))
        if name in known:
            k = known.index(name)
        elif name.isdigit() and int(name) < heads[head]:
            k = int(name)
        else:
            raise ValueError(f"--class {item}: head {head} has classes "
                             f"{', '.join(known) or f'0..{heads[head] - 1}'}.")
        given.setdefault(head, []).append(k)
    return {h: np.asarray(_per_prompt(v, n, f"--class {h}=..."), np.int32)
            for h, v in given.items()}


def load_guidance(args, pipe, height: int, width: int) -> Optional[Guidance]:
    """The guidance the flags ask for (None: plain generation), checked against ``pipe``
    and the prompts before anything is compiled or written."""
    n = len(args.prompt)
    clf_flags = args.classes or args.classifier_scale is not None
    clip_flags = args.clip_prompt or args.clip_image or args.clip_scale is not None
    if args.classifier is None and clf_flags:
        raise ValueError("--class / --classifier-scale need --classifier DIR.")
    if args.clip_recurrence < 1 or (args.clip_recurrence > 1 and args.sampler != "ddim"):
        raise ValueError(f"--clip-recurrence {args.clip_recurrence}: needs K >= 1, and K > 1 "
                         f"only with --sampler ddim (got {args.sampler}).")
    if args.clip_views < 1 or (args.clip_views > 1 and args.clip_mode != "x0"):
        raise ValueError(f"--clip-views {args.clip_views}: needs V >= 1, and V > 1 only with "
                         f"--clip-mode x0 (got {args.clip_mode}).")
    if args.clip_candidates < 1 or (args.clip_candidates > 1 and args.clip_mode != "x0"):
        raise ValueError(f"--clip-candidates {args.clip_candidates}: needs N >= 1, and N > 1 "
                         f"only with --clip-mode x0 (got {args.clip_mode}).")
    clip_flags = (clip_flags or args.clip_normalize or args.clip_recurrence != 1
                  or args.clip_views != 1 or args.clip_candidates != 1)
    if args.clip is None and clip_flags:
        raise ValueError("--clip-prompt / --clip-image / --clip-scale / --clip-normalize / "
                         "--clip-recurrence / --clip-views / --clip-candidates need --clip "
                         "DIR.")
    if args.classifier is None and args.clip is None:
        return None
    if args.classifier is not None and args.clip is not None:
        raise ValueError("--classifier and --clip: give one kind of gradient guidance.")
    if args.controlnet or args.adapter:
        raise ValueError("--classifier / --clip do not combine with --controlnet / --adapter "
                         "yet; drop one of them.")
    if (height, width) != (pipe.image_size, pipe.image_size):
        raise ValueError(f"--classifier / --clip sample at the model's size "
                         f"{pipe.image_size}x{pipe.image_size}; drop --height/--width.")
    if pipe.is_sdxl:
        raise ValueError("--classifier / --clip support SD 1.x/2.x pipelines (not SDXL) so far.")
    if args.classifier is not None:
        folder = shipped_folder(args.classifier, DEFAULT_CLASSIFIER, "--classifier")
        try:
            model, params = load_classifier(folder)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"--classifier {args.classifier}: not a noisy-classifier folder "
                             f"(train/classifier.py's export): {e}") from None
        channels = pipe.latent_shape(height, width)[-1]
        if model.config.in_channels != channels:
            raise ValueError(f"--classifier {args.classifier}: it reads "
                             f"{model.config.in_channels}-channel latents; this model's have "
                             f"{channels}.")
        scales = tuple(args.classifier_scale or (10.0,))
        return Guidance("classifier", model, params, scales,
                        labels=_labels(model, args.classes, n))
    if bool(args.clip_prompt) == bool(args.clip_image):
        raise ValueError("--clip needs a target: --clip-prompt TEXT or --clip-image PNG "
                         "(one of the two).")
    folder = shipped_folder(args.clip, SHAPES_CLIP, "--clip")
    try:
        clip, params = load_clip(folder)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--clip {args.clip}: not a CLIP folder (transformers CLIPModel "
                         f"layout): {e}") from None
    if args.clip_mode == "xt" and clip.time_token is None:
        raise ValueError(f"--clip {args.clip}: --clip-mode xt needs a noise-aware CLIP "
                         "(configs/clip.py:noisy); use --clip-mode x0 with this one.")
    if args.clip_mode == "x0" and clip.time_token is not None:
        raise ValueError(f"--clip {args.clip} is noise-aware (reads latents): use "
                         "--clip-mode xt with it.")
    scales = tuple(args.clip_scale or (10.0,))
    if args.clip_prompt:
        return Guidance("clip", clip, params, scales,
                        texts=_per_prompt(args.clip_prompt, n, "--clip-prompt"))
    paths = _per_prompt(args.clip_image, n, "--clip-image")
    images = np.stack([load_image(p, (height, width), fit=args.fit) for p in paths])
    return Guidance("clip", clip, params, scales, images=images)


def generate_chunk(g: Guidance, pipe, params, prompts, rows, args, sample_offset: int):
    """uint8 [S, B, H, W, 3] for ``prompts`` (B of them; ``rows`` [B]: each one's index into
    the per-prompt targets), images ``sample_offset ..`` of the job."""
    scales = list(g.scales)
    kw = dict(prompts=prompts, negative_prompts=args.negative_prompt,
              guidance_scale=None if args.guidance == 1.0 else args.guidance,
              sampler=args.sampler, steps=args.steps, seed=args.seed, eta=args.eta,
              sample_offset=sample_offset)
    if g.kind == "classifier":
        labels = {h: v[rows] for h, v in g.labels.items()}
        return generate_guided(pipe, params, g.model, g.params, labels,
                               classifier_scale=scales, **kw)
    target = (dict(texts=[g.texts[r] for r in rows]) if g.texts is not None
              else dict(images=g.images[rows]))
    return generate_clip_guided(pipe, params, g.model, g.params, mode=args.clip_mode,
                                clip_scale=scales, normalize=args.clip_normalize,
                                recurrence=args.clip_recurrence, views=args.clip_views,
                                candidates=args.clip_candidates, **target, **kw)
