"""Evaluation: metrics and the shapes-world evaluator."""
from jaxdiff.eval.shapes_eval import aggregate, attribute_accuracy, evaluate, mask_iou

__all__ = ["aggregate", "attribute_accuracy", "evaluate", "mask_iou"]
