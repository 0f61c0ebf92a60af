"""ILVR: generate from --target-prompt while the low-pass (--factor) of every step follows
the noised input image.

    python edit/ilvr.py --image ref.png --target-prompt "a green square" --factor 2 \\
        --out outputs/ilvr

Per input it writes ``<out>/<name>/``: input.png, reconstruction.png (VAE round trip),
edit.png (edit_<k>.png), panel.png, settings.json; ``<out>/summary.json``. --factor is in
latent cells (it must divide the latent size). Logic: ``jaxdiff.editing.ilvr``.
"""
from __future__ import annotations

import argparse
import sys

from jaxdiff.cli import edit_args, edit_runner
from jaxdiff.data.images import InputError
from jaxdiff.editing import ilvr
from jaxdiff.pipeline import from_uint8


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edit/ilvr.py", description=__doc__.splitlines()[0])
    edit_args.add_common_args(p, steps=50, guidance=7.5)
    p.add_argument("--factor", type=int, default=2,
                   help="low-pass down-sampling factor N in latent cells (default 2)")
    p.add_argument("--refine-fraction", type=float, default=1.0,
                   help="fraction of the steps (from the start) that are refined (default 1)")
    p.add_argument("--negative-prompt", default="", help="negative prompt (default empty)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    return p


def run(args) -> int:
    if not 0.0 <= args.refine_fraction <= 1.0:
        raise InputError(f"--refine-fraction must be in [0, 1], got {args.refine_fraction}.")

    def edit(pipe, params, chunk):
        return ilvr.ilvr(pipe, params, from_uint8(chunk.images), chunk.targets,
                         args.negative_prompt, factor=args.factor,
                         refine_fraction=args.refine_fraction, steps=args.steps,
                         guidance_scale=args.guidance, seed=chunk.seed,
                         sample_index=chunk.index, mesh=chunk.mesh, eta=args.eta)

    record = edit_runner.method_record(args, "ilvr", dict(
        factor=args.factor, refine_fraction=args.refine_fraction, eta=args.eta,
        negative_prompt=args.negative_prompt))
    return edit_runner.run_edits(args, edit_runner.EditTool("ilvr", edit, record))


def main(argv=None) -> int:
    return edit_args.run_main(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
