r"""Textual Inversion (new token embeddings); see configs/textual_inversion.py.

    python train/textual_inversion.py --config configs/textual_inversion.py --workdir runs/ti \
        --config.instance_dir=my_concept/ --config.placeholder_token="<new-shape>"
    python train/textual_inversion.py --config configs/textual_inversion.py:tiny \
        --workdir /tmp/smoke --config.instance_dir=my_concept/ \
        --config.templates='("a {} square", "a photo of a {}")'

Tuple fields (``templates``) take a Python tuple, quoted for the shell as above.
Re-running the same command resumes from the last checkpoint. The logic is in
``jaxdiff.training.textual_inversion`` (run from a config by
``jaxdiff.training.recipes``); this file only reads flags.
"""
from jaxdiff.training.recipes import run_textual_inversion, run_training_main

if __name__ == "__main__":
    run_training_main(run_textual_inversion)
