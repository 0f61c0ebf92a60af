"""Data: the procedural shapes world, its TFDS builder and its tokenizer builder.

``jaxdiff.data.tfds_shapes`` and ``jaxdiff.data.tokenizer`` are not imported here: they
pull in tensorflow_datasets and transformers; import them where needed.
"""
from jaxdiff.data.shapes import (ShapeObject, WorldSpec, caption, held_out_examples,
                                 iterate, make_example, parse_caption, render,
                                 sample_example, split_of)

__all__ = ["ShapeObject", "WorldSpec", "caption", "held_out_examples", "iterate",
           "make_example", "parse_caption", "render", "sample_example", "split_of"]
