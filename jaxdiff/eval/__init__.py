"""Evaluation: metrics, the shapes-world evaluator and generation scoring."""
from jaxdiff.eval.generation import (PromptCase, prompt_set, psnr, score_images, vae_psnr)
from jaxdiff.eval.shapes_eval import aggregate, attribute_accuracy, evaluate, mask_iou

__all__ = ["PromptCase", "aggregate", "attribute_accuracy", "evaluate", "mask_iou",
           "prompt_set", "psnr", "score_images", "vae_psnr"]
