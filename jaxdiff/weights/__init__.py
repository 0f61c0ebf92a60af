"""Checkpoints: diffusers folders, original-layout single files, the Hugging Face cache;
PyTorch <-> Flax layout conversion."""
from jaxdiff.weights.convert import WeightsError
from jaxdiff.weights.diffusers_format import DEFAULT_MODEL, load_component
from jaxdiff.weights.files import PickleRefusedError
from jaxdiff.weights.loading import load_pipeline, save_pipeline

__all__ = ["DEFAULT_MODEL", "load_component", "load_pipeline", "save_pipeline",
           "WeightsError", "PickleRefusedError"]
