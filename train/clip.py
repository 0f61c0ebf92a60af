r"""Train a CLIP on the shapes world (contrastive, symmetric InfoNCE).

    python train/clip.py --config configs/clip.py --workdir runs/clip_shapes
    python train/clip.py --config configs/clip.py:tiny --workdir /tmp/smoke

Re-running the same command resumes from the last checkpoint. The export
(``<workdir>/export``) is a transformers ``CLIPModel`` folder. The logic is in
``jaxdiff.training.clip``; this file only reads flags.
"""
from jaxdiff.training.clip import run_clip
from jaxdiff.training.recipes import run_training_main

if __name__ == "__main__":
    run_training_main(run_clip)
