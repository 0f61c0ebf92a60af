"""DreamBooth with prior preservation (full UNet or LoRA); see configs/dreambooth.py.

    python train/dreambooth.py --config configs/dreambooth.py --workdir runs/db \
        --config.instance_dir=my_subject/ --config.instance_prompt="a sks circle"

Re-running the same command resumes from the last checkpoint. The logic is in
``jaxdiff.training.dreambooth``; this file only reads flags.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxdiff import parallel
from jaxdiff.training.personalize import run_dreambooth

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs, samples and export.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    parallel.maybe_initialize_distributed()
    try:
        export = run_dreambooth(_CONFIG.value, _WORKDIR.value)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"exported {export}")


if __name__ == "__main__":
    app.run(main)
