"""Options of DreamBooth and Textual Inversion training.

``ema_decay``: what they return is the exponential moving average of the weights along the
very trajectory the plain run takes (checked against the definition, d^2 p0 + d (1 - d) p1
+ (1 - d) p2 after two steps, with p1 / p2 the plain runs' weights after one / two steps),
and a decay outside [0, 1) is refused before anything is written.

``caption_dropout`` (DreamBooth): that share of instance rows carries the empty prompt's
encoding, the other rows their own prompt, class rows always the class prompt."""
import jax
import numpy as np
import pytest

from jaxdiff.adapters import textual_inversion as ti
from jaxdiff.training import dreambooth as db
from jaxdiff.training import textual_inversion as ti_train

DECAY = 0.8


def _images(n=3):
    return np.random.default_rng(0).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


def _by_definition(p0, p1, p2):
    d = DECAY
    return jax.tree.map(lambda a, b, c: d * d * a + d * (1 - d) * b + (1 - d) * c, p0, p1, p2)


def _assert_trees_close(got, want, atol):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=atol, rtol=0)


def _max_diff(a, b):
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_dreambooth_returns_the_ema_of_the_plain_trajectory(micro, tmp_path):
    _, pipe, params = micro
    kw = dict(instance_prompt="sks o", batch_size=2, lr=1e-2, log_every=1,
              ckpt_every=10 ** 9, seed=3)
    run = lambda name, steps, **extra: db.train_dreambooth(
        pipe, params, _images(), str(tmp_path / name), steps=steps, **kw, **extra)[0]
    p1, p2 = run("one", 1), run("two", 2)
    ema = run("ema", 2, ema_decay=DECAY)
    want = _by_definition(params["unet"], p1["unet"], p2["unet"])
    _assert_trees_close(ema["unet"], want, atol=2e-6)
    assert _max_diff(ema["unet"], p2["unet"]) > 100 * 2e-6     # not the last step's weights
    _assert_trees_close(ema["vae"], params["vae"], atol=0)      # frozen parts untouched


def test_textual_inversion_returns_the_ema_of_the_plain_trajectory(micro, tmp_path):
    _, pipe, params = micro
    kw = dict(placeholder="<c>", initializer_token="o", batch_size=2, lr=5e-2,
              log_every=1, ckpt_every=10 ** 9, seed=3)
    run = lambda name, steps, **extra: ti_train.train_textual_inversion(
        pipe, params, _images(), str(tmp_path / name), steps=steps, **kw, **extra).rows
    p0 = np.asarray(ti.init_embeddings(params, pipe.tokenizer, "o", 1))
    p1, p2 = run("one", 1), run("two", 2)
    ema = run("ema", 2, ema_decay=DECAY)
    _assert_trees_close(ema, _by_definition(p0, p1, p2), atol=1e-6)
    assert _max_diff(ema, p2) > 100 * 1e-6


@pytest.mark.parametrize("decay", [1.0, -0.1])
def test_a_decay_outside_the_unit_interval_is_refused_before_any_file(micro, tmp_path,
                                                                      decay):
    _, pipe, params = micro
    msg = rf"^ema_decay={decay}: use 0 \(no average\) or a decay in \(0, 1\)\.$"
    with pytest.raises(ValueError, match=msg):
        db.train_dreambooth(pipe, params, _images(), str(tmp_path / "db"),
                            instance_prompt="sks o", steps=1, batch_size=1, lr=1e-3,
                            ema_decay=decay)
    with pytest.raises(ValueError, match=msg):
        ti_train.train_textual_inversion(pipe, params, _images(), str(tmp_path / "ti"),
                                         placeholder="<c>", initializer_token="o", steps=1,
                                         batch_size=1, lr=1e-3, ema_decay=decay)
    assert not any(tmp_path.iterdir())


def test_caption_dropout_puts_the_empty_prompt_on_that_share_of_instance_rows():
    rng = np.random.default_rng(0)
    lat = {"instance": rng.normal(size=(5, 2, 2, 1)).astype(np.float32),
           "class": rng.normal(size=(3, 2, 2, 1)).astype(np.float32)}
    texts = {"instance": np.arange(5 * 3, dtype=np.float32).reshape(5, 3) + 1,
             "class": np.full((1, 3), -1.0, np.float32)}
    empty = np.full((1, 3), 100.0, np.float32)
    kw = dict(batch_size=4, seed=2, prior_loss_weight=1.0, paired=("instance",))
    plain = db.make_batch_fn(lat, texts, **kw)
    same = db.make_batch_fn(lat, texts, **kw, caption_dropout=0.0, uncond_text=empty)
    dropping = db.make_batch_fn(lat, texts, **kw, caption_dropout=0.25, uncond_text=empty)
    dropped = rows = 0
    for s in range(200):
        a, b, c = plain(s), same(s), dropping(s)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_array_equal(a["instance_latents"], c["instance_latents"])
        np.testing.assert_array_equal(c["class_text"], a["class_text"])
        is_empty = (c["instance_text"] == 100.0).all(axis=1)
        np.testing.assert_array_equal(c["instance_text"][~is_empty], a["instance_text"][~is_empty])
        dropped += is_empty.sum()
        rows += len(is_empty)
    assert 0.20 < dropped / rows < 0.30      # 800 rows: binomial s.d. 0.015 around 0.25


def test_caption_dropout_outside_zero_one_is_refused_before_any_file(micro, tmp_path):
    _, pipe, params = micro
    with pytest.raises(ValueError, match=r"^caption_dropout=1\.0: use a share in \[0, 1\)\.$"):
        db.train_dreambooth(pipe, params, _images(), str(tmp_path / "db"),
                            instance_prompt="sks o", steps=1, batch_size=1, lr=1e-3,
                            caption_dropout=1.0)
    assert not any(tmp_path.iterdir())
