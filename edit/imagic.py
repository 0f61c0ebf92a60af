"""Imagic: optimise the target text's embedding on the image, fine-tune the model on it,
then sample from eta * e_target + (1 - eta) * e_optimised.

    python edit/imagic.py --image photo.png --target-prompt "a big red circle" \\
        --out outputs/imagic

Every (image, target prompt) pair gets its own optimised embedding and its own LoRA
adapters (full UNet with ``--lora-rank 0``); stage sizes come from ``--config``
(default ``configs/imagic.py``; ``configs/imagic.py:sd`` holds the paper's Stable
Diffusion values) and the flags below override them. Per input it writes
``<out>/<name>/``: input.png, reconstruction.png (VAE round trip), edit.png (edit_<k>.png
for several targets), panel.png, settings.json; ``<out>/summary.json`` lists finished jobs
and errors. One compiled program per --max-batch chunk (the last chunk padded).
Logic: ``jaxdiff.editing.imagic``.
"""
from __future__ import annotations

import argparse
import os
import runpy
import sys

from jaxdiff.cli import edit_args, edit_runner
from jaxdiff.data.images import InputError
from jaxdiff.editing import imagic
from jaxdiff.pipeline import from_uint8

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                              "imagic.py")
STAGE_FLAGS = ("embedding_steps", "embedding_lr", "finetune_steps", "finetune_lr",
               "lora_rank", "draws", "eta")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edit/imagic.py", description=__doc__.splitlines()[0])
    edit_args.add_common_args(p, steps=50, guidance=7.5)
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="stage sizes: a config file, optionally :variant (default "
                   "configs/imagic.py; configs/imagic.py:sd = the paper's SD values)")
    p.add_argument("--eta", type=float, default=None,
                   help="interpolation weight of the target embedding (config: 0.7)")
    p.add_argument("--embedding-steps", type=int, default=None,
                   help="stage (a): Adam steps on the text embedding")
    p.add_argument("--embedding-lr", type=float, default=None, help="stage (a) learning rate")
    p.add_argument("--finetune-steps", type=int, default=None,
                   help="stage (b): fine-tuning steps with the optimised embedding")
    p.add_argument("--finetune-lr", type=float, default=None, help="stage (b) learning rate")
    p.add_argument("--lora-rank", type=int, default=None,
                   help="LoRA rank of stage (b); 0 = full UNet fine-tuning")
    p.add_argument("--draws", type=int, default=None,
                   help="(t, noise) draws of the image per optimisation step")
    p.add_argument("--negative-prompt", default="", help="negative prompt (default empty)")
    return p


def settings(args) -> dict:
    """The config's stage values with the flags given on the command line over them."""
    path, _, variant = args.config.partition(":")
    if not os.path.isfile(path):
        raise InputError(f"--config {path}: no such file.")
    config = runpy.run_path(path)["get_config"](variant)
    out = {k: getattr(args, k) if getattr(args, k) is not None else config[k]
           for k in STAGE_FLAGS}
    for k in ("embedding_steps", "finetune_steps", "lora_rank"):
        if out[k] < 0:
            raise InputError(f"--{k.replace('_', '-')} must be >= 0, got {out[k]}.")
    if out["draws"] < 1:
        raise InputError(f"--draws must be >= 1, got {out['draws']}.")
    return out


def run(args) -> int:
    s = settings(args)
    stages = imagic.Stages(s["embedding_steps"], s["finetune_steps"], s["lora_rank"],
                           s["draws"])

    def edit(pipe, params, chunk):
        out = imagic.imagic(pipe, params, from_uint8(chunk.images), chunk.targets,
                            args.negative_prompt, etas=s["eta"], stages=stages,
                            embedding_lr=s["embedding_lr"], finetune_lr=s["finetune_lr"],
                            steps=args.steps, guidance_scale=args.guidance, seed=chunk.seed,
                            sample_index=chunk.index, mesh=chunk.mesh)
        return {"edited": out["edited"][:, 0], "reconstruction": out["reconstruction"]}

    record = edit_runner.method_record(args, "imagic", dict(
        s, config=args.config, negative_prompt=args.negative_prompt))
    return edit_runner.run_edits(args, edit_runner.EditTool("imagic", edit, record,
                                                            pad_chunks=True))


def main(argv=None) -> int:
    return edit_args.run_main(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
