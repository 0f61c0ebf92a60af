"""Textual Inversion (new token embeddings); see configs/textual_inversion.py.

    python train/textual_inversion.py --config configs/textual_inversion.py --workdir runs/ti \
        --config.instance_dir=my_concept/ --config.placeholder_token="<new-shape>"

Re-running the same command resumes from the last checkpoint. The logic is in
``jaxdiff.training.ti_train``; this file only reads flags.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxdiff import parallel
from jaxdiff.training.personalize import run_textual_inversion

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs, samples and export.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    parallel.maybe_initialize_distributed()
    try:
        export = run_textual_inversion(_CONFIG.value, _WORKDIR.value)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"exported {export}")


if __name__ == "__main__":
    app.run(main)
