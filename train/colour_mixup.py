r"""Colour-mixup conditioning (the embedded model's last stage); see configs/colour_mixup.py.

    python train/colour_mixup.py --config configs/colour_mixup.py --workdir runs/shapes_v2_mixup_a
    python train/colour_mixup.py --config configs/colour_mixup.py:second \
        --workdir runs/shapes_v2_mixup_b

Re-running the same command resumes from the last checkpoint. The logic is in
``jaxdiff.training.colour_mixup``; this file only reads flags.
"""
from jaxdiff.training.colour_mixup import run_colour_mixup
from jaxdiff.training.recipes import run_training_main

if __name__ == "__main__":
    run_training_main(run_colour_mixup)
