"""InstructPix2Pix: edit image(s) by a written instruction (--target-prompt is the instruction).

    python edit/instruct.py --image in.png --target-prompt "make the circle blue" \\
        --guidance 7.5 --image-guidance 1.5 --out outputs/instruct

--model must be an InstructPix2Pix pipeline (a diffusers StableDiffusionInstructPix2Pix
folder: its UNet takes the noisy latents and the image latents, 8 channels for SD); by
default the embedded model's instruct weights (jaxdiff/assets/shapes_instruct, best at
--guidance 3 --image-guidance 3). --guidance is the text guidance s_T, --image-guidance
the image guidance s_I; --source-prompt is not used. Per input it writes
``<out>/<name>/``: input.png, reconstruction.png (VAE round trip), edit.png (edit_<k>.png
for several instructions), panel.png, settings.json; ``<out>/summary.json`` lists finished
jobs and errors (a bad job is reported and the rest go on). One compiled program per
--max-batch chunk, split over the devices (an edit's noise comes from --seed and its index
among all edits of the command). Logic: ``jaxdiff.editing.instruct_pix2pix``.
"""
from __future__ import annotations

import argparse
import os
import sys

from jaxdiff.cli import edit_args, edit_runner
from jaxdiff.data.images import InputError
from jaxdiff.editing import instruct_pix2pix
from jaxdiff.samplers import SAMPLERS
from jaxdiff.weights.diffusers_format import INSTRUCT_MODEL


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edit/instruct.py", description=__doc__.splitlines()[0],
                                epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    edit_args.add_common_args(p, steps=100, guidance=7.5, helps=dict(
        model="InstructPix2Pix pipeline directory (default: the embedded model's instruct "
              "weights, jaxdiff/assets/shapes_instruct)",
        steps="sampler steps (default 100, as diffusers)",
        guidance="text guidance scale s_T (default 7.5)",
        source_prompt="not used (the instruction alone describes the edit)",
        target_prompt="the instruction, e.g. \"make the circle blue\" (repeat for several "
                      "edits per image)"))
    p.add_argument("--image-guidance", type=float, default=1.5,
                   help="image guidance scale s_I (default 1.5; --guidance is s_T)")
    p.add_argument("--negative-prompt", default="", help="negative prompt (default empty)")
    p.add_argument("--sampler", default="euler_a", choices=sorted(SAMPLERS),
                   help="sampler (default euler_a, as the released InstructPix2Pix)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    return p


def run(args) -> int:
    if args.model is None:
        if not os.path.isdir(INSTRUCT_MODEL):
            raise InputError("the embedded model has no InstructPix2Pix weights yet "
                             f"({INSTRUCT_MODEL} is missing); pass --model <InstructPix2Pix "
                             "pipeline folder> (train/instruct_pix2pix.py trains one).")
        args.model = INSTRUCT_MODEL

    def edit(pipe, params, chunk):
        out = instruct_pix2pix.edit_outputs(
            pipe, params, chunk.images, chunk.targets, steps=args.steps,
            text_guidance=args.guidance, image_guidance=args.image_guidance, seed=chunk.seed,
            negative_prompt=args.negative_prompt, sampler=args.sampler, eta=args.eta,
            mesh=chunk.mesh, sample_index=chunk.index)
        return {"edited": out["edited"], "reconstruction": out["reconstruction"]}

    record = edit_runner.method_record(args, "instruct_pix2pix", dict(
        image_guidance=args.image_guidance, negative_prompt=args.negative_prompt,
        sampler=args.sampler, eta=args.eta))
    return edit_runner.run_edits(args, edit_runner.EditTool("instruct", edit, record))


def main(argv=None) -> int:
    return edit_args.run_main(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
