"""Drawing shapes-world scenes: each shape's sub-pixel coverage, its exact mask and the image.

Masks are exact (a pixel is in when at least half of its sub-pixel samples are), so the
evaluator (``jaxdiff.eval.shapes_eval``) can read them back; images are crisp, or
anti-aliased by coverage for ``WorldSpec.antialias`` (``shapes.spec``, the worlds).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxdiff.data.shapes.spec import UNNAMED, Rgb, ShapeObject, WorldSpec

_STAR_INNER = 0.45  # inner/outer radius: fatter than a regular star, readable at 9 px


def _polygon_mask(u: np.ndarray, v: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test. u, v: [H, W]; verts: [N, 2] -> bool [H, W]."""
    inside = np.zeros(u.shape, bool)
    for (x0, y0), (x1, y1) in zip(verts, np.roll(verts, -1, axis=0)):
        crosses = (y0 > v) != (y1 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (u < x_at)
    return inside


def _star_vertices() -> np.ndarray:
    """10 vertices [10, 2] of a 5-point star of outer radius 1, pointing up."""
    k = np.arange(10)
    r = np.where(k % 2 == 0, 1.0, _STAR_INNER)
    ang = -np.pi / 2 + k * np.pi / 5
    return np.stack([r * np.cos(ang), r * np.sin(ang)], axis=1)


def _unit_shape(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Shape of half-extent 1 centred at 0 in normalised coordinates u, v (v down)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    if shape == "triangle":  # apex up; base at v = 0.85, half-width 1
        return (v <= 0.85) & (np.abs(u) <= (v + 1.0) / 1.85)
    if shape == "cross":
        arm = 0.26
        return (((np.abs(u) <= arm) & (np.abs(v) <= 1.0))
                | ((np.abs(v) <= arm) & (np.abs(u) <= 1.0)))
    if shape == "star":
        return _polygon_mask(u, v, _star_vertices())
    raise ValueError(f"unknown shape {shape!r}")


def object_coverage(spec: WorldSpec, shape: str, size: str, centre: tuple[float, float],
                    supersample: int = 4) -> np.ndarray:
    """float [H, W] in [0, 1]: share of each pixel's ``supersample``**2 sub-pixel samples
    inside one shape of ``size`` centred at ``centre`` (x, y) in pixels."""
    n, s = spec.image_size, supersample
    half = dict(spec.sizes)[size] * n
    coords = (np.arange(n * s) + 0.5) / s
    u = np.broadcast_to((coords[None, :] - centre[0]) / half, (n * s, n * s))
    v = np.broadcast_to((coords[:, None] - centre[1]) / half, (n * s, n * s))
    return _unit_shape(shape, u, v).reshape(n, s, n, s).mean(axis=(1, 3))


def object_mask(spec: WorldSpec, shape: str, size: str, centre: tuple[float, float],
                supersample: int = 4) -> np.ndarray:
    """Mask bool [H, W] of one shape of ``size`` centred at ``centre`` (x, y) in pixels.

    A pixel is in when at least half of its ``supersample``**2 sub-pixel samples are:
    crisp, but without the stray pixels that centre sampling leaves at thin tips.
    """
    return object_coverage(spec, shape, size, centre, supersample) >= 0.5


def object_rgb(spec: WorldSpec, obj: ShapeObject) -> Rgb:
    """The rendered colour of an object: its own ``rgb``, else its named colour's anchor."""
    if obj.rgb is not None:
        return tuple(int(c) for c in obj.rgb)
    if obj.colour == UNNAMED:
        raise ValueError("an object of an unnamed colour needs its rgb")
    return dict(spec.colours)[obj.colour]


def anchor(spec: WorldSpec, obj: ShapeObject) -> tuple[float, float]:
    """Centre (x, y) in pixels of an object: its position's anchor plus its offset."""
    fx, fy = dict(spec.positions)[obj.position]
    return ((fx + obj.offset[0]) * spec.image_size, (fy + obj.offset[1]) * spec.image_size)


def render(spec: WorldSpec, objects: Sequence[ShapeObject],
           background: str) -> tuple[np.ndarray, np.ndarray]:
    """Draws a scene. Returns image uint8 [H, W, 3] and masks bool [len(objects), H, W].

    Later objects are drawn over earlier ones; masks are the visible pixels (sub-pixel
    coverage >= 1/2). With ``spec.antialias`` each pixel is the coverage-weighted mix of
    the object's colour and what lies below (rounded once, at the end).
    """
    n = spec.image_size
    canvas = np.empty((n, n, 3), np.float64 if spec.antialias else np.uint8)
    canvas[:] = dict(spec.backgrounds)[background]
    masks = np.zeros((len(objects), n, n), bool)
    for k, obj in enumerate(objects):
        cover = object_coverage(spec, obj.shape, obj.size, anchor(spec, obj))
        m = cover >= 0.5
        masks[:k] &= ~m
        masks[k] = m
        rgb = object_rgb(spec, obj)
        if spec.antialias:
            canvas += cover[..., None] * (np.asarray(rgb, np.float64) - canvas)
        else:
            canvas[m] = rgb
    image = np.round(canvas).astype(np.uint8) if spec.antialias else canvas
    return image, masks
