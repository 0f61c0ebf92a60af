"""SDEdit / img2img: noise the image(s) to --strength, then denoise toward --target-prompt.

    python edit/sdedit.py --image in.png --target-prompt "a blue square" --strength 0.6 \\
        --out outputs/sdedit

Per input it writes ``<out>/<name>/``: input.png, reconstruction.png (VAE round trip),
edit.png (edit_<k>.png for several targets), panel.png, settings.json; ``<out>/summary.json``
lists finished jobs and errors. One compiled program per --max-batch chunk, split over the
devices (an edit's noise comes from --seed and its index among all edits of the command).
Logic: ``jaxdiff.editing.sdedit``.
"""
from __future__ import annotations

import argparse
import sys

from jaxdiff.cli import edit_args, edit_runner
from jaxdiff.data.images import InputError
from jaxdiff.editing import sdedit
from jaxdiff.pipeline import from_uint8


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edit/sdedit.py", description=__doc__.splitlines()[0])
    edit_args.add_common_args(p, steps=50, guidance=7.5)
    p.add_argument("--strength", type=float, default=0.8,
                   help="fraction of the steps run, in [0, 1] (default 0.8)")
    p.add_argument("--negative-prompt", default="", help="negative prompt (default empty)")
    p.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"),
                   help="sampler (default ddim)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    return p


def run(args) -> int:
    if not 0.0 <= args.strength <= 1.0:
        raise InputError(f"--strength must be in [0, 1], got {args.strength}.")

    def edit(pipe, params, chunk):
        return sdedit.sdedit(pipe, params, from_uint8(chunk.images), chunk.targets,
                             args.negative_prompt, strength=args.strength, steps=args.steps,
                             guidance_scale=args.guidance, seed=chunk.seed,
                             sample_index=chunk.index, mesh=chunk.mesh, eta=args.eta,
                             sampler=args.sampler)

    record = edit_runner.method_record(args, "sdedit", dict(
        strength=args.strength, negative_prompt=args.negative_prompt, sampler=args.sampler,
        eta=args.eta))
    return edit_runner.run_edits(args, edit_runner.EditTool("sdedit", edit, record))


def main(argv=None) -> int:
    return edit_args.run_main(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
