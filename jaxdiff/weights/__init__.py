"""diffusers-format checkpoints: load/save, PyTorch <-> Flax layout conversion."""
from jaxdiff.weights.convert import WeightsError
from jaxdiff.weights.diffusers_format import (DEFAULT_MODEL, load_component, load_pipeline,
                                              save_pipeline)
from jaxdiff.weights.files import PickleRefusedError

__all__ = ["DEFAULT_MODEL", "load_component", "load_pipeline", "save_pipeline",
           "WeightsError", "PickleRefusedError"]
