"""Sampling shapes-world scenes into examples, the train / test split and the streams.

``sample_example`` draws a scene (background, objects, shades or unnamed colours, what
the caption mentions) and ``make_example`` renders it into the example dict: image,
caption, masks and exact ground truth. ``split_of`` puts each scene in "train" or the
held-out "test" split by a stable hash; ``iterate`` and ``held_out_examples`` are the
seeded streams the TFDS builder and the evaluators read.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
from typing import Iterator, Optional, Sequence

import numpy as np

from jaxdiff.data.shapes.grammar import caption
from jaxdiff.data.shapes.rendering import object_rgb, render
from jaxdiff.data.shapes.spec import (MAX_OBJECTS, PAIRS, UNNAMED, Rgb, ShapeObject, WorldSpec,
                                      palette)


def scene_key(objects: Sequence[ShapeObject], background: str) -> str:
    """A canonical text key of a scene (offsets ignored)."""
    objs = ";".join(f"{o.size},{o.colour},{o.shape},{o.position}" for o in objects)
    return f"{background}|{objs}"


def split_of(spec: WorldSpec, objects: Sequence[ShapeObject], background: str) -> str:
    """"test" for the held-out scenes, else "train": a stable hash of ``scene_key``."""
    digest = hashlib.sha256(scene_key(objects, background).encode()).digest()
    u = int.from_bytes(digest[:8], "little") / 2.0**64
    return "test" if u < spec.held_out_fraction else "train"


def _sample_objects(rng: np.random.Generator, spec: WorldSpec, num_objects: int,
                    background: str) -> list[ShapeObject]:
    colours = list(palette(spec, background))
    if num_objects == 1:
        positions = [spec.position_names[rng.integers(len(spec.positions))]]
    else:
        pairs = [p for p in PAIRS if set(p) <= set(spec.position_names)]
        if not pairs:
            raise ValueError("two objects need left+right or top+bottom positions")
        positions = list(pairs[rng.integers(len(pairs))])
    objs = []
    for k, pos in enumerate(positions):
        offset = rng.uniform(-spec.jitter, spec.jitter, 2)
        if num_objects == 2:  # jitter never moves a pair closer together
            axis = 0 if positions[0] == "left" else 1
            offset[axis] = abs(offset[axis]) * (1 if k else -1)
        offset = tuple(float(x) for x in offset)
        obj = ShapeObject(shape=spec.shapes[rng.integers(len(spec.shapes))],
                          colour=colours[rng.integers(len(colours))],
                          size=spec.size_names[rng.integers(len(spec.sizes))],
                          position=pos, offset=offset)
        if spec.varied_colours:  # v1 draws nothing more: its streams stay as they were
            obj = _sample_colour(rng, spec, obj, background)
        objs.append(obj)
    return objs


def _sample_colour(rng: np.random.Generator, spec: WorldSpec, obj: ShapeObject,
                   background: str) -> ShapeObject:
    """Gives ``obj`` its own RGB: a shade of its named colour, or an unnamed colour."""
    if rng.random() < spec.p_unnamed_colour:
        return dataclasses.replace(obj, colour=UNNAMED, rgb=_unnamed_rgb(rng, spec, background))
    direction = rng.normal(size=3)
    radius = spec.colour_spread * rng.random() ** (1.0 / 3.0)  # uniform in the ball
    shade = np.add(dict(spec.colours)[obj.colour],
                   radius * direction / max(np.linalg.norm(direction), 1e-12))
    return dataclasses.replace(obj, rgb=tuple(int(c) for c in np.clip(np.round(shade), 0, 255)))


def _unnamed_rgb(rng: np.random.Generator, spec: WorldSpec, background: str) -> Rgb:
    """A uniform RGB colour >= ``unnamed_margin`` from every named anchor whose nearest
    allowed anchor is nearer than the background by >= ``unnamed_margin`` / 2 (so it
    reads as an object, not as background, even on blurred edges)."""
    anchors = np.array([c for _, c in spec.colours], np.float64)
    allowed = np.array(list(palette(spec, background).values()), np.float64)
    bg = np.array(dict(spec.backgrounds)[background], np.float64)
    for _ in range(10_000):
        rgb = rng.integers(0, 256, 3).astype(np.float64)
        nearest_named = np.linalg.norm(anchors - rgb, axis=1).min()
        nearest_allowed = np.linalg.norm(allowed - rgb, axis=1).min()
        if (nearest_named >= spec.unnamed_margin
                and np.linalg.norm(bg - rgb) - nearest_allowed >= spec.unnamed_margin / 2):
            return tuple(int(c) for c in rgb)
    raise ValueError(f"no unnamed colour {spec.unnamed_margin=} away from the palette")


def _ids(values: Sequence[str], names: Sequence[str]) -> np.ndarray:
    """Names -> int32 [MAX_OBJECTS] ids, padded with -1 (``UNNAMED`` -> len(names))."""
    out = np.full((MAX_OBJECTS,), -1, np.int32)
    out[:len(values)] = [len(names) if v == UNNAMED else names.index(v) for v in values]
    return out


def _per_object(values, dtype, shape=()) -> np.ndarray:
    out = np.zeros((MAX_OBJECTS,) + shape, dtype)
    out[:len(values)] = values
    return out


def make_example(spec: WorldSpec, objects: Sequence[ShapeObject], background: str,
                 mention_size: bool = True, mention_position: bool = True,
                 mention_background: bool = True, mention_colour=True,
                 mention_shape=True) -> dict:
    """Renders a given scene into an example dict (see ``sample_example``).

    ``mention_colour`` / ``mention_shape``: one bool for all objects or one per object.
    """
    image, masks = render(spec, objects, background)
    n = spec.image_size
    padded = np.zeros((MAX_OBJECTS, n, n), bool)
    padded[:len(objects)] = masks
    k = len(objects)
    say_colour = np.broadcast_to(np.asarray(mention_colour, bool), (k,))
    say_colour = say_colour & np.array([o.colour != UNNAMED for o in objects], bool)
    say_shape = np.broadcast_to(np.asarray(mention_shape, bool), (k,))
    return {
        "image": image,
        "caption": caption(objects, background if mention_background else None,
                           mention_size=mention_size, mention_position=mention_position,
                           mention_colour=say_colour, mention_shape=say_shape),
        "masks": padded,
        "num_objects": np.int32(len(objects)),
        "shape": _ids([o.shape for o in objects], spec.shapes),
        "colour": _ids([o.colour for o in objects], spec.colour_names),
        "rgb": _per_object([object_rgb(spec, o) for o in objects], np.uint8, (3,)),
        "size": _ids([o.size for o in objects], spec.size_names),
        "position": _ids([o.position for o in objects], spec.position_names),
        "background": np.int32(spec.background_names.index(background)),
        "mention_size": np.bool_(mention_size),
        "mention_position": np.bool_(mention_position),
        "mention_background": np.bool_(mention_background),
        "mention_colour": _per_object(say_colour, bool),
        "mention_shape": _per_object(say_shape, bool),
        "objects": tuple(objects),
    }


def sample_example(rng: np.random.Generator, spec: WorldSpec,
                   num_objects: Optional[int] = None) -> dict:
    """Samples one captioned scene.

    Returns a dict: image uint8 [H, W, 3]; caption str; masks bool [2, H, W] (rows past
    num_objects are False); num_objects int32; shape / colour / size / position int32 [2]
    (indices into the spec's name lists, -1 padded; an ``UNNAMED`` colour is
    ``len(spec.colour_names)``); rgb uint8 [2, 3] (the rendered colours, 0 padded);
    background int32; mention_size / mention_position / mention_background bool and
    mention_colour / mention_shape bool [2] (what the caption states, False padded);
    objects: the ``ShapeObject``s in caption order.
    """
    if num_objects is None:
        num_objects = 2 if rng.random() < spec.p_two_objects else 1
    if num_objects not in (1, 2):
        raise ValueError(f"num_objects must be 1 or 2, got {num_objects=}")
    background = spec.background_names[rng.integers(len(spec.backgrounds))]
    objects = _sample_objects(rng, spec, num_objects, background)
    flags = rng.random(3) < (spec.p_mention_size, spec.p_mention_position,
                             spec.p_mention_background)
    say_colour = say_shape = True
    if spec.p_mention_colour < 1.0 or spec.p_mention_shape < 1.0:  # v1 draws nothing here
        say = rng.random((2, num_objects)) < np.array(
            [[spec.p_mention_colour], [spec.p_mention_shape]])
        say_colour, say_shape = say
    return make_example(spec, objects, background, *map(bool, flags),
                        mention_colour=say_colour, mention_shape=say_shape)


def iterate(seed: int, spec: WorldSpec, split: Optional[str] = None,
            num_objects: Optional[int] = None) -> Iterator[dict]:
    """Endless deterministic stream of examples; ``split`` ("train"/"test") filters scenes."""
    if split not in (None, "train", "test"):
        raise ValueError(f"split must be None, 'train' or 'test', got {split=}")
    rng = np.random.default_rng(seed)
    while True:
        ex = sample_example(rng, spec, num_objects)
        bg = spec.background_names[int(ex["background"])]
        if split is None or split_of(spec, ex["objects"], bg) == split:
            yield ex


def held_out_examples(spec: WorldSpec, num: int, seed: int = 20_231_123,
                      num_objects: Optional[int] = None, named: bool = False) -> list[dict]:
    """The fixed held-out evaluation set: the first ``num`` "test"-split scenes of ``seed``.

    ``named``: only scenes whose caption names every object's colour and shape (editing
    benches swap those words); in world v1 every caption does, so the set is unchanged.
    """
    stream = iterate(seed, spec, "test", num_objects)
    if named:
        stream = (ex for ex in stream
                  if ex["mention_colour"][:ex["num_objects"]].all()
                  and ex["mention_shape"][:ex["num_objects"]].all())
    return list(itertools.islice(stream, num))
