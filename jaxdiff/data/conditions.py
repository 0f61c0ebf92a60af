"""Control conditions of a shapes-world scene, made from its ground-truth masks.

Pure numpy functions of the visible-pixel masks (``shapes.render``: bool [K, H, W],
disjoint, later objects over earlier ones) and the objects' shape ids. The TFDS builder
(``tfds_shapes``) writes both maps with every record, so training never recomputes them.

* ``segmentation_map``: the per-pixel class as an RGB image (uint8 [H, W, 3]):
  background is black, a pixel of an object with shape id ``s`` (index into
  ``WorldSpec.shapes``) is ``SEGMENT_COLOURS[s]``. The colours are fixed, saturated and
  far apart (ADE20K-style colour-coded classes); they say nothing about the object's own
  colour. ``segment_classes`` inverts the encoding (nearest palette entry).
* ``edge_map``: the mask boundaries as a white-on-black RGB image (uint8 [H, W, 3], the
  form of diffusers' Canny condition images): an object pixel is an edge when one of its
  4-neighbours is outside its mask (another object or the background; the image border
  counts as outside). Canny-like, but exact: edges of the true shapes, not of the
  antialiased pixels.
"""
from __future__ import annotations

import numpy as np

# Background, then one colour per shape id (circle, square, triangle, cross, star for the
# shipped worlds). Enough entries for worlds of up to 7 shapes.
SEGMENT_COLOURS = np.array([
    (0, 0, 0),        # background
    (230, 25, 75),    # shape 0
    (60, 180, 75),    # shape 1
    (0, 130, 200),    # shape 2
    (255, 225, 25),   # shape 3
    (145, 30, 180),   # shape 4
    (70, 240, 240),   # shape 5
    (250, 190, 190),  # shape 6
], np.uint8)
EDGE_VALUE = 255


def _check(masks, shape_ids=None):
    masks = np.asarray(masks, bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must be bool [K, H, W], got shape {masks.shape}.")
    if shape_ids is not None:
        ids = np.asarray(shape_ids)
        if ids.shape[0] < masks.shape[0]:
            raise ValueError(f"{masks.shape[0]} masks but {ids.shape[0]} shape ids.")
        if masks.shape[0] and np.max(ids[:masks.shape[0]]) + 1 >= len(SEGMENT_COLOURS):
            raise ValueError(f"shape id {int(np.max(ids))} has no segmentation colour "
                             f"(at most {len(SEGMENT_COLOURS) - 2}).")
    return masks


def class_map(masks, shape_ids) -> np.ndarray:
    """int32 [H, W]: 0 for background, ``1 + shape id`` of the object covering the pixel."""
    masks = _check(masks, shape_ids)
    out = np.zeros(masks.shape[1:], np.int32)
    for k in range(masks.shape[0]):   # visible masks are disjoint; order only for safety
        out[masks[k]] = 1 + int(shape_ids[k])
    return out


def segmentation_map(masks, shape_ids) -> np.ndarray:
    """uint8 [H, W, 3]: ``class_map`` coloured with ``SEGMENT_COLOURS``."""
    return SEGMENT_COLOURS[class_map(masks, shape_ids)]


def segment_classes(seg_rgb) -> np.ndarray:
    """Inverse of ``segmentation_map`` (nearest palette colour): int32 [..., H, W] classes
    (0 background, 1 + shape id), also for resized or generated maps."""
    x = np.asarray(seg_rgb, np.float32)[..., None, :]
    d = np.sum((x - SEGMENT_COLOURS.astype(np.float32)) ** 2, axis=-1)
    return np.argmin(d, axis=-1).astype(np.int32)


def boundary(mask) -> np.ndarray:
    """bool [H, W]: pixels of ``mask`` with a 4-neighbour outside it (border = outside)."""
    m = np.pad(np.asarray(mask, bool), 1, constant_values=False)
    inner = m[1:-1, 1:-1]
    all_in = m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return inner & ~all_in


def edge_map(masks) -> np.ndarray:
    """uint8 [H, W, 3]: white (``EDGE_VALUE``) on the boundary pixels of every mask."""
    masks = _check(masks)
    edges = np.zeros(masks.shape[1:], bool)
    for k in range(masks.shape[0]):
        edges |= boundary(masks[k])
    return np.repeat((edges * EDGE_VALUE).astype(np.uint8)[..., None], 3, axis=-1)


def conditions(masks, shape_ids, num_objects: int) -> dict:
    """Both maps of one scene from its first ``num_objects`` masks / shape ids."""
    masks = np.asarray(masks, bool)[:int(num_objects)]
    ids = np.asarray(shape_ids)[:int(num_objects)]
    return {"segmentation": segmentation_map(masks, ids), "edges": edge_map(masks)}
