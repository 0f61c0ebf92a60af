"""DiffEdit: automatic mask from --source-prompt vs --target-prompt, then a masked
DDIM-inversion edit (the background retraces the inversion).

    python edit/diffedit.py --image in.png --source-prompt "a red circle" \\
        --target-prompt "a blue circle" --out outputs/diffedit

Per input it writes ``<out>/<name>/``: input.png, reconstruction.png (VAE round trip),
edit.png (edit_<k>.png), mask.png (the mask used, at latent resolution), panel.png,
settings.json; ``<out>/summary.json``. --mask (file or folder) replaces the automatic mask
for the images that have one. Logic: ``jaxdiff.editing.diffedit``.
"""
from __future__ import annotations

import argparse
import sys

from jaxdiff.cli import edit_args, edit_runner
from jaxdiff.data.images import InputError
from jaxdiff.editing import diffedit
from jaxdiff.pipeline import from_uint8


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edit/diffedit.py", description=__doc__.splitlines()[0])
    edit_args.add_common_args(p, steps=50, guidance=7.5, mask="optional")
    p.add_argument("--strength", type=float, default=0.8,
                   help="inversion depth: fraction of the steps inverted (default 0.8)")
    p.add_argument("--mask-strength", type=float, default=0.5,
                   help="noise level at which the mask is estimated (default 0.5)")
    p.add_argument("--num-maps", type=int, default=10,
                   help="noise draws averaged for the mask (default 10)")
    p.add_argument("--threshold-ratio", type=float, default=3.0,
                   help="clamp the map at this multiple of its mean (default 3)")
    return p


def run(args) -> int:
    for name in ("strength", "mask_strength"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise InputError(f"--{name.replace('_', '-')} must be in [0, 1], got "
                             f"{getattr(args, name)}.")
    if args.num_maps < 1 or args.threshold_ratio <= 0:
        raise InputError("--num-maps must be >= 1 and --threshold-ratio > 0.")

    def edit(pipe, params, chunk):
        return diffedit.diffedit(pipe, params, from_uint8(chunk.images), chunk.sources,
                                 chunk.targets, masks=chunk.masks, mask_given=chunk.mask_given,
                                 strength=args.strength, mask_strength=args.mask_strength,
                                 num_maps=args.num_maps, threshold_ratio=args.threshold_ratio,
                                 steps=args.steps, guidance_scale=args.guidance, seed=chunk.seed,
                                 sample_index=chunk.index, mesh=chunk.mesh)

    record = edit_runner.method_record(args, "diffedit", dict(
        strength=args.strength, mask_strength=args.mask_strength, num_maps=args.num_maps,
        threshold_ratio=args.threshold_ratio))
    return edit_runner.run_edits(args, edit_runner.EditTool(
        "diffedit", edit, record, mask="optional", need=("source_prompt", "target_prompt")))


def main(argv=None) -> int:
    return edit_args.run_main(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
