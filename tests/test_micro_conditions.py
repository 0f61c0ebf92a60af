"""Methods on a micro-conditioned text DiT (issue #18, point 1): a PixArt-style DiT with
``use_additional_conditions`` reads the image's resolution and aspect ratio (``Pipeline
.condition`` / ``encode_prompts`` add them), so every method must encode its prompts with
them. Here the Diffusion Classifier, the InstructPix2Pix sampler and InstructPix2Pix's
generated-pair Prompt-to-Prompt program (and ``p2p_pairs``, the loop around it) run on a
tiny random one (``text_dit.tiny_text_dit``, one block). (Imagic, fixed alike, is checked
by hand: its public program's compile alone would take this file over its CPU budget.)

Truth, written here without the code under test: eta-0 DDIM with classifier-free guidance
as a plain loop of ``denoiser.denoise`` calls (``_ddim_by_hand``), and the Diffusion
Classifier's error as the mean squared difference of ``denoise``'s output and the noise on
the same (t, eps). Each truth is also computed with the resolution doubled: it moves by far
more than the tolerance, so a method that dropped or mis-sized the micro-conditions fails.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import denoiser, schedules
from jaxdiff.data import instructions, shapes
from jaxdiff.editing import instruct_pix2pix as ip_edit
from jaxdiff.editing import prompt_to_prompt as p2p
from jaxdiff.eval import diffusion_classifier as dc
from jaxdiff.pipeline import to_uint8
from jaxdiff.samplers.ddim import ddim_tables
from jaxdiff.sampling import initial_noise, sample_keys
from jaxdiff.training import instruct_pairs
from jaxdiff.training import instruct_pix2pix as ip2p
from text_dit import tiny_text_dit

PROMPTS = ["a red circle", "a blue square"]
STEPS, SCALE = 4, 3.0
TOL = 1e-4  # different programs, float32


@pytest.fixture(scope="module")
def micro(embedded):
    """(pipe, the same without caption mask, params, images [2, H, W, 3] in [-1, 1], N(0, 1)
    latent noise [2, h, w, C]) of a micro-conditioned tiny text DiT (random weights
    without an init compile)."""
    pipe, params = tiny_text_dit(*embedded, from_shapes=True, attention_head_dim=6,
                                 cross_attention_dim=12, num_layers=1,
                                 use_additional_conditions=True)  # 12 = 3 x 4
    assert pipe.micro_conditions and pipe.uses_caption_mask
    assert pipe.scheduler.prediction_type == "epsilon" and not pipe.scheduler.clip_sample
    size = pipe.image_size
    yy, xx = np.mgrid[:size, :size] / size
    images = np.stack([np.stack([np.sin(4 * xx + k), np.cos(3 * yy - k), xx * yy - 0.5], -1)
                       for k in range(2)]).astype(np.float32)
    noise = initial_noise(sample_keys(0, 2), pipe.latent_shape(size, size))
    return pipe, dataclasses.replace(pipe, caption_mask=False), params, images, noise


def _doubled(cond):
    """``cond`` with its resolution doubled (the same aspect ratio)."""
    return dict(cond, resolution=2.0 * cond["resolution"])


@functools.partial(jax.jit, static_argnums=(0, 1))
def _ddim_by_hand(pipe, decode, params, x, ids, neg_ids, scale):
    """eta-0 DDIM of STEPS steps from ``x`` with guidance ``u + scale (c - u)`` of the
    prompts' and negative prompts' conditions (``Pipeline.condition`` at the model's
    resolution), the denoiser called once per branch. Returns (latents, the latents with
    the resolution doubled), both decoded if ``decode``."""
    tab = ddim_tables(pipe.scheduler, STEPS)
    b, size = x.shape[0], pipe.image_size
    cond = pipe.condition(params, ids, size, size)
    uncond = pipe.condition(params, neg_ids, size, size, negative=True)
    both = lambda c: jax.tree.map(lambda a, d: jnp.concatenate([a, d]), c, _doubled(c))
    cond, uncond, x = both(cond), both(uncond), jnp.concatenate([x, x])

    def step(z, i):
        c = denoiser.denoise(pipe, params["unet"], z, tab.timesteps[i], cond)
        u = denoiser.denoise(pipe, params["unet"], z, tab.timesteps[i], uncond)
        eps = u + scale * (c - u)
        a, ap = tab.alpha[i], tab.alpha_prev[i]
        x0 = (z - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)
        return jnp.sqrt(ap) * x0 + jnp.sqrt(1 - ap) * eps, None

    z, _ = jax.lax.scan(step, x, jnp.arange(STEPS))
    z = pipe.decode_latents(params, z) if decode else z
    return z[:b], z[b:]


def _check(got, truth, doubled, tol=TOL):
    np.testing.assert_allclose(got, truth, atol=tol, rtol=0)
    assert np.abs(np.asarray(doubled) - np.asarray(truth)).max() > 10 * tol


def test_diffusion_classifier(micro):
    """Each candidate's error = the mean over the plan's (t, eps) samples of
    ``mean((denoise(x_t, t, condition(prompt)) - eps) ** 2)``, computed here directly."""
    pipe, _, params, _, noise = micro
    z0 = 0.5 * noise[::-1]  # any latents: the error is defined for all
    res = dc.classify(pipe, params, None, PROMPTS, samples=(2,), keep=(1,), chunk=2,
                      latents=z0)
    stage = dc.stage_plan(pipe.scheduler.num_train_timesteps, (2,), (1,))[0]
    eps_all = jax.random.normal(jax.random.key(0), (2,) + z0.shape[1:])
    ac = schedules.alphas_cumprod(pipe.scheduler)
    ids = pipe.tokenize(PROMPTS)

    @jax.jit
    def errors(p):
        cond = pipe.condition(p, ids, pipe.image_size, pipe.image_size)

        def err(c):
            out = []
            for t, j in zip(stage.timesteps, stage.noise_index):
                eps = eps_all[j][None]
                x_t = np.sqrt(ac[t]) * z0 + np.sqrt(1 - ac[t]) * eps
                pred = denoiser.denoise(pipe, p["unet"], x_t, jnp.full((2,), t), c)
                out.append(jnp.mean((pred - eps) ** 2, axis=(1, 2, 3)))
            return jnp.mean(jnp.stack(out), 0)  # [B]

        rows = lambda c, k: jax.tree.map(lambda a: jnp.broadcast_to(a[k], (2,) + a.shape[1:]), c)
        return (jnp.stack([err(rows(cond, k)) for k in range(2)], 1),
                jnp.stack([err(rows(_doubled(cond), k)) for k in range(2)], 1))

    want, doubled = errors(params)
    np.testing.assert_allclose(res.errors, want, rtol=1e-5, atol=0)
    assert np.abs(np.asarray(doubled) - np.asarray(want)).max() > 1e-3 * np.abs(want).max()


def test_instruct_pix2pix_sampler(micro):
    """At s_T = s_I = 1 the InstructPix2Pix sampler (DDIM) of the widened DiT (its image
    slice zero: ``widen_unet``) is plain conditional sampling of the base DiT, decoded.
    Without the caption mask, so the two share the truth's program."""
    _, pipe, params, images, noise = micro
    wide, wp = ip2p.widen_unet(pipe, params)
    got = ip_edit.edit_outputs(wide, wp, images, PROMPTS, steps=STEPS, text_guidance=1.0,
                               image_guidance=1.0, sampler="ddim",
                               latents=np.asarray(noise))["edited"]
    _check(got, *_ddim_by_hand(pipe, True, params, noise, pipe.tokenize(PROMPTS),
                               pipe.tokenize(["", ""]), 1.0), tol=1e-3)


def test_p2p_pairs_program(micro):
    """The generated-pair program's source image is plain CFG sampling of the source
    caption from the same noise (the controller only edits the target branch), decoded.
    Without the caption mask, so the two share the truth's program."""
    _, pipe, params, _, noise = micro
    caps, edits = ["a red circle", "a blue square"], ["a blue circle", "a red square"]
    control = p2p.make_control(pipe, caps, edits, STEPS, mode="replace",
                               cross_replace_steps=0.8, self_replace_steps=0.4)
    src, dst = instruct_pairs._p2p_program(pipe, STEPS)(
        params, noise, pipe.tokenize(caps), pipe.tokenize(edits), pipe.tokenize(["", ""]),
        control, jnp.float32(SCALE))
    _check(src, *_ddim_by_hand(pipe, True, params, noise, pipe.tokenize(caps),
                               pipe.tokenize(["", ""]), SCALE), tol=1e-3)
    assert np.abs(np.asarray(dst) - np.asarray(src)).max() > 1e-2  # the edit acts


def test_p2p_pairs_loop_keeps_what_the_filter_accepts(micro, monkeypatch):
    """``p2p_pairs`` around that program: triples in chunks of ``batch_size``, chunk k's
    noise N(0, 1) from ``fold_in(key(seed), start)``; what comes back is exactly the pairs
    the filter accepts, in triple order, each with its own instruction and the reader's
    masks. The evaluator (which a random model never satisfies) is replaced by a reader
    that accepts every other triple; each kept source image is checked against plain CFG
    sampling of its caption."""
    _, pipe, params, _, _ = micro
    spec = shapes.world("v1", image_size=pipe.image_size)
    ts = instructions.triples(1, spec, 4, "train")
    accept = {t.caption + t.instruction: i % 2 == 0 for i, t in enumerate(ts)}

    def reader(spec_, t, a, b):  # a deterministic mask of the source image
        return {"source_ok": accept[t.caption + t.instruction], "edit_ok": True,
                "psnr": 30.0, "masks": a[..., 0] > a[..., 1]}

    monkeypatch.setattr(instruct_pairs, "read_pair", reader)
    out = instruct_pairs.p2p_pairs(pipe, params, ts, seed=3, steps=STEPS, guidance=SCALE,
                                   batch_size=2)
    np.testing.assert_array_equal(out["kept"], [True, False, True, False])
    assert out["triples"] == [ts[0], ts[2]]
    assert out["instruction"] == [ts[0].instruction, ts[2].instruction]
    assert out["source"].shape == out["edited"].shape == (2, pipe.image_size,
                                                         pipe.image_size, 3)
    shape = pipe.latent_shape(pipe.image_size, pipe.image_size)
    for k, start in enumerate((0, 2)):  # the first triple of each chunk is the kept one
        z = jax.random.normal(jax.random.fold_in(jax.random.key(3), start), (2,) + shape)
        want, _ = _ddim_by_hand(pipe, True, params, z,
                                pipe.tokenize([t.caption for t in ts[start:start + 2]]),
                                pipe.tokenize(["", ""]), SCALE)
        want = np.asarray(to_uint8(want))[0]
        assert np.abs(out["source"][k].astype(int) - want.astype(int)).max() <= 1
        np.testing.assert_array_equal(out["masks"][k],
                                      out["source"][k][..., 0] > out["source"][k][..., 1])
