"""Textual Inversion: only the new rows train; diffusers' load_textual_inversion reads the file."""
import dataclasses
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdiff
from torchref import models as ref
from jaxdiff.data.tokenizer import build_tokenizer, load_tokenizer
from jaxdiff.training import state as state_lib
from jaxdiff.adapters import textual_inversion as ti
from jaxdiff.training.step import make_train_step
from jaxdiff.training import textual_inversion as ti_train
from jaxdiff.training.latents import mask_loss_weights
from jaxdiff.training.textual_inversion import make_ti_loss

PLACEHOLDER, N = "<cat-toy>", 2


@pytest.fixture(scope="module")
def sd(tiny_pipe_dir):
    return (tiny_pipe_dir,) + tuple(jaxdiff.load_pipeline(tiny_pipe_dir))


_with_micro_unet = ref.with_micro_unet


def _tokenize(pipe, tokenizer, prompts):
    prompts = [ti.expand_prompt(p, PLACEHOLDER, N) for p in prompts]
    return dataclasses.replace(pipe, tokenizer=tokenizer).tokenize(prompts)


def test_add_tokens_follows_diffusers_multi_vector_convention(sd):
    _, pipe, params = sd
    tok = ti.add_tokens(pipe.tokenizer, PLACEHOLDER, N)
    v = len(pipe.tokenizer)
    assert len(pipe.tokenizer) == v and len(tok) == v + N  # the input is not modified
    assert tok.convert_tokens_to_ids(["<cat-toy>", "<cat-toy>_1"]) == [v, v + 1]
    assert ti.expand_prompt("a <cat-toy> x", PLACEHOLDER, N) == "a <cat-toy> <cat-toy>_1 x"
    ids = _tokenize(pipe, tok, ["a <cat-toy> x"])[0]
    assert list(ids[1:5]) == [tok.convert_tokens_to_ids("a</w>"), v, v + 1,
                              tok.convert_tokens_to_ids("x</w>")]
    rows = ti.init_embeddings(params, tok, "a", N)
    table = np.asarray(ti.token_table(params))
    assert rows.shape == (N, 32)
    np.testing.assert_array_equal(rows, np.stack([table[ids[1]]] * N))


def test_clear_errors(sd):
    _, pipe, params = sd
    with pytest.raises(ValueError, match="already exist"):
        ti.add_tokens(pipe.tokenizer, "a")  # a character token of the tiny vocabulary
    tok = ti.add_tokens(pipe.tokenizer, PLACEHOLDER, N)
    with pytest.raises(ValueError, match="already exist"):
        ti.add_tokens(tok, PLACEHOLDER)
    with pytest.raises(ValueError, match="already exist"):
        ti.add_tokens(tok, "<cat-toy>_1")
    shapes_tok = load_tokenizer(build_tokenizer(tempfile.mkdtemp()))
    for word in ("sks", "zwx", "star"):  # whole-word tokens of the shapes-world BPE
        with pytest.raises(ValueError, match="already exist"):
            ti.add_tokens(shapes_tok, word)
    assert len(ti.add_tokens(shapes_tok, "<sks>")) == len(shapes_tok) + 1
    with pytest.raises(ValueError, match="single token"):
        ti.init_embeddings(params, tok, "ab", 1)
    with pytest.raises(ValueError, match="without spaces"):
        ti.add_tokens(pipe.tokenizer, "<a b>")


def test_only_new_rows_train(sd):
    pipe, params = _with_micro_unet(*sd[1:])
    tok = ti.add_tokens(pipe.tokenizer, PLACEHOLDER, N)
    rows = ti.init_embeddings(params, tok, "a", N)
    opt = optax.adam(1e-2)
    state = state_lib.create(rows, opt, ema=False)
    step = jax.jit(make_train_step(make_ti_loss(pipe, params), opt))
    ids = jnp.asarray(_tokenize(pipe, tok, ["a <cat-toy> x", "<cat-toy> b"]))
    batch = (jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, 4)), jnp.float32), ids)
    for _ in range(3):
        state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    # The optimizer holds only the new rows (adam mu, nu + a count).
    assert sum(x.size for x in jax.tree.leaves(state.opt_state)) <= 2 * rows.size + 8
    assert (np.abs(np.asarray(state.params) - np.asarray(rows)).max(axis=1) > 1e-4).all()
    pipe2, merged = ti.merge_embeddings(pipe, params, tok, state.params)
    table, new_table = np.asarray(ti.token_table(params)), np.asarray(ti.token_table(merged))
    np.testing.assert_array_equal(new_table[: len(table)], table)  # bit-identical old rows
    np.testing.assert_array_equal(new_table[len(table):], state.params)
    # A prompt without the placeholder encodes exactly as before.
    plain = jnp.asarray(pipe.tokenize(["a red star"]))
    encode = jax.jit(lambda p, r: (ti.encode_text(pipe, p, r, plain), pipe.encode_text(p, plain)))
    np.testing.assert_allclose(*encode(params, state.params), atol=1e-6, rtol=0)


def test_diffusers_load_textual_inversion_matches(sd, tmp_path, torch):
    from diffusers import StableDiffusionPipeline
    folder, pipe, params = sd
    rows = jnp.asarray(np.random.default_rng(1).normal(0, 1.0, (N, 32)), jnp.float32)
    file = ti.save_learned_embeds(str(tmp_path / "emb"), PLACEHOLDER, rows)
    assert file.endswith("emb/learned_embeds.safetensors")
    name, back = ti.load_learned_embeds(file)
    assert name == PLACEHOLDER and np.array_equal(back, rows)

    tp = StableDiffusionPipeline.from_pretrained(folder)
    tp.load_textual_inversion(str(tmp_path / "emb"))
    prompts = ["a <cat-toy> x", "b <cat-toy>"]
    with torch.no_grad():
        want = tp.encode_prompt(prompts, "cpu", 1, False)[0].numpy()
    tok = ti.add_tokens(pipe.tokenizer, PLACEHOLDER, N)
    ids = _tokenize(pipe, tok, prompts)
    want_ids = tp.tokenizer(tp.maybe_convert_prompt(prompts, tp.tokenizer), padding="max_length",
                            max_length=tp.tokenizer.model_max_length, return_tensors="np")
    np.testing.assert_array_equal(ids, want_ids.input_ids)
    got = jax.jit(lambda p, r: ti.encode_text(pipe, p, r, ids))(params, rows)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    pipe2, merged = ti.merge_embeddings(pipe, params, tok, rows)
    ids2 = pipe2.tokenize([ti.expand_prompt(p, PLACEHOLDER, N) for p in prompts])
    np.testing.assert_allclose(jax.jit(pipe2.encode_text)(merged, ids2), want, atol=1e-4, rtol=0)
    # The merged pipeline exports as a diffusers directory with the new tokens.
    exported = StableDiffusionPipeline.from_pretrained(
        jaxdiff.save_pipeline(pipe2, merged, str(tmp_path / "export")))
    with torch.no_grad():
        np.testing.assert_allclose(exported.encode_prompt(prompts, "cpu", 1, False)[0].numpy(),
                                   want, atol=1e-5, rtol=0)
    # Not vacuous: the learned rows matter.
    init = ti.init_embeddings(params, tok, "a", N)
    assert np.abs(want - jax.jit(lambda p, r: ti.encode_text(pipe, p, r, ids))(params, init)
                  ).max() > 1e-2


def test_per_image_captions_pair_each_row_with_its_image(sd, tmp_path):
    """``captions``: every row's ids are its own image's caption (the image found by the
    latent's content, the caption tokenized alone); templates keep exactly the old batches
    (drawn independently of the image)."""
    from jaxdiff.training.batching import host_slice, stream_indices
    _, pipe, params = sd
    tok = ti.add_tokens(pipe.tokenizer, PLACEHOLDER, N)
    captions = ["a {} x", "{} b", "a b {}", "x {} a", "{} o"]
    prompts = ti_train.template_prompts(captions, PLACEHOLDER, N, what="captions")
    ids = dataclasses.replace(pipe, tokenizer=tok).tokenize(prompts)
    lat = np.random.default_rng(0).normal(size=(5, 4, 4, 4)).astype(np.float32)
    batch_fn = ti_train.make_batch_fn(lat, ids, batch_size=4, seed=3, paired=True)
    seen = []
    for s in range(3):                    # 12 rows: every image at least twice
        x, got = batch_fn(s)
        for row, row_ids in zip(x, got):
            (i,) = [k for k in range(5) if np.array_equal(lat[k], row)]
            np.testing.assert_array_equal(
                row_ids, _tokenize(pipe, tok, [captions[i].format(PLACEHOLDER)])[0])
            seen.append(i)
    assert sorted(set(seen)) == list(range(5))
    assert len({tuple(r) for r in ids}) == 5
    templates = ids[:2]

    def old(s):  # train_textual_inversion's batch function before captions, verbatim
        idx = host_slice(stream_indices(len(lat), 4, s, 3))
        which = host_slice(stream_indices(len(templates), 4, s, 3 + 1))
        return lat[idx], templates[which]

    new = ti_train.make_batch_fn(lat, templates, batch_size=4, seed=3)
    for s in range(3):
        for a, b in zip(new(s), old(s)):
            assert a.dtype == b.dtype and np.array_equal(a, b)
    imgs = np.zeros((5, 16, 16, 3), np.uint8)
    kw = dict(placeholder=PLACEHOLDER, initializer_token="a", steps=1, batch_size=1, lr=1e-3)
    for bad, message in ((dict(captions=captions[:2]), "^captions: 2 captions for 5 instance "
                          "images; give a sequence of one template per image.$"),
                         (dict(captions="a {}"), "^captions: a string for 5"),
                         (dict(captions=captions, templates=["a {}"]), "not both"),
                         (dict(captions=["a {}"] * 4 + ["x"]), "captions must be")):
        with pytest.raises(ValueError, match=message):
            ti_train.train_textual_inversion(pipe, params, imgs, str(tmp_path / "w"), **bad, **kw)
    assert not (tmp_path / "w").exists()


def test_masked_loss_weights_each_row_by_its_own_mask(sd, tmp_path):
    """``instance_masks`` + ``mask_weight``: each batch row carries 1 + w x its own image's
    mask coverage (the image found by the latent's content), the loss with unit weights is
    the plain loss, and bad masks / weights are one-line errors before anything is
    written."""
    pipe, params = _with_micro_unet(*sd[1:])
    rng = np.random.default_rng(2)
    masks = rng.random((5, 8, 8)) < 0.5
    lat = rng.normal(size=(5, 2, 2, 4)).astype(np.float32)
    weights = mask_loss_weights(masks, 3.0, np.zeros((5, 8, 8, 3)), factor=4)
    want = 1.0 + 3.0 * masks.reshape(5, 2, 4, 2, 4).mean(axis=(2, 4))[..., None]
    np.testing.assert_allclose(weights, want, rtol=1e-6)
    tok = ti.add_tokens(pipe.tokenizer, PLACEHOLDER, N)
    ids = _tokenize(pipe, tok, ["a <cat-toy>"] * 5)
    batch_fn = ti_train.make_batch_fn(lat, ids, batch_size=4, seed=1, paired=True,
                                      weights=weights)
    for s in range(3):
        x, _, w = batch_fn(s)
        for row, row_w in zip(x, w):
            (i,) = [k for k in range(5) if np.array_equal(lat[k], row)]
            np.testing.assert_array_equal(row_w, weights[i])
    loss = jax.jit(make_ti_loss(pipe, params))
    rows, key = ti.init_embeddings(params, tok, "a", N), jax.random.key(0)
    x, i, w = (jnp.asarray(a) for a in batch_fn(0))
    plain = float(loss(rows, (x, i), key))
    np.testing.assert_allclose(float(loss(rows, (x, i, jnp.ones_like(w)), key)), plain,
                               rtol=1e-6)
    assert abs(float(loss(rows, (x, i, w), key)) - plain) > 1e-6 * plain
    imgs = np.zeros((5, 16, 16, 3), np.uint8)
    kw = dict(placeholder=PLACEHOLDER, initializer_token="a", steps=1, batch_size=1, lr=1e-3)
    for bad, message in ((dict(mask_weight=2.0), "^mask_weight > 0 needs instance_masks"),
                         (dict(mask_weight=-1.0), "^mask_weight must be >= 0"),
                         (dict(mask_weight=2.0, instance_masks=np.ones((4, 16, 16))),
                          r"^instance_masks: shape \(4, 16, 16\) does not match")):
        with pytest.raises(ValueError, match=message):
            ti_train.train_textual_inversion(pipe, params, imgs, str(tmp_path / "w"), **bad, **kw)
    assert not (tmp_path / "w").exists()


def test_train_guidance_fits_the_guided_prediction(sd):
    """``train_guidance=g``: the loss is ||u + g (c - u) - target||^2 with u the prediction
    for the empty prompt, written out here from the DDPM forward process; g = 1 is the
    plain loss."""
    from jaxdiff import schedules
    from jaxdiff.denoiser import denoise
    pipe, params = _with_micro_unet(*sd[1:])
    tok = ti.add_tokens(pipe.tokenizer, PLACEHOLDER, N)
    rows = ti.init_embeddings(params, tok, "a", N) + 0.3
    ids = jnp.asarray(_tokenize(pipe, tok, ["a <cat-toy> x", "<cat-toy> b"]))
    empty = jnp.asarray(_tokenize(pipe, tok, [""]))
    x0 = jnp.asarray(np.random.default_rng(2).normal(size=(2, 4, 4, 4)), jnp.float32)
    rng = jax.random.key(3)
    k_t, k_n = jax.random.split(rng)
    alphas = jnp.asarray(schedules.alphas_cumprod(pipe.scheduler), jnp.float32)
    t = jax.random.randint(k_t, (2,), 0, alphas.shape[0])
    noise = jax.random.normal(k_n, x0.shape)
    a = alphas[t][:, None, None, None]
    x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise
    assert pipe.scheduler.prediction_type == "epsilon"
    c = denoise(pipe, params["unet"], x_t, t, ti.encode_text(pipe, params, rows, ids))
    u = denoise(pipe, params["unet"], x_t, t,
                ti.encode_text(pipe, params, rows, jnp.concatenate([empty] * 2)))
    for g in (1.0, 3.0):
        got = make_ti_loss(pipe, params, train_guidance=g, uncond_ids=empty)(rows, (x0, ids),
                                                                            rng)
        want = jnp.mean((u + g * (c - u) - noise) ** 2)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    plain = make_ti_loss(pipe, params)(rows, (x0, ids), rng)
    np.testing.assert_allclose(float(plain), float(jnp.mean((c - noise) ** 2)), rtol=1e-5)
    with pytest.raises(ValueError, match="needs uncond_ids"):
        make_ti_loss(pipe, params, train_guidance=2.0)
