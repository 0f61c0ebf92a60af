"""Floors for the shipped control models of the embedded model (issue #14, point 4): the
segmentation-map ControlNet (``jaxdiff/assets/shapes_controlnet_seg``), the edge-map
T2I-Adapter (``shapes_adapter_edges``) and the GLIGEN layers (``shapes_gligen``).

The README's figures come from ``bench/control_quality.py --controlnet shipped --adapter
shipped`` on 200 held-out scenes (``--gligen shipped --gligen-beta 0.6``: 400 one-object
and 100 two-object layouts); these tests score the same quantities with the bench's own
code on fewer fixed scenes, with margins for that sample's error, and check that the
control is what does it (the same program at scale 0 / beta 0 scores clearly lower).
"""
import dataclasses
import os

import pytest

import jaxdiff
from jaxdiff.data.shapes import world
from jaxdiff.eval import control_eval as ce
from jaxdiff.weights.control import (SHAPES_ADAPTER, SHAPES_CONTROLNET, load_controlnet,
                                     load_t2i_adapter)
from jaxdiff.weights.gligen import SHAPES_GLIGEN, with_gligen

pytestmark = pytest.mark.slow

ASSETS = (SHAPES_CONTROLNET, SHAPES_ADAPTER, SHAPES_GLIGEN)


@pytest.fixture(scope="module")
def bench():
    from torchref.scripts import load_script
    return load_script("bench", "control_quality")


@pytest.fixture(scope="module")
def spec(embedded):
    return world("v2", image_size=embedded[0].image_size)


def test_shipped_control_models_are_small_float16_folders():
    """Each is a folder the loaders read (float16 tensors: half the bytes); together under
    4 MB, so the assets stay within their 20 MB."""
    total = 0
    for folder in ASSETS:
        names = sorted(os.listdir(folder))
        assert "config.json" in names and len(names) == 2, (folder, names)
        total += sum(os.path.getsize(os.path.join(folder, n)) for n in names)
    assert total < 4 * 2 ** 20, total


def test_controlnet_and_adapter_follow_their_condition(embedded, spec, bench):
    """README (200 scenes, the shipped U-Net): ControlNet mask IoU 0.87 (no control 0.72),
    adapter 0.89; captions right 91.5 % / 95 %. Floors on 48 fixed held-out scenes
    (measured: 0.869 / 0.893 IoU, 0.938 / 0.917 attributes, baseline 0.734; on the U-Net
    they were trained with, candidates/shapes_v2_focus: 0.844 / 0.895, 0.896 / 0.896,
    0.697), both models and the scale-0
    baseline in one program: IoU >= 0.78 for each and above the baseline by >= 0.05, every
    stated attribute right >= 85 %."""
    pipe, params = embedded
    args = bench.parse_args(["--controlnet", "shipped", "--adapter", "shipped", "--num", "48",
                             "--chunk", "48"])
    models = [("controlnet", "segmentation", *load_controlnet(SHAPES_CONTROLNET)),
              ("adapter", "edges", *load_t2i_adapter(SHAPES_ADAPTER))]
    cases = ce.condition_cases(spec, args.num)
    images = bench.control_images(pipe, params, cases, models, args)
    scores = {name: ce.score_condition(images[name], cases, kind, spec)
              for name, kind in (("controlnet", "segmentation"), ("adapter", "edges"),
                                 ("baseline", "segmentation"))}
    print(scores)
    for name in ("controlnet", "adapter"):
        assert scores[name]["mask_iou"] >= 0.78, scores
        assert scores[name]["mask_iou"] >= scores["baseline"]["mask_iou"] + 0.05, scores
        assert scores[name]["attributes"]["all"] >= 0.85, scores


def test_gligen_puts_objects_in_their_boxes(embedded, spec, bench):
    """README (beta 0.6, 200 + 200 one-object layouts, 100 two-object): object centre in
    its box 1.00 for boxes around a named position, 0.93 for boxes the caption cannot name
    (corners, off-grid centres and sizes; fusers off: 0.43), two-object layouts right
    0.96. Floors on 48 fixed one-object layouts (24 unnamed) and 16 two-object ones, the
    fusers-off baseline in the same program (measured 0.958, baseline 0.417; named 1.00,
    two-object layouts 0.8125 with the model's decoder since ``configs/shapes.py:v2_sharp``,
    0.875 with the one before: one layout of 16): unnamed centre in box >= 0.8 and above the
    baseline by >= 0.3, the right object there >= 0.75; named >= 0.85, two-object layouts
    >= 0.75; 16 two-object layouts at unnamed positions (measured 0.844 vs 0.531): centre in
    box >= 0.6 and above the baseline by >= 0.1."""
    pipe, params = embedded
    args = bench.parse_args(["--gligen", "shipped", "--gligen-beta", "0.6", "--num", "48",
                             "--num-two", "16", "--num-two-unnamed", "16", "--chunk", "80"])
    gpipe, gparams = with_gligen(pipe, params, SHAPES_GLIGEN)
    cases = ce.grounding_cases(spec, args.num, args.num_two,
                               num_two_unnamed=args.num_two_unnamed)
    images = bench.gligen_images(gpipe, gparams, cases, args)
    scores = {name: ce.score_grounding(images[name], cases, spec)
              for name in ("grounded", "baseline")}
    print(scores)
    got, base = scores["grounded"], scores["baseline"]
    assert got["unnamed"]["n"] == 24 and got["two_object"]["n"] == 16, got
    assert got["unnamed"]["centre_in_box"] >= 0.8, scores
    assert got["unnamed"]["centre_in_box"] >= base["unnamed"]["centre_in_box"] + 0.3, scores
    assert got["unnamed"]["right_object_in_box"] >= 0.75, scores
    assert got["named"]["centre_in_box"] >= 0.85, scores
    assert got["two_object"]["layout_right"] >= 0.75, scores
    # Two objects where no caption puts them: the boxes still move them (bench/README: centre
    # in box 0.765 vs 0.495 with the fusers off) though both are right only ~40 % of the time.
    two = got["two_unnamed"]
    assert two["centre_in_box"] >= 0.6, scores
    assert two["centre_in_box"] >= base["two_unnamed"]["centre_in_box"] + 0.1, scores


def test_controlnet_follows_a_map_off_the_anchors(embedded, spec, bench):
    """README (200 scenes, objects moved up to 0.3 of the side off their anchors, prompts
    without position or size words): ControlNet IoU 0.63 (>= 0.5 in 78.5 %), no control
    0.08; colour right 89 %. Floors on 48 such scenes (measured: IoU 0.641, baseline 0.086,
    colour 0.825): IoU >= 0.5 and above the baseline by >= 0.3, colour >= 0.7."""
    pipe, params = embedded
    args = bench.parse_args(["--controlnet", "shipped", "--num", "48", "--chunk", "48",
                             "--jitter", "0.3", "--unnamed-layout"])
    models = [("controlnet", "segmentation", *load_controlnet(SHAPES_CONTROLNET))]
    off = dataclasses.replace(spec, jitter=0.3)
    cases = ce.condition_cases(off, args.num, name_layout=False)
    images = bench.control_images(pipe, params, cases, models, args)
    scores = {name: ce.score_condition(images[name], cases, "segmentation", off)
              for name in ("controlnet", "baseline")}
    print(scores)
    got, base = scores["controlnet"], scores["baseline"]
    assert got["mask_iou"] >= 0.5 and got["mask_iou"] >= base["mask_iou"] + 0.3, scores
    assert got["attributes"]["colour"] >= 0.7, scores
