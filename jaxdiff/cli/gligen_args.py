"""``jaxdiff generate``'s GLIGEN flags: boxes + phrases placing objects
(``gligen_sampling.generate_gligen``).

``add_arguments`` adds the flag group; ``load_gligen`` checks the flags and puts the
GLIGEN UNet in the pipeline before anything is compiled or written (one-line errors);
``generate_chunk`` runs one chunk of the job.
"""
from __future__ import annotations

import dataclasses

from jaxdiff.cli.guided_args import SHIPPED, shipped_folder
from jaxdiff.gligen_sampling import generate_gligen, parse_box
from jaxdiff.models.gligen import ATTENTION_TYPES
from jaxdiff.weights.gligen import SHAPES_GLIGEN, SHAPES_GLIGEN_BETA, with_gligen

DEFAULT_BETA = 0.3  # diffusers' gligen_scheduled_sampling_beta


def add_arguments(p) -> None:
    g = p.add_argument_group("GLIGEN grounding (boxes + phrases; a GLIGEN UNet)")
    g.add_argument("--gligen", default=None, metavar="DIR",
                   help="GLIGEN UNet folder (diffusers UNet2DConditionModel with "
                   "attention_type='gated') or GLIGEN pipeline folder, whose UNet replaces the "
                   "model's (not needed when --model is a GLIGEN pipeline); a GLIGEN layers "
                   "folder (gligen_layers.safetensors), whose layers join the model's UNet; "
                   "or 'shipped' for the embedded model's layers (jaxdiff/assets/shapes_gligen; "
                   "trained on the noisier half of the steps; --gligen-beta defaults to "
                   f"{SHAPES_GLIGEN_BETA} for them)")
    g.add_argument("--box", action="append", default=[], metavar="x0,y0,x1,y1:PHRASE",
                   help="an object: its box as fractions of the image (left, top, right, "
                   "bottom) and its phrase, e.g. '0.1,0.1,0.5,0.6:a red circle' (also "
                   "'PHRASE:x0,y0,x1,y1'); repeatable, the same boxes for every image")
    g.add_argument("--gligen-beta", type=float, default=None, metavar="BETA",
                   help="fraction of the steps with grounding on "
                   f"(gligen_scheduled_sampling_beta; default {DEFAULT_BETA}, diffusers', or "
                   f"{SHAPES_GLIGEN_BETA} with --gligen shipped)")


@dataclasses.dataclass
class Grounding:
    """What ``load_gligen`` resolved: the phrases and boxes, beta."""
    phrases: list
    boxes: list
    beta: float

    def settings(self, args) -> dict:
        return dict(gligen=args.gligen, box=list(args.box), gligen_beta=self.beta)


def load_gligen(args, pipe, params):
    """(pipe, params, Grounding or None): the GLIGEN UNet of ``--gligen`` put in, the boxes
    parsed and checked (ValueError naming the flag)."""
    if args.gligen is None and not args.box:
        return pipe, params, None
    others = [f"--{name}" for name in ("controlnet", "adapter", "classifier", "clip")
              if getattr(args, name, None)]
    if others:
        raise ValueError(f"--gligen / --box cannot be combined with {', '.join(others)} yet; "
                         "run them separately.")
    if not args.box:
        raise ValueError("--gligen needs objects: pass --box 'x0,y0,x1,y1:phrase' (repeatable).")
    beta = args.gligen_beta
    if beta is None:
        beta = SHAPES_GLIGEN_BETA if args.gligen == SHIPPED else DEFAULT_BETA
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"--gligen-beta {beta} must be in [0, 1].")
    parsed = [parse_box(text) for text in args.box]
    if args.gligen is not None:
        folder = shipped_folder(args.gligen, SHAPES_GLIGEN, "--gligen")
        pipe, params = with_gligen(pipe, params, folder)
    elif pipe.unet.config.attention_type not in ATTENTION_TYPES:
        raise ValueError("--box needs a GLIGEN UNet: pass --gligen DIR (or a GLIGEN pipeline "
                         "as --model).")
    return pipe, params, Grounding([p for p, _ in parsed], [b for _, b in parsed], beta)


def generate_chunk(grounding: Grounding, pipe, params, chunk, args, height, width, start):
    """uint8 [B, H, W, 3] images of one chunk of prompts (``start``: its first index)."""
    return generate_gligen(pipe, params, chunk, grounding.phrases, grounding.boxes,
                           args.negative_prompt, args.sampler, args.steps, args.guidance,
                           args.seed, grounding.beta, height=height, width=width, eta=args.eta,
                           sample_offset=start)
