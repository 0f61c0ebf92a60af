r"""Train the noisy-latent classifier of classifier guidance; see configs/classifier.py.

    python train/classifier.py --config configs/classifier.py --workdir runs/classifier
    python train/classifier.py --config configs/classifier.py:tiny --workdir /tmp/smoke

Re-running the same command resumes from the last checkpoint. The logic is in
``jaxdiff.training.classifier``; this file only reads flags.
"""
from jaxdiff.training.classifier import run_classifier
from jaxdiff.training.recipes import run_training_main

if __name__ == "__main__":
    run_training_main(run_classifier)
