"""jaxdiff: pure-functional JAX/Flax Stable Diffusion — models, samplers, training, editing."""
import logging as _logging

# transformers (used for tokenizers only) announces at import that PyTorch is missing.
# jaxdiff never needs PyTorch, so exactly that notice is dropped; its other warnings stay.
_logging.getLogger("transformers").addFilter(
    lambda record: "PyTorch was not found" not in record.getMessage())

from jaxdiff.adapters.apply import load_lora
from jaxdiff.pipeline import Pipeline
from jaxdiff.sampling import generate
from jaxdiff.weights import load_pipeline, save_pipeline

__version__ = "0.1.0"
__all__ = ["Pipeline", "load_pipeline", "save_pipeline", "generate", "load_lora"]
