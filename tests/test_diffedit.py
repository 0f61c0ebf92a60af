"""DiffEdit: the automatic mask equals diffusers' generate_mask (same noise); partial
inversion agrees with full DDIM inversion; outside the mask the edit retraces the inverted
trajectory and ends at the input latent."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from torchref import models as ref
from jaxdiff import schedules
from jaxdiff.editing import batch_inputs, diffedit as de, inversion as inv
from jaxdiff.samplers.ddim import ddim_tables

STEPS = 10


@pytest.fixture(scope="module")
def loaded(tiny_pipe_dir):
    return jaxdiff.load_pipeline(tiny_pipe_dir)


def test_mask_matches_diffusers_generate_mask(tiny_pipe_dir, loaded, torch):
    from diffusers import (DDIMInverseScheduler, StableDiffusionDiffEditPipeline,
                           StableDiffusionPipeline)
    pipe, params = loaded
    sd = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    comps = {k: v for k, v in sd.components.items() if k != "image_encoder"}
    tp = StableDiffusionDiffEditPipeline(
        **comps, inverse_scheduler=DDIMInverseScheduler.from_config(sd.scheduler.config),
        requires_safety_checker=False)
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    z0 = np.asarray(pipe.encode_images(params, jnp.asarray(image)))
    n = 4
    with torch.no_grad():
        tnoise = torch.randn((n, 4, 8, 8), generator=torch.Generator().manual_seed(5))
        want = tp.generate_mask(image=torch.tensor(ref.nchw(z0)), target_prompt="blue sq",
                                source_prompt="red dot", num_maps_per_mask=n,
                                num_inference_steps=STEPS, guidance_scale=5.0,
                                generator=torch.Generator().manual_seed(5), output_type="np")
    tables = ddim_tables(pipe.scheduler, STEPS)
    ac = jnp.asarray(schedules.alphas_cumprod(pipe.scheduler))
    enc = lambda p: pipe.encode_text(params, pipe.tokenize([p]))
    noise = jnp.asarray(ref.nhwc(tnoise.numpy()))[None]
    mask, norm = jax.jit(lambda *a: de.diffedit_mask(batch_inputs.unet_denoiser(pipe, params),
                                                     tables, ac, *a, 5.0, 0.5))(
        jnp.asarray(z0), noise, enc("blue sq"), enc(""), enc("red dot"), enc(""))
    np.testing.assert_array_equal(np.asarray(mask), want)
    assert 0 < want.mean() < 1  # a real mask, not all/none
    assert float(jnp.abs(norm - 0.5).min()) > 1e-4  # no pixel sits on the threshold


def test_partial_inversion_and_background_follow_the_trajectory(loaded):
    pipe, params = loaded
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    z0 = pipe.encode_images(params, jnp.asarray(images))
    den = batch_inputs.unet_denoiser(pipe, params)
    tables = ddim_tables(pipe.scheduler, STEPS)
    pt = pipe.scheduler.prediction_type
    cond = pipe.encode_text(params, pipe.tokenize(["red dot", "red dot"]))
    tgt = pipe.encode_text(params, pipe.tokenize(["blue sq", "blue sq"]))
    unc = pipe.encode_text(params, pipe.tokenize(["", ""]))
    mask = np.zeros((2, 8, 8, 1), np.float32)
    mask[0, 2:6, 2:6], mask[1, :, 4:] = 1, 1

    @jax.jit
    def run(strength):
        start, levels = de.partial_invert(den, tables, z0, cond, strength, pt)
        final, steps = de.masked_edit(den, tables, z0, levels, start, jnp.asarray(mask), tgt,
                                      unc, 5.0, pt)
        return start, levels, final, steps

    start, levels, final, steps = run(jnp.asarray([0.8, 0.5]))
    np.testing.assert_array_equal(start, [2, 5])
    full = jax.jit(lambda: inv.ddim_invert(den, tables, z0, cond, pt))()  # [S + 1, B, ...]
    bg = mask[..., 0] == 0
    for b in range(2):
        s = int(start[b])
        for i in range(s, STEPS):  # levels[i] = latent sampling step i starts from
            np.testing.assert_allclose(levels[i, b], full[STEPS - i, b], atol=1e-5)
            arrived = full[STEPS - 1 - i, b]
            np.testing.assert_allclose(np.asarray(steps[i, b])[bg[b]],
                                       np.asarray(arrived)[bg[b]], atol=1e-5)
        np.testing.assert_array_equal(np.asarray(final[b])[bg[b]], np.asarray(z0[b])[bg[b]])
    assert float(jnp.abs(final - z0).max()) > 0.1  # the masked region was edited


def test_pipeline_program_uses_given_masks(loaded):
    pipe, params = loaded
    images = np.random.default_rng(2).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    masks = np.zeros((2, 16, 16), np.float32)
    masks[0, :8] = 1
    auto = de.diffedit(pipe, params, images, "red dot", "blue sq", steps=STEPS, num_maps=2)
    given = de.diffedit(pipe, params, images, "red dot", "blue sq", steps=STEPS, num_maps=2,
                        masks=masks)
    m = np.asarray(given["latent_mask"])
    assert m[0, :4].all() and not m[0, 4:].any() and not m[1].any()
    assert set(np.unique(auto["latent_mask"])) <= {0.0, 1.0}
    # image 1 has an empty mask: the edit is the input latent
    np.testing.assert_allclose(given["latents"][1:], pipe.encode_images(
        params, jnp.asarray(images[1:])), atol=1e-5)
