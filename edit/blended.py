"""Blended latent diffusion: regenerate the --mask region (white) toward --target-prompt,
keeping the rest (blended from the noised original at every step).

    python edit/blended.py --image in.png --mask mask.png --target-prompt "a blue star" \\
        --out outputs/blended

Per input it writes ``<out>/<name>/``: input.png, reconstruction.png (VAE round trip),
edit.png (edit_<k>.png), mask.png (latent-resolution mask), panel.png, settings.json;
``<out>/summary.json``. Logic: ``jaxdiff.editing.blended``.
"""
from __future__ import annotations

import argparse
import sys

from jaxdiff.cli import edit_args, edit_runner
from jaxdiff.data.images import InputError
from jaxdiff.editing import blended
from jaxdiff.pipeline import from_uint8


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edit/blended.py", description=__doc__.splitlines()[0])
    edit_args.add_common_args(p, steps=50, guidance=7.5, mask="required")
    p.add_argument("--blending-percentage", type=float, default=0.25,
                   help="fraction of the first steps skipped (default 0.25, PIE-Bench)")
    p.add_argument("--negative-prompt", default="", help="negative prompt (default empty)")
    return p


def run(args) -> int:
    if not 0.0 <= args.blending_percentage < 1.0:
        raise InputError(f"--blending-percentage must be in [0, 1), got "
                         f"{args.blending_percentage}.")

    def edit(pipe, params, chunk):
        return blended.blended(pipe, params, from_uint8(chunk.images), chunk.masks,
                               chunk.targets, args.negative_prompt,
                               blending_percentage=args.blending_percentage, steps=args.steps,
                               guidance_scale=args.guidance, seed=chunk.seed,
                               sample_index=chunk.index, mesh=chunk.mesh)

    record = edit_runner.method_record(args, "blended", dict(
        blending_percentage=args.blending_percentage, negative_prompt=args.negative_prompt))
    return edit_runner.run_edits(args, edit_runner.EditTool("blended", edit, record,
                                                            mask="required"))


def main(argv=None) -> int:
    return edit_args.run_main(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
