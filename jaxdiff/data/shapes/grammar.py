"""Shapes-world captions: ``caption``, ``noun_phrase`` and the inverse ``parse_caption``.

Caption grammar (lower case, no punctuation; optional parts in brackets)::

    one object : a [SIZE] [COLOUR] (SHAPE | object) [POSITION] [on a BACKGROUND background]
    two objects: a [SIZE] [COLOUR] (SHAPE | object) (RELATION | and)
                 a [SIZE] [COLOUR] (SHAPE | object) [on a BACKGROUND background]

    POSITION  = on the left | on the right | at the top | at the bottom | in the centre
    RELATION  = left of (objects at left+right) | above (objects at top+bottom)

"a" becomes "an" before a vowel ("an orange star", "an object"). Two objects are always
placed left+right or top+bottom and named in that order (left before right, top before
bottom); with the relation dropped the caption says "and". Sizes (both objects'
together), positions/relation and the background are each mentioned with a probability
from the spec; colour and shape with a probability per object (a dropped shape is said
"object"; an object of an unnamed colour never has a colour word). The example records
what was mentioned.

Examples: ``a small red circle on the left``, ``a blue star above a big white cross on a
gray background``, ``a big square on the left`` (colour dropped), ``a red object`` (shape
dropped), ``an object at the top``. The longest caption has 14 words (16 CLIP tokens
with BOS/EOS).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from jaxdiff.data.shapes.spec import (OBJECT_WORD, POSITION_PHRASES, RELATIONS, UNNAMED,
                                      ShapeObject, WorldSpec)


def caption(objects: Sequence[ShapeObject], background: Optional[str] = None, *,
            mention_size: bool = True, mention_position: bool = True,
            mention_colour=True, mention_shape=True) -> str:
    """The caption of a scene (grammar in the module docstring).

    ``background=None`` leaves the background out. Two objects must be given in caption
    order: (left, right) or (top, bottom). ``mention_colour`` / ``mention_shape``: one
    bool for all objects or one per object. ``UNNAMED`` colours are never said.
    """
    def per_object(flag):
        return np.broadcast_to(np.asarray(flag, bool), (len(objects),))

    def noun(o, say_colour, say_shape):
        return _article(noun_phrase(o, mention_size, say_colour, say_shape).split())

    nouns = [noun(o, c, s) for o, c, s in
             zip(objects, per_object(mention_colour), per_object(mention_shape))]
    if len(objects) == 1:
        words = [nouns[0]]
        if mention_position:
            words.append(POSITION_PHRASES[objects[0].position])
    elif len(objects) == 2:
        pair = (objects[0].position, objects[1].position)
        if mention_position and pair not in RELATIONS:
            raise ValueError(f"two objects must be left+right or top+bottom, got {pair}")
        words = [nouns[0], RELATIONS[pair] if mention_position else "and", nouns[1]]
    else:
        raise ValueError(f"a scene has 1 or 2 objects, got {len(objects)}")
    if background is not None:
        words.append("on " + _article([background, "background"]))
    return " ".join(words)


def noun_phrase(obj: ShapeObject, say_size: bool = True, say_colour: bool = True,
                say_shape: bool = True) -> str:
    """An object's noun as a caption says it, without the article: "small red circle",
    "big object" (shape dropped), "circle" (size and colour unsaid). ``UNNAMED`` colours
    are never said."""
    words = [obj.size] if say_size else []
    if say_colour and obj.colour != UNNAMED:
        words.append(obj.colour)
    return " ".join(words + [obj.shape if say_shape else OBJECT_WORD])


def _article(words: list[str]) -> str:
    """Prefixes "a" or "an" (before a vowel): ["orange", "star"] -> "an orange star"."""
    return " ".join(["an" if words[0][0] in "aeiou" else "a"] + words)


def _parse_noun(words: list[str], spec: WorldSpec) -> ShapeObject:
    """["a", SIZE?, COLOUR?, SHAPE | "object", *POSITION_PHRASE?] -> ShapeObject
    (missing -> None)."""
    if len(words) < 2 or words[0] not in ("a", "an"):
        raise ValueError(f"cannot parse {' '.join(words)!r}")
    rest = words[1:]
    size = rest.pop(0) if rest[0] in spec.size_names else None
    colour = rest.pop(0) if rest and rest[0] in spec.colour_names else None
    if not rest or rest[0] not in spec.shapes + (OBJECT_WORD,):
        raise ValueError(f"cannot parse {' '.join(words)!r}")
    shape = None if rest[0] == OBJECT_WORD else rest[0]
    phrase = " ".join(rest[1:])
    positions = [p for p in spec.position_names if POSITION_PHRASES[p] == phrase]
    if phrase and not positions:
        raise ValueError(f"unknown position phrase {phrase!r}")
    return ShapeObject(shape, colour, size, positions[0] if positions else None)


def parse_caption(text: str, spec: WorldSpec) -> tuple[list[ShapeObject], Optional[str]]:
    """Inverse of ``caption``: -> (objects in caption order, background or None).

    Attributes the caption leaves out are None (as ``attribute_accuracy`` expects).
    Raises ValueError for text outside the grammar.
    """
    words = text.lower().split()
    background = None
    if len(words) >= 4 and words[-1] == "background" and words[-4] == "on":
        background = words[-2]
        if background not in spec.background_names:
            raise ValueError(f"unknown background {background!r}")
        words = words[:-4]
    for i in range(1, len(words)):
        for rel, pair in ((["left", "of"], ("left", "right")), (["above"], ("top", "bottom")),
                          (["and"], (None, None))):
            if words[i:i + len(rel)] == rel and words[i + len(rel):][:1] in (["a"], ["an"]):
                objs = [_parse_noun(words[:i], spec), _parse_noun(words[i + len(rel):], spec)]
                return [dataclasses.replace(o, position=p) for o, p in zip(objs, pair)], background
    return [_parse_noun(words, spec)], background
