"""Command-line flags shared by every ``edit/`` entrypoint, and its one-line error exit."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Mapping, Optional, Sequence

from jaxdiff.data.images import ALPHAS, FITS, InputError
from jaxdiff.weights.loading import is_embedded


def add_common_args(parser: argparse.ArgumentParser, *, steps: int = 50,
                    guidance: float = 7.5, mask: str = "none", source_prompt: bool = True,
                    helps: Optional[Mapping[str, str]] = None) -> argparse.ArgumentParser:
    """Adds the flags every edit entrypoint shares.

    ``--image`` (file or folder, repeatable) or ``--manifest`` (JSONL), ``--model``,
    ``--out``, ``--steps``, ``--guidance``, ``--seed``, ``--source-prompt``,
    ``--target-prompt`` (repeatable), ``--fit``, ``--alpha``, ``--max-batch``,
    ``--overwrite`` and, when
    ``mask`` is "optional" or "required", ``--mask``. ``helps``: a method's own help text of
    some of them, by destination name (e.g. ``{"model": ...}``).
    """
    helps = dict(helps or {})
    h = lambda dest, text: helps.get(dest, text)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", action="append",
                     help="input image file or folder of images (repeatable)")
    src.add_argument("--manifest", help="JSONL file, one job per line: {\"image\": ..., "
                     "\"source_prompt\": ..., \"target_prompt\": ..., \"mask\": ...}")
    parser.add_argument("--model", default=None,
                        help=h("model", "diffusers-layout pipeline directory, or "
                               "embedded:shapes (default) / embedded:dit (the text-DiT "
                               "model)"))
    parser.add_argument("--out", required=True, help="output folder (one sub-folder per image)")
    parser.add_argument("--steps", type=int, default=steps,
                        help=h("steps", f"DDIM steps (default {steps})"))
    parser.add_argument("--guidance", type=float, default=guidance,
                        help=h("guidance", f"classifier-free guidance scale (default {guidance})"))
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    if source_prompt:
        parser.add_argument("--source-prompt", default=None,
                            help=h("source_prompt", "caption of the input image(s)"))
    parser.add_argument("--target-prompt", action="append", default=None,
                        help=h("target_prompt",
                               "prompt of the edit (repeat for several edits per image)"))
    if mask != "none":
        parser.add_argument("--mask", required=False, default=None,
                            help="mask file (white = edit) or folder of masks named like the "
                            "images" + (" (required)" if mask == "required" else ""))
    parser.add_argument("--fit", default="crop", choices=FITS,
                        help="other sizes: centre-crop+resize (default), resize, or reject")
    parser.add_argument("--alpha", default="white", choices=ALPHAS,
                        help="transparent images: composite on white (default) or drop alpha")
    parser.add_argument("--max-batch", type=int, default=16,
                        help="images per compiled program call, split over the devices "
                        "(default 16)")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo jobs whose result folder is already complete (default: "
                        "skip them, so re-running a command resumes it)")
    return parser


def check_common_args(args):
    """Validates the shared numeric flags (InputError with one line)."""
    if args.steps < 1:
        raise InputError(f"--steps must be >= 1, got {args.steps}.")
    if args.max_batch < 1:
        raise InputError(f"--max-batch must be >= 1, got {args.max_batch}.")
    if args.model is not None and not (os.path.isdir(args.model) or is_embedded(args.model)):
        raise InputError(f"--model {args.model}: no such directory (nor embedded:NAME).")


def run_main(fn: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
             argv=None) -> int:
    """Parses ``argv``, runs ``fn(args)``; bad input ends with one ``error: ...`` line and
    exit status 2. ``fn`` returns 0, or 1 when some jobs of a batch failed."""
    args = parser.parse_args(argv)
    try:
        return fn(args)
    except (InputError, ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def report_errors(errors: Sequence[str]):
    """Prints each job error as one ``error: ...`` line on stderr."""
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
