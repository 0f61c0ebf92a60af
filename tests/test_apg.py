"""Adaptive projected guidance (Sadat et al. 2025): parity with diffusers' reference, CFG at
eta 1, a traced option of ``jaxdiff.generate`` (one program for every value)."""
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff import guidance, schedules
from jaxdiff.samplers import levels
from jaxdiff.samplers.base import x0_eps_vp

PROMPTS = ["a red circle", "blue square"]


@pytest.fixture(scope="module")
def loaded(tiny_pipe_dir):
    return jaxdiff.load_pipeline(tiny_pipe_dir)


@pytest.mark.parametrize("eta,threshold,momentum", [(0.0, 0.0, 0.0), (0.3, 4.0, 0.0),
                                                    (0.5, 0.0, -0.5), (0.0, 3.0, 0.4)])
def test_apg_combine_matches_diffusers(torch, eta, threshold, momentum):
    """Three steps against diffusers' ``normalized_guidance`` in float64 (the paper's form
    ``c + (w - 1) update`` is its ``use_original_formulation=True`` with scale w - 1), with
    its ``MomentumBuffer`` carried across the steps and its norm threshold."""
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, \
        normalized_guidance

    rng = np.random.default_rng(0)
    w, buffer = 5.0, MomentumBuffer(momentum) if momentum else None
    average = jnp.zeros((2, 4, 4, 3), jnp.float32)
    for _ in range(3):
        cond, uncond = (rng.standard_normal((2, 4, 4, 3)) for _ in range(2))
        want = normalized_guidance(torch.tensor(cond), torch.tensor(uncond), w - 1.0, buffer,
                                   eta, threshold, use_original_formulation=True).numpy()
        got, average = guidance.apg_combine(
            jnp.asarray(uncond, jnp.float32), jnp.asarray(cond, jnp.float32), jnp.float32(w),
            jnp.float32(eta), jnp.float32(threshold), jnp.float32(momentum), average)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if threshold:  # the clip acted: the guided update is shorter than CFG's
        assert np.linalg.norm(got - cond) < (w - 1) * np.linalg.norm(cond - uncond)


def test_apg_combine_per_image_scale_and_cfg_limit():
    """A per-image [B] scale equals each row run alone; eta 1, no threshold, no momentum is
    CFG ``u + w (c - u)``."""
    rng = np.random.default_rng(1)
    u, c = (jnp.asarray(rng.standard_normal((3, 4, 4, 2)), jnp.float32) for _ in range(2))
    w = jnp.asarray([1.0, 3.0, 7.5])
    zero = jnp.zeros_like(c)
    both, _ = guidance.apg_combine(u, c, w, 0.2, 2.0, -0.5, zero)
    for k in range(3):
        row, _ = guidance.apg_combine(u[k:k + 1], c[k:k + 1], w[k], 0.2, 2.0, -0.5, zero[:1])
        np.testing.assert_allclose(both[k:k + 1], row, rtol=1e-6, atol=1e-6)
    cfg, _ = guidance.apg_combine(u, c, w, 1.0, 0.0, 0.0, zero)
    np.testing.assert_allclose(cfg, guidance.combine(u, c, w[:, None, None, None]),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_out_from_x0_inverts_the_samplers_conversion(prediction_type):
    rng = np.random.default_rng(2)
    out, x = (jnp.asarray(rng.standard_normal((2, 4, 4, 3)), jnp.float32) for _ in range(2))
    a, s = jnp.float32(0.3), jnp.float32(0.954)
    x0, _ = x0_eps_vp(prediction_type)(out, x, a, s)
    back = guidance.out_from_x0_vp(prediction_type)(x0, x, a, s)
    np.testing.assert_allclose(back, out, rtol=1e-5, atol=1e-5)


def test_eta_one_is_cfg_with_interval_sweep_and_cads(loaded):
    """(1, 0, 0) equals plain CFG through ``generate``, composed with a guidance interval, a
    sweep over scales and CADS (the x0 round trip costs float32 rounding only)."""
    pipe, params = loaded
    kw = dict(sampler="dpmpp_2m", steps=4, output="latents", seed=3, guidance_scale=[1.0, 6.0],
              guidance_interval=(0.25, 1.0), condition_annealing=(0.3, 0.9, 0.25, 1.0))
    plain = jaxdiff.generate(pipe, params, PROMPTS, **kw)
    apg = jaxdiff.generate(pipe, params, PROMPTS, adaptive_projection=(1.0, 0.0, 0.0), **kw)
    assert apg.shape == plain.shape == (2, 2, 8, 8, 4)
    np.testing.assert_allclose(apg, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
def test_values_change_images_without_retracing(loaded, generation_traces, sampler):
    """eta, threshold and momentum each change the images and are traced: one program."""
    pipe, params = loaded
    traces = generation_traces
    kw = dict(sampler=sampler, steps=4, output="latents", seed=2, guidance_scale=7.0)
    runs = [jaxdiff.generate(pipe, params, PROMPTS, adaptive_projection=v, **kw)
            for v in [(1.0, 0.0, 0.0), (0.0, 0.0, 0.0), (1.0, 1.0, 0.0), (1.0, 0.0, -0.5)]]
    assert len(traces) == 1
    for other in runs[1:]:
        assert np.abs(other - runs[0]).max() > 1e-3


@pytest.mark.parametrize("kwargs,match", [
    (dict(adaptive_projection=(0.0, 0.0, 1.0)), "-1 < momentum < 1"),
    (dict(adaptive_projection=(0.0, -1.0, 0.0)), "norm_threshold >= 0"),
    (dict(adaptive_projection=(0.0, 0.0)), "needs 3 numbers"),
    (dict(adaptive_projection=(0.0, 0.0, 0.0), sampler="heun"), "works with the ddim"),
])
def test_bad_values_are_clear_errors(loaded, kwargs, match):
    pipe, params = loaded
    with pytest.raises(ValueError, match=match):
        jaxdiff.generate(pipe, params, PROMPTS, **kwargs)


def test_levels_are_the_samplers_own(loaded):
    """APG's x0 conversion uses the levels the samplers step with: DDIM's alpha-bar table,
    DPM-Solver++'s (alpha, sigma) table, and the 1 / sqrt(s^2 + 1) by which Euler and
    Euler-ancestral scale their VE sample into the UNet's input; alpha^2 + sigma^2 = 1."""
    from jaxdiff.samplers import SampleState, ddim, dpmpp_2m, make_sampler

    cfg = loaded[0].scheduler
    for name in levels.APG_SAMPLERS:
        alpha, sigma = levels.apg_levels(name, cfg, 5)
        assert alpha.shape == (make_sampler(name, cfg, 5).num_evals,)
        np.testing.assert_allclose(alpha ** 2 + sigma ** 2, 1.0, rtol=1e-6)
    alpha, _ = levels.apg_levels("ddim", cfg, 5)
    np.testing.assert_allclose(alpha ** 2, ddim.ddim_tables(cfg, 5).alpha, rtol=1e-6)
    alpha, sigma = levels.apg_levels("dpmpp_2m", cfg, 5)
    want = dpmpp_2m._tables(schedules.dpm_sigmas(cfg, 5)[1])
    np.testing.assert_array_equal(alpha, want[0])
    np.testing.assert_array_equal(sigma, want[1])
    for name in ("euler", "euler_a"):
        sampler, (alpha, _) = make_sampler(name, cfg, 5), levels.apg_levels(name, cfg, 5)
        ones = SampleState(jnp.ones((1, 2, 2, 1)))
        got = [float(sampler.model_input(ones, i)[0, 0, 0, 0]) for i in range(5)]
        np.testing.assert_allclose(got, alpha, rtol=1e-6)
