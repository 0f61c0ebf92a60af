"""End-to-end sampling: parity with diffusers, one program, no recompiles, guidance sweeps."""
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from torchref import models as ref
from jaxdiff import guidance
from jaxdiff import sampling as gen_lib
from jaxdiff.samplers import SAMPLERS

PROMPTS = ["a red circle", "blue square"]


@pytest.fixture(scope="module")
def pipe_dir(tiny_pipe_dir):
    return tiny_pipe_dir


@pytest.fixture(scope="module")
def loaded(pipe_dir):
    return jaxdiff.load_pipeline(pipe_dir)


def _noise(pipe, n, seed=0):
    c = pipe.unet.config
    return np.random.default_rng(seed).standard_normal((n, c.sample_size, c.sample_size,
                                                        c.in_channels)).astype(np.float32)


@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_ddim_matches_diffusers_pipeline(pipe_dir, loaded, torch, rescale):
    """Also with guidance rescale (Lin et al.), diffusers' ``guidance_rescale``: the same
    compiled program (the factor is traced)."""
    from diffusers import StableDiffusionPipeline
    tp = StableDiffusionPipeline.from_pretrained(pipe_dir)
    pipe, params = loaded
    noise = _noise(pipe, 2)
    with torch.no_grad():
        want = tp(PROMPTS, negative_prompt=["green", "dark"], num_inference_steps=10,
                  guidance_scale=5.0, guidance_rescale=rescale,
                  latents=torch.tensor(ref.nchw(noise)), output_type="latent").images.numpy()
        plain = tp(PROMPTS, negative_prompt=["green", "dark"], num_inference_steps=10,
                   guidance_scale=5.0, latents=torch.tensor(ref.nchw(noise)),
                   output_type="latent").images.numpy()
    got = jaxdiff.generate(pipe, params, PROMPTS, ["green", "dark"], sampler="ddim", steps=10,
                           guidance_scale=5.0, guidance_rescale=rescale, latents=noise,
                           output="latents")
    np.testing.assert_allclose(ref.nchw(got), want, atol=1e-3, rtol=0)
    assert np.abs(want).max() > 0.1  # a real trajectory, not a vanishing one
    if rescale:  # the rescale really acts here (far beyond the tolerance)
        assert np.abs(want - plain).max() > 0.05


def test_images_are_decoded_latents(loaded):
    pipe, params = loaded
    noise = _noise(pipe, 1)
    lat = jaxdiff.generate(pipe, params, "x", steps=3, latents=noise, output="latents")
    img = jaxdiff.generate(pipe, params, "x", steps=3, latents=noise)
    want = jaxdiff.pipeline.to_uint8(pipe.decode_latents(params, jnp.asarray(lat)))
    assert img.dtype == np.uint8 and img.shape == (1, 16, 16, 3)
    assert np.abs(img.astype(int) - want.astype(int)).max() <= 1


def test_traced_values_do_not_recompile(loaded, generation_traces):
    pipe, params = loaded
    traces = generation_traces
    for scale, eta, neg, seed, window in [(5.0, 0.0, "green", 0, (0.0, 1.0)),
                                          (7.5, 0.5, "blue dark", 1, (0.25, 0.9)),
                                          (1.0, 1.0, None, 2, (0.0, 0.5))]:
        jaxdiff.generate(pipe, params, PROMPTS, neg, sampler="ddim", steps=4,
                         guidance_scale=scale, eta=eta, seed=seed, guidance_rescale=0.3,
                         guidance_interval=window)
    assert len(traces) == 1
    jaxdiff.generate(pipe, params, PROMPTS, sampler="ddim", steps=5)  # new shape: recompiles
    assert len(traces) == 2


def test_eta_and_rescale_change_the_result(loaded):
    pipe, params = loaded
    kw = dict(sampler="ddim", steps=4, output="latents", seed=3)
    a = jaxdiff.generate(pipe, params, PROMPTS, **kw)
    assert not np.allclose(a, jaxdiff.generate(pipe, params, PROMPTS, eta=1.0, **kw))
    assert not np.allclose(a, jaxdiff.generate(pipe, params, PROMPTS,
                                               guidance_rescale=0.7, **kw))


def test_guidance_sweep_equals_separate_runs(loaded):
    pipe, params = loaded
    kw = dict(sampler="dpmpp_2m", steps=4, output="latents", seed=1)
    sweep = jaxdiff.generate(pipe, params, PROMPTS, guidance_scale=[1.0, 4.0, 9.0], **kw)
    assert sweep.shape[:2] == (3, 2)
    for i, s in enumerate([1.0, 4.0, 9.0]):
        one = jaxdiff.generate(pipe, params, PROMPTS, guidance_scale=s, **kw)
        np.testing.assert_allclose(sweep[i], one, rtol=1e-5, atol=1e-4)


def test_guidance_interval(loaded):
    """Guidance only inside the interval: no step inside it is plain conditional sampling
    (scale 1); guidance on the first half of the steps equals a run that stops at half way
    (``denoising_end``) handing its latents to an unguided run of the rest
    (``denoising_start``)."""
    pipe, params = loaded
    kw = dict(sampler="ddim", steps=4, output="latents", seed=4)
    none = jaxdiff.generate(pipe, params, PROMPTS, guidance_scale=6.0,
                            guidance_interval=(0.99, 1.0), **kw)
    np.testing.assert_allclose(none, jaxdiff.generate(pipe, params, PROMPTS,
                                                      guidance_scale=1.0, **kw),
                               rtol=1e-5, atol=1e-5)
    half = jaxdiff.generate(pipe, params, PROMPTS, guidance_scale=6.0,
                            guidance_interval=(0.0, 0.5), **kw)
    mid = jaxdiff.generate(pipe, params, PROMPTS, guidance_scale=6.0, denoising_end=0.5, **kw)
    rest = jaxdiff.generate(pipe, params, PROMPTS, guidance_scale=1.0, latents=mid,
                            denoising_start=0.5, **kw)
    np.testing.assert_allclose(half, rest, rtol=1e-5, atol=1e-5)
    assert not np.allclose(half, none, atol=1e-3)


def test_condition_annealing_schedule_and_statistics():
    """CADS (Sadat et al. 2024): gamma(t) is 1 up to tau1, 0 from tau2, linear between;
    psi = 1 keeps each row's own mean and std; all-noise steps with psi = 0 are pure
    N(0, s^2) noise, independent of the condition; a row's result does not depend on the
    batch; gamma = 1 returns the condition bit for bit."""
    w = [float(guidance.annealing_weight(t, 0.6, 0.9)) for t in (0.0, 0.6, 0.75, 0.9, 1.0)]
    np.testing.assert_allclose(w, [1.0, 1.0, 0.5, 0.0, 0.0], atol=1e-6)
    rng = np.random.default_rng(0)
    y = jnp.asarray(rng.normal(0.3, 2.0, (3, 77, 64)) * np.arange(1, 4)[:, None, None],
                    jnp.float32)
    keys = gen_lib.sample_keys(1, 3)
    mixed = guidance.anneal_condition(y, keys, 0.75, jnp.asarray([0.6, 0.9, 0.5, 1.0]))
    assert not np.allclose(mixed, y, atol=1e-2)
    np.testing.assert_allclose(mixed.mean(axis=(1, 2)), y.mean(axis=(1, 2)), atol=1e-4)
    np.testing.assert_allclose(mixed.std(axis=(1, 2)), y.std(axis=(1, 2)), rtol=1e-4)
    noise = guidance.anneal_condition(y, keys, 0.95, jnp.asarray([0.6, 0.9, 0.5, 0.0]))
    assert abs(float(noise.std()) - 0.5) < 0.01 and abs(float(noise.mean())) < 0.01
    assert abs(np.corrcoef(np.ravel(noise), np.ravel(y))[0, 1]) < 0.02
    row = guidance.anneal_condition(y[1:2], keys[1:2], 0.75, jnp.asarray([0.6, 0.9, 0.5, 1.0]))
    np.testing.assert_allclose(row, mixed[1:2], rtol=1e-6, atol=1e-6)
    same = guidance.anneal_condition(y, keys, 0.5, jnp.asarray([0.6, 0.9, 0.5, 1.0]))
    assert np.array_equal(same, y)


def test_condition_annealing_in_generate(loaded, request):
    """Noise scale 0 with psi = 1 rescales the condition back to itself: the images equal
    plain sampling; a real noise scale changes them; new values are traced (one program)."""
    pipe, params = loaded
    kw = dict(sampler="ddim", steps=4, output="latents", seed=2, guidance_scale=5.0)
    plain = jaxdiff.generate(pipe, params, PROMPTS, **kw)
    traces = request.getfixturevalue("generation_traces")
    off = jaxdiff.generate(pipe, params, PROMPTS, condition_annealing=(0.0, 1.0, 0.0, 1.0), **kw)
    # (DDIM 4 steps: t <= 0.751 < tau2 = 1, so gamma > 0 and the rescale restores y)
    np.testing.assert_allclose(off, plain, rtol=1e-4, atol=1e-4)
    on = jaxdiff.generate(pipe, params, PROMPTS, condition_annealing=(0.3, 0.9, 1.0, 1.0), **kw)
    assert np.abs(on - plain).max() > 1e-2
    assert len(traces) == 1


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_runs_end_to_end(loaded, name):
    pipe, params = loaded
    out = jaxdiff.generate(pipe, params, PROMPTS[:1], sampler=name, steps=3, output="latents")
    assert out.shape == (1, 8, 8, 4) and np.isfinite(out).all()


def test_chunks_reproduce_one_batch(loaded):
    pipe, params = loaded
    kw = dict(sampler="euler_a", steps=3, output="latents", seed=5)
    whole = jaxdiff.generate(pipe, params, ["a", "b", "c"], **kw)
    tail = jaxdiff.generate(pipe, params, ["b", "c"], sample_offset=1, **kw)
    np.testing.assert_allclose(whole[1:], tail, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(steps=0), "steps must be >= 1"),
    (dict(height=10), "height=10 must be a positive multiple of 4"),
    (dict(sampler="plms"), "unknown sampler"),
    (dict(negative_prompts=["a", "b", "c"]), "3 negative prompts for 2 prompts"),
    (dict(guidance_interval=(0.6, 0.2)), "need 0 <= start < end <= 1"),
    (dict(condition_annealing=(0.9, 0.6, 0.25, 1.0)), "need 0 <= tau1 < tau2 <= 1"),
    (dict(condition_annealing=(0.6, 0.9)), "needs 4 numbers"),
])
def test_bad_arguments_are_clear_errors(loaded, kwargs, match):
    pipe, params = loaded
    with pytest.raises(ValueError, match=match):
        jaxdiff.generate(pipe, params, PROMPTS, **kwargs)


def test_eight_devices_equal_one_device(pipe_dir):
    """Same seeds on a mesh of 8 forced host devices and on 1 device give the same images."""
    script = textwrap.dedent(f"""
        import os
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_force_host_platform_device_count=8")
        import jax, numpy as np, jaxdiff
        from jaxdiff import parallel
        assert jax.device_count() == 8
        pipe, params = jaxdiff.load_pipeline({pipe_dir!r})
        prompts = ["p%d" % i for i in range(8)]
        kw = dict(sampler="euler_a", steps=3, seed=7, output="latents")
        many = jaxdiff.generate(pipe, params, prompts, mesh=parallel.make_mesh(), **kw)
        one = jaxdiff.generate(pipe, params, prompts,
                               mesh=parallel.make_mesh(jax.devices()[:1]), **kw)
        odd = jaxdiff.generate(pipe, params, prompts[:5], mesh=parallel.make_mesh(), **kw)
        np.testing.assert_allclose(many, one, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(odd, one[:5], rtol=1e-5, atol=1e-4)
        print("OK", float(np.abs(many).max()))
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
