"""The shapes world's vocabularies and specs: ``WorldSpec``, ``ShapeObject``, the named worlds.

A scene is a plain background and one or two ``ShapeObject``s. Every object has a shape,
a colour, a size and a position drawn from the ``WorldSpec`` vocabularies. Rendering:
``shapes.rendering``; captions and their grammar: ``shapes.grammar``; sampling:
``shapes.scenes``.

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
* ``"v2_brief"`` (``WORLD_V2_BRIEF``): ``v2_terse`` with size and position each mentioned
  with probability 0.5 instead of 0.8 (same images and ground truth; terser captions).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

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


WORLD_V2 = WorldSpec(p_mention_colour=0.8, p_mention_shape=0.8, colour_spread=30.0,
                     p_unnamed_colour=0.08, antialias=True)
# World v2 with the colour word dropped for half of the objects (same images and ground
# truth rules): the last fine-tuning stage of model v2 trains on it so that colour-free
# prompts are common enough to be learned.
WORLD_V2_TERSE = dataclasses.replace(WORLD_V2, p_mention_colour=0.5)
# World v2_terse with size and position each said for half of the captions: the terse
# prompts people type ("a square on a white background") are ~6x more frequent.
WORLD_V2_BRIEF = dataclasses.replace(WORLD_V2_TERSE, p_mention_size=0.5,
                                     p_mention_position=0.5)
WORLDS = {"v1": WorldSpec(), "v2": WORLD_V2, "v2_terse": WORLD_V2_TERSE,
          "v2_brief": WORLD_V2_BRIEF}


def world(name: str = "v1", **overrides) -> WorldSpec:
    """The named world (``WORLDS``), with ``WorldSpec`` fields overridden, e.g. image_size."""
    if name not in WORLDS:
        raise ValueError(f"unknown world {name!r}; known: {sorted(WORLDS)}")
    return dataclasses.replace(WORLDS[name], **overrides)
