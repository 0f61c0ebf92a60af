"""GLIGEN grounding of a shapes-world scene: one (phrase, box) per object, from its truth.

The TFDS builder (``tfds_shapes``) writes both with every record, so training never
recomputes them:

* ``phrases``: the object's noun exactly as the scene's caption says it, without the
  article (``shapes.noun_phrase``): "small red circle", "big blue square", "red object"
  (shape word dropped), "circle" (size and colour unsaid). The phrase therefore always
  occurs in the caption, and the caption's own mention dropout (size, colour, shape)
  doubles as the phrase-attribute variety GLIGEN's noun phrases have. Empty slots
  (objects past ``num_objects``) are "".
* ``boxes``: float32 [MAX_OBJECTS, 4] ``(x0, y0, x1, y1)``, fractions of the image side
  (diffusers' GLIGEN convention, y down), the tight box of the object's visible mask in
  pixel-edge coordinates: ``x0 = first column / W``, ``x1 = (last column + 1) / W`` (rows
  likewise), so a box always has ``x0 < x1``, ``y0 < y1`` and lies in [0, 1]. An empty
  slot, or an object without a visible pixel, has the box (0, 0, 0, 0).
"""
from __future__ import annotations

import numpy as np

from jaxdiff.data.shapes import MAX_OBJECTS, noun_phrase


def mask_box(mask) -> np.ndarray:
    """float32 [4]: the tight pixel-edge box of a bool [H, W] mask as fractions of the
    image, (0, 0, 0, 0) for an empty mask."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        return np.zeros(4, np.float32)
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    h, w = mask.shape
    return np.array([cols[0] / w, rows[0] / h, (cols[-1] + 1) / w, (rows[-1] + 1) / h],
                    np.float32)


def grounding(example: dict) -> dict:
    """``phrases`` (list of MAX_OBJECTS str) and ``boxes`` (float32 [MAX_OBJECTS, 4]) of a
    ``shapes.sample_example`` / ``make_example`` dict."""
    k = int(example["num_objects"])
    boxes = np.zeros((MAX_OBJECTS, 4), np.float32)
    phrases = [""] * MAX_OBJECTS
    for j, obj in enumerate(example["objects"][:k]):
        boxes[j] = mask_box(example["masks"][j])
        phrases[j] = noun_phrase(obj, bool(example["mention_size"]),
                                 bool(example["mention_colour"][j]),
                                 bool(example["mention_shape"][j]))
    return {"phrases": phrases, "boxes": boxes}
