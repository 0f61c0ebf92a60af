r"""Train an InstructPix2Pix model from a base pipeline; see configs/instruct_pix2pix.py.

    python train/instruct_pix2pix.py --config configs/instruct_pix2pix.py \
        --workdir runs/instruct_pix2pix
    python train/instruct_pix2pix.py --config configs/instruct_pix2pix.py:tiny \
        --workdir /tmp/smoke

Re-running the same command resumes from the last checkpoint. The export
(``<workdir>/export``) is a diffusers ``StableDiffusionInstructPix2PixPipeline`` folder.
The logic is in ``jaxdiff.training.instruct_pix2pix``; this file only reads flags.
"""
from jaxdiff.training.instruct_pix2pix import run_instruct_pix2pix
from jaxdiff.training.recipes import run_training_main

if __name__ == "__main__":
    run_training_main(run_instruct_pix2pix)
