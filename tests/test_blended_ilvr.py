"""Blended latent diffusion and ILVR: their defining properties on the tiny pipeline.

Blended: outside the mask every step's latent is the source noised (fresh N(0, 1)) to
that step's timestep; with the whole image masked and nothing skipped it is plain generation.
ILVR: the low-pass of the result equals the noised reference's (factor 1: the
sample *is* the noised reference); with refinement off it is plain generation.
The pipeline-level functions (``blended.blended``, ``ilvr.ilvr``) are exercised end to end
by tests/test_edit_methods_cli.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff import schedules
from jaxdiff.editing import batch_inputs, blended as bl, ilvr
from jaxdiff.samplers import make_sampler
from jaxdiff.sampling import sample_keys

STEPS = 8


@pytest.fixture(scope="module")
def setup(tiny_pipe_dir):
    pipe, params = jaxdiff.load_pipeline(tiny_pipe_dir)
    rng = np.random.default_rng(2)
    images = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    z0 = pipe.encode_images(params, jnp.asarray(images))
    ids = pipe.tokenize(["red dot", "blue sq"])
    cond, uncond = pipe.encode_text(params, ids), pipe.encode_text(params, pipe.tokenize(["", ""]))
    noise = jnp.asarray(rng.standard_normal(z0.shape).astype(np.float32))
    return pipe, params, z0, cond, uncond, noise


def _generate(pipe, params, noise):
    return jaxdiff.generate(pipe, params, ["red dot", "blue sq"], steps=STEPS,
                            guidance_scale=5.0, latents=np.asarray(noise), output="latents")


def test_blended_background_is_the_noised_source(setup):
    pipe, params, z0, cond, uncond, noise = setup
    sampler = make_sampler("ddim", pipe.scheduler, STEPS)
    ac = schedules.alphas_cumprod(pipe.scheduler)
    mask = np.zeros(z0.shape[:3] + (1,), np.float32)
    mask[0, 2:6, 2:6], mask[1, :, :4] = 1, 1
    keys = sample_keys(0, 2)
    run = jax.jit(lambda p: bl.blended_latents(batch_inputs.unet_denoiser(pipe, params), sampler,
                                               jnp.asarray(ac), z0, jnp.asarray(mask), noise,
                                               cond, uncond, p, 5.0, keys))
    final, steps = run(jnp.asarray([0.25, 0.5]))
    steps = np.asarray(steps)
    ts = np.asarray(sampler.timesteps)
    for b, first in enumerate((2, 4)):  # int(8 * 0.25), int(8 * 0.5)
        np.testing.assert_array_equal(steps[:first, b], np.asarray(noise)[b][None].repeat(first, 0))
        for i in range(first, STEPS):
            a = ac[ts[i]]
            # outside the mask: sqrt(a) z0 + sqrt(1 - a) eps with eps ~ N(0, 1) (fresh draws)
            eps = (steps[i, b] - a ** 0.5 * np.asarray(z0[b])) / (1 - a) ** 0.5
            out = eps[mask[b, ..., 0] == 0]
            assert abs(out.mean()) < 0.35 and 0.7 < out.std() < 1.3, (i, out.mean(), out.std())
        # after the last step (t = 1) the background is the source up to sqrt(1 - a_1)
        bg = (mask[b] == 0)[..., 0]
        assert np.abs(np.asarray(final[b])[bg] - np.asarray(z0[b])[bg]).max() < 0.2
    inside = np.abs(np.asarray(final) - np.asarray(z0))[mask[..., 0] == 1]
    assert inside.max() > 0.5  # the masked region was re-generated
    # The whole image masked, no step skipped: plain generation from the same noise.
    full, _ = jax.jit(lambda: bl.blended_latents(
        batch_inputs.unet_denoiser(pipe, params), sampler, jnp.asarray(ac), z0,
        jnp.ones_like(jnp.asarray(mask)), noise, cond, uncond, jnp.zeros(2), 5.0, keys))()
    np.testing.assert_allclose(full, _generate(pipe, params, noise), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("factor", [1, 2])
def test_ilvr_low_pass_follows_the_reference(setup, factor):
    pipe, params, z0, cond, uncond, noise = setup
    sampler = make_sampler("ddim", pipe.scheduler, STEPS)
    after = ilvr.level_after_step(pipe.scheduler, np.asarray(sampler.timesteps), STEPS)
    run = jax.jit(lambda f: ilvr.ilvr_latents(batch_inputs.unet_denoiser(pipe, params), sampler,
                                              after, z0, noise, factor, cond, uncond, 5.0, f,
                                              sample_keys(0, 2)))
    final, y = run(jnp.ones(2))
    if factor == 1:  # the low-pass is everything: the sample is the noised reference
        np.testing.assert_allclose(final, y, atol=1e-5)
    else:
        np.testing.assert_allclose(ilvr.low_pass(final, 2), ilvr.low_pass(y, 2), atol=1e-5)
        assert float(jnp.abs(final - y).max()) > 0.1  # the high frequencies are its own
    # y is the reference noised to the final level (alpha-bar ~ 1): close to the reference
    assert float(jnp.abs(y - z0).max()) < 0.2
    off, _ = run(jnp.zeros(2))  # refinement off: plain generation
    np.testing.assert_allclose(off, _generate(pipe, params, noise), atol=1e-4, rtol=1e-5)
