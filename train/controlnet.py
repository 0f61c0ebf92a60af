r"""Train a ControlNet on a frozen base pipeline; see configs/controlnet.py.

    python train/controlnet.py --config configs/controlnet.py --workdir runs/controlnet_seg
    python train/controlnet.py --config configs/controlnet.py:tiny --workdir /tmp/smoke

Re-running the same command resumes from the last checkpoint. The export
(``<workdir>/export``) is a diffusers ``ControlNetModel`` folder. The logic is in
``jaxdiff.training.control``; this file only reads flags.
"""
from jaxdiff.training.control import run_controlnet
from jaxdiff.training.recipes import run_training_main

if __name__ == "__main__":
    run_training_main(run_controlnet)
