"""Editing on SDXL (issue #15, point 1): inversion + Prompt-to-Prompt on a tiny random SDXL
base equals the independent PyTorch reference algorithm (``torchref.p2p`` on diffusers'
``StableDiffusionXLPipeline``: its own prompt encoding, pooled embeddings and time ids);
the mask editors reduce to diffusers' SDXL sampling; SDEdit on the refiner is diffusers'
``StableDiffusionXLImg2ImgPipeline``. The conditions come from the one pipeline-level
helper (``Pipeline.encode_prompts`` / ``condition``) that ``generate`` uses too."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from torchref import models as ref
from jaxdiff.editing import p2p_pipeline as pp, prompt_to_prompt as p2p

PROMPTS = ["a red circle", "blue square"]
STEPS = 4
INNER = 3  # null-text Adam steps per timestep (the reference's 10 only cost time here)
SOURCES = ["a red ball", "a big cat"]
TARGETS = ["a tan ball", "a big dog"]  # same token counts (this tokenizer is per character)


@pytest.fixture(scope="module")
def saved(tiny_sdxl):
    """The session's tiny SDXL base / refiner folders (tests/conftest.py, ``tiny_sdxl``)."""
    return tiny_sdxl


@functools.partial(jax.jit, static_argnames=("pipe", "inversion"))
def _latents(pipe, params, images, src_ids, tgt_ids, empty_ids, control, guidance, *,
             inversion):
    z0 = pipe.encode_images(params, jnp.asarray(images, jnp.float32) / 127.5 - 1)
    return pp.edit_latents(pipe, params, z0, src_ids, tgt_ids, empty_ids,
                           jnp.arange(images.shape[0]), control, None, guidance,
                           steps=STEPS, inversion=inversion, num_inner_steps=INNER)


def test_sdxl_null_text_p2p_equals_the_reference(torch, saved):
    """Null-text inversion (prompt + pooled null embeddings optimised, time ids kept, zero
    start as the base's force_zeros_for_empty_prompt) then a P2P replace edit whose
    controller reaches every transformer block (the UNet's blocks are 2 deep): both
    branches of both images equal the reference run one image at a time, and the inner
    step counts are the reference's."""
    from diffusers import StableDiffusionXLPipeline
    from torchref.p2p import TorchP2P
    folder = saved["pipeline"][1]
    pipe, params = jaxdiff.load_pipeline(folder)
    assert max(pipe.unet.config.per_block("transformer_layers_per_block")) > 1
    side = pipe.image_size
    yy, xx = np.mgrid[:side, :side] / side
    images = np.stack([np.stack([xx, yy, 1 - xx], -1),
                       np.stack([np.exp(-((xx - .6) ** 2 + (yy - .4) ** 2) * 20), yy * xx,
                                 0.5 + 0 * xx], -1)])
    images = (images * 255).round().astype(np.uint8)
    control = p2p.make_control(pipe, SOURCES, TARGETS, STEPS, cross_replace_steps=0.8,
                               self_replace_steps=0.5)
    out, taken = _latents(pipe, params, images, pipe.tokenize(SOURCES), pipe.tokenize(TARGETS),
                          pipe.tokenize(["", ""]), control, jnp.float32(7.5),
                          inversion="null_text")
    tref = TorchP2P(torch, StableDiffusionXLPipeline.from_pretrained(folder), STEPS, 7.5)
    assert tref.pipe.tokenizer.model_max_length == pipe.max_length
    for k in range(2):
        want_src, want_tgt, want_taken = tref(
            images[k], SOURCES[k], TARGETS[k], "null_text", inner_steps=INNER,
            control=dict(mode="replace", cross_replace_steps=0.8, self_replace_steps=0.5))
        got_src, got_tgt = (ref.nchw(np.asarray(o[k:k + 1])) for o in (out.source, out.target))
        assert np.abs(got_tgt - got_src).max() > 1e-2  # the edit is not the reconstruction
        np.testing.assert_allclose(got_src, want_src.numpy(), atol=2e-4, rtol=1e-3)
        np.testing.assert_allclose(got_tgt, want_tgt.numpy(), atol=2e-4, rtol=1e-3)
        assert list(np.asarray(taken[:, k])) == want_taken


def test_sdxl_sdedit_on_the_refiner_matches_diffusers_img2img(torch, saved):
    """SDEdit on the refiner is diffusers' StableDiffusionXLImg2ImgPipeline (strength 0.6
    of 5 DDIM steps; aesthetic-score time ids of the image size)."""
    from jaxdiff.editing import sdedit
    tr, folder = saved["refiner_pipeline"]
    pipe, params = jaxdiff.load_pipeline(folder)
    images = np.random.default_rng(2).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    z0 = np.asarray(pipe.encode_images(params, jnp.asarray(images)))
    with torch.no_grad():
        noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3))
        want = tr(PROMPTS, image=torch.tensor(ref.nchw(z0)), strength=0.6,
                  num_inference_steps=5, guidance_scale=5.0,
                  generator=torch.Generator().manual_seed(3), output_type="latent").images
    got = sdedit.sdedit(pipe, params, images, PROMPTS, strength=0.6, steps=5,
                        guidance_scale=5.0, noise=ref.nhwc(noise.numpy()))["latents"]
    np.testing.assert_allclose(ref.nchw(got), want.numpy(), atol=1e-3, rtol=0)
    assert np.abs(want.numpy() - ref.nchw(z0)).max() > 0.1


def test_sdxl_blended_with_a_full_mask_is_diffusers_sampling(torch, saved):
    """Blended diffusion with the whole image masked and no skipped steps samples from its
    start noise as diffusers' StableDiffusionXLPipeline does (zero negative embeddings,
    time ids of the image size); the second image of the batch (empty mask) does not
    disturb the first."""
    from jaxdiff.editing import batch_inputs, blended
    from jaxdiff.sampling import initial_noise
    tp, folder = saved["pipeline"]
    pipe, params = jaxdiff.load_pipeline(folder)
    images = np.random.default_rng(5).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    masks = np.stack([np.ones((16, 16)), np.zeros((16, 16))]).astype(np.float32)
    out = blended.blended(pipe, params, images, masks, PROMPTS, blending_percentage=0.0,
                          steps=3, guidance_scale=5.0, seed=4)
    noise = np.asarray(initial_noise(batch_inputs.image_keys(4, 2), (8, 8, 4)))
    with torch.no_grad():
        want = tp(PROMPTS, num_inference_steps=3, guidance_scale=5.0,
                  latents=torch.tensor(ref.nchw(noise)), output_type="latent").images.numpy()
    np.testing.assert_allclose(ref.nchw(out["latents"][:1]), want[:1], atol=1e-3, rtol=0)
    assert np.abs(want[:1] - ref.nchw(noise[:1])).max() > 0.1
