"""Reads a shapes-world scene back from an image: background, objects and their attributes.

Works on rendered images and on (noisy, blurry) generated ones:

1. background = nearest background colour to the median of the 1-pixel border;
2. foreground = pixels whose nearest palette colour (background + the object colours
   allowed on it) is not the background; objects = its 8-connected components, minus
   specks smaller than a quarter of the smallest shape;
3. colour = nearest palette colour to the mean of the component's "core" (its pixels
   farthest from the background colour, so blurred edges don't vote);
4. shape and size: the component's coverage map (how much of each pixel, around the
   component, is that colour over the background; in worlds with shades or unnamed
   colours, the core's own colour, and the object's mask is where that covers >= 1/2)
   is compared with every (shape, size)
   template, crisp and blurred at two strengths, placed at the map's centroid; the best
   soft IoU ("fit") wins. position = the anchor nearest to that template's centre.
"""
from __future__ import annotations

import functools
import itertools
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from jaxdiff.data.shapes import Rgb, ShapeObject, WorldSpec, object_mask, palette

ATTRIBUTES = ("shape", "colour", "size", "position")
_EIGHT = np.ones((3, 3), bool)
_HALF_COVERED = 0.5 - 1.0 / 32.0


def _nearest(pixels: np.ndarray, table: np.ndarray) -> np.ndarray:
    """pixels [..., 3], table [K, 3] -> index of the nearest row (L2 in RGB), int [...]."""
    d = ((pixels[..., None, :].astype(np.float32) - table.astype(np.float32)) ** 2).sum(-1)
    return d.argmin(-1)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two bool masks [H, W]; 1.0 when both are empty."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def classify_background(image: np.ndarray, spec: WorldSpec) -> str:
    """image uint8 [H, W, 3] -> background colour name (from the border's median)."""
    border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])
    median = np.median(border.astype(np.float32), axis=0)
    table = np.array([c for _, c in spec.backgrounds])
    return spec.background_names[int(_nearest(median, table))]


def foreground(image: np.ndarray, spec: WorldSpec, background: str) -> np.ndarray:
    """bool [H, W]: pixels nearer to an allowed object colour than to the background."""
    bg = dict(spec.backgrounds)[background]
    table = np.array([bg] + list(palette(spec, background).values()))
    return _nearest(image, table) > 0


@functools.lru_cache(maxsize=None)
def _template(spec: WorldSpec, shape: str, size: str) -> tuple[np.ndarray, int]:
    """(centroid minus centre as [x, y] pixels, area) of a shape drawn at the image centre."""
    c = spec.image_size / 2.0
    m = object_mask(spec, shape, size, (c, c))
    ys, xs = np.nonzero(m)
    return np.array([xs.mean() + 0.5 - c, ys.mean() + 0.5 - c]), int(m.sum())


# Binomial blur kernels (sigma ~0.7 and ~1 px): what blur does to a crisp shape.
_BLURS = (np.array([1.0, 2.0, 1.0]) / 4.0, np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0)


def _blur(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """float [H, W] -> separable blur with zero padding."""
    x = ndimage.convolve1d(x, kernel, axis=0, mode="constant")
    return ndimage.convolve1d(x, kernel, axis=1, mode="constant")


@functools.lru_cache(maxsize=8192)
def _placed(spec: WorldSpec, shape: str, size: str, qx: int, qy: int) -> tuple[np.ndarray, ...]:
    """Templates float32 [H, W] centred at (qx, qy) quarter-pixels: crisp, then blurred."""
    crisp = object_mask(spec, shape, size, (qx / 4.0, qy / 4.0)).astype(np.float32)
    return (crisp,) + tuple(_blur(crisp, k) for k in _BLURS)


def soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Fuzzy IoU sum(min) / sum(max) of two float maps [H, W] in [0, 1]."""
    den = np.maximum(a, b).sum()
    return 1.0 if den == 0 else float(np.minimum(a, b).sum() / den)


def _min_area(spec: WorldSpec) -> int:
    return min(_template(spec, s, z)[1] for s in spec.shapes for z in spec.size_names) // 4


def components(mask: np.ndarray, min_area: int) -> list[np.ndarray]:
    """8-connected components of a bool mask [H, W] with >= min_area pixels, as masks."""
    labels, n = ndimage.label(mask, structure=_EIGHT)
    comps = [labels == i for i in range(1, n + 1)]
    return [c for c in comps if c.sum() >= min_area]


def _colour(image: np.ndarray, mask: np.ndarray, spec: WorldSpec,
            background: str) -> tuple[str, np.ndarray]:
    """-> (nearest allowed colour name, core mean RGB float32 [3]) of a component."""
    pix = image[mask].astype(np.float32)
    dist = np.linalg.norm(pix - np.array(dict(spec.backgrounds)[background]), axis=-1)
    core = pix[dist >= np.median(dist)].mean(0)
    allowed = palette(spec, background)
    return list(allowed)[int(_nearest(core, np.array(list(allowed.values()))))], core


def _coverage(image: np.ndarray, region: np.ndarray, bg: Rgb, fg: Rgb) -> np.ndarray:
    """float32 [H, W] in [0, 1]: how much of each region pixel is colour ``fg`` over ``bg``."""
    d = np.subtract(fg, bg, dtype=np.float32)
    alpha = (image.astype(np.float32) - np.asarray(bg, np.float32)) @ d / (d @ d)
    return np.where(region, np.clip(alpha, 0.0, 1.0), 0.0).astype(np.float32)


def _shape_size_position(alpha: np.ndarray, spec: WorldSpec) -> tuple[str, str, str, float]:
    """Best (shape, size, blur) template for a coverage map alpha [H, W]; -> names, fit.

    Each template is placed so that its centroid is alpha's (blur keeps centroids);
    fit = soft IoU. Position = the anchor nearest to the best template's centre.
    """
    grid = np.arange(spec.image_size) + 0.5
    total = alpha.sum()
    centroid = np.array([(alpha.sum(0) * grid).sum(), (alpha.sum(1) * grid).sum()]) / total
    best = (-1.0, None, None, None)
    for shape, size in itertools.product(spec.shapes, spec.size_names):
        centre = centroid - _template(spec, shape, size)[0]
        qx, qy = np.round(centre * 4).astype(int)
        fit = max(soft_iou(alpha, t) for t in _placed(spec, shape, size, int(qx), int(qy)))
        if fit > best[0]:
            best = (fit, shape, size, centre)
    fit, shape, size, centre = best
    anchors = np.array([xy for _, xy in spec.positions]) * spec.image_size
    position = spec.position_names[int(np.argmin(((anchors - centre) ** 2).sum(-1)))]
    return shape, size, position, fit


def _reading_order(obj: dict) -> float:
    # Caption order: left before right, top before bottom.
    return obj["centre"][0] + obj["centre"][1]


def evaluate(image: np.ndarray, spec: WorldSpec) -> dict:
    """Reads a scene from image uint8 [H, W, 3].

    Returns {"background": name, "objects": [obj, ...]} with objects in caption order
    (left-to-right / top-to-bottom); each obj has "shape", "colour", "size", "position"
    (names; colour = the nearest allowed named colour, also for unnamed ones), "rgb"
    (mean colour of the object's core, floats), "mask" bool [H, W], "centre" (x, y)
    pixels, "area" int and "fit" (soft IoU with the best template in [0, 1]; < 0.6 for
    blobs that are no world shape).
    """
    image = np.asarray(image)
    if image.shape != (spec.image_size, spec.image_size, 3):
        raise ValueError(f"expected [{spec.image_size}, {spec.image_size}, 3], got {image.shape}")
    background = classify_background(image, spec)
    bg_rgb = dict(spec.backgrounds)[background]
    comps = components(foreground(image, spec, background), _min_area(spec))
    objects = []
    for i, m in enumerate(comps):
        others = np.zeros_like(m) if len(comps) == 1 else np.any(
            [c for j, c in enumerate(comps) if j != i], axis=0)
        region = ndimage.binary_dilation(m, _EIGHT, iterations=2) & ~others
        colour, core = _colour(image, m, spec, background)
        if spec.varied_colours:
            # Shades and unnamed colours: coverage relative to the object's own colour;
            # the mask is where it covers half a pixel (the world's mask rule; the
            # threshold sits half a 1/16 coverage step lower, as uint8 rounding of an
            # exactly half-covered anti-aliased pixel can land just below 1/2).
            alpha = _coverage(image, region, bg_rgb, tuple(core))
            half = alpha >= _HALF_COVERED
            m = half if half.any() else m
        else:
            alpha = _coverage(image, region, bg_rgb, palette(spec, background)[colour])
        shape, size, position, fit = _shape_size_position(alpha, spec)
        ys, xs = np.nonzero(m)
        objects.append({"shape": shape, "colour": colour, "rgb": tuple(float(c) for c in core),
                        "size": size, "position": position, "mask": m,
                        "centre": (float(xs.mean() + 0.5), float(ys.mean() + 0.5)),
                        "area": int(m.sum()), "fit": fit})
    return {"background": background, "objects": sorted(objects, key=_reading_order)}


def _matches(obj: dict, target: ShapeObject, min_fit: float) -> dict[str, bool]:
    """Per specified attribute of ``target``: does ``obj`` have it? Shape needs fit >= min_fit."""
    out = {a: obj[a] == getattr(target, a) for a in ATTRIBUTES if getattr(target, a) is not None}
    if "shape" in out:
        out["shape"] = out["shape"] and obj["fit"] >= min_fit
    return out


def _assign(found: list[dict], targets: Sequence[ShapeObject],
            min_fit: float) -> list[Optional[dict]]:
    """Detected object for each target: caption order when counts agree, else best fit."""
    if len(found) == len(targets):
        return list(found)
    k = min(len(found), len(targets))
    best, best_score = [None] * len(targets), -1
    for tgt_idx in itertools.permutations(range(len(targets)), k):
        for obj_idx in itertools.permutations(range(len(found)), k):
            score = sum(sum(_matches(found[o], targets[t], min_fit).values())
                        for t, o in zip(tgt_idx, obj_idx))
            if score > best_score:
                best_score, best = score, [None] * len(targets)
                for t, o in zip(tgt_idx, obj_idx):
                    best[t] = found[o]
    return best


def attribute_accuracy(image: np.ndarray, target_objects: Sequence[ShapeObject],
                       spec: WorldSpec, background: Optional[str] = None,
                       min_fit: float = 0.6) -> dict[str, bool]:
    """Whether an image shows the target scene, attribute by attribute.

    Args:
      image: uint8 [H, W, 3].
      target_objects: the scene's objects in caption order (e.g. from
        ``shapes.parse_caption``); attributes that are ``None`` are not scored.
      background: target background name, or None to not score it.
      min_fit: a shape only counts when its template fit is at least this. World shapes
        fit >= 0.64 even under strong blur and noise; ellipses, rings and bars < 0.6.
    Returns:
      {"count": right number of objects, "shape"/"colour"/"size"/"position": every target
      object with that attribute specified has it, "background": (when given),
      "all": all of the above}. A missing object fails every attribute it specifies.
    """
    found = evaluate(image, spec)
    out = {"count": len(found["objects"]) == len(target_objects)}
    assigned = _assign(found["objects"], target_objects, min_fit)
    for attr in ATTRIBUTES:
        scored = [(o, t) for o, t in zip(assigned, target_objects) if getattr(t, attr) is not None]
        if scored:
            out[attr] = all(o is not None and _matches(o, t, min_fit)[attr] for o, t in scored)
    if background is not None:
        out["background"] = found["background"] == background
    out["all"] = all(out.values())
    return out


def aggregate(results: Sequence[dict[str, bool]]) -> dict[str, float]:
    """Mean of each key over the results that have it (e.g. ``attribute_accuracy`` dicts)."""
    keys = sorted({k for r in results for k in r})
    return {k: float(np.mean([r[k] for r in results if k in r])) for k in keys}
