r"""DreamBooth with prior preservation (full UNet or LoRA); see configs/dreambooth.py.

    python train/dreambooth.py --config configs/dreambooth.py --workdir runs/db \
        --config.instance_dir=my_subject/ --config.instance_prompt="a sks circle"
    python train/dreambooth.py --config configs/dreambooth.py:tiny --workdir /tmp/smoke \
        --config.instance_dir=my_subject/ \
        --config.sample_prompts='("a sks circle", "a sks circle on the left")'

Tuple fields (``sample_prompts``) take a Python tuple, quoted for the shell as above.
Re-running the same command resumes from the last checkpoint. The logic is in
``jaxdiff.training.dreambooth`` (run from a config by ``jaxdiff.training.recipes``); this
file only reads flags.
"""
from jaxdiff.training.recipes import run_dreambooth, run_training_main

if __name__ == "__main__":
    run_training_main(run_dreambooth)
