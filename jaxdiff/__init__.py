"""jaxdiff: pure-functional JAX/Flax Stable Diffusion — models, samplers, training, editing."""
from jaxdiff.pipeline import Pipeline
from jaxdiff.sampling import generate
from jaxdiff.weights import load_pipeline, save_pipeline

__version__ = "0.1.0"
__all__ = ["Pipeline", "load_pipeline", "save_pipeline", "generate"]
