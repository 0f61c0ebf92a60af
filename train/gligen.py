r"""Train GLIGEN layers (boxes + phrases) on a frozen base pipeline; see configs/gligen.py.

    python train/gligen.py --config configs/gligen.py --workdir runs/gligen
    python train/gligen.py --config configs/gligen.py:tiny --workdir /tmp/smoke

Re-running the same command resumes from the last checkpoint. The export
(``<workdir>/export``) is a diffusers ``StableDiffusionGLIGENPipeline`` folder. The logic
is in ``jaxdiff.training.gligen``; this file only reads flags.
"""
from jaxdiff.training.gligen import run_gligen
from jaxdiff.training.recipes import run_training_main

if __name__ == "__main__":
    run_training_main(run_gligen)
