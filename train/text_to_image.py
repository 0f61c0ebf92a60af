"""Train a text-to-image pipeline from scratch (autoencoder, then text encoder + UNet).

    python train/text_to_image.py --config configs/shapes.py --workdir runs/shapes
    python train/text_to_image.py --config configs/shapes.py:tiny --workdir /tmp/smoke \
        --config.diffusion.steps=100

Re-running the same command resumes from the last checkpoint of each stage. The logic is
in ``jaxdiff.training.recipe``; this file only reads flags.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from jaxdiff import parallel
from jaxdiff.training.recipe import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs, samples and export.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    parallel.maybe_initialize_distributed()
    export = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    print(f"exported pipeline to {export}")


if __name__ == "__main__":
    app.run(main)
