"""jaxdiff: pure-functional JAX/Flax Stable Diffusion — models, samplers, training, editing."""
from jaxdiff.pipeline import Pipeline
from jaxdiff.weights import load_pipeline, save_pipeline

__version__ = "0.1.0"
__all__ = ["Pipeline", "load_pipeline", "save_pipeline", "generate"]


def __getattr__(name):
    if name == "generate":  # imported lazily: samplers pull in more modules
        from jaxdiff.generate import generate
        return generate
    raise AttributeError(f"module 'jaxdiff' has no attribute {name!r}")
