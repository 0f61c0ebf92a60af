"""``jaxdiff generate``'s SDXL micro-conditioning flags (diffusers' ``original_size``,
``crops_coords_top_left``, ``target_size``, their ``negative_*`` forms and the refiner's
``aesthetic_score`` / ``negative_aesthetic_score``; ``sampling.generate``'s keyword
arguments of those names, ``Pipeline.time_id_pair``'s rules).

``add_arguments`` adds the flags; ``load`` checks them against the loaded base (and
refiner) before any compile or output (one-line errors naming the flag) and returns the
``Micro`` keyword arguments of each model's ``generate`` calls. The base takes the sizes and
crops; a ``--refiner`` takes the sizes and crops its time ids hold (an aesthetic-score
refiner: no target size) and the aesthetic scores.
"""
from __future__ import annotations

import dataclasses
import re

# (flag, generate's keyword, numbers, metavar)
FLAGS = (
    ("--original-size", "original_size", 2, ("H", "W")),
    ("--crop-top-left", "crops_coords_top_left", 2, ("TOP", "LEFT")),
    ("--target-size", "target_size", 2, ("H", "W")),
    ("--negative-original-size", "negative_original_size", 2, ("H", "W")),
    ("--negative-crop-top-left", "negative_crops_coords_top_left", 2, ("TOP", "LEFT")),
    ("--negative-target-size", "negative_target_size", 2, ("H", "W")),
    ("--aesthetic-score", "aesthetic_score", 1, "S"),
    ("--negative-aesthetic-score", "negative_aesthetic_score", 1, "S"),
)
HELP = {
    "original_size": "SDXL: the original image size the model is told (default: --height "
                     "--width)",
    "crops_coords_top_left": "SDXL: the crop's top-left corner it is told (default 0 0)",
    "target_size": "SDXL base: the target size it is told (default: --height --width)",
    "negative_original_size": "SDXL: the negative half's original size (base: needs "
                              "--negative-target-size too, as diffusers)",
    "negative_crops_coords_top_left": "SDXL: the negative half's crop corner (base: with "
                                      "both negative sizes; default 0 0)",
    "negative_target_size": "SDXL base: the negative half's target size",
    "aesthetic_score": "SDXL --refiner: its aesthetic score (default 6)",
    "negative_aesthetic_score": "SDXL --refiner: the negative half's aesthetic score "
                                "(default 2.5)",
}


def add_arguments(p) -> None:
    g = p.add_argument_group("SDXL micro-conditioning (diffusers' time ids; traced: new "
                             "values do not recompile)")
    for flag, name, n, metavar in FLAGS:
        g.add_argument(flag, dest=name, default=None, metavar=metavar,
                       type=float if n == 1 else int, nargs=None if n == 1 else n,
                       help=HELP[name])


@dataclasses.dataclass
class Micro:
    """``generate`` keyword arguments for the base and for the refiner."""
    base: dict
    refiner: dict

    def settings(self) -> dict:
        given = dict(self.refiner, **self.base)
        return {name: given[name] for _, name, _, _ in FLAGS if name in given}


def _given(args) -> dict:
    return {name: getattr(args, name) for _, name, _, _ in FLAGS
            if getattr(args, name, None) is not None}


def _flag_error(e: ValueError, model: str) -> ValueError:
    flags = {name: flag for flag, name, _, _ in FLAGS}
    msg = re.sub(r"\b(" + "|".join(flags) + r")\b", lambda m: flags[m.group(1)], str(e))
    return ValueError(f"{model}: {msg}")


def load(args, pipe, refiner, height: int, width: int) -> Micro:
    """The ``Micro`` of the parsed flags, checked against ``pipe`` and the ``Refiner`` (or
    None) by computing their time ids (one-line ValueError naming the flag)."""
    given = _given(args)
    if not given:
        return Micro({}, {})
    others = [flag for flag, on in (
        ("--classifier", getattr(args, "classifier", None)),
        ("--clip", getattr(args, "clip", None)),
        ("--gligen / --box", getattr(args, "gligen", None) or getattr(args, "box", None)))
        if on]
    if others:
        raise ValueError(f"SDXL micro-conditioning flags cannot be combined with "
                         f"{', '.join(others)}.")
    scores = {k: v for k, v in given.items() if "aesthetic" in k}
    if scores and refiner is None:
        raise ValueError(f"--{next(iter(scores)).replace('_', '-')} is the SDXL refiner's "
                         "conditioning: it needs --refiner MODEL.")
    base = {k: v for k, v in given.items() if k not in scores}
    try:
        pipe.time_id_pair(height, width, **base)
    except ValueError as e:
        raise _flag_error(e, f"--model {args.model or 'embedded:shapes'}") from None
    ref = {}
    if refiner is not None:
        rpipe = refiner.pipe
        skip = (("target_size", "negative_target_size") if rpipe.requires_aesthetics_score
                else ("negative_crops_coords_top_left",))
        ref = {k: v for k, v in given.items() if k not in skip}
        try:
            rpipe.time_id_pair(height, width, True, **ref)
        except ValueError as e:
            raise _flag_error(e, f"--refiner {args.refiner}") from None
    return Micro(base, ref)
