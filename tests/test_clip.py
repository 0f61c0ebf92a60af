"""CLIP: parity with transformers, transformers-layout round trip, contrastive training (and
the recipe's init_from), and the shipped shapes CLIP's zero-shot colour accuracy."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.data.shapes import held_out_examples, world
from jaxdiff.data.tokenizer import load_tokenizer
from jaxdiff.eval import clip_zero_shot as zs
from jaxdiff.pipeline import from_uint8
from jaxdiff.training import clip as clip_train
from jaxdiff.training import state as state_lib
from jaxdiff.training.optim import adamw_with_warmup
from jaxdiff.training.step import make_train_step
from jaxdiff.weights import DEFAULT_MODEL, clip_format

EOS = 98


@pytest.fixture(scope="module")
def tiny(torch, tmp_path_factory):
    """A tiny random transformers CLIPModel saved to a folder, its inputs and outputs."""
    from transformers import CLIPConfig, CLIPModel
    cfg = CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37,
                         num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=16, eos_token_id=EOS),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4, image_size=16, patch_size=4,
                           hidden_act="gelu"),
        projection_dim=24)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():
        model.logit_scale.fill_(1.3)
    folder = str(tmp_path_factory.mktemp("clip_tiny"))
    model.save_pretrained(folder)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, EOS - 1, (3, 16))
    ids[:, 9] = EOS
    ids[1, 4] = EOS  # pooled at the first eos
    pix = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids),
                    pixel_values=torch.tensor(pix.transpose(0, 3, 1, 2)))
    ref = {k: getattr(out, k).numpy() for k in ("logits_per_image", "text_embeds",
                                                "image_embeds")}
    return dict(folder=folder, model=model, ids=ids, pix=pix, ref=ref, torch=torch)


def _ours(clip, params, ids, pix):
    out = jax.jit(clip.model.apply)({"params": params["model"]}, jnp.asarray(ids, jnp.int32),
                                    jnp.asarray(pix))
    return {k: np.asarray(v) for k, v in out.items()}


def test_clip_model_matches_transformers(tiny):
    clip, params = clip_format.load_clip(tiny["folder"])
    ours = _ours(clip, params, tiny["ids"], tiny["pix"])
    for key, ref in tiny["ref"].items():
        np.testing.assert_allclose(ours[key], ref, atol=1e-4, rtol=0, err_msg=key)


def test_vision_model_with_projection_matches_transformers(tiny):
    from transformers import CLIPVisionModelWithProjection
    torch = tiny["torch"]
    ref = CLIPVisionModelWithProjection(tiny["model"].config.vision_config).eval()
    raw = dict(ref.config.to_dict(), model_type="clip_vision_model")
    module = clip_format.clip_module(raw)
    params = clip_format.params_from_torch(
        module, {k: v.numpy() for k, v in ref.state_dict().items()}, "state")
    embeds, last = module.apply({"params": params}, jnp.asarray(tiny["pix"]))
    with torch.no_grad():
        out = ref(pixel_values=torch.tensor(tiny["pix"].transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(np.asarray(embeds), out.image_embeds.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(last), out.last_hidden_state.numpy(), atol=1e-4)


def test_saved_clip_loads_in_transformers_with_same_embeddings(tiny, tmp_path):
    from transformers import CLIPModel
    torch = tiny["torch"]
    clip, params = clip_format.load_clip(tiny["folder"])
    params["model"]["logit_scale"] = jnp.asarray(2.0)  # a value of ours survives the trip
    clip_format.save_clip(clip, params, str(tmp_path / "out"))
    back = CLIPModel.from_pretrained(str(tmp_path / "out")).eval()
    with torch.no_grad():
        out = back(input_ids=torch.tensor(tiny["ids"]),
                   pixel_values=torch.tensor(tiny["pix"].transpose(0, 3, 1, 2)))
    ours = _ours(clip, params, tiny["ids"], tiny["pix"])
    assert float(back.logit_scale.detach()) == pytest.approx(2.0)
    for key in ("logits_per_image", "text_embeds", "image_embeds"):
        np.testing.assert_allclose(getattr(out, key).numpy(), ours[key], atol=1e-4, err_msg=key)
    _, params2 = clip_format.load_clip(str(tmp_path / "out"))
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), params, params2))


def test_clip_loss_is_symmetric_infonce():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 4)), jnp.float32)
    def ce(lg):
        return float(np.mean(-np.diag(np.asarray(jax.nn.log_softmax(lg, axis=-1)))))
    expected = 0.5 * (ce(logits) + ce(logits.T))
    assert float(clip_train.clip_loss(logits)) == pytest.approx(expected, rel=1e-6)
    # Rows 0 and 1 share a caption: each is a positive of the other.
    same = jnp.asarray(np.eye(4, dtype=bool) | np.pad(np.ones((2, 2), bool), ((0, 2), (0, 2))))
    half = np.where(np.asarray(same), 1.0, 0.0) / np.asarray(same).sum(1, keepdims=True)
    lp, lpt = jax.nn.log_softmax(logits, -1), jax.nn.log_softmax(logits.T, -1)
    expected = 0.5 * (-(half * lp).sum(1).mean() - (half.T * lpt).sum(1).mean())
    assert float(clip_train.clip_loss(logits, same)) == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("noisy", [False, True])
def test_a_few_train_steps_lower_the_loss(noisy):
    """Tiny CLIP (the ``tiny`` config's sizes), 12 steps on one batch of 16 world scenes;
    the noise-aware variant reads 8x8x4 inputs with timesteps."""
    tok = load_tokenizer(os.path.join(DEFAULT_MODEL, "tokenizer"))
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    vision = dict(text, image_size=8 if noisy else 32, patch_size=2 if noisy else 8,
                  num_channels=4 if noisy else 3)
    clip = clip_train.build_clip(tok, text, vision, 16, noisy, {"num_train_timesteps": 1000})
    examples = held_out_examples(world("v2"), 16)
    if noisy:
        x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 8, 8, 4)), jnp.float32)
        acp = jnp.linspace(0.99, 0.01, 1000)
    else:
        x, acp = from_uint8(np.stack([e["image"] for e in examples])), None
    ids = jnp.asarray(clip.tokenize([e["caption"] for e in examples]))
    opt = adamw_with_warmup(3e-3, 0, 100)
    init = clip_train.init_params(clip)
    state = state_lib.create(jax.tree.map(jnp.array, init), opt, ema=False)
    step = jax.jit(make_train_step(clip_train.make_loss_fn(clip, acp), opt))
    losses = []
    for _ in range(12):
        state, metrics = step(state, (x, ids))
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    if noisy:
        moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), init["time_embedding"],
                             state.params["time_embedding"])
        assert jax.tree.all(moved)  # the timestep input is trained too


def test_noised_latent_features_follow_the_forward_process():
    """A tiny random noise-aware CLIP: the features at timestep t are its embedding of
    sqrt(abar_t) x + sqrt(1 - abar_t) n with n drawn from the seed, at that timestep; a
    clean CLIP and a feature count that does not match the examples are refused."""
    tok = load_tokenizer(os.path.join(DEFAULT_MODEL, "tokenizer"))
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    vision = dict(text, image_size=8, patch_size=2, num_channels=4)
    clip = clip_train.build_clip(tok, text, vision, 16, True, {"num_train_timesteps": 1000})
    params = clip_train.init_params(clip)
    lat = np.random.default_rng(1).normal(size=(3, 8, 8, 4)).astype(np.float32)
    acp = np.linspace(0.999, 0.01, 1000).astype(np.float32)
    got = zs.noised_latent_features(clip, params, lat, 600, acp, seed=4, chunk=2)
    n = jax.random.normal(jax.random.key(4), lat.shape)
    x = np.sqrt(acp[600]) * lat + np.sqrt(1.0 - acp[600]) * n
    want = clip.image_embeds(params, jnp.asarray(x), jnp.full((3,), 600))
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(got - zs.noised_latent_features(clip, params, lat, 100, acp, seed=4)).max() \
        > 1e-3    # the timestep matters
    clean = clip_train.build_clip(tok, text, dict(vision, num_channels=3), 16, False, None)
    with pytest.raises(ValueError, match="noise-aware"):
        zs.noised_latent_features(clean, clip_train.init_params(clean), lat, 0, acp)
    examples = held_out_examples(world("v2"), 4, num_objects=1)
    with pytest.raises(ValueError, match="3 feature rows for 4 examples"):
        zs.attribute_accuracy(clip, params, examples, world("v2"), features=got)


@pytest.mark.slow
def test_shipped_clip_zero_shot_colour_far_above_chance():
    clip, params = clip_format.load_clip(clip_format.SHAPES_CLIP)
    spec = world("v2")
    scores = zs.attribute_accuracy(clip, params, held_out_examples(spec, 64, num_objects=1),
                                   spec)
    assert scores["num_colour"] >= 50
    assert scores["colour_accuracy"] >= 0.8    # chance 0.125; measured 1.000 of 475 (bench/README)
    assert scores["shape_accuracy"] >= 0.4     # chance 0.2; measured 0.970 on 500


def test_clip_guidance_gradient_matches_finite_differences():
    """SDG on the predicted x0 (stub denoiser and decoder, tiny random CLIP): the guidance
    gradient is the similarity's derivative, and scale 0 leaves the denoiser unchanged."""
    from jaxdiff import clip_guidance as cg
    from jaxdiff.guidance import classifier_grad
    tok = load_tokenizer(os.path.join(DEFAULT_MODEL, "tokenizer"))
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    clip = clip_train.build_clip(tok, text, dict(text, image_size=8, patch_size=2), 16)
    clip_params = clip_train.init_params(clip)
    target = cg.text_target(clip, clip_params, jnp.asarray(clip.tokenize(["a red circle"] * 2)))
    acp = jnp.linspace(0.999, 0.01, 1000)
    denoise = lambda x, t: 0.3 * x + 0.01 * t[:, None, None, None]
    decode = lambda z: jnp.tanh(jax.image.resize(z[..., :3], (z.shape[0], 8, 8, 3), "linear"))
    log_p = jax.jit(cg.similarity_x0(clip, clip_params, target, denoise, decode, acp,
                                     "epsilon"))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, 4)), jnp.float32)
    t = jnp.array([100, 50])
    g = jax.jit(classifier_grad(log_p))(x, t)
    # Along the gradient's own direction (most signal over float32 round-off) the central
    # difference must give its norm: a gradient off in size or direction fails.
    norm = jnp.sqrt(jnp.sum(g ** 2, axis=(1, 2, 3)))
    v = g / norm[:, None, None, None]
    h = 1e-2
    fd = (log_p(x + h * v, t) - log_p(x - h * v, t)) / (2 * h)
    np.testing.assert_allclose(np.asarray(fd), np.asarray(norm), rtol=1e-2)
    guided = cg.clip_guided(lambda x_, t_, c_: denoise(x_, t_), log_p, 0.0, acp)
    np.testing.assert_array_equal(np.asarray(guided(x, t, None)), np.asarray(denoise(x, t)))
    moved = cg.clip_guided(lambda x_, t_, c_: denoise(x_, t_), log_p, 5.0, acp)(x, t, None)
    a = acp[t][:, None, None, None]
    np.testing.assert_allclose(np.asarray(moved),
                               np.asarray(denoise(x, t) - 5.0 * jnp.sqrt(1 - a) * g),
                               rtol=1e-5, atol=1e-6)


def test_shifted_views_average_the_similarity_of_translated_images():
    """``views``: the similarity is the mean over the image and its translations by
    r = H // 16 px (edge pixels repeated), each view built here by index arithmetic;
    views = 1 is the image alone; views > 1 is mode x0 only (one-line error)."""
    from jaxdiff import clip_guidance as cg
    img = jnp.asarray(np.random.default_rng(5).normal(size=(2, 32, 32, 3)), jnp.float32)
    got = np.asarray(cg.shifted_views(img, 5)).reshape(5, 2, 32, 32, 3)
    np.testing.assert_array_equal(got[0], img)
    clamp = lambda i: np.clip(np.arange(32) + i, 0, 31)
    for view, (dy, dx) in zip(got[1:], ((0, 2), (2, 0), (0, -2), (-2, 0))):
        np.testing.assert_array_equal(view, np.asarray(img)[:, clamp(dy)][:, :, clamp(dx)])
    assert cg.shifted_views(img, 1) is img
    tok = load_tokenizer(os.path.join(DEFAULT_MODEL, "tokenizer"))
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    clip = clip_train.build_clip(tok, text, dict(text, image_size=8, patch_size=2), 16)
    clip_params = clip_train.init_params(clip)
    target = cg.text_target(clip, clip_params, jnp.asarray(clip.tokenize(["a red circle"] * 2)))
    decode = lambda z: jnp.tanh(z[..., :3])
    x, t = jnp.asarray(np.random.default_rng(6).normal(size=(2, 8, 8, 4)), jnp.float32), \
        jnp.array([10, 20])
    sim = lambda v: cg.similarity_x0(clip, clip_params, target, lambda x_, t_: x_, decode,
                                     jnp.linspace(0.999, 0.01, 1000), "sample", v)(x, t)
    one = lambda image: jnp.sum(clip.image_embeds(clip_params, image) * target, axis=-1)
    views = cg.shifted_views(decode(x), 3).reshape(3, 2, 8, 8, 3)
    np.testing.assert_allclose(np.asarray(sim(3)), np.mean([one(v) for v in views], axis=0),
                               rtol=1e-5)
    np.testing.assert_allclose(np.asarray(sim(1)), np.asarray(one(decode(x))), rtol=1e-6)
    import jaxdiff
    pipe, params = jaxdiff.load_pipeline(None)
    with pytest.raises(ValueError, match="^views=2: needs an integer >= 1, and > 1 only in "
                       "mode 'x0'"):
        cg.generate_clip_guided(pipe, params, clip, clip_params, texts="a", mode="xt",
                                views=2)


def test_candidates_keep_the_sample_the_clip_finds_most_similar():
    """``candidates=N``: target i's N guided samples are the plain run's samples i * N + j
    (the targets repeated N times), and the one kept is the argmax of the CLIP similarity
    of its decoded image to the target, recomputed here; N > 1 needs a clean CLIP."""
    import jaxdiff
    from jaxdiff import clip_guidance as cg
    pipe, params = jaxdiff.load_pipeline(None)
    tok = load_tokenizer(os.path.join(DEFAULT_MODEL, "tokenizer"))
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    clip = clip_train.build_clip(tok, text, dict(text, image_size=8, patch_size=2), 16)
    clip_params = clip_train.init_params(clip, seed=3)
    texts, n = ["a red circle", "a blue square"], 3
    kw = dict(clip_scale=1.0, steps=2, normalize=True, output="latents", seed=4)
    best = cg.generate_clip_guided(pipe, params, clip, clip_params, texts=texts,
                                   candidates=n, **kw)
    each = cg.generate_clip_guided(pipe, params, clip, clip_params,
                                   texts=[t for t in texts for _ in range(n)], **kw)
    images = pipe.decode_latents(params, jnp.asarray(each))
    target = cg.text_target(clip, clip_params, jnp.asarray(clip.tokenize(texts)))
    sim = np.asarray(jnp.sum(clip.image_embeds(clip_params, cg._fit(clip, images))
                             .reshape(2, n, -1) * target[:, None], axis=-1))
    assert np.all(np.abs(np.sort(sim, -1)[:, -1] - np.sort(sim, -1)[:, -2]) > 1e-6)
    pick = np.asarray(each).reshape((2, n) + each.shape[1:])[np.arange(2), sim.argmax(-1)]
    np.testing.assert_allclose(best, pick, atol=1e-5)
    assert sim.argmax(-1).any()  # not merely the first candidate
    assert not np.allclose(each[0], each[1])  # the candidates differ
    with pytest.raises(ValueError, match="^candidates=0: needs an integer >= 1"):
        cg.generate_clip_guided(pipe, params, clip, clip_params, texts="a", candidates=0)


def test_normalized_gradient_and_ddim_renoise_are_exact():
    """``unit_rms``: each sample's gradient keeps its direction at RMS 1, and a normalized
    ``clip_guided`` moves the output by ``scale * sqrt(1 - abar)`` of it; ``ddim_renoise``
    is the forward process from the next level: data x0 = c with x_next = sqrt(a') c +
    sqrt(1 - a') e comes back as mean sqrt(a) c and variance 1 - a (analytic)."""
    from jaxdiff import clip_guidance as cg
    from jaxdiff import schedules
    from jaxdiff.samplers.ddim import ddim_tables
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 4, 4)), jnp.float32)
    grad = lambda x_, t_: x_ * jnp.asarray([1e-4, 30.0])[:, None, None, None]
    g = cg.unit_rms(grad)(x, None)
    np.testing.assert_allclose(np.sqrt(np.mean(np.square(g), axis=(1, 2, 3))), 1.0, rtol=1e-5)
    cos = np.sum(np.asarray(g) * np.asarray(x), axis=(1, 2, 3)) / np.sqrt(
        np.sum(np.square(g), axis=(1, 2, 3)) * np.sum(np.square(x), axis=(1, 2, 3)))
    np.testing.assert_allclose(cos, 1.0, rtol=1e-5)
    acp = jnp.linspace(0.999, 0.01, 1000)
    log_p = lambda x_, t_: jnp.sum(x_ ** 2, axis=(1, 2, 3)) * jnp.asarray([1e-4, 30.0]) / 2
    moved = cg.clip_guided(lambda x_, t_, c_: 0.5 * x_, log_p, 2.0, acp, normalize=True)(
        x, jnp.array([100, 500]), None)
    a = acp[jnp.array([100, 500])][:, None, None, None]
    np.testing.assert_allclose(np.asarray(moved), np.asarray(0.5 * x - 2.0 * jnp.sqrt(1 - a) * g),
                               rtol=1e-5, atol=1e-6)
    cfg = schedules.SchedulerConfig()
    tables, renoise = ddim_tables(cfg, 10), cg.ddim_renoise(cfg, 10)
    rng = np.random.default_rng(2)
    c = 0.7
    for i in (0, 4, 9):
        a_t, a_next = float(tables.alpha[i]), float(tables.alpha_prev[i])
        x_next = np.sqrt(a_next) * c + np.sqrt(1 - a_next) * rng.standard_normal(200_000)
        back = np.asarray(renoise(jnp.asarray(x_next, jnp.float32), i,
                                  jnp.asarray(rng.standard_normal(200_000), jnp.float32)))
        assert abs(back.mean() - np.sqrt(a_t) * c) < 0.01
        assert abs(back.var() - (1 - a_t)) < 0.01 * max(1 - a_t, 0.1)


def test_backward_guidance_moves_the_predicted_x0_along_the_score():
    """``backward_guided`` (universal guidance's backward step) with the score
    -|z - c|^2 / 2: its unit-RMS ascent points straight at c, so k steps of size h move the
    predicted z0 by k h (c - z0) / rms(c - z0) (analytic while short of c); the output,
    for each prediction type, predicts exactly that z0 at the same x_t, and size 0 leaves
    the denoiser's output as it was."""
    from jaxdiff import clip_guidance as cg
    from jaxdiff.samplers.base import x0_eps_vp
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(2, 4, 4, 4)), jnp.float32)
    c = jnp.asarray(rng.normal(size=(2, 4, 4, 4)) * 3, jnp.float32)
    acp = jnp.linspace(0.999, 0.01, 1000)
    t = jnp.array([100, 700])
    a = acp[t][:, None, None, None]
    score = lambda z: -0.5 * jnp.sum((z - c) ** 2, axis=(1, 2, 3))
    for pt in ("epsilon", "v_prediction", "sample"):
        denoise = lambda x_, t_, c_: 0.3 * x_ + 0.1
        to_x0 = x0_eps_vp(pt)
        z0, _ = to_x0(denoise(x, t, None), x, jnp.sqrt(a), jnp.sqrt(1 - a))
        d = c - z0
        want = z0 + 3 * 0.2 * d / jnp.sqrt(jnp.mean(d ** 2, axis=(1, 2, 3), keepdims=True))
        out = cg.backward_guided(denoise, score, 3, 0.2, acp, pt)(x, t, None)
        got, _ = to_x0(out, x, jnp.sqrt(a), jnp.sqrt(1 - a))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4,
                                   err_msg=pt)
        same = cg.backward_guided(denoise, score, 3, 0.0, acp, pt)(x, t, None)
        np.testing.assert_allclose(np.asarray(same), np.asarray(denoise(x, t, None)),
                                   rtol=1e-6, atol=1e-6, err_msg=pt)


def test_self_recurrence_renoises_to_each_steps_level():
    """Self-recurrence with the exact denoiser of point-mass data x0 = m: every one of the
    steps x rounds calls sees x_t = sqrt(abar_t) m + sqrt(1 - abar_t) z with z ~ N(0, 1)
    (analytic for correctly re-noised states; a wrong level gives another variance), and
    the result is m, as without recurrence."""
    from jaxdiff import clip_guidance as cg
    from jaxdiff import schedules
    from jaxdiff.guided_sampling import scan_sampler
    from jaxdiff.samplers import make_sampler
    cfg, steps, m = schedules.SchedulerConfig(), 6, 0.8
    acp = jnp.asarray(schedules.alphas_cumprod(cfg), jnp.float32)
    seen = []

    def denoise(x, t, _):
        a = acp[t]
        z = (x - jnp.sqrt(a) * m) / jnp.sqrt(1 - a)
        jax.debug.callback(lambda v: seen.append(float(v)), jnp.var(z))
        return z

    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3), i))(jnp.arange(256))
    noise = jax.random.normal(jax.random.key(4), (256, 8, 8, 4))
    sampler = make_sampler("ddim", cfg, steps)
    out = jax.jit(lambda n: scan_sampler(sampler, denoise, n, keys, None, 3,
                                         cg.ddim_renoise(cfg, steps)))(noise)
    assert len(seen) == 3 * steps
    np.testing.assert_allclose(seen, 1.0, atol=0.02)
    np.testing.assert_allclose(np.asarray(out), m, atol=1e-4)


def test_recipe_init_from_starts_from_the_exported_weights(tmp_path):
    """``config.init_from``: a 0-step run of the ``tiny`` recipe initialised from a saved tiny
    export exports exactly those weights (not its own random init); an export of another
    size is refused."""
    from configs.clip import get_config
    config = get_config("tiny")
    tok = load_tokenizer(os.path.join(DEFAULT_MODEL, "tokenizer"))
    clip = clip_train.build_clip(tok, dict(config.model.text), dict(config.model.vision),
                                 config.model.projection_dim)
    saved = clip_train.init_params(clip, seed=7)
    folder = clip_format.save_clip(clip, saved, str(tmp_path / "start"))
    config.init_from = folder
    config.train.steps = 0
    out = clip_train.run_clip(config, str(tmp_path / "run"))
    _, exported = clip_format.load_clip(out)
    jax.tree.map(np.testing.assert_array_equal, exported, jax.tree.map(np.asarray, saved))
    fresh = clip_train.init_params(clip, seed=config.seed)
    assert not np.array_equal(exported["model"]["text_projection"]["kernel"],
                              fresh["model"]["text_projection"]["kernel"])  # seed 7 != 0
    wider = clip_train.build_clip(tok, dict(config.model.text, hidden_size=32),
                                  dict(config.model.vision), config.model.projection_dim)
    with pytest.raises(ValueError, match="init_from"):
        clip_train.initial_params(wider, 0, folder)
