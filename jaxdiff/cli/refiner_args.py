"""``jaxdiff generate``'s SDXL refiner flags: the base model stops at ``--denoising-end``
and a refiner finishes its latents (diffusers' ``StableDiffusionXLPipeline(denoising_end=)``
then ``StableDiffusionXLImg2ImgPipeline(image=latents, denoising_start=)``).

``add_arguments`` adds the flags (``--refiner-revision`` / ``--refiner-variant``: as
``--revision`` / ``--variant`` for ``--model``); ``check_flags`` checks them before any model loads;
``load_refiner`` checks them against the base and loads the refiner before anything is
compiled or written (one-line errors naming the flag);
``generate_chunk`` runs one chunk: the base's program for its steps, then the refiner's
for the rest (``sampling.generate`` with ``denoising_end`` / ``denoising_start``).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax.numpy as jnp

from jaxdiff import sampling
from jaxdiff.weights import load_pipeline
from jaxdiff.weights.hf_cache import is_repo_id

DEFAULT_END = 0.8


def add_arguments(p) -> None:
    g = p.add_argument_group("SDXL refiner (the base's latents finished by a second model)")
    g.add_argument("--refiner", default=None, metavar="MODEL",
                   help="SDXL refiner (or any SDXL model): diffusers folder, single "
                   ".safetensors file or org/name in the local Hugging Face cache; --model "
                   "(SDXL) runs the steps down to --denoising-end, the refiner the rest, with "
                   "the same prompts, sampler, steps, guidance and seed (--lora applies to the "
                   "base only)")
    g.add_argument("--denoising-end", type=float, default=None, metavar="FRAC",
                   help=f"with --refiner: the fraction of the noise schedule the base "
                   f"removes, in (0, 1) (default {DEFAULT_END}: the refiner does the last "
                   f"{1 - DEFAULT_END:.0%}%)")
    g.add_argument("--refiner-revision", default=None, metavar="REV",
                   help="for --refiner org/name: a branch or tag under the cache's refs/, or "
                   "a commit hash (default main), as --revision for --model")
    g.add_argument("--refiner-variant", default=None, metavar="VARIANT",
                   help="weight-file variant of a diffusers-layout --refiner, e.g. fp16 "
                   "(reads *.fp16.safetensors), as --variant for --model")


@dataclasses.dataclass
class Refiner:
    """What ``load_refiner`` resolved: the refiner's (pipe, params) and the cut."""
    pipe: Any
    params: Any
    fraction: float

    def settings(self, args) -> dict:
        out = dict(refiner=args.refiner, denoising_end=self.fraction)
        out.update({k: v for k, v in (("refiner_revision", args.refiner_revision),
                                      ("refiner_variant", args.refiner_variant)) if v})
        return out


def check_flags(args) -> None:
    """One-line ValueError / FileNotFoundError for refiner flags that cannot work, before
    any model is loaded."""
    if args.refiner is None:
        for flag, value in (("--denoising-end", args.denoising_end),
                            ("--refiner-revision", args.refiner_revision),
                            ("--refiner-variant", args.refiner_variant)):
            if value is not None:
                raise ValueError(f"{flag} needs --refiner MODEL (the model that finishes "
                                 "the base's latents).")
        return
    frac = DEFAULT_END if args.denoising_end is None else args.denoising_end
    if not 0.0 < frac < 1.0:
        raise ValueError(f"--denoising-end {frac} must be a fraction strictly between 0 and 1 "
                         f"(e.g. {DEFAULT_END}: the refiner does the last "
                         f"{1 - DEFAULT_END:.0%} of the schedule).")
    others = [flag for flag, on in (
        ("--controlnet", args.controlnet), ("--adapter", args.adapter),
        ("--classifier", getattr(args, "classifier", None)),
        ("--clip", getattr(args, "clip", None)),
        ("--gligen / --box", getattr(args, "gligen", None) or getattr(args, "box", None)),
        ("--textual-inversion", args.textual_inversion)) if on]
    if others:
        raise ValueError(f"--refiner cannot be combined with {', '.join(others)} yet; run "
                         "the base alone with them.")
    if not (os.path.exists(args.refiner) or is_repo_id(args.refiner)):
        raise FileNotFoundError(f"--refiner {args.refiner}: no such directory or file (nor an "
                                "org/name for the Hugging Face cache).")


def load_refiner(args, pipe, height: int, width: int):
    """The ``Refiner`` of the parsed flags (``check_flags`` passed), or None: checks the
    base ``pipe`` and the refiner (ValueError naming the flag) and both step ranges, before
    any compile."""
    if args.refiner is None:
        return None
    frac = DEFAULT_END if args.denoising_end is None else args.denoising_end
    if not pipe.is_sdxl:
        raise ValueError(f"--refiner needs an SDXL --model; {args.model or 'the embedded model'}"
                         " is an SD 1.x/2.x-style pipeline (one text encoder).")
    try:
        rpipe, rparams = load_pipeline(args.refiner, revision=args.refiner_revision,
                                       variant=args.refiner_variant)
    except (ValueError, OSError) as e:  # say which model: --model may be org/name too
        raise type(e)(f"--refiner: {e}") from None
    if not rpipe.is_sdxl:
        raise ValueError(f"--refiner {args.refiner} is not an SDXL model (no second text "
                         "encoder); pass an SDXL refiner or base.")
    if args.dtype == "bfloat16":
        rpipe = rpipe.with_dtype(jnp.bfloat16)
    if rpipe.latent_shape(height, width) != pipe.latent_shape(height, width):
        raise ValueError(f"--refiner {args.refiner}: its latents "
                         f"{rpipe.latent_shape(height, width)} differ from the base's "
                         f"{pipe.latent_shape(height, width)} at {height}x{width}.")
    sampling.check_request(rpipe, 1, args.steps, height, width, args.sampler)
    try:
        sampling.step_span(pipe, args.sampler, args.steps, None, frac)
        sampling.step_span(rpipe, args.sampler, args.steps, frac)
    except ValueError as e:
        raise ValueError(f"--denoising-end {frac} with --steps {args.steps}: {e}") from None
    return Refiner(rpipe, rparams, frac)


def generate_chunk(refiner: Refiner, pipe, params, chunk, args, height, width, start,
                   micro=None):
    """uint8 [B, H, W, 3] images of one chunk of prompts (``start``: its first index): the
    base down to the cut (latents), then the refiner from there (``micro``: the
    ``micro_args.Micro`` keyword arguments of each)."""
    common = dict(height=height, width=width, eta=args.eta, sample_offset=start)
    latents = sampling.generate(pipe, params, chunk, args.negative_prompt, args.sampler,
                                args.steps, args.guidance, args.seed, output="latents",
                                denoising_end=refiner.fraction, **common,
                                **(micro.base if micro else {}))
    return sampling.generate(refiner.pipe, refiner.params, chunk, args.negative_prompt,
                             args.sampler, args.steps, args.guidance, args.seed,
                             latents=latents, denoising_start=refiner.fraction, **common,
                             **(micro.refiner if micro else {}))
