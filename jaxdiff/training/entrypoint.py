"""The shared body of the ``train/*.py`` entrypoints: ``--config`` / ``--workdir`` flags,
multi-host start-up, one-line errors for bad input."""
import sys
from typing import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from jaxdiff import parallel


def run_training_main(train: Callable[[object, str], str]) -> None:
    """Parse ``--config FILE[:variant]`` (with ``--config.x=y`` overrides) and ``--workdir``,
    start ``jax.distributed`` when the environment asks for it, run ``train(config,
    workdir)`` and print the export it returns. Bad input (ValueError / FileNotFoundError
    raised by the recipe) exits with a one-line ``error: ...`` message."""
    config = config_flags.DEFINE_config_file("config", None, "Python config file.",
                                             lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, "Checkpoints, logs, samples and export.")
    flags.mark_flags_as_required(["config", "workdir"])
    for name in ("config", "workdir"):  # list them in the entrypoint's own --help
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])

    def main(argv):
        del argv
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
        parallel.maybe_initialize_distributed()
        try:
            export = train(config.value, workdir.value)
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"error: {e}")
        print(f"exported {export}")

    app.run(main)
