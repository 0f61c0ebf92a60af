"""Generation scoring (``jaxdiff.eval.generation``) and the ``bench/quality.py`` driver.

No trained model: the scorer is checked on ground-truth renders and on renders with one
attribute changed, PSNR on arrays with a known answer, and the driver end to end on a tiny
random pipeline.
"""
import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.data import shapes
from jaxdiff.data.shapes import WorldSpec
from jaxdiff.eval import generation as gen
from torchref.scripts import load_script

SPEC = WorldSpec()


@pytest.fixture(scope="module")
def cases():
    return gen.prompt_set(SPEC, 200, 100)


def test_prompt_set_is_fixed_full_and_held_out(cases):
    assert cases == gen.prompt_set(SPEC, 200, 100)
    assert [len(c.objects) for c in cases] == [1] * 200 + [2] * 100
    # A smaller request is a prefix: the order does not depend on the count.
    assert gen.prompt_set(SPEC, 20, 10) == cases[:20] + cases[200:210]
    for c in cases:
        objects, background = shapes.parse_caption(c.prompt, SPEC)
        assert (tuple(objects), background) == (c.objects, c.background)
        assert all(None not in (o.shape, o.colour, o.size, o.position) for o in objects)
        assert shapes.split_of(SPEC, c.objects, c.background) == "test"
    # All held-out one-object scenes come first, each once, then the list cycles.
    unique = len(gen.held_out_scenes(SPEC, 1))
    assert 100 < unique < 200
    assert len({c.prompt for c in cases[:unique]}) == unique
    assert cases[unique] == cases[0]
    assert len({c.prompt for c in cases[200:]}) == 100
    # Different draws differ; every attribute value is represented.
    assert {o.colour for c in cases for o in c.objects} == set(SPEC.colour_names)
    assert {c.background for c in cases} == set(SPEC.background_names)


def test_held_out_scenes_are_the_held_out_split():
    """The enumeration is the population ``held_out_examples`` samples from."""
    scenes = {shapes.scene_key(o, b) for o, b in gen.held_out_scenes(SPEC, 1)}
    for ex in shapes.held_out_examples(SPEC, 40, num_objects=1):
        bg = SPEC.background_names[int(ex["background"])]
        assert shapes.scene_key(ex["objects"], bg) in scenes
    every = [(tuple([shapes.ShapeObject(s, c, z, p)]), bg)
             for bg in SPEC.background_names for s in SPEC.shapes
             for c in shapes.palette(SPEC, bg) for z in SPEC.size_names
             for p in SPEC.position_names]
    held = [s for s in every if shapes.split_of(SPEC, *s) == "test"]
    assert len(held) == len(scenes)


def _render(targets, spec=SPEC):
    return np.stack([shapes.render(spec, objs, bg)[0] for objs, bg in targets])


def _subset(cases, n_one=40, n_two=40):
    return cases[:n_one] + cases[200:200 + n_two]


def test_ground_truth_renders_score_one(cases):
    sub = _subset(cases)
    scores = gen.score_images(_render([(c.objects, c.background) for c in sub]), sub, SPEC)
    assert scores.pop("n") == len(sub)
    assert scores == {k: 1.0 for k in ("all", "background", "colour", "count", "position",
                                       "shape", "size")}


def _other(value, choices):
    return next(v for v in choices if v != value)


def _changed(c, attr):
    """The scene of case ``c`` with ``attr`` changed on every object (or the background)."""
    if attr == "background":
        used = {o.colour for o in c.objects}
        return c.objects, next(b for b in SPEC.background_names
                               if b != c.background and b not in used)
    choices = {"shape": SPEC.shapes, "colour": list(shapes.palette(SPEC, c.background)),
               "size": SPEC.size_names}
    if attr == "position":  # one object: another anchor; two: swap the pair's axis
        swap = {"left": "top", "right": "bottom", "top": "left", "bottom": "right",
                "centre": "left"}
        objs = [dataclasses.replace(o, position=swap[o.position]) for o in c.objects]
    else:
        objs = [dataclasses.replace(o, **{attr: _other(getattr(o, attr), choices[attr])})
                for o in c.objects]
    return tuple(objs), c.background


@pytest.mark.parametrize("attr", ["colour", "shape", "size", "position", "background"])
def test_one_wrong_attribute_scores_zero_on_it_only(cases, attr):
    sub = _subset(cases, 25, 25)
    scores = gen.score_images(_render([_changed(c, attr) for c in sub]), sub, SPEC)
    assert scores[attr] == 0.0
    assert scores["all"] == 0.0
    for other in {"count", "shape", "colour", "size", "position", "background"} - {attr}:
        assert scores[other] == 1.0, (attr, other, scores)


def test_score_images_checks_shapes(cases):
    with pytest.raises(ValueError, match="one per target"):
        gen.score_images(np.zeros((3, 32, 32, 3), np.uint8), cases[:2], SPEC)
    # (objects, None) pairs: background not scored.
    c = cases[0]
    img = _render([(c.objects, _changed(c, "background")[1])])
    scores = gen.score_images(img, [(c.objects, None)], SPEC)
    assert "background" not in scores and scores["all"] == 1.0


def test_psnr_known_values():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[0] = 16                                   # MSE 256
    b[1, 0, 0, 0] = 255                         # MSE 255^2 / 48
    got = gen.psnr(a, b)
    np.testing.assert_allclose(got, [20 * np.log10(255 / 16), 10 * np.log10(48)], rtol=1e-12)
    assert gen.psnr(a, a).tolist() == [np.inf, np.inf]
    np.testing.assert_allclose(gen.psnr(np.zeros((1, 2, 2, 1)), np.full((1, 2, 2, 1), 0.5),
                                        peak=1.0), [10 * np.log10(4)])


class _ShiftPipe:
    """Stands in for a Pipeline: encode = identity, decode = +2 grey levels."""

    def encode_images(self, params, x):
        return x * params["gain"]

    def decode_latents(self, params, z):
        return z / params["gain"] + 2.0 / 127.5


def test_vae_psnr_round_trip_in_padded_batches():
    images = np.random.default_rng(0).integers(0, 250, (7, 8, 8, 3), dtype=np.uint8)
    params = {"gain": jnp.float32(0.5)}
    recon = gen.vae_reconstruct(_ShiftPipe(), params, images, batch_size=3)
    np.testing.assert_array_equal(recon, images.astype(np.int32) + 2)   # order kept, 7 of 7
    out = gen.vae_psnr(_ShiftPipe(), params, images, batch_size=3)
    assert out["n"] == 7
    for k in ("mean_db", "min_db", "median_db"):
        assert out[k] == pytest.approx(20 * np.log10(255 / 2), abs=1e-9)


def test_single_attribute_prompts_name_one_attribute_and_score_their_renders():
    bench = load_script("bench", "quality")
    colour_free = bench.single_attribute_cases(SPEC, 20, "colour")
    shape_free = bench.single_attribute_cases(SPEC, 30, "shape")
    assert colour_free[0].prompt == "a circle on a black background"
    assert shape_free[0].prompt == "a red object on a black background"
    assert {c.objects[0].shape for c in colour_free} == set(SPEC.shapes)
    assert len({c.prompt for c in shape_free}) == 23  # 8 + 8 + 7 colours (no white on white)
    for c in colour_free + shape_free:
        objs, bg = shapes.parse_caption(c.prompt, SPEC)
        assert (tuple(objs), bg) == (c.objects, c.background)
    # Renders of the asked object score 1; another shape / colour scores 0 on it only.
    def render(c, **change):
        o = c.objects[0]
        obj = shapes.ShapeObject(o.shape or "star", o.colour or "cyan", "big", "centre")
        if o.colour is None:  # any colour allowed on the background
            obj = dataclasses.replace(obj, colour=list(shapes.palette(SPEC, c.background))[3])
        return shapes.render(SPEC, [dataclasses.replace(obj, **change)], c.background)[0]
    cases = colour_free + shape_free
    assert gen.score_images(np.stack([render(c) for c in cases]), cases, SPEC)["all"] == 1.0
    wrong = np.stack([render(c, shape=_other(c.objects[0].shape, SPEC.shapes))
                      for c in colour_free])
    scores = gen.score_images(wrong, colour_free, SPEC)
    assert scores["shape"] == 0.0 and scores["background"] == 1.0 and "colour" not in scores
    wrong = np.stack([render(c, colour=_other(c.objects[0].colour,
                                              list(shapes.palette(SPEC, c.background))))
                      for c in shape_free])
    scores = gen.score_images(wrong, shape_free, SPEC)
    assert scores["colour"] == 0.0 and scores["background"] == 1.0 and "shape" not in scores


def test_bench_runs_end_to_end_on_a_tiny_random_pipeline(tmp_path, torch):
    from torchref import models as ref
    folder = str(tmp_path / "pipe")
    ref.make_torch_pipeline(folder)               # 16 x 16 images
    bench = load_script("bench", "quality")
    out = str(tmp_path / "q.json")
    with pytest.warns(UserWarning, match="truncated"):   # 16-token char-level tokenizer
        result = bench.main(["--model", folder, "--num-one", "3", "--num-two", "2",
                             "--num-colour-free", "2", "--num-shape-free", "1",
                             "--num-real", "4", "--guidance", "1", "4", "--steps", "2",
                             "--chunk", "3", "--world", "v2", "--out", out])
    assert json.load(open(out)) == result
    assert result["image_size"] == 16 and result["world"] == "v2"
    for name, n, keys in (("colour_free", 2, {"all", "count", "shape", "background"}),
                          ("shape_free", 1, {"all", "count", "colour", "background"})):
        block = result["generation"][name]
        assert block["n"] == n and set(block["by_guidance"]) == {"1", "4"}
        assert all(set(v) == keys for v in block["by_guidance"].values())
    for name, n in (("one_object", 3), ("two_object", 2)):
        block = result["generation"][name]
        assert block["n"] == n and set(block["by_guidance"]) == {"1", "4"}
        for scores in block["by_guidance"].values():
            assert set(scores) >= {"all", "shape", "colour", "size", "position", "background"}
            assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert result["vae"]["n"] == 4 and np.isfinite(result["vae"]["mean_db"])
    assert result["evaluator_on_real"]["n"] == 4 and result["evaluator_on_vae"]["n"] == 4
    # Every prompt row 0: only the autoencoder lines (what the decoder study reads).
    vae_only = bench.main(["--model", folder, "--num-one", "0", "--num-two", "0",
                           "--num-colour-free", "0", "--num-shape-free", "0",
                           "--num-real", "4", "--guidance", "1", "--world", "v2"])
    assert vae_only["generation"] == {} and vae_only["vae"] == result["vae"]
    assert vae_only["evaluator_on_vae"] == result["evaluator_on_vae"]
