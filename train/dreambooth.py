"""DreamBooth with prior preservation (full UNet or LoRA); see configs/dreambooth.py.

    python train/dreambooth.py --config configs/dreambooth.py --workdir runs/db \
        --config.instance_dir=my_subject/ --config.instance_prompt="a sks circle"

Re-running the same command resumes from the last checkpoint. The logic is in
``jaxdiff.training.dreambooth``; this file only reads flags.
"""
from jaxdiff.training.entrypoint import run_training_main
from jaxdiff.training.personalize import run_dreambooth

if __name__ == "__main__":
    run_training_main(run_dreambooth)
