"""One denoiser interface (issue #18, point 1): a Pipeline whose denoiser is a PixArt-style
text DiT (the shipped model's CLIP text encoder, VAE and tokenizer around a tiny random
``PixArtTransformer2DModel``) generates, inverts, edits with Prompt-to-Prompt and trains
through ``denoiser.denoise``, like a U-Net pipeline.

Truth: a hand-written guided DDIM loop calling the PixArt module directly; the image
latents an inversion started from; an identity edit vs a word swap with the controller
on and off; the loss before and after a few optimizer steps.
"""
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdiff
from jaxdiff import denoiser
from jaxdiff.adapters.lora import init_lora, merge_lora
from jaxdiff.editing import inversion as inv
from jaxdiff.editing import p2p_pipeline as pp
from jaxdiff.editing import prompt_to_prompt as p2p
from jaxdiff.editing.batch_inputs import unet_denoiser
from jaxdiff.gligen_sampling import generate_gligen
from jaxdiff.samplers import make_sampler
from jaxdiff.samplers.ddim import ddim_tables
from jaxdiff.training.dreambooth import make_dreambooth_loss
from jaxdiff.training.text_to_image import diffusion_loss
from text_dit import optimise, tiny_text_dit

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def dit(embedded):
    """(pipe, params): the shipped pipeline with its U-Net swapped for a tiny text DiT
    (``text_dit.tiny_text_dit``: learned sigma, output layer scaled by 0.1)."""
    return tiny_text_dit(*embedded)


def _hand_loop(pipe, params, noise, scale, steps):
    """Guided DDIM calling the PixArt module directly (no ``denoise``, no ``cfg``), with
    the tokenizer's own attention mask as ``encoder_attention_mask`` (PixArtAlphaPipeline)."""
    s = make_sampler("ddim", pipe.scheduler, steps)
    tok = pipe.tokenizer(PROMPTS + ["", ""], padding="max_length", max_length=pipe.max_length,
                         truncation=True, return_tensors="np")
    ctx = pipe.text_encoder.apply({"params": params["text_encoder"]}, tok.input_ids)
    order = np.array([2, 3, 0, 1])  # [uncond; cond]
    ctx, mask = ctx[order], jnp.asarray(tok.attention_mask[order], jnp.float32)
    assert 0 < mask.sum() < mask.size  # padding is masked out
    state = s.init(jnp.asarray(noise) * s.init_noise_sigma)
    net = jax.jit(pipe.unet.apply)
    for i in range(steps):
        x = s.model_input(state, i)
        out = net({"params": params["unet"]}, jnp.concatenate([x, x]), s.timesteps[i],
                  ctx, None, None, mask)[..., :4]
        u, c = out[:2], out[2:]
        state = s.step(state, i, u + scale * (c - u), jnp.zeros_like(x))
    return np.asarray(s.latents(state))


def test_generate_equals_hand_loop_and_sweeps(dit):
    pipe, params = dit
    noise = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    got = jaxdiff.generate(pipe, params, PROMPTS, sampler="ddim", steps=4,
                           guidance_scale=[1.0, 4.0], latents=noise, output="latents")
    assert got.shape == (2, 2, 8, 8, 4)
    for k, scale in enumerate((1.0, 4.0)):
        want = _hand_loop(pipe, params, noise, scale, 4)
        np.testing.assert_allclose(got[k], want, atol=2e-4, rtol=0)
    assert np.abs(got[1] - got[0]).max() > 1e-2  # the traced scale really acts


@functools.partial(jax.jit, static_argnums=(0, 3))
def _invert_and_sample(pipe, params, z0, steps, ids):
    den = unet_denoiser(pipe, params)
    tab = ddim_tables(pipe.scheduler, steps)
    cond = pipe.encode_text(params, ids)
    traj = inv.ddim_invert(den, tab, z0, cond, pipe.scheduler.prediction_type)
    nulls = inv.negative_prompt_nulls(cond, steps)  # guidance 1: the cond branch only
    return traj, inv.ddim_sample(den, tab, traj[-1], cond, nulls, 1.0,
                                 pipe.scheduler.prediction_type)


def test_ddim_inversion_reconstructs(dit):
    """Invert to z_T and sample back (guidance 1) at 50 steps: back within 0.1 (measured
    0.08; first order, so 0.35 at 10 steps, and > 1 for a mismatched t or sign)."""
    pipe, params = dit
    z0 = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
    traj, rec = _invert_and_sample(pipe, params, z0, 50, pipe.tokenize(PROMPTS))
    assert float(jnp.abs(traj[-1] - z0).mean()) > 0.5  # a real trip to noise
    err = float(jnp.abs(rec - z0).max())
    assert err < 0.1, err


@functools.partial(jax.jit, static_argnums=(0,))
def _p2p_latents(pipe, params, z0, ids, control):
    out, taken = pp.edit_latents(pipe, params, z0, ids[0:1], ids[1:2], ids[2:3],
                                 jnp.arange(1), control, None, jnp.float32(5.0), steps=4,
                                 inversion="null_text", num_inner_steps=3)
    return out.source, out.target, taken


def test_null_text_p2p_on_the_text_dit(dit):
    """Identity edit (target = source) == the reconstruction (null-text retraces the
    inversion). With target = source the target branch can only leave the source branch
    through the controller, so reweighting "red" to 0 (cross-attention column zeroed in
    the transformer's ``attn2``) moving it shows the controller acts inside the DiT; the
    same program (the controller is traced data) runs both. Run without the caption
    mask: with it the empty prompt leaves null-text only its BOS and EOS embeddings to
    move, and 3 inner steps come back to 0.45 mean distance (0.22 at 10; unmasked: 0.11 /
    0.075)."""
    pipe, params = dit
    pipe = dataclasses.replace(pipe, caption_mask=False)
    z0 = jax.random.normal(jax.random.key(2), (1, 8, 8, 4))
    src = "a red circle"
    ids = pipe.tokenize([src, src, ""])
    same = p2p.make_control(pipe, [src], [src], 4)
    rec, edit, taken = _p2p_latents(pipe, params, z0, ids, same)
    np.testing.assert_allclose(np.asarray(edit), np.asarray(rec), atol=1e-5)
    assert float(jnp.abs(rec - z0).mean()) < 0.15  # back from z_T (mean distance ~0.75)
    assert int(np.asarray(taken).sum()) > 0  # null-text optimisation ran
    drop = p2p.make_control(pipe, [src], [src], 4, mode="reweight", reweight={"red": 0.0})
    rec2, moved, _ = _p2p_latents(pipe, params, z0, ids, drop)
    np.testing.assert_array_equal(np.asarray(rec2), np.asarray(rec))  # source untouched
    assert float(jnp.abs(moved - rec).mean()) > 1e-2


def _descends(loss, params, batch, steps=5, lr=1e-2):
    """(loss before, loss after ``steps`` Adam steps) on a fixed batch and rng."""
    # steps + 1 calls: the last one only reads the loss.
    vals, _ = optimise(loss, params, batch, optax.adam(lr), steps + 1)
    return vals[0], vals[-1]


def test_train_steps_lower_the_loss(dit):
    """Text-to-image (``diffusion_loss``, denoiser trained) and DreamBooth-LoRA (prior
    preservation; LoRA factors on the transformer's attention) on the text DiT."""
    pipe, params = dit
    batch = (jax.random.normal(jax.random.key(3), (2, 8, 8, 4)), pipe.tokenize(PROMPTS))
    t2i = diffusion_loss(pipe, params["text_encoder"], pipe.tokenize([""])[0],
                         caption_dropout=0.0)
    before, after = _descends(t2i, {"unet": params["unet"]}, batch)
    assert after < 0.9 * before, (before, after)
    lora = init_lora(params, 2, key=jax.random.key(4))
    assert lora["unet"]  # the transformer's to_q/k/v/out are targets
    db = make_dreambooth_loss(pipe, lambda tr: merge_lora(params, tr, 1.0),
                              train_text_encoder=True, prior_preservation=True)
    ids = pipe.tokenize(PROMPTS)
    db_batch = dict(instance_latents=batch[0][:1], instance_text=ids[:1],
                    class_latents=batch[0][1:], class_text=ids[1:],
                    prior_weight=jnp.ones((1,)))
    before, after = _descends(lambda p, b, r: db(p, db_batch, r), lora, None, lr=5e-2)
    assert after < 0.97 * before, (before, after)
    merged = merge_lora(params, lora, 1.0)
    assert jax.tree.structure(merged) == jax.tree.structure(params)


def test_unet_only_inputs_are_refused(dit):
    pipe, params = dit
    with pytest.raises(ValueError, match="U-Net only"):
        denoiser.denoise(pipe, params["unet"], jnp.zeros((1, 8, 8, 4)), 1.0, jnp.zeros((1, 16, 64)),
                   mid_block_additional_residual=jnp.zeros(1))
    with pytest.raises(ValueError, match="remat=True is U-Net only"):
        diffusion_loss(pipe, params["text_encoder"], None, remat=True)
    with pytest.raises(ValueError, match="GLIGEN UNet.*PixArtTransformer2DModel"):
        generate_gligen(pipe, params, ["a red circle"], [["a red circle"]], [[(0, 0, 1, 1)]])


def test_save_load_round_trip(dit, tmp_path):
    """Saved with ``transformer/`` in place of ``unet/``; loads back to the same pipeline
    (here one without the caption mask: ``"_caption_mask": false`` in model_index.json)."""
    pipe, params = dit
    pipe = dataclasses.replace(pipe, caption_mask=False)
    out = jaxdiff.save_pipeline(pipe, params, str(tmp_path / "dit"))
    assert (tmp_path / "dit" / "transformer" / "config.json").exists()
    assert not (tmp_path / "dit" / "unet").exists()
    index = json.loads((tmp_path / "dit" / "model_index.json").read_text())
    assert index["_caption_mask"] is False
    back, bparams = jaxdiff.load_pipeline(out)
    assert back.is_transformer and back.unet.config == pipe.unet.config
    assert not back.caption_mask and not back.uses_caption_mask
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(bparams)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(params) == jax.tree.structure(bparams)


def test_dispatch_survives_the_progress_wrapper(dit):
    """The web app wraps ``pipe.unet`` (``app.progress.with_progress``): ``denoise`` still
    calls it the transformer's way (the noise half of the 8-channel learned-sigma output;
    traced only, no compile)."""
    from jaxdiff.app.progress import with_progress
    pipe, params = dit
    wrapped = with_progress(pipe)
    assert wrapped.is_transformer and wrapped.unet is not pipe.unet
    x, ctx = jnp.ones((1, 8, 8, 4)), jnp.full((1, 16, 64), 0.1)
    full = jax.eval_shape(lambda: pipe.unet.apply({"params": params["unet"]}, x, 500.0, ctx))
    out = jax.eval_shape(lambda: denoiser.denoise(wrapped, params["unet"], x, 500.0, ctx))
    assert full.shape == (1, 8, 8, 8) and out.shape == (1, 8, 8, 4)
