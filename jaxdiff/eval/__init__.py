"""Evaluation: metrics, the shapes-world evaluator, generation scoring and colour fidelity."""
from jaxdiff.eval.colour_fidelity import colour_distances, fidelity, median_colour, object_colour
from jaxdiff.eval.generation import (PromptCase, prompt_set, psnr, score_images, vae_psnr)
from jaxdiff.eval.shapes_eval import aggregate, attribute_accuracy, evaluate, mask_iou

__all__ = ["PromptCase", "aggregate", "attribute_accuracy", "colour_distances", "evaluate",
           "fidelity", "mask_iou", "median_colour", "object_colour", "prompt_set", "psnr",
           "score_images", "vae_psnr"]
