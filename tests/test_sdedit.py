"""SDEdit / img2img: parity with diffusers' StableDiffusionImg2ImgPipeline, the defining
limits (strength 0 = the input, strength 1 = plain generation), traced strength."""
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from torchref import models as ref
from jaxdiff import schedules
from jaxdiff.editing import partial_trajectory, sdedit as sd

PROMPTS = ["red dot", "blue sq"]


@pytest.fixture(scope="module")
def loaded(tiny_pipe_dir):
    return jaxdiff.load_pipeline(tiny_pipe_dir)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)


def _noise(seed=1):
    return np.random.default_rng(seed).standard_normal((2, 8, 8, 4)).astype(np.float32)


def test_start_index_matches_diffusers_get_timesteps():
    for s in (10, 50):
        for strength in (0.0, 0.05, 0.3, 0.5, 0.7, 0.8, 0.99, 1.0):
            want = s - min(int(s * strength), s)
            assert int(partial_trajectory.start_index(strength, s)) == want, (s, strength)


def test_matches_diffusers_img2img(tiny_pipe_dir, loaded, images, torch):
    from diffusers import StableDiffusionImg2ImgPipeline
    pipe, params = loaded
    z0 = np.asarray(pipe.encode_images(params, jnp.asarray(images)))
    noise = _noise()
    tp = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_pipe_dir)
    with torch.no_grad():
        # diffusers draws the start noise with randn(shape, generator): reproduce it.
        tnoise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3))
        want = tp(PROMPTS, image=torch.tensor(ref.nchw(z0)), strength=0.6,
                  negative_prompt=["green", "dark"], num_inference_steps=10,
                  guidance_scale=5.0, generator=torch.Generator().manual_seed(3),
                  output_type="latent").images.numpy()
    noise = ref.nhwc(tnoise.numpy())
    got = sd.sdedit(pipe, params, images, PROMPTS, ["green", "dark"], strength=0.6, steps=10,
                    guidance_scale=5.0, noise=noise)["latents"]
    np.testing.assert_allclose(ref.nchw(got), want, atol=1e-4, rtol=0)
    assert np.abs(want - ref.nchw(z0)).max() > 0.1  # it did edit


def test_strength_zero_returns_the_input(loaded, images):
    pipe, params = loaded
    out = sd.sdedit(pipe, params, images, PROMPTS, strength=0.0, steps=10, noise=_noise())
    z0 = pipe.encode_images(params, jnp.asarray(images))  # eager: round-off differs from jit
    np.testing.assert_allclose(out["latents"], z0, atol=1e-6, rtol=0)
    np.testing.assert_allclose(out["edited"], out["reconstruction"], atol=1e-5, rtol=0)
    # Below one step (strength < 1/S) nothing runs either.
    out = sd.sdedit(pipe, params, images, PROMPTS, strength=0.09, steps=10, noise=_noise())
    np.testing.assert_allclose(out["edited"], out["reconstruction"], atol=1e-5, rtol=0)


def test_strength_one_equals_plain_generation(loaded, images):
    pipe, params = loaded
    noise = _noise()
    z0 = pipe.encode_images(params, jnp.asarray(images))
    ac = schedules.alphas_cumprod(pipe.scheduler)
    t0 = schedules.timesteps(pipe.scheduler, 10)[0]
    start = schedules.add_noise(ac, z0, jnp.asarray(noise), t0)
    want = jaxdiff.generate(pipe, params, PROMPTS, ["x", ""], steps=10, guidance_scale=4.0,
                            latents=np.asarray(start), output="latents")
    got = sd.sdedit(pipe, params, images, PROMPTS, ["x", ""], strength=1.0, steps=10,
                    guidance_scale=4.0, noise=noise)["latents"]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)


def test_traced_values_do_not_recompile_and_batch_equals_single(loaded, images, monkeypatch):
    pipe, params = loaded
    sd._compiled.cache_clear()
    traces = []
    real = sd.sdedit_latents
    monkeypatch.setattr(sd, "sdedit_latents", lambda *a, **k: traces.append(1) or real(*a, **k))
    runs = {}
    for strength, g, seed, eta in [((0.3, 0.8), 3.0, 0, 0.0), ((0.5, 0.5), 7.5, 1, 0.5),
                                   ((1.0, 0.2), 1.0, 2, 1.0)]:
        runs[strength] = sd.sdedit(pipe, params, images, PROMPTS, strength=strength, steps=10,
                                   guidance_scale=g, seed=seed, eta=eta)["latents"]
    assert len(traces) == 1
    # Per-image strengths in one batch equal running each image with its own strength.
    # (Seed 0 keys fold in the image index, so image 1 alone needs its noise passed.)
    noise = _noise()
    both = sd.sdedit(pipe, params, images, PROMPTS, strength=(0.3, 0.8), steps=10,
                     noise=noise)["latents"]
    for i, s in enumerate((0.3, 0.8)):
        one = sd.sdedit(pipe, params, images[i:i + 1], PROMPTS[i], strength=s, steps=10,
                        noise=noise[i:i + 1])["latents"]
        np.testing.assert_allclose(one[0], both[i], atol=1e-4, rtol=1e-5)
    assert not np.allclose(runs[(0.3, 0.8)], runs[(0.5, 0.5)])
