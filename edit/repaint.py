"""RePaint: fill the --mask region (white) toward --target-prompt by resampling, the rest
taken from the noised original at every step.

    python edit/repaint.py --image in.png --mask mask.png --target-prompt "a red circle" \\
        --steps 50 --jump-length 5 --jump-n-sample 5 --out outputs/repaint

Per input it writes ``<out>/<name>/``: input.png, reconstruction.png (VAE round trip),
edit.png (edit_<k>.png), mask.png (latent-resolution mask), panel.png, settings.json;
``<out>/summary.json``. The UNet runs about steps * jump_n_sample times. Logic:
``jaxdiff.editing.repaint``.
"""
from __future__ import annotations

import argparse
import sys

from jaxdiff.cli import edit_args, edit_runner
from jaxdiff.data.images import InputError
from jaxdiff.editing import repaint
from jaxdiff.pipeline import from_uint8


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edit/repaint.py", description=__doc__.splitlines()[0])
    edit_args.add_common_args(p, steps=50, guidance=7.5, mask="required")
    p.add_argument("--jump-length", type=int, default=10, help="jump length (default 10)")
    p.add_argument("--jump-n-sample", type=int, default=10,
                   help="resamplings per jump (default 10)")
    p.add_argument("--eta", type=float, default=0.0,
                   help="variance scale: 0 as diffusers' default, 1 = DDPM as the paper")
    p.add_argument("--negative-prompt", default="", help="negative prompt (default empty)")
    return p


def run(args) -> int:
    if args.jump_length < 1 or args.jump_n_sample < 1:
        raise InputError("--jump-length and --jump-n-sample must be >= 1.")

    def edit(pipe, params, chunk):
        return repaint.repaint(pipe, params, from_uint8(chunk.images), chunk.masks,
                               chunk.targets, args.negative_prompt, steps=args.steps,
                               jump_length=args.jump_length, jump_n_sample=args.jump_n_sample,
                               guidance_scale=args.guidance, seed=chunk.seed,
                               sample_index=chunk.index, mesh=chunk.mesh, eta=args.eta)

    record = edit_runner.method_record(args, "repaint", dict(
        jump_length=args.jump_length, jump_n_sample=args.jump_n_sample, eta=args.eta,
        negative_prompt=args.negative_prompt))
    return edit_runner.run_edits(args, edit_runner.EditTool("repaint", edit, record,
                                                            mask="required"))


def main(argv=None) -> int:
    return edit_args.run_main(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
