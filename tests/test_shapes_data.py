"""Shapes world generator (worlds v1 and v2) and its TFDS builder (array_record, no TF)."""
import dataclasses
import hashlib
import os
import itertools

import numpy as np
import pytest
from scipy import ndimage

from jaxdiff.data import shapes
from jaxdiff.data.shapes import ShapeObject, WorldSpec

SPEC = WorldSpec()


def _take(seed, spec=SPEC, n=300, split=None):
    return list(itertools.islice(shapes.iterate(seed, spec, split), n))


def test_deterministic_and_seeded():
    a, b, c = _take(0, n=50), _take(0, n=50), _take(1, n=50)
    assert all(x["caption"] == y["caption"] and np.array_equal(x["image"], y["image"])
               for x, y in zip(a, b))
    assert [x["caption"] for x in a] != [x["caption"] for x in c]


@pytest.mark.parametrize("size", [32, 64])
def test_example_ground_truth_is_consistent(size):
    spec = WorldSpec(image_size=size)
    for ex in _take(2, spec, n=200):
        k = int(ex["num_objects"])
        assert ex["image"].shape == (size, size, 3) and ex["image"].dtype == np.uint8
        assert ex["masks"].shape == (2, size, size) and ex["masks"].dtype == bool
        assert not ex["masks"][k:].any() and all(ex["masks"][i].any() for i in range(k))
        assert not (ex["masks"][0] & ex["masks"][1]).any()
        for key in ("shape", "colour", "size", "position"):
            assert ex[key].shape == (2,) and (ex[key][k:] == -1).all() and (ex[key][:k] >= 0).all()
        bg = spec.background_names[ex["background"]]
        background_pixels = ~ex["masks"].any(0)
        assert (ex["image"][background_pixels] == dict(spec.backgrounds)[bg]).all()
        for i, obj in enumerate(ex["objects"]):
            assert obj.colour != bg
            assert (ex["image"][ex["masks"][i]] == dict(spec.colours)[obj.colour]).all()
            assert spec.colour_names[ex["colour"][i]] == obj.colour
        if k == 2:
            assert (ex["objects"][0].position, ex["objects"][1].position) in shapes.PAIRS


def test_every_attribute_value_occurs():
    exs = _take(3, n=600)
    for key, names in (("shape", SPEC.shapes), ("colour", SPEC.colour_names),
                       ("size", SPEC.size_names), ("position", SPEC.position_names)):
        seen = {names[i] for ex in exs for i in ex[key] if i >= 0}
        assert seen == set(names), key
    assert {int(ex["num_objects"]) for ex in exs} == {1, 2}


def test_caption_grammar_and_parse_round_trip():
    exs = _take(4, n=500)
    vocab = set(SPEC.words())
    for ex in exs:
        words = ex["caption"].split()
        assert set(words) <= vocab and len(words) <= 14
        objs, bg = shapes.parse_caption(ex["caption"], SPEC)
        truth_bg = SPEC.background_names[ex["background"]]
        assert bg == (truth_bg if ex["mention_background"] else None)
        for o, t in zip(objs, ex["objects"], strict=True):
            assert (o.shape, o.colour) == (t.shape, t.colour)
            assert o.size == (t.size if ex["mention_size"] else None)
            assert o.position == (t.position if ex["mention_position"] else None)


def test_caption_examples():
    red = ShapeObject("circle", "red", "small", "left")
    star = ShapeObject("star", "orange", "big", "right")
    assert shapes.caption([red]) == "a small red circle on the left"
    assert shapes.caption([red, star], "gray") == (
        "a small red circle left of a big orange star on a gray background")
    assert shapes.caption([star], mention_size=False, mention_position=False) == "an orange star"
    top = dataclasses.replace(red, position="top")
    bottom = dataclasses.replace(star, position="bottom")
    assert shapes.caption([top, bottom]).split()[4] == "above"
    with pytest.raises(ValueError):
        shapes.caption([red, dataclasses.replace(star, position="top")])


def test_render_one_attribute_edit_changes_only_that_object():
    objs = [ShapeObject("square", "blue", "big", "top"),
            ShapeObject("cross", "red", "small", "bottom")]
    img, masks = shapes.render(SPEC, objs, "gray")
    edited = [dataclasses.replace(objs[0], colour="yellow"), objs[1]]
    img2, masks2 = shapes.render(SPEC, edited, "gray")
    assert np.array_equal(masks, masks2)
    changed = (img != img2).any(-1)
    assert changed.any() and not (changed & ~masks[0]).any()
    reshaped = [dataclasses.replace(objs[0], shape="circle"), objs[1]]
    img3, masks3 = shapes.render(SPEC, reshaped, "gray")
    assert np.array_equal(masks3[1], masks[1]) and np.array_equal(img3[masks[1]], img[masks[1]])


def test_held_out_split_is_fixed_and_disjoint():
    test = shapes.held_out_examples(SPEC, 40)
    again = shapes.held_out_examples(SPEC, 40)
    assert [e["caption"] for e in test] == [e["caption"] for e in again]
    key = lambda e: shapes.scene_key(e["objects"], SPEC.background_names[e["background"]])
    train_keys = {key(e) for e in _take(5, n=300, split="train")}
    assert not train_keys & {key(e) for e in test}
    assert all(shapes.split_of(SPEC, e["objects"], SPEC.background_names[e["background"]])
               == "test" for e in test)
    # ~10% of scenes are held out, by a stable (sha256) hash
    frac = np.mean([shapes.split_of(SPEC, e["objects"], SPEC.background_names[e["background"]])
                    == "test" for e in _take(6, n=1000)])
    assert 0.06 < frac < 0.14


def test_held_out_named_scenes_say_every_colour_and_shape():
    v2 = shapes.world("v2", image_size=32)
    named = shapes.held_out_examples(v2, 30, num_objects=1, named=True)
    every = shapes.held_out_examples(v2, 60, num_objects=1)
    assert all(e["mention_colour"][0] and e["mention_shape"][0]
               and e["objects"][0].colour in v2.colour_names
               and e["objects"][0].colour in e["caption"] for e in named)
    kept = [e["caption"] for e in every if e["mention_colour"][0] and e["mention_shape"][0]]
    assert len(kept) < len(every)  # v2 leaves words out; the filter keeps the stream order
    assert [e["caption"] for e in named][:len(kept)] == kept[:len(named)]
    # v1 names everything: the filter changes nothing there.
    assert ([e["caption"] for e in shapes.held_out_examples(SPEC, 20, named=True)]
            == [e["caption"] for e in shapes.held_out_examples(SPEC, 20)])


def test_jitter_keeps_pairs_apart():
    spec = WorldSpec(jitter=0.04, p_two_objects=1.0)
    for ex in _take(7, spec, n=150):
        assert any(o.offset != (0.0, 0.0) for o in ex["objects"])
        grown = ndimage.binary_dilation(ex["masks"][0], np.ones((3, 3), bool))
        assert not (grown & ex["masks"][1]).any()


def test_spec_validation():
    with pytest.raises(ValueError):
        WorldSpec(shapes=("circle", "hexagon"))
    with pytest.raises(ValueError):
        WorldSpec(image_size=8)
    with pytest.raises(ValueError):
        shapes.sample_example(np.random.default_rng(0), SPEC, num_objects=3)
    with pytest.raises(ValueError):
        shapes.parse_caption("a dog on the moon", SPEC)


def test_v1_defaults_reproduce_the_shipped_world():
    """Seeds give the same v1 images, masks and captions as before world v2 existed."""
    h = hashlib.sha256()
    for ex in _take(0, n=200):
        h.update(ex["image"].tobytes())
        h.update(ex["masks"].tobytes())
        h.update(ex["caption"].encode())
    for ex in shapes.held_out_examples(SPEC, 50):
        h.update(ex["image"].tobytes())
        h.update(ex["caption"].encode())
    assert h.hexdigest() == "de9a456548dec7e6bbedb111b59d72013abbd10f08497bfd7b8104d1abd20b7a"
    assert shapes.world("v1") == SPEC and shapes.world("v2", image_size=64).antialias
    assert "object" not in SPEC.words() and "object" in shapes.WORLD_V2.words()
    with pytest.raises(ValueError):
        shapes.world("v3")


def test_restricted_vocabulary():
    spec = WorldSpec(shapes=("circle", "square"), colours=shapes.COLOURS[:3])
    exs = _take(8, spec, n=100)
    assert {o.shape for e in exs for o in e["objects"]} == {"circle", "square"}
    assert {o.colour for e in exs for o in e["objects"]} <= {"red", "green", "blue"}


# ---------------------------------------------------------------- world v2

V2 = shapes.WORLD_V2


@pytest.fixture(scope="module")
def v2_examples():
    return _take(11, V2, n=600)


def test_v2_captions_follow_the_grammar_and_the_mention_flags(v2_examples):
    from jaxdiff.data.tokenizer import tokenizer_words
    vocab = set(V2.words())
    assert vocab <= set(tokenizer_words())  # the shipped tokenizer has every word
    said_colour, said_shape = [], []
    for ex in v2_examples:
        words = ex["caption"].split()
        assert set(words) <= vocab and len(words) <= 14
        objs, _ = shapes.parse_caption(ex["caption"], V2)
        for k, (o, t) in enumerate(zip(objs, ex["objects"], strict=True)):
            assert o.colour == (t.colour if ex["mention_colour"][k] else None)
            assert o.shape == (t.shape if ex["mention_shape"][k] else None)
            if t.colour == shapes.UNNAMED:
                assert not ex["mention_colour"][k]
            else:
                said_colour.append(bool(ex["mention_colour"][k]))
            said_shape.append(bool(ex["mention_shape"][k]))
        assert not ex["mention_colour"][len(objs):].any()
    assert 0.75 < np.mean(said_colour) < 0.85 and 0.75 < np.mean(said_shape) < 0.85
    assert any(ex["caption"].startswith("an object") for ex in v2_examples)
    assert shapes.caption([ShapeObject("square", "red", "big", "left")],
                          mention_colour=False) == "a big square on the left"
    assert shapes.caption([ShapeObject("square", "red", "big", "left")], "white",
                          mention_size=False, mention_position=False,
                          mention_shape=False) == "a red object on a white background"
    assert shapes.parse_caption("an object", V2) == ([ShapeObject(None, None, None, None)], None)


def test_v2_brief_draws_the_terse_world_with_size_and_position_said_half_the_time():
    terse = _take(12, shapes.WORLD_V2_TERSE, n=400)
    brief = _take(12, shapes.world("v2_brief"), n=400)
    for t, b in zip(terse, brief, strict=True):  # same scenes, captions at most terser
        assert np.array_equal(t["image"], b["image"]) and t["objects"] == b["objects"]
        assert b["mention_size"] <= t["mention_size"]
        assert b["mention_position"] <= t["mention_position"]
    for key, lo, hi in (("mention_size", 0.43, 0.57), ("mention_position", 0.43, 0.57)):
        assert lo < np.mean([b[key] for b in brief]) < hi
        assert np.mean([t[key] for t in terse]) > 0.72


def test_v2_colours_are_shades_of_the_anchors_or_unnamed(v2_examples):
    anchors = dict(V2.colours)
    table = np.array(list(anchors.values()), float)
    objs = [(o, ex) for ex in v2_examples for o in ex["objects"]]
    unnamed = [o for o, _ in objs if o.colour == shapes.UNNAMED]
    assert 0.05 < len(unnamed) / len(objs) < 0.11
    offsets = []
    for o, ex in objs:
        k = ex["objects"].index(o)
        assert tuple(ex["rgb"][k]) == o.rgb
        dist = np.linalg.norm(table - np.array(o.rgb, float), axis=1)
        if o.colour == shapes.UNNAMED:
            assert ex["colour"][k] == len(V2.colour_names)
            assert dist.min() >= V2.unnamed_margin
        else:
            assert V2.colour_names[ex["colour"][k]] == o.colour
            offsets.append(np.subtract(o.rgb, anchors[o.colour]))
            assert dist[V2.colour_names.index(o.colour)] <= V2.colour_spread + 1
            assert dist.argmin() == V2.colour_names.index(o.colour)  # nearest = own anchor
    offsets = np.array(offsets, float)
    assert np.linalg.norm(offsets, axis=1).mean() > 0.6 * V2.colour_spread  # a spread, not a point
    assert np.abs(offsets.mean(0)).max() < 4.0  # centred on the anchor
    # Unnamed colours are in between: far from the anchors, across the colour cube.
    spread = np.array([o.rgb for o in unnamed], float)
    assert spread.std(0).min() > 30


def test_v2_edges_are_anti_aliased_and_masks_stay_binary(v2_examples):
    mixed = 0
    for ex in v2_examples[:200]:
        bg = np.array(dict(V2.backgrounds)[V2.background_names[ex["background"]]], float)
        expected = np.broadcast_to(bg, ex["image"].shape).copy()
        for k, o in enumerate(ex["objects"]):
            cover = shapes.object_coverage(V2, o.shape, o.size, shapes.anchor(V2, o))
            assert np.array_equal(ex["masks"][k], cover >= 0.5)
            expected += cover[..., None] * (np.array(o.rgb, float) - expected)
            full = cover == 1.0
            assert (ex["image"][full] == o.rgb).all()
            mixed += int(((cover > 0) & (cover < 1)).sum())
        np.testing.assert_array_equal(ex["image"], np.round(expected).astype(np.uint8))
        assert ex["masks"].dtype == bool
    assert mixed > 200 * 20  # every object has a soft rim


# ---------------------------------------------------------------- TFDS builder

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from jaxdiff.data import tfds_shapes
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    cfg = tfds_shapes.ShapesConfig(name="tiny", num_train=24, num_test=8)
    return tfds_shapes.prepare(data_dir, cfg), cfg, data_dir


def test_tfds_builder_writes_array_record_and_reads_back(prepared):
    from jaxdiff.data import tfds_shapes
    builder, cfg, _ = prepared
    src = builder.as_data_source()
    assert len(src["train"]) == 24 and len(src["test"]) == 8
    assert all("array_record" in f.name for f in builder.data_path.iterdir()
               if "jaxdiff_shapes-" in f.name)
    expected = _take(cfg.seed, cfg.spec(), n=24, split="train")
    for i in (0, 5, 23):
        rec = src["train"][i]
        assert tfds_shapes.decode_caption(rec["caption"]) == expected[i]["caption"]
        for k in tfds_shapes.ARRAY_KEYS:
            np.testing.assert_array_equal(rec[k], expected[i][k], err_msg=k)
    held = shapes.held_out_examples(cfg.spec(), 8)
    for i in range(8):
        np.testing.assert_array_equal(src["test"][i]["image"], held[i]["image"])
    assert builder.info.metadata["shapes"] == list(SPEC.shapes)


def test_tfds_data_source_by_name_and_rebuild_is_reuse(prepared):
    import tensorflow_datasets as tfds
    from jaxdiff.data import tfds_shapes
    builder, cfg, data_dir = prepared
    ds = tfds.data_source("jaxdiff_shapes/tiny", data_dir=data_dir)
    assert len(ds["test"]) == 8
    assert ds["train"][3]["image"].shape == (32, 32, 3)
    files = {f.name: os.stat(f).st_mtime for f in builder.data_path.iterdir()}
    again = tfds_shapes.prepare(data_dir, cfg)
    assert {f.name: os.stat(f).st_mtime for f in again.data_path.iterdir()} == files
    assert [c.name for c in tfds_shapes.ShapesWorld.BUILDER_CONFIGS] == [
        "32px", "64px", "32px_v2"]


def test_tfds_v2_data_has_its_own_directory_and_records(prepared, tmp_path):
    from jaxdiff.data import tfds_shapes
    v1_builder, _, _ = prepared
    cfg = tfds_shapes.ShapesConfig(name="tiny", num_train=12, num_test=4, world="v2")
    assert cfg.name == "tiny_v2" and cfg.spec().antialias
    assert tfds_shapes.ShapesConfig(name="x_v2", world="v2").name == "x_v2"
    with pytest.raises(ValueError):
        tfds_shapes.ShapesConfig(name="tiny", world="v9")
    builder = tfds_shapes.prepare(str(tmp_path), cfg)
    assert builder.data_path.parent.name == "tiny_v2"
    assert builder.info.metadata["world"] == "v2"
    assert v1_builder.info.metadata["world"] == "v1"
    src = builder.as_data_source()["train"]
    expected = _take(cfg.seed, cfg.spec(), n=12, split="train")
    for i in (0, 11):
        assert tfds_shapes.decode_caption(src[i]["caption"]) == expected[i]["caption"]
        for k in tfds_shapes.ARRAY_KEYS:
            np.testing.assert_array_equal(src[i][k], expected[i][k], err_msg=k)
