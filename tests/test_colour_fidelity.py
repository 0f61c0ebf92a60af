"""Colour fidelity (jaxdiff.eval.colour_fidelity) on synthetic images of a known colour."""
import math

import numpy as np
import pytest

from jaxdiff.data import shapes
from jaxdiff.data.shapes import ShapeObject
from jaxdiff.eval import colour_fidelity as cf

SPEC = shapes.world("v2")
VIOLET = (90, 20, 140)


@pytest.fixture(scope="module")
def scenes():
    """World-v2 renders (anti-aliased) of one big object of colour VIOLET per shape on white."""
    return [shapes.render(SPEC, [ShapeObject(shape=s, colour=shapes.UNNAMED, size="big",
                                             position="left", rgb=VIOLET)], "white")
            for s in shapes.SHAPES]


def test_median_colour_ignores_a_minority_of_outliers():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)
    mask = np.zeros((16, 16), bool)
    mask[2:12, 3:13] = True                              # 100 pixels
    image[mask] = (200, 60, 10)
    inside = np.argwhere(mask)
    bad = inside[rng.permutation(len(inside))[:45]]      # 45 % of the mask: random colours
    image[bad[:, 0], bad[:, 1]] = rng.integers(0, 256, (45, 3))
    np.testing.assert_array_equal(cf.median_colour(image, mask), (200, 60, 10))
    assert np.linalg.norm(image[mask].mean(0) - (200, 60, 10)) > 10   # the mean would move
    with pytest.raises(ValueError, match="empty mask"):
        cf.median_colour(image, np.zeros((16, 16), bool))


def test_object_colour_of_rendered_world_objects_is_their_colour(scenes):
    edge = [(image[masks[0]] != VIOLET).any(-1).mean() for image, masks in scenes]
    assert max(edge) > 0.4                               # anti-aliased pixels in the masks
    for image, _ in scenes:
        np.testing.assert_array_equal(cf.object_colour(image, SPEC), VIOLET)
    blank = np.full((32, 32, 3), 255, np.uint8)
    assert cf.object_colour(blank, SPEC) is None


def test_thin_objects_mostly_edge_move_the_median_a_little():
    """A small star's mask is half anti-aliased edge pixels: its median drifts towards the
    background, by less than a quarter of the 40-unit fidelity threshold."""
    image, masks = shapes.render(SPEC, [ShapeObject(shape="star", colour=shapes.UNNAMED,
                                                    size="small", position="top", rgb=VIOLET)],
                                 "white")
    assert (image[masks[0]] != VIOLET).any(-1).mean() >= 0.5
    assert 0 < np.linalg.norm(cf.object_colour(image, SPEC) - VIOLET) < 10


def test_distances_and_fidelity_share(scenes):
    images = [im for im, _ in scenes] + [np.full((32, 32, 3), 255, np.uint8)]
    target = (90 + 30, 20 + 40, 140)                     # 50 units from VIOLET
    d = cf.colour_distances(images, target, SPEC)
    np.testing.assert_allclose(d[:5], 50.0)
    assert math.isinf(d[5])
    assert cf.fidelity(d) == {"within": 0.0, "median_distance": 50.0, "n": 6, "no_object": 1}
    assert cf.fidelity(d, within=50.0)["within"] == pytest.approx(5 / 6)
    assert cf.fidelity([3.0, 50.0, math.inf, math.inf, 39.99])["within"] == pytest.approx(0.4)
    assert cf.fidelity([math.inf, math.inf, 1.0])["median_distance"] is None


def test_anchor_distances():
    d = cf.anchor_distances((225, 35, 65), SPEC)
    assert d["red"] == pytest.approx(30.0)
    assert set(d) == set(SPEC.colour_names)
