"""Instruction-edit triples of the shapes world, and their exact image pairs.

InstructPix2Pix (Brooks et al. 2023) trains on (image, instruction, edited image) made
from (caption, instruction, edited caption) triples. Here the triples come from
templates over a scene of ``jaxdiff.data.shapes``, and the scene itself is edited, so
every triple has its ground truth: the edited scene differs from the source scene in
exactly the instructed attribute of exactly one object (or in the background).

Kinds (``KINDS``) and their templates (one drawn per triple)::

    colour     : make the circle blue | turn the circle blue | make it blue
    shape      : turn the square into a star | make the square a star
    size       : make the circle big | make it big           (small <-> big)
    position   : move it to the right | move the circle to the right   (one object only)
    background : change the background to black | make the background black

"it" is only used for one-object scenes. With two objects the target is named by its
shape, or by colour and shape when both objects have the same shape ("make the red
circle blue"), or by position and shape when they also share the colour ("make the left
circle blue"). A new colour is never the background's name (the world's rule) and a
new background is never the name of an object's colour.

Captions (source and edited) are full captions with the background (every attribute
said). ``render_pair`` draws both scenes with the world's exact renderer; generated
pairs (the embedded model with Prompt-to-Prompt, filtered by the evaluator) are made
one layer up, in ``jaxdiff.training.instruct_pix2pix``.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Iterator, Optional, Sequence

import numpy as np

from jaxdiff.data import shapes
from jaxdiff.data.shapes import ShapeObject, WorldSpec

KINDS = ("colour", "shape", "size", "position", "background")
POSITION_WORDS = {"left": "left", "right": "right", "top": "top", "bottom": "bottom",
                  "centre": "centre"}


@dataclasses.dataclass(frozen=True)
class EditTriple:
    """One instruction edit of a scene with its ground truth.

    Attributes:
      kind: one of ``KINDS``.
      instruction, caption, edited_caption: the text triple.
      objects, background: the source scene (objects in caption order).
      edited_objects, edited_background: the edited scene (same order).
      target: index of the edited object, -1 for a background edit.
    """
    kind: str
    instruction: str
    caption: str
    edited_caption: str
    objects: tuple[ShapeObject, ...]
    background: str
    edited_objects: tuple[ShapeObject, ...]
    edited_background: str
    target: int


def _name(objects: Sequence[ShapeObject], k: int) -> str:
    """How an instruction names object k: "it", "the circle", "the red circle" or "the left
    circle" (the shortest that is unique in the scene)."""
    if len(objects) == 1:
        return "it"
    o, other = objects[k], objects[1 - k]
    if o.shape != other.shape:
        return f"the {o.shape}"
    if o.colour != other.colour:
        return f"the {o.colour} {o.shape}"
    return f"the {POSITION_WORDS[o.position]} {o.shape}"


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def edit_scene(rng: np.random.Generator, spec: WorldSpec, objects: Sequence[ShapeObject],
               background: str, kind: str) -> EditTriple:
    """Draws one instruction of ``kind`` for a scene and applies it to the scene.

    Raises ValueError for a position edit of a two-object scene (its objects stand on
    the left+right or top+bottom anchors; a move would break the caption grammar).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown edit kind {kind!r}; use one of {KINDS}.")
    objects = tuple(objects)
    new_objects, new_background, target = list(objects), background, -1
    if kind == "background":
        taken = {o.colour for o in objects}
        choices = [b for b in spec.background_names if b != background and b not in taken]
        new_background = _pick(rng, choices)
        instruction = _pick(rng, (f"change the background to {new_background}",
                                  f"make the background {new_background}"))
    else:
        if kind == "position" and len(objects) != 1:
            raise ValueError("position edits need a one-object scene.")
        target = int(rng.integers(len(objects)))
        o, the = objects[target], _name(objects, target)
        if kind == "colour":
            new = _pick(rng, [c for c in shapes.palette(spec, background) if c != o.colour])
            new_obj = dataclasses.replace(o, colour=new, rgb=None)
            instruction = _pick(rng, (f"make {the} {new}", f"turn {the} {new}"))
        elif kind == "shape":
            new = _pick(rng, [s for s in spec.shapes if s != o.shape])
            new_obj = dataclasses.replace(o, shape=new)
            instruction = _pick(rng, (f"turn {the} into a {new}", f"make {the} a {new}"))
        elif kind == "size":
            new = _pick(rng, [s for s in spec.size_names if s != o.size])
            new_obj = dataclasses.replace(o, size=new)
            instruction = f"make {the} {new}"
        else:
            new = _pick(rng, [p for p in spec.position_names if p != o.position])
            new_obj = dataclasses.replace(o, position=new)
            obj_ref = "it" if rng.random() < 0.5 else f"the {o.shape}"
            instruction = f"move {obj_ref} to the {POSITION_WORDS[new]}"
        new_objects[target] = new_obj
    return EditTriple(kind=kind, instruction=instruction,
                      caption=shapes.caption(objects, background),
                      edited_caption=shapes.caption(new_objects, new_background),
                      objects=objects, background=background,
                      edited_objects=tuple(new_objects), edited_background=new_background,
                      target=target)


def sample_triple(rng: np.random.Generator, spec: WorldSpec,
                  kind: Optional[str] = None) -> EditTriple:
    """A random scene of the world and a random instruction (``kind`` None: uniform over
    ``KINDS``; position edits draw one-object scenes, the others the world's mix)."""
    kind = KINDS[int(rng.integers(len(KINDS)))] if kind is None else kind
    ex = shapes.sample_example(rng, spec, 1 if kind == "position" else None)
    return edit_scene(rng, spec, ex["objects"], spec.background_names[int(ex["background"])],
                      kind)


def iterate_triples(seed: int, spec: WorldSpec, split: Optional[str] = None,
                    kind: Optional[str] = None) -> Iterator[EditTriple]:
    """Endless deterministic stream of triples; ``split`` ("train"/"test") keeps those
    whose source scene is in that split of the world (``shapes.split_of``)."""
    if split not in (None, "train", "test"):
        raise ValueError(f"split must be None, 'train' or 'test', got {split=}")
    rng = np.random.default_rng(seed)
    while True:
        t = sample_triple(rng, spec, kind)
        if split is None or shapes.split_of(spec, t.objects, t.background) == split:
            yield t


def triples(seed: int, spec: WorldSpec, num: int, split: Optional[str] = None,
            kind: Optional[str] = None) -> list[EditTriple]:
    """The first ``num`` triples of ``iterate_triples``."""
    return list(itertools.islice(iterate_triples(seed, spec, split, kind), num))


def held_out_triples(spec: WorldSpec, kind: str, num: int,
                     seed: int = 20_231_201) -> list[EditTriple]:
    """The fixed evaluation set of one kind: held-out ("test" split) source scenes."""
    return triples(seed, spec, num, "test", kind)


def render_pair(spec: WorldSpec, triple: EditTriple):
    """The exact (source, edited) images uint8 [H, W, 3] and masks bool [k, H, W] of both
    scenes: ``(source, edited, source_masks, edited_masks)``."""
    src, src_masks = shapes.render(spec, triple.objects, triple.background)
    dst, dst_masks = shapes.render(spec, triple.edited_objects, triple.edited_background)
    return src, dst, src_masks, dst_masks


def preserved_region(triple: EditTriple, source_masks: np.ndarray,
                     edited_masks: np.ndarray) -> np.ndarray:
    """bool [H, W]: the pixels the edit must leave as they were. Object edits: outside
    the union of the target's old and new masks; background edits: the objects."""
    if triple.target < 0:
        return source_masks.any(0)
    return ~(source_masks[triple.target] | edited_masks[triple.target])


def renderer_dataset(seed: int, spec: WorldSpec, num: int,
                     split: Optional[str] = "train") -> dict:
    """``num`` renderer pairs: {"source", "edited": uint8 [N, H, W, 3], "instruction":
    list[str], "kind": int32 [N] (index into ``KINDS``), "masks": bool [N, H, W] (where an
    object of either scene is), "triples": list}."""
    ts = triples(seed, spec, num, split)
    pairs = [render_pair(spec, t) for t in ts]
    return {"source": np.stack([p[0] for p in pairs]),
            "edited": np.stack([p[1] for p in pairs]),
            "masks": np.stack([p[2].any(0) | p[3].any(0) for p in pairs]),
            "instruction": [t.instruction for t in ts],
            "kind": np.array([KINDS.index(t.kind) for t in ts], np.int32),
            "triples": ts}
