"""Colour-mixup conditioning (jaxdiff.training.colour_mixup): the data against the world's
palette, the loss against literally writing the word, the recipe's export and its errors."""
import os

import jax
import numpy as np
import pytest

import jaxdiff
from jaxdiff.data.shapes import WORLDS
from jaxdiff.training import colour_mixup as cm
from jaxdiff.training.latents import encode_uint8


@pytest.fixture(scope="module")
def pipe_params():
    return jaxdiff.load_pipeline()


@pytest.fixture(scope="module")
def data(pipe_params):
    pipe, _ = pipe_params
    return cm.mixup_data(pipe, 120, 0.5, seed=3)


def test_mix_rows_draw_the_convex_mix_of_their_anchors(pipe_params, data):
    pipe, _ = pipe_params
    images, captions, masks, mix_ids, mix_w = data
    spec = WORLDS["v2_brief"]
    name_of = {v: k for k, v in cm.word_ids(pipe, spec.colour_names).items()}
    rgb_of = dict(spec.colours)
    rows = np.nonzero(mix_w[:, 0] > 0)[0]
    assert 35 <= len(rows) <= 85                      # ~ half of 120
    k3 = 0
    for i in rows:
        w = mix_w[i]
        assert abs(w.sum() - 1) < 1e-5 and np.all(np.diff(w) <= 0)   # heaviest first
        k = int((w > 0).sum())
        k3 += k == 3
        names = [name_of[int(j)] for j in mix_ids[i, :k]]
        assert len(set(names)) == k
        assert f" {names[0]} " in f" {captions[i]} "  # the heaviest anchor's word is said
        mix = sum(wi * np.asarray(rgb_of[n], float) for wi, n in zip(w[:k], names))
        inner = masks[i] & np.roll(masks[i], 1, 0) & np.roll(masks[i], -1, 0) \
            & np.roll(masks[i], 1, 1) & np.roll(masks[i], -1, 1)  # away from blended edges
        drawn = np.median(images[i][inner], axis=0)
        assert np.linalg.norm(drawn - mix) <= 15.0 + 1.0, (captions[i], drawn, mix)
    assert 0 < k3 < len(rows)
    ordinary = np.nonzero(mix_w[:, 0] == 0)[0]
    assert np.all(mix_w[ordinary] == 0) and len(ordinary) > 0


def test_colour_positions_point_at_the_word(pipe_params, data):
    pipe, _ = pipe_params
    _, captions, _, mix_ids, mix_w = data
    ids = pipe.tokenize(captions, warn=False)
    pos = cm.colour_positions(ids, mix_ids, mix_w)
    for i in range(len(captions)):
        if mix_w[i, 0] > 0:
            assert ids[i, pos[i]] == mix_ids[i, 0]
        else:
            assert pos[i] == -1


def _batch(pipe, params, captions, mix_ids, mix_w, pos):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (len(captions), 32, 32, 3)).astype(np.uint8)
    x0 = encode_uint8(pipe, params, images)
    ids = pipe.tokenize(captions, warn=False)
    wt = np.ones(x0.shape[:3] + (1,), np.float32)
    return (x0, ids, np.asarray(mix_ids, np.int32), np.asarray(mix_w, np.float32),
            np.asarray(pos, np.int32), wt)


def test_a_mix_all_on_another_word_is_that_word_written(pipe_params):
    """The embedding substitution is exact: a mix with all its weight on "red", placed at
    "green", gives the loss of the caption that says "red" (same noise)."""
    pipe, params = pipe_params
    ids_of = cm.word_ids(pipe, ("red", "green", "blue"))
    p = {"unet": params["unet"], "text_encoder": params["text_encoder"]}
    loss = jax.jit(cm.mixup_loss(pipe, pipe.tokenize([""], warn=False)[0], 0.0))
    green = ["a green circle", "a big green square on the left"]
    red = ["a red circle", "a big red square on the left"]
    pos = [2, 3]   # <bos> a green / <bos> a big green
    mids = [[ids_of["green"], ids_of["red"], ids_of["blue"]]] * 2
    key = jax.random.PRNGKey(1)
    mixed = loss(p, _batch(pipe, params, green, mids, [[0, 1, 0]] * 2, pos), key)
    written = loss(p, _batch(pipe, params, red, mids, [[0, 0, 0]] * 2, [-1, -1]), key)
    plain = loss(p, _batch(pipe, params, green, mids, [[0, 0, 0]] * 2, [-1, -1]), key)
    np.testing.assert_allclose(mixed, written, rtol=1e-5)
    assert abs(float(plain) - float(written)) > 1e-4 * abs(float(written))


def test_dropped_captions_ignore_the_mix(pipe_params):
    pipe, params = pipe_params
    ids_of = cm.word_ids(pipe, ("red", "green", "blue"))
    p = {"unet": params["unet"], "text_encoder": params["text_encoder"]}
    loss = jax.jit(cm.mixup_loss(pipe, pipe.tokenize([""], warn=False)[0], 1.0))
    mids = [[ids_of["green"], ids_of["red"], ids_of["blue"]]] * 2
    key = jax.random.PRNGKey(2)
    b_mix = _batch(pipe, params, ["a green circle"] * 2, mids, [[0.5, 0.3, 0.2]] * 2, [2, 2])
    b_empty = _batch(pipe, params, [""] * 2, mids, [[0, 0, 0]] * 2, [-1, -1])
    np.testing.assert_allclose(loss(p, b_mix, key), loss(p, b_empty, key), rtol=1e-6)


def test_recipe_exports_float16_and_refuses_bad_config(tmp_path):
    from configs.colour_mixup import get_config
    c = get_config("tiny")
    c.init_from = "embedded"
    c.export_dtype = "float16"
    c.ema_decay, c.lr = 0.0, 1e-2   # export the last step's weights, moved well past fp16
    out = cm.run_colour_mixup(c, str(tmp_path / "run"))
    pipe, params = jaxdiff.load_pipeline(out)
    _, base = jaxdiff.load_pipeline()
    from safetensors.numpy import load_file
    unet = load_file(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))
    assert all(v.dtype == np.float16 for v in unet.values())
    moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                                   params["unet"], base["unet"])
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-3    # it trained (fp16 rounds ~1e-4)
    assert "text_encoder" in params and (tmp_path / "run" / "log.jsonl").exists()
    c2 = get_config("tiny")
    c2.init_from = ""
    with pytest.raises(ValueError, match="init_from"):
        cm.run_colour_mixup(c2, str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()
    c3 = get_config("tiny")
    c3.init_from, c3.mix = "embedded", 1.5
    with pytest.raises(ValueError, match="mix must be"):
        cm.run_colour_mixup(c3, str(tmp_path / "bad3"))
    assert not (tmp_path / "bad3").exists()
    c4 = get_config("tiny")
    c4.init_from, c4.world = "embedded", "v9"
    with pytest.raises(ValueError, match="world 'v9'"):
        cm.run_colour_mixup(c4, str(tmp_path / "bad4"))
    assert not (tmp_path / "bad4").exists()
