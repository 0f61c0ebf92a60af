"""Textual Inversion (new token embeddings); see configs/textual_inversion.py.

    python train/textual_inversion.py --config configs/textual_inversion.py --workdir runs/ti \
        --config.instance_dir=my_concept/ --config.placeholder_token="<new-shape>"

Re-running the same command resumes from the last checkpoint. The logic is in
``jaxdiff.training.ti_train``; this file only reads flags.
"""
from jaxdiff.training.entrypoint import run_training_main
from jaxdiff.training.personalize import run_textual_inversion

if __name__ == "__main__":
    run_training_main(run_textual_inversion)
