"""The editing, guidance and personalisation methods run on a text DiT through
``denoiser.denoise`` (issue #18, point 1), on the tiny text-DiT pipeline of
``text_dit.tiny_text_dit``: SDEdit, classifier guidance, CLIP guidance, Textual Inversion
and InstructPix2Pix training through their public entry points (CLIP guidance's x0 mode,
which differentiates through the denoiser, also by its gradient); blended diffusion, ILVR,
RePaint and DiffEdit through their latent-space functions in one program (their public
programs add only the VAE encode / decode and prompt encoding around them, which SDEdit
exercises on the DiT pipeline).

Truth: ``jaxdiff.generate`` from the same noise (SDEdit at strength 1 from the noised
image, as diffusers' img2img; blended diffusion with an all-edit mask and no skipped step;
ILVR with no refined step; classifier and CLIP guidance at scale 0) -- one generate program
serves them all; the source latents where a mask keeps everything (RePaint, DiffEdit,
blended); the loss falling under Adam on the new token rows (Textual Inversion); a central
difference (the CLIP-guidance gradient through the DiT). Two images per call,
with per-image traced settings, so each method compiles once. The caption mask and
micro-conditions a text DiT gets through ``denoise`` are checked against diffusers' PyTorch
``PixArtTransformer2DModel`` called as ``PixArtAlphaPipeline`` calls it.
"""
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdiff
from torchref import models as ref
from jaxdiff import denoiser
from jaxdiff import clip_guidance as cg
from jaxdiff import schedules
from jaxdiff.adapters import textual_inversion as ti
from jaxdiff.editing import batch_inputs
from jaxdiff.editing import blended as bl
from jaxdiff.editing import diffedit as de
from jaxdiff.editing import imagic, unitune
from jaxdiff.editing import ilvr as il
from jaxdiff.editing import instruct_pix2pix as ip_edit
from jaxdiff.editing import repaint as rp
from jaxdiff.editing.sdedit import sdedit
from jaxdiff.guidance import cfg, classifier_grad
from jaxdiff.guided_sampling import generate_guided
from jaxdiff.models.noisy_classifier import NoisyClassifier, NoisyClassifierConfig
from jaxdiff.samplers import make_sampler
from jaxdiff.samplers.base import clip_fn
from jaxdiff.samplers.ddim import ddim_tables
from jaxdiff.sampling import initial_noise, sample_keys
from jaxdiff.training import instruct_pix2pix as ip2p
from jaxdiff.training.clip import build_clip, init_params as init_clip
from jaxdiff.training.textual_inversion import make_ti_loss
from text_dit import optimise, tiny_text_dit

PROMPTS = ["a red circle", "a blue square"]
STEPS, SCALE = 4, 3.0
TOL = 1e-4  # different programs (edit vs generate), float32


@pytest.fixture(scope="module")
def dit(embedded):
    """(pipe, params, images [2, 32, 32, 3], their latents z0 (SDEdit's program at strength
    0: exactly its encoding), N(0, 1) noise of seed 0, ``truth(latents) -> generate's final
    latents`` from those start latents)."""
    pipe, params = tiny_text_dit(*embedded, num_layers=1)  # one block: half the compiles
    size = pipe.image_size
    yy, xx = np.mgrid[:size, :size] / size
    images = np.stack([np.stack([np.sin(4 * xx + k), np.cos(3 * yy - k), xx * yy - 0.5], -1)
                       for k in range(2)]).astype(np.float32)
    noise = initial_noise(sample_keys(0, 2), pipe.latent_shape(size, size))
    z0 = sdedit(pipe, params, images, PROMPTS, strength=0.0, steps=STEPS,
                guidance_scale=SCALE, noise=np.asarray(noise))["latents"]

    def truth(latents):
        return np.asarray(jaxdiff.generate(pipe, params, PROMPTS, steps=STEPS,
                                           guidance_scale=SCALE, latents=np.asarray(latents),
                                           output="latents"))

    return pipe, params, images, jnp.asarray(z0), noise, truth


def test_sdedit(dit):
    """Strength 1 = generation from ``add_noise(z0, noise, t_0)`` (image 0); a small
    strength moves the input only a little (image 1)."""
    pipe, params, images, z0, noise, truth = dit
    out = sdedit(pipe, params, images, PROMPTS, strength=(1.0, 0.3), steps=STEPS,
                 guidance_scale=SCALE, noise=np.asarray(noise))["latents"]
    t0 = schedules.timesteps(pipe.scheduler, STEPS)[0]
    start = schedules.add_noise(schedules.alphas_cumprod(pipe.scheduler), z0, noise, t0)
    np.testing.assert_allclose(out[0], truth(start)[0], atol=TOL, rtol=0)
    assert 1e-3 < np.abs(out[1] - z0[1]).mean() < 0.5 * np.abs(out[0] - z0[0]).mean()


@functools.partial(jax.jit, static_argnums=(0,))
def _masked_methods(pipe, params, z0, noise, ids, neg_ids, keep, keys):
    """Blended diffusion, ILVR, RePaint and DiffEdit in latent space on the text DiT, as
    their public programs run them between the VAE encode and decode (one compile):
    blended with mask ``1 - keep`` from step 0; ILVR refining no step (image 0) / every
    step (image 1); RePaint (jumps of 2) and DiffEdit (automatic mask computed, the given
    ``1 - keep`` used, strength 1) with mask ``1 - keep``."""
    den = batch_inputs.unet_denoiser(pipe, params)
    cond, uncond = pipe.encode_prompts(params, ids, neg_ids, pipe.image_size, pipe.image_size)
    sampler = make_sampler("ddim", pipe.scheduler, STEPS)
    ac = jnp.asarray(schedules.alphas_cumprod(pipe.scheduler), jnp.float32)
    edit = (1.0 - keep)[:, None, None, None] * jnp.ones(z0.shape[:3] + (1,))
    out = {"blended": bl.blended_latents(den, sampler, ac, z0, edit, noise, cond, uncond,
                                         jnp.zeros(2), SCALE, keys)[0]}
    after = il.level_after_step(pipe.scheduler, schedules.timesteps(pipe.scheduler, STEPS,
                                                                   "ddim"), STEPS)
    out["ilvr"] = il.ilvr_latents(den, sampler, after, z0, noise, 2, cond, uncond, SCALE,
                                  jnp.array([0.0, 1.0]), keys)[0]
    tables = rp.repaint_tables(pipe.scheduler, rp.jump_schedule(
        STEPS, 2, 2, pipe.scheduler.num_train_timesteps), STEPS)
    guided = cfg(den, SCALE)
    out["repaint"] = rp.repaint_latents(
        lambda x, t: guided(x, t, (cond, uncond)), tables, z0, edit, noise,
        lambda k: batch_inputs.step_noise(keys, k, z0.shape[1:]), 0.0,
        pipe.scheduler.prediction_type, clip_fn(pipe.scheduler))
    dt, pt = ddim_tables(pipe.scheduler, STEPS), pipe.scheduler.prediction_type
    src = pipe.condition(params, ids[::-1], pipe.image_size, pipe.image_size)
    maps = jnp.stack([noise, noise[::-1]], 1)
    out["mask"], _ = de.diffedit_mask(den, dt, ac, z0, maps, cond, uncond, src, uncond, SCALE,
                                      0.5)
    start, levels = de.partial_invert(den, dt, z0, src, jnp.ones(2), pt)
    out["diffedit"] = de.masked_edit(den, dt, z0, levels, start, edit, cond, uncond, SCALE,
                                     pt)[0]
    return out


def test_masked_methods(dit):
    """Image 0 all-edit, image 1 all-keep. Blended from step 0 and ILVR with no refined
    step = generation from the seed's noise (image 0); ILVR refining every step moves it
    (image 1); all-keep RePaint and DiffEdit return the source latents exactly (image 1),
    all-edit ones regenerate (image 0); blended all-keep ends at the source up to the last
    step's noise level."""
    pipe, params, _, z0, noise, truth = dit
    out = _masked_methods(pipe, params, z0, noise, pipe.tokenize(PROMPTS),
                          pipe.tokenize(["", ""]), jnp.array([0.0, 1.0]), sample_keys(0, 2))
    want = truth(noise)
    np.testing.assert_allclose(out["blended"][0], want[0], atol=TOL, rtol=0)
    np.testing.assert_allclose(out["ilvr"][0], want[0], atol=TOL, rtol=0)
    assert np.abs(out["ilvr"][1] - want[1]).max() > 1e-2
    a_last = schedules.alphas_cumprod(pipe.scheduler)[schedules.timesteps(pipe.scheduler,
                                                                          STEPS)[-1]]
    assert np.abs(out["blended"][1] - z0[1]).max() < 6 * (1 - a_last) ** 0.5 + 1e-3
    for name in ("repaint", "diffedit"):
        np.testing.assert_allclose(out[name][1], z0[1], atol=1e-6, rtol=0)
        assert float(jnp.abs(out[name][0] - z0[0]).mean()) > 0.1, name
    assert np.isin(np.asarray(out["mask"]), [0.0, 1.0]).all()


def test_classifier_guidance(dit):
    """Scale 0 of a [0, s] sweep = generation; scale s moves the samples."""
    pipe, params, _, _, noise, truth = dit
    model = NoisyClassifier(NoisyClassifierConfig(block_out_channels=(8, 16),
                                                  norm_num_groups=4, heads=(("colour", 9),)))
    shapes = jax.eval_shape(model.init, jax.random.key(0), noise, jnp.zeros((2,)))["params"]
    rng = np.random.default_rng(1)  # random weights without compiling an init
    clf = jax.tree.map(lambda a: 0.2 * rng.standard_normal(a.shape).astype(np.float32), shapes)
    out = generate_guided(pipe, params, model, clf, {"colour": [1, 4]}, PROMPTS,
                          classifier_scale=[0.0, 50.0], guidance_scale=SCALE, steps=STEPS,
                          output="latents")
    np.testing.assert_allclose(out[0], truth(noise), atol=TOL, rtol=0)
    assert np.abs(out[1] - out[0]).max() > 1e-2


def _random_clip(pipe, noisy: bool):
    """A tiny CLIP (8x8 inputs: the DiT's 4-channel latents with the timestep if ``noisy``,
    else 3-channel images) with random weights from its shapes (no init compile)."""
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=2)
    vision = dict(small, image_size=8, patch_size=2, num_channels=4 if noisy else 3)
    clip = build_clip(pipe.tokenizer, small, vision, 16, noisy=noisy,
                      noise_schedule=pipe.scheduler.to_dict())
    rng = np.random.default_rng(2)
    return clip, jax.tree.map(lambda a: 0.2 * rng.standard_normal(a.shape).astype(a.dtype),
                              jax.eval_shape(lambda: init_clip(clip)))


def test_clip_guidance(dit):
    """``generate_clip_guided`` on the text DiT (mode "xt": a noise-aware CLIP reads x_t;
    CFG over the caption-masked conditions): scale 0 of a [0, s] sweep = generation, scale s
    moves the samples."""
    pipe, params, _, _, noise, truth = dit
    clip, clip_params = _random_clip(pipe, noisy=True)
    out = cg.generate_clip_guided(pipe, params, clip, clip_params, mode="xt",
                                  texts=["a green star", "a red circle"], prompts=PROMPTS,
                                  clip_scale=[0.0, 100.0], guidance_scale=SCALE,
                                  steps=STEPS, output="latents")
    np.testing.assert_allclose(out[0], truth(noise), atol=TOL, rtol=0)
    assert np.abs(out[1] - out[0]).max() > 1e-2


def test_clip_guidance_gradient_through_the_dit(dit):
    """Mode "x0" differentiates the CLIP similarity of the decoded x0 that the text DiT
    predicts from x_t (caption-masked conditions), built as ``generate_clip_guided`` builds
    it: the central difference along the gradient gives its norm, and the DiT's Jacobian is
    a large part of that gradient (with the DiT's output held fixed it differs by far more
    than the tolerance). The DiT's output layer is at full scale here (``tiny_text_dit``
    scales it by 0.1); a stub decoder stands in for the VAE (the U-Net path's)."""
    pipe, params, _, _, noise, _ = dit
    clip, clip_params = _random_clip(pipe, noisy=False)
    ac, pt = schedules.alphas_cumprod(pipe.scheduler), pipe.scheduler.prediction_type
    target = cg.text_target(clip, clip_params,
                            jnp.asarray(clip.tokenize(["a green star", "a red circle"])))
    ids = jnp.asarray(pipe.tokenize(PROMPTS))
    decode = lambda z: jnp.tanh(z[..., :3])  # 8x8x4 latents -> the CLIP's 8x8 images

    @jax.jit
    def check(p, x, t):
        cond = pipe.condition(p, ids, pipe.image_size, pipe.image_size)
        den = lambda x_, t_: batch_inputs.unet_denoiser(pipe, p)(x_, t_, cond)
        log_p = cg.similarity_x0(clip, clip_params, target, den, decode, ac, pt)
        fixed = cg.similarity_x0(clip, clip_params, target,
                                 lambda x_, t_: jax.lax.stop_gradient(den(x_, t_)), decode,
                                 ac, pt)
        g, g_fixed = classifier_grad(log_p)(x, t), classifier_grad(fixed)(x, t)
        norm = jnp.sqrt(jnp.sum(g ** 2, axis=(1, 2, 3)))
        v, h = g / norm[:, None, None, None], 1e-2
        fd = (log_p(x + h * v, t) - log_p(x - h * v, t)) / (2 * h)
        return norm, fd, jnp.sqrt(jnp.sum((g - g_fixed) ** 2, axis=(1, 2, 3)))

    full = dict(params, unet=dict(params["unet"], proj_out=jax.tree.map(
        lambda a: 10.0 * a, params["unet"]["proj_out"])))
    norm, fd, dit_part = map(np.asarray, check(full, noise, jnp.array([300, 700])))
    np.testing.assert_allclose(fd, norm, rtol=2e-3)  # measured 3e-4
    assert (dit_part > 0.2 * norm).all(), (dit_part, norm)

def test_textual_inversion_loss_falls(dit):
    """The TI loss (a function of the new rows only: nothing else can move) falls at every
    Adam step on the text DiT: the learned row reaches the denoiser."""
    pipe, params, _, z0, _, _ = dit
    tok = ti.add_tokens(pipe.tokenizer, "<new-shape>", 1)
    rows = ti.init_embeddings(params, tok, "circle", 1)
    ids = dataclasses.replace(pipe, tokenizer=tok).tokenize(["a <new-shape>", "a red <new-shape>"])
    assert (ids == len(pipe.tokenizer)).sum() == 2  # the new token is in both prompts
    loss = make_ti_loss(pipe, params)
    vals, rows = optimise(loss, rows, (z0, jnp.asarray(ids)), optax.adam(0.3), 6)
    # The DiT's outputs are small (std ~0.06), so the loss is mostly the noise's own
    # variance; the rows move the part they can steadily (measured 1.1264 -> 1.1156).
    assert all(b < a for a, b in zip(vals, vals[1:])) and vals[-1] < vals[0] - 5e-3, vals


def test_instruct_pix2pix_training_on_the_text_dit(dit):
    """``widen_unet`` on the text DiT: 8 input channels (patch embedding's new slice zero),
    the learned-sigma output cut to its noise half, so at step 0 the widened DiT equals the
    base one through ``denoise`` whatever the image channels hold (and the IP2P sampler's
    three-branch guidance at scales 1 is that output); the InstructPix2Pix loss then falls
    under ``instruct_optimizer`` and the image slice starts to read the image."""
    pipe, params, _, z0, noise, _ = dit
    wide, wparams = ip2p.widen_unet(pipe, params)
    assert wide.is_instruct and wide.unet.config.output_channels == 4
    ids, neg = jnp.asarray(pipe.tokenize(PROMPTS)), jnp.asarray(pipe.tokenize(["", ""]))

    @jax.jit
    def both(p, wp):
        ctx, empty = pipe.encode_text(params, ids), pipe.encode_text(params, neg)
        guided = ip_edit.dual_guidance(ip_edit.instruct_denoiser(wide, {"unet": wp}), 1.0, 1.0)
        return (denoiser.denoise(pipe, p, noise, 500, ctx),
                denoiser.denoise(wide, wp, jnp.concatenate([noise, z0], -1), 500, ctx),
                guided(noise, 500, (ctx, empty, z0)))

    base, widened, sampled = both(params["unet"], wparams["unet"])
    np.testing.assert_allclose(widened, base, atol=1e-6, rtol=0)  # the zero slice adds 0
    # the sampler's three-branch guidance at s_T = s_I = 1 is the text + image branch
    np.testing.assert_allclose(sampled, widened, atol=1e-5, rtol=0)
    loss = ip2p.make_instruct_loss(wide, wparams, dropout=0.0)
    trainable = {"unet": wparams["unet"]}
    opt = ip2p.instruct_optimizer(trainable, 1e-2, 0, 10, input_lr_multiplier=3.0)
    vals, trainable = optimise(loss, trainable, (z0, z0[::-1], ids), opt, 5)
    assert vals[-1] < 0.9 * vals[0], vals
    image_slice = trainable["unet"]["pos_embed"]["proj"]["kernel"][:, :, 4:]
    assert float(jnp.abs(image_slice).max()) > 1e-2


def test_caption_mask_and_micro_conditions_match_diffusers(dit, torch, tmp_path):
    """A micro-conditioned tiny text DiT (``use_additional_conditions``) through
    ``denoise`` on ``encode_prompts``' conditions equals diffusers' PyTorch
    ``PixArtTransformer2DModel`` called as ``PixArtAlphaPipeline`` calls it: transformers'
    CLIP text model given the tokenizer's attention mask, that mask as
    ``encoder_attention_mask``, the negative prompt's own mask, resolution (H, W) and
    aspect ratio H / W. Without the mask diffusers' output differs (it acts)."""
    from diffusers import PixArtTransformer2DModel
    from transformers import CLIPTextModel
    from jaxdiff.weights import DEFAULT_MODEL
    from jaxdiff.weights.backbones import save_transformer
    pipe, params, _, _, noise, _ = dit
    pipe, params = tiny_text_dit(pipe, params, attention_head_dim=6, cross_attention_dim=12,
                                 num_layers=1, use_additional_conditions=True)  # 12 = 3 x 4
    assert pipe.uses_caption_mask and pipe.micro_conditions
    h = w = pipe.image_size
    ids, neg = pipe.tokenize(PROMPTS), pipe.tokenize(["", ""])
    x, t = jnp.concatenate([noise, noise[::-1]]), jnp.array([10, 400, 700, 999])

    @jax.jit
    def run(p):
        both = jax.tree.map(lambda u, c: jnp.concatenate([u, c]),
                            *pipe.encode_prompts(p, ids, neg, h, w)[::-1])
        return both, denoiser.denoise(pipe, p["unet"], x, t, both, variance=True)

    both, got = run(params)
    tok = pipe.tokenizer(["", ""] + PROMPTS, padding="max_length",
                         max_length=pipe.max_length, truncation=True, return_tensors="pt")
    np.testing.assert_array_equal(both["mask"], tok.attention_mask.numpy())
    save_transformer(pipe.unet, params["unet"], str(tmp_path / "t"))
    tdit = PixArtTransformer2DModel.from_pretrained(str(tmp_path / "t")).eval()
    text = CLIPTextModel.from_pretrained(os.path.join(DEFAULT_MODEL, "text_encoder"),
                                         dtype=torch.float32).eval()  # stored in float16
    with torch.no_grad():
        emb = text(tok.input_ids, attention_mask=tok.attention_mask)[0]
        run = lambda mask: tdit(torch.tensor(ref.nchw(np.asarray(x))), encoder_hidden_states=emb,
                                encoder_attention_mask=mask, timestep=torch.tensor(np.asarray(t)),
                                added_cond_kwargs={
                                    "resolution": torch.tensor([[h, w]] * 4, dtype=torch.float32),
                                    "aspect_ratio": torch.tensor([[h / w]] * 4)}).sample.numpy()
        want, unmasked = run(tok.attention_mask), run(None)
    np.testing.assert_allclose(ref.nchw(np.asarray(got)), want, atol=1e-4, rtol=0)
    assert np.abs(unmasked - want).max() > 1e-3


def test_imagic_and_unitune_refuse_a_caption_masked_dit(dit):
    """Their embedding optimisation / interpolation is on plain arrays: one line, no
    compile (they run on a text DiT with ``caption_mask=False``, as embedded:dit)."""
    pipe, params, images, _, _, _ = dit
    with pytest.raises(ValueError, match="Imagic works on plain text-embedding arrays"):
        imagic.imagic(pipe, params, images, PROMPTS)
    with pytest.raises(ValueError, match="UniTune works on plain text-embedding arrays"):
        unitune.unitune(pipe, params, images, PROMPTS)
