"""The shapes world: seeded, captioned RGB images of coloured shapes with exact ground truth.

A scene is a plain background and one or two ``ShapeObject``s. Every object has a shape,
a colour, a size and a position drawn from the ``WorldSpec`` vocabularies. Masks and
attributes are exact, so the evaluator (``jaxdiff.eval.shapes_eval``) can read them back.

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

Worlds (``WORLDS``; ``world(name)``):

* ``"v1"`` (``WorldSpec()`` defaults, the shipped model's world): colour and shape always
  said; each named colour is one exact RGB value; shapes drawn crisply (a pixel is the
  object's colour iff at least half of its 4x4 sub-pixel samples are inside the shape).
* ``"v2"`` (``WORLD_V2``): colour and shape each dropped with probability 0.2 per object;
  a named colour is rendered as a shade drawn uniformly from the RGB ball of radius 30
  around its anchor (anchors are >= 99 apart, so every shade is nearest its own anchor);
  8 % of objects get an unnamed colour (uniform RGB, >= 60 from every named anchor, and
  clearly nearer some named anchor than the background), captioned without a colour
  word and recorded as colour ``"unnamed"``; edges anti-aliased: each pixel mixes object
  and background by the shape's 4x4 sub-pixel coverage. Masks keep the v1 rule (coverage
  >= 1/2), so they stay exact binary masks.
* ``"v2_terse"`` (``WORLD_V2_TERSE``): world v2 with the colour word dropped with
  probability 0.5 per object (model v2's last diffusion stage trains on it).
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
from typing import Iterator, Optional, Sequence

import numpy as np

Rgb = tuple[int, int, int]

SHAPES = ("circle", "square", "triangle", "cross", "star")
COLOURS: tuple[tuple[str, Rgb], ...] = (
    ("red", (225, 35, 35)), ("green", (40, 190, 50)), ("blue", (40, 80, 230)),
    ("yellow", (245, 235, 40)), ("purple", (160, 60, 220)), ("cyan", (40, 220, 230)),
    ("orange", (250, 130, 20)), ("white", (240, 240, 240)))
BACKGROUNDS: tuple[tuple[str, Rgb], ...] = (
    ("black", (0, 0, 0)), ("gray", (128, 128, 128)), ("white", (255, 255, 255)))
# Half-extent of a shape as a fraction of the image side.
SIZES: tuple[tuple[str, float], ...] = (("small", 0.15), ("big", 0.22))
# Anchor (x, y) as fractions of the image side; y grows downwards.
POSITIONS: tuple[tuple[str, tuple[float, float]], ...] = (
    ("left", (0.25, 0.5)), ("right", (0.75, 0.5)), ("top", (0.5, 0.25)),
    ("bottom", (0.5, 0.75)), ("centre", (0.5, 0.5)))
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "centre": "in the centre"}
PAIRS = (("left", "right"), ("top", "bottom"))
RELATIONS = {("left", "right"): "left of", ("top", "bottom"): "above"}
MAX_OBJECTS = 2
_STAR_INNER = 0.45  # inner/outer radius: fatter than a regular star, readable at 9 px
UNNAMED = "unnamed"    # colour name of an object whose colour is none of the palette's
OBJECT_WORD = "object"  # what a caption says for a dropped shape


@dataclasses.dataclass(frozen=True)
class WorldSpec:
    """What the world contains and how it is sampled (hashable; safe as a cache key).

    Attributes:
      image_size: side of the square images in pixels (32 default; 64 works too).
      shapes: shape names, a subset of ``SHAPES``.
      colours / backgrounds: ``(name, (r, g, b))`` palettes; an object never has the
        background's colour name.
      sizes: ``(name, half_extent_fraction)``; positions: ``(name, (x, y) fractions)``.
      p_two_objects: probability that a sampled scene has two objects.
      p_mention_size / p_mention_position / p_mention_background: caption dropout.
      jitter: max random offset of an object from its anchor, fraction of the side.
      held_out_fraction: share of all scenes in the held-out ("test") split.
      p_mention_colour / p_mention_shape: per-object caption dropout of the colour word
        and of the shape word (a dropped shape is said "object").
      colour_spread: radius (L2, RGB units) of the ball around a named colour's anchor
        its shades are drawn from (uniformly); 0 = the anchor itself.
      p_unnamed_colour: share of objects with an unnamed colour (never captioned).
      unnamed_margin: minimum L2 distance of an unnamed colour to every named anchor.
      antialias: mix each edge pixel by its sub-pixel coverage (else crisp).

    The defaults are the v1 world: the same seed gives the same images and captions as
    before these options existed.
    """
    image_size: int = 32
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[tuple[str, Rgb], ...] = COLOURS
    backgrounds: tuple[tuple[str, Rgb], ...] = BACKGROUNDS
    sizes: tuple[tuple[str, float], ...] = SIZES
    positions: tuple[tuple[str, tuple[float, float]], ...] = POSITIONS
    p_two_objects: float = 0.5
    p_mention_size: float = 0.8
    p_mention_position: float = 0.8
    p_mention_background: float = 0.5
    jitter: float = 0.0
    held_out_fraction: float = 0.1
    p_mention_colour: float = 1.0
    p_mention_shape: float = 1.0
    colour_spread: float = 0.0
    p_unnamed_colour: float = 0.0
    unnamed_margin: float = 60.0
    antialias: bool = False

    def __post_init__(self):
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size=}")
        unknown = set(self.shapes) - set(SHAPES)
        if unknown:
            raise ValueError(f"unknown shapes {sorted(unknown)}; known: {SHAPES}")
        if not set(POSITION_PHRASES) >= {n for n, _ in self.positions}:
            raise ValueError(f"positions must be among {tuple(POSITION_PHRASES)}")
        if not 0.0 <= self.held_out_fraction < 1.0:
            raise ValueError(f"{self.held_out_fraction=} must be in [0, 1)")
        if self.colour_spread < 0 or not 0.0 <= self.p_unnamed_colour < 1.0:
            raise ValueError(f"need {self.colour_spread=} >= 0 and "
                             f"{self.p_unnamed_colour=} in [0, 1)")

    @property
    def varied_colours(self) -> bool:
        """Whether objects carry their own RGB (shades or unnamed colours), not the anchor."""
        return self.colour_spread > 0 or self.p_unnamed_colour > 0

    @property
    def colour_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.colours)

    @property
    def background_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.backgrounds)

    @property
    def size_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.sizes)

    @property
    def position_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.positions)

    def words(self) -> tuple[str, ...]:
        """Every word any caption of this world can contain (sorted)."""
        fixed = {"a", "an", "and", "background", "on"}
        if self.p_mention_shape < 1.0:
            fixed.add(OBJECT_WORD)
        phrases = [POSITION_PHRASES[p] for p in self.position_names]
        phrases += [r for pair, r in RELATIONS.items() if set(pair) <= set(self.position_names)]
        names = (self.shapes + self.colour_names + self.background_names + self.size_names)
        return tuple(sorted(fixed | set(names) | {w for p in phrases for w in p.split()}))


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One object of a scene. ``offset``: (dx, dy) from the anchor, fractions of the side.

    ``colour`` is a palette name or ``UNNAMED``; ``rgb`` is the rendered colour (None: the
    named colour's anchor, as in the v1 world; required for ``UNNAMED``).
    An attribute set to ``None`` means "unspecified" (used for evaluation targets only).
    """
    shape: Optional[str]
    colour: Optional[str]
    size: Optional[str]
    position: Optional[str]
    offset: tuple[float, float] = (0.0, 0.0)
    rgb: Optional[Rgb] = None


def palette(spec: WorldSpec, background: Optional[str] = None) -> dict[str, Rgb]:
    """Object colours allowed on ``background`` (all when None): name -> rgb."""
    return {n: c for n, c in spec.colours if n != background}


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
                      num_objects: Optional[int] = None) -> list[dict]:
    """The fixed held-out evaluation set: the first ``num`` "test"-split scenes of ``seed``."""
    return list(itertools.islice(iterate(seed, spec, "test", num_objects), num))


WORLD_V2 = WorldSpec(p_mention_colour=0.8, p_mention_shape=0.8, colour_spread=30.0,
                     p_unnamed_colour=0.08, antialias=True)
# World v2 with the colour word dropped for half of the objects (same images and ground
# truth rules): the last fine-tuning stage of model v2 trains on it so that colour-free
# prompts are common enough to be learned.
WORLD_V2_TERSE = dataclasses.replace(WORLD_V2, p_mention_colour=0.5)
WORLDS = {"v1": WorldSpec(), "v2": WORLD_V2, "v2_terse": WORLD_V2_TERSE}


def world(name: str = "v1", **overrides) -> WorldSpec:
    """The named world (``WORLDS``), with ``WorldSpec`` fields overridden, e.g. image_size."""
    if name not in WORLDS:
        raise ValueError(f"unknown world {name!r}; known: {sorted(WORLDS)}")
    return dataclasses.replace(WORLDS[name], **overrides)
