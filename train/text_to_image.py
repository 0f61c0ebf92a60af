"""Train a text-to-image pipeline from scratch (autoencoder, then text encoder + UNet).

    python train/text_to_image.py --config configs/shapes.py --workdir runs/shapes
    python train/text_to_image.py --config configs/shapes.py:tiny --workdir /tmp/smoke \
        --config.diffusion.steps=100

Re-running the same command resumes from the last checkpoint of each stage. The logic is
in ``jaxdiff.training.recipe``; this file only reads flags.
"""
from jaxdiff.training.entrypoint import run_training_main
from jaxdiff.training.recipe import train_and_evaluate

if __name__ == "__main__":
    run_training_main(train_and_evaluate)
