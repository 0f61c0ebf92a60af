r"""Train a text-to-image pipeline from scratch (autoencoder, then text encoder + UNet).

    python train/text_to_image.py --config configs/shapes.py --workdir runs/shapes
    python train/text_to_image.py --config configs/shapes.py:tiny --workdir /tmp/smoke \
        --config.diffusion.steps=100 --config.sample_prompts='("a big blue square",)'

Tuple fields (``sample_prompts``, ``mesh.rules``) take a Python tuple, quoted for the
shell as above. Re-running the same command resumes from the last checkpoint of each
stage. The logic is in ``jaxdiff.training.text_to_image`` (run from a config by
``jaxdiff.training.recipes``); this file only reads flags.
"""
from jaxdiff.training.recipes import run_training_main, train_and_evaluate

if __name__ == "__main__":
    run_training_main(train_and_evaluate)
