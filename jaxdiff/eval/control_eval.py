"""Scoring spatial control on the shapes world against the condition it was given.

Pure numpy functions (the driver is ``bench/control_quality.py``):

* ``condition_cases(spec, num)``: held-out scenes (``shapes.held_out_examples``) with
  their captions, target attributes, segmentation and edge maps
  (``data.conditions``) and the condition's object mask;
* ``condition_mask(cond, kind)``: the object mask a condition image says
  (segmentation: every non-background class; edges: the edge rings filled);
* ``generated_mask(image, spec)``: the union of the objects the evaluator
  (``shapes_eval.evaluate``) reads from an image;
* ``score_condition(images, cases, kind, spec)``: IoU of each generated mask with its
  condition's mask, and the caption's attributes read back (``attribute_accuracy``);
* ``grounding_cases(spec, num_one, num_two)``: GLIGEN layouts, (phrase, box) per object:
  boxes around the positions captions name, boxes at corners and off-grid sizes that
  no caption names, and two-object layouts;
* ``box_hits(image, case, spec)`` / ``score_grounding``: is the centre of an object with
  the phrase's stated shape and colour inside each box, and are all boxes of an image
  right.
"""
from __future__ import annotations

import itertools
from typing import NamedTuple, Optional, Sequence

import numpy as np
from scipy import ndimage

from jaxdiff.data import conditions as cond_lib
from jaxdiff.data.shapes import (UNNAMED, ShapeObject, WorldSpec, caption, held_out_examples,
                                 parse_caption)
from jaxdiff.eval.shapes_eval import aggregate, attribute_accuracy, evaluate, mask_iou

KINDS = ("segmentation", "edges")


class ConditionCase(NamedTuple):
    """A held-out scene: its caption, the caption's targets (unstated attributes None),
    background (None when unstated), condition images uint8 [H, W, 3] by kind and the
    true object mask bool [H, W] (union of the visible masks)."""
    prompt: str
    objects: tuple
    background: Optional[str]
    conditions: dict
    mask: np.ndarray


def condition_cases(spec: WorldSpec, num: int, seed: int = 20_231_123,
                    name_layout: bool = True) -> list:
    """The first ``num`` held-out scenes of ``seed`` as ``ConditionCase``s. ``name_layout``
    False: each prompt is its scene's caption without position and size words (colour and
    shape words as the caption has them, the background always named), so only the
    condition gives the layout."""
    out = []
    for ex in held_out_examples(spec, num, seed):
        k = int(ex["num_objects"])
        prompt = ex["caption"]
        if not name_layout:
            prompt = caption(ex["objects"], spec.background_names[int(ex["background"])],
                             mention_size=False, mention_position=False,
                             mention_colour=ex["mention_colour"][:k],
                             mention_shape=ex["mention_shape"][:k])
        targets, background = parse_caption(prompt, spec)
        out.append(ConditionCase(prompt, tuple(targets), background,
                                 cond_lib.conditions(ex["masks"], ex["shape"], k),
                                 np.any(ex["masks"][:k], axis=0)))
    return out


def condition_mask(cond, kind: str) -> np.ndarray:
    """bool [H, W]: the object pixels a condition image uint8 [H, W, 3] states.

    segmentation: pixels of any non-background class (``segment_classes``); edges: the
    edge pixels with the regions they enclose filled (the edge map's objects are closed
    rings of their masks' boundaries).
    """
    cond = np.asarray(cond)
    if kind == "segmentation":
        return cond_lib.segment_classes(cond) > 0
    if kind == "edges":
        return ndimage.binary_fill_holes(cond.mean(-1) >= cond_lib.EDGE_VALUE / 2)
    raise ValueError(f"unknown condition kind {kind!r}; use one of {KINDS}.")


def generated_mask(image, spec: WorldSpec) -> np.ndarray:
    """bool [H, W]: the union of the objects the evaluator reads from image uint8."""
    objects = evaluate(image, spec)["objects"]
    out = np.zeros((spec.image_size, spec.image_size), bool)
    for o in objects:
        out |= o["mask"]
    return out


def score_condition(images, cases: Sequence[ConditionCase], kind: str,
                    spec: WorldSpec) -> dict:
    """How well images uint8 [N, H, W, 3] follow their cases' ``kind`` conditions.

    Returns {"n", "mask_iou" (mean IoU of the generated object mask with the condition's
    mask), "iou_at_least_0.5" (share), "attributes": the shares of ``attribute_accuracy``
    against each caption's stated attributes ("all": everything stated right)}.
    """
    images = np.asarray(images)
    if len(images) != len(cases):
        raise ValueError(f"{len(images)} images for {len(cases)} cases.")
    ious, attrs = [], []
    for image, case in zip(images, cases):
        want = condition_mask(case.conditions[kind], kind)
        ious.append(mask_iou(generated_mask(image, spec), want))
        attrs.append(attribute_accuracy(image, case.objects, spec, case.background))
    ious = np.asarray(ious)
    return {"n": len(cases), "mask_iou": float(ious.mean()) if len(ious) else 0.0,
            "iou_at_least_0.5": float((ious >= 0.5).mean()) if len(ious) else 0.0,
            "attributes": aggregate(attrs)}


# --- GLIGEN: boxes ---------------------------------------------------------------------

GROUPS = ("named", "unnamed", "two_object", "two_unnamed")
# Centres (fractions) that no caption names: the four corners, and off-grid points.
UNNAMED_CENTRES = ((0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75),
                   (0.4, 0.6), (0.62, 0.38), (0.35, 0.3), (0.68, 0.7))
# Pairs of such centres for two objects, far enough apart for two big objects' boxes.
UNNAMED_PAIRS = (((0.25, 0.25), (0.75, 0.75)), ((0.75, 0.25), (0.25, 0.75)),
                 ((0.3, 0.35), (0.7, 0.65)), ((0.68, 0.3), (0.32, 0.72)))


class GroundingCase(NamedTuple):
    """A GLIGEN layout: the prompt, one phrase and box (x0, y0, x1, y1 fractions) per
    object, the objects as targets (shape / colour scored when stated) and its group."""
    prompt: str
    phrases: tuple
    boxes: tuple
    objects: tuple
    group: str


def box_around(spec: WorldSpec, size: str, centre, scale: float = 1.0) -> tuple:
    """The box (fractions, clipped to [0, 1]) of an object of ``size`` centred at
    ``centre`` (fractions), its half side ``scale`` times the size's half extent plus a
    pixel."""
    half = dict(spec.sizes)[size] * scale + 1.0 / spec.image_size
    return tuple(float(np.clip(v, 0.0, 1.0)) for v in (centre[0] - half, centre[1] - half,
                                                       centre[0] + half, centre[1] + half))


def _phrase(obj: ShapeObject) -> str:
    return caption([obj], None, mention_size=False, mention_position=False,
                   mention_colour=obj.colour != UNNAMED)


def grounding_cases(spec: WorldSpec, num_one: int, num_two: int,
                    seed: int = 20_231_123, num_two_unnamed: int = 0) -> list:
    """``num_one`` one-object layouts (alternately ``named``: the box around the held-out
    scene's captioned position; ``unnamed``: a box at a corner or an off-grid centre, of a
    size from 0.8 to 1.5 times the object's, the prompt without position or size),
    ``num_two`` ``two_object`` layouts (a box around each object of a held-out two-object
    scene, whose caption names both positions) and ``num_two_unnamed`` ``two_unnamed`` ones
    (the objects of held-out two-object scenes in boxes at a pair of corners or off-grid
    centres, ``UNNAMED_PAIRS``, the prompt "a red star and a blue square on a BG
    background" naming neither position nor size). Returns ``GroundingCase``s."""
    rng = np.random.default_rng(seed)
    out = []
    ones = held_out_examples(spec, num_one, seed, num_objects=1) if num_one else []
    corners = itertools.cycle(UNNAMED_CENTRES)
    for k, ex in enumerate(ones):
        obj = ex["objects"][0]
        bg = spec.background_names[int(ex["background"])]
        if k % 2 == 0:
            fx, fy = dict(spec.positions)[obj.position]
            out.append(GroundingCase(caption([obj], bg), (_phrase(obj),),
                                     (box_around(spec, obj.size, (fx, fy)),),
                                     (_target(obj),), "named"))
        else:
            scale = float(rng.uniform(0.8, 1.5))
            out.append(GroundingCase(caption([obj], bg, mention_size=False,
                                             mention_position=False),
                                     (_phrase(obj),),
                                     (box_around(spec, obj.size, next(corners), scale),),
                                     (_target(obj),), "unnamed"))
    # One slice of the held-out two-object stream: two_object layouts, then two_unnamed.
    twos = held_out_examples(spec, num_two + num_two_unnamed, seed, num_objects=2)
    for ex in twos[:num_two]:
        objs = ex["objects"]
        bg = spec.background_names[int(ex["background"])]
        boxes = tuple(box_around(spec, o.size, dict(spec.positions)[o.position]) for o in objs)
        out.append(GroundingCase(caption(objs, bg), tuple(_phrase(o) for o in objs), boxes,
                                 tuple(_target(o) for o in objs), "two_object"))
    pairs = itertools.cycle(UNNAMED_PAIRS)
    for ex in twos[num_two:]:
        objs = ex["objects"]
        bg = spec.background_names[int(ex["background"])]
        boxes = tuple(box_around(spec, o.size, c) for o, c in zip(objs, next(pairs)))
        out.append(GroundingCase(caption(objs, bg, mention_size=False, mention_position=False),
                                 tuple(_phrase(o) for o in objs), boxes,
                                 tuple(_target(o) for o in objs), "two_unnamed"))
    return out


def _target(obj: ShapeObject) -> ShapeObject:
    """What a phrase states: shape and colour (an unnamed colour is not scored)."""
    return ShapeObject(obj.shape, None if obj.colour == UNNAMED else obj.colour, None, None)


def inside(centre, box, size: int) -> bool:
    """Whether a centre (x, y) in pixels lies in a box (x0, y0, x1, y1) of fractions."""
    x, y = centre[0] / size, centre[1] / size
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def _fits(obj: dict, target: ShapeObject, min_fit: float) -> bool:
    ok = target.colour is None or obj["colour"] == target.colour
    return ok and (target.shape is None or (obj["shape"] == target.shape
                                            and obj["fit"] >= min_fit))


def box_hits(image, case: GroundingCase, spec: WorldSpec, min_fit: float = 0.6) -> dict:
    """Reads image uint8 [H, W, 3] against a layout.

    Returns {"inside": per box, some object's centre is in it; "right": per box, an
    object with the phrase's shape and colour has its centre in it; "all_right": the
    boxes are right with distinct objects (one object per box)}.
    """
    found = evaluate(image, spec)["objects"]
    n = spec.image_size
    ins = [[inside(o["centre"], box, n) for o in found] for box in case.boxes]
    good = [[i and _fits(o, t, min_fit) for i, o in zip(row, found)]
            for row, t in zip(ins, case.objects)]
    k = len(case.boxes)
    distinct = any(all(good[b][o] for b, o in enumerate(perm))
                   for perm in itertools.permutations(range(len(found)), k))
    return {"inside": [any(r) for r in ins], "right": [any(r) for r in good],
            "all_right": bool(distinct)}


def score_grounding(images, cases: Sequence[GroundingCase], spec: WorldSpec) -> dict:
    """Per group of ``cases``: {"n", "centre_in_box" (share of boxes with some object's
    centre inside), "right_object_in_box" (share of boxes holding an object with the
    phrase's shape and colour), "layout_right" (share of images with every box right)}."""
    images = np.asarray(images)
    if len(images) != len(cases):
        raise ValueError(f"{len(images)} images for {len(cases)} cases.")
    rows = {}
    for image, case in zip(images, cases):
        rows.setdefault(case.group, []).append(box_hits(image, case, spec))
    out = {}
    for group in GROUPS:
        hits = rows.get(group, [])
        if not hits:
            continue
        out[group] = {"n": len(hits),
                      "centre_in_box": float(np.mean([v for h in hits for v in h["inside"]])),
                      "right_object_in_box": float(np.mean([v for h in hits
                                                            for v in h["right"]])),
                      "layout_right": float(np.mean([h["all_right"] for h in hits]))}
    return out
