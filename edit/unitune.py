"""UniTune: fine-tune the model on each image under a rare token, then edit it by SDEdit
from --strength toward "<token> <target prompt>", interpolated back toward the input.

    python edit/unitune.py --image photo.png --target-prompt "a blue circle" \\
        --strength 0.6 --out outputs/unitune

Every (image, target prompt) pair gets its own LoRA adapters (full UNet with
``--lora-rank 0``), trained with DreamBooth's loss under the prompt ``--token`` alone.
Per input it writes ``<out>/<name>/``: input.png, reconstruction.png (VAE round trip),
edit.png (edit_<k>.png for several targets), panel.png, settings.json;
``<out>/summary.json`` lists finished jobs and errors. One compiled program per
--max-batch chunk (the last chunk padded). Logic: ``jaxdiff.editing.unitune``.
"""
from __future__ import annotations

import argparse
import sys

from jaxdiff.cli import edit_args, edit_runner
from jaxdiff.data.images import InputError
from jaxdiff.editing import imagic, unitune
from jaxdiff.pipeline import from_uint8

DEFAULT = unitune.DEFAULT_STAGES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edit/unitune.py", description=__doc__.splitlines()[0])
    edit_args.add_common_args(p, steps=50, guidance=7.5)
    p.add_argument("--token", default="sks", help="the rare token (default sks)")
    p.add_argument("--strength", type=float, default=0.6,
                   help="SDEdit start: fraction of the steps run, in [0, 1] (default 0.6)")
    p.add_argument("--interpolation", type=float, default=0.0,
                   help="weight of the input's latent blended into the result, in [0, 1] "
                   "(default 0)")
    p.add_argument("--finetune-steps", type=int, default=DEFAULT.finetune_steps,
                   help=f"fine-tuning steps (default {DEFAULT.finetune_steps})")
    p.add_argument("--finetune-lr", type=float, default=1e-3,
                   help="fine-tuning learning rate (default 1e-3)")
    p.add_argument("--lora-rank", type=int, default=DEFAULT.lora_rank,
                   help=f"LoRA rank; 0 = full UNet fine-tuning (default {DEFAULT.lora_rank})")
    p.add_argument("--draws", type=int, default=DEFAULT.draws,
                   help=f"(t, noise) draws of the image per step (default {DEFAULT.draws})")
    p.add_argument("--negative-prompt", default="", help="negative prompt (default empty)")
    return p


def run(args) -> int:
    for name in ("strength", "interpolation"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise InputError(f"--{name} must be in [0, 1], got {getattr(args, name)}.")
    if args.finetune_steps < 0 or args.lora_rank < 0 or args.draws < 1:
        raise InputError("--finetune-steps and --lora-rank must be >= 0 and --draws >= 1.")
    if not args.token.strip() or len(args.token.split()) != 1:
        raise InputError(f"--token must be one word, got {args.token!r}.")
    stages = imagic.Stages(0, args.finetune_steps, args.lora_rank, args.draws)

    def edit(pipe, params, chunk):
        out = unitune.unitune(pipe, params, from_uint8(chunk.images), chunk.targets,
                              args.negative_prompt, token=args.token, strengths=args.strength,
                              interpolations=args.interpolation, finetune_lr=args.finetune_lr,
                              stages=stages, steps=args.steps, guidance_scale=args.guidance,
                              seed=chunk.seed, sample_index=chunk.index, mesh=chunk.mesh)
        return {"edited": out["edited"][:, 0], "reconstruction": out["reconstruction"]}

    record = edit_runner.method_record(args, "unitune", dict(
        token=args.token, strength=args.strength, interpolation=args.interpolation,
        finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr,
        lora_rank=args.lora_rank, draws=args.draws, negative_prompt=args.negative_prompt))
    return edit_runner.run_edits(args, edit_runner.EditTool("unitune", edit, record,
                                                            pad_chunks=True))


def main(argv=None) -> int:
    return edit_args.run_main(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
