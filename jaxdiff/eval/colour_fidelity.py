"""Colour fidelity of generated objects: how close an object's colour is to a target RGB.

Used to score personalization of colours (``bench/personalize.py``): a concept taught as
one RGB colour is reproduced when the generated object's *median* colour lies within a
few tens of RGB units of it.

* ``median_colour(image, mask)``: per-channel median RGB inside a mask (anti-aliased
  edges and stray pixels do not move it while they are fewer than half the mask);
* ``object_colour(image, spec)``: that median inside the mask of the largest object the
  shapes-world evaluator (``shapes_eval.evaluate``) segments; None when it finds none;
* ``colour_distances(images, target, spec)``: Euclidean RGB distance of each image's
  object colour to ``target`` (inf when no object was found);
* ``fidelity(distances, within)``: share within ``within`` RGB units (a missing object
  counts as a miss) and the median distance;
* ``anchor_distances(rgb, spec)``: distance of a colour to every named colour's anchor
  (to check that a colour is off the palette and outside its shade spread).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from jaxdiff.data.shapes import WorldSpec
from jaxdiff.eval.shapes_eval import evaluate

WITHIN = 40.0  # RGB units: "the taught colour" (the personalization target's threshold)


def median_colour(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-channel median RGB float64 [3] of ``image`` uint8 [H, W, 3] inside ``mask``
    bool [H, W] (non-empty)."""
    mask = np.asarray(mask, bool)
    if mask.shape != np.shape(image)[:2]:
        raise ValueError(f"mask {mask.shape} does not match image {np.shape(image)}")
    if not mask.any():
        raise ValueError("empty mask: no pixels to take a colour from")
    return np.median(np.asarray(image)[mask].astype(np.float64), axis=0)


def object_colour(image: np.ndarray, spec: WorldSpec) -> Optional[np.ndarray]:
    """Median RGB [3] inside the largest object the evaluator finds; None if none."""
    objects = evaluate(image, spec)["objects"]
    if not objects:
        return None
    return median_colour(image, max(objects, key=lambda o: o["area"])["mask"])


def colour_distances(images: Sequence[np.ndarray], target, spec: WorldSpec) -> np.ndarray:
    """float64 [N]: RGB distance of each image's object colour to ``target`` (inf: no
    object found)."""
    out = []
    for image in images:
        rgb = object_colour(image, spec)
        out.append(math.inf if rgb is None else float(np.linalg.norm(rgb - np.asarray(target))))
    return np.asarray(out, np.float64)


def fidelity(distances, within: float = WITHIN) -> dict:
    """{"within": share of distances <= ``within``, "median_distance": median (None when
    more than half are inf, i.e. no object), "n": count, "no_object": count of inf}."""
    d = np.asarray(distances, np.float64)
    if d.size == 0:
        raise ValueError("no distances to score")
    median = float(np.median(d))
    return {"within": float(np.mean(d <= within)),
            "median_distance": round(median, 1) if math.isfinite(median) else None,
            "n": int(d.size), "no_object": int(np.isinf(d).sum())}


def anchor_distances(rgb, spec: WorldSpec) -> dict[str, float]:
    """Named colour -> RGB distance of ``rgb`` to its anchor."""
    return {name: float(np.linalg.norm(np.subtract(rgb, anchor, dtype=np.float64)))
            for name, anchor in spec.colours}
