"""The shapes world: seeded, captioned RGB images of coloured shapes with exact ground truth.

A scene is a plain background and one or two ``ShapeObject``s. Every object has a shape,
a colour, a size and a position drawn from the ``WorldSpec`` vocabularies. Masks and
attributes are exact, so the evaluator (``jaxdiff.eval.shapes_eval``) can read them back.

Modules: ``spec`` (vocabularies, ``WorldSpec``, ``ShapeObject``, the named worlds
``WORLDS``), ``rendering`` (coverage, masks, images), ``grammar`` (captions, their
parser and the caption grammar) and ``scenes`` (sampling, examples, the train / test
split, streams). Every public name below is imported from ``jaxdiff.data.shapes``.
"""
from jaxdiff.data.shapes.grammar import caption, noun_phrase, parse_caption
from jaxdiff.data.shapes.rendering import (anchor, object_coverage, object_mask, object_rgb,
                                           render)
from jaxdiff.data.shapes.scenes import (held_out_examples, iterate, make_example,
                                        sample_example, scene_key, split_of)
from jaxdiff.data.shapes.spec import (BACKGROUNDS, COLOURS, MAX_OBJECTS, OBJECT_WORD, PAIRS,
                                      POSITION_PHRASES, POSITIONS, RELATIONS, SHAPES, SIZES,
                                      UNNAMED, WORLD_V2, WORLD_V2_BRIEF, WORLD_V2_TERSE, WORLDS,
                                      Rgb, ShapeObject, WorldSpec, palette, world)

__all__ = [
    "BACKGROUNDS", "COLOURS", "MAX_OBJECTS", "OBJECT_WORD", "PAIRS", "POSITION_PHRASES",
    "POSITIONS", "RELATIONS", "SHAPES", "SIZES", "UNNAMED", "WORLD_V2", "WORLD_V2_BRIEF",
    "WORLD_V2_TERSE", "WORLDS", "Rgb", "ShapeObject", "WorldSpec", "anchor", "caption",
    "held_out_examples", "iterate", "make_example", "noun_phrase", "object_coverage", "object_mask", "object_rgb",
    "palette", "parse_caption", "render", "sample_example", "scene_key", "split_of", "world",
]
