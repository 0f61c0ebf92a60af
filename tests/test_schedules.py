"""Schedules and spacings against diffusers' PyTorch schedulers; config round trips."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import schedules
from jaxdiff.schedules import SchedulerConfig

SD1 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
           steps_offset=1, set_alpha_to_one=False)
BETAS = {
    "linear": dict(),
    "scaled_linear": SD1,
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
    "scaled_linear_zsnr": dict(SD1, rescale_betas_zero_snr=True),
}
STEP_COUNTS = (1, 3, 7, 30, 50, 999)


@pytest.fixture(scope="module")
def diffusers_mod(torch):
    import diffusers
    from diffusers.utils import logging
    logging.set_verbosity_error()
    return diffusers


def _ref(diffusers_mod, cls_name, cfg, steps=None):
    sched = getattr(diffusers_mod, cls_name).from_config(cfg.to_dict())
    if steps is not None:
        sched.set_timesteps(steps)
    return sched


@pytest.mark.parametrize("betas", sorted(BETAS))
def test_betas_and_alphas_cumprod(diffusers_mod, betas):
    cfg = SchedulerConfig(**BETAS[betas])
    ref = _ref(diffusers_mod, "DDPMScheduler", cfg)
    b, ac = schedules.betas(cfg), schedules.alphas_cumprod(cfg)
    assert b.dtype == ac.dtype == np.float32
    # torch.linspace rounds a few entries differently (by one ulp) from numpy's.
    tol = dict(rtol=1e-6, atol=1e-12)
    if cfg.rescale_betas_zero_snr:
        # beta = 1 - abar_t / abar_{t-1} magnifies float32 round-off (torch's CPU float32
        # sqrt is not correctly rounded), so only abar is compared tightly.
        np.testing.assert_allclose(b, ref.betas.numpy(), rtol=5e-4)
        tol = dict(rtol=1e-6, atol=1e-6)
        assert ac[-1] == 0
    else:
        np.testing.assert_allclose(b, ref.betas.numpy(), **tol)
    np.testing.assert_allclose(ac, ref.alphas_cumprod.numpy(), **tol)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("family,cls_name", [("ddim", "DDIMScheduler"),
                                             ("ddim", "DDPMScheduler"),
                                             ("k", "EulerDiscreteScheduler"),
                                             ("k", "HeunDiscreteScheduler"),
                                             ("dpm", "DPMSolverMultistepScheduler")])
def test_timesteps(diffusers_mod, family, cls_name, spacing):
    offset = 0 if spacing != "leading" else 1
    for steps in STEP_COUNTS:
        cfg = SchedulerConfig(**dict(SD1, timestep_spacing=spacing, steps_offset=offset))
        ref = _ref(diffusers_mod, cls_name, cfg, steps).timesteps.numpy()
        if cls_name == "HeunDiscreteScheduler":  # diffusers repeats all but the first
            ref = ref[::2]
        ts = schedules.timesteps(cfg, steps, family)
        assert ts.dtype == (np.float32 if family == "k" else np.int64)
        np.testing.assert_array_equal(ts, ref, err_msg=f"{steps=}")


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_k_and_dpm_sigmas(diffusers_mod, karras, spacing):
    cfg = SchedulerConfig(**dict(SD1, timestep_spacing=spacing, use_karras_sigmas=karras))
    for steps in (4, 25):
        ts, sig = schedules.k_sigmas(cfg, steps)
        ref = _ref(diffusers_mod, "EulerDiscreteScheduler", cfg, steps)
        np.testing.assert_allclose(sig, ref.sigmas.numpy(), rtol=1e-6)
        np.testing.assert_allclose(ts, ref.timesteps.numpy(), rtol=1e-6, atol=1e-4)
        ts, sig = schedules.dpm_sigmas(cfg, steps)
        ref = _ref(diffusers_mod, "DPMSolverMultistepScheduler", cfg, steps)
        np.testing.assert_allclose(sig, ref.sigmas.numpy(), rtol=1e-6)
        np.testing.assert_array_equal(ts, ref.timesteps.numpy())


def test_karras_sigmas_endpoints():
    s = schedules.karras_sigmas(0.03, 14.6, 10)
    assert s.shape == (10,)
    np.testing.assert_allclose([s[0], s[-1]], [14.6, 0.03])
    assert np.all(np.diff(s) < 0)


@pytest.mark.parametrize("steps", [0, -1, 1001, 2.5])
def test_num_steps_validated(steps):
    with pytest.raises(ValueError, match="num_steps="):
        schedules.timesteps(SchedulerConfig(), steps)


def test_leading_offset_past_the_table_is_refused():
    with pytest.raises(ValueError, match="steps_offset"):
        schedules.timesteps(SchedulerConfig(steps_offset=1), 1000)


@pytest.mark.parametrize("fn,ref_name", [(schedules.add_noise, "add_noise"),
                                         (schedules.velocity, "get_velocity")])
def test_add_noise_and_velocity(torch, diffusers_mod, fn, ref_name):
    cfg = SchedulerConfig(**SD1)
    ref = _ref(diffusers_mod, "DDPMScheduler", cfg)
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((3, 4, 4, 2)).astype(np.float32)
    noise = rng.standard_normal((3, 4, 4, 2)).astype(np.float32)
    t = np.array([0, 500, 999])
    expected = getattr(ref, ref_name)(torch.from_numpy(x0), torch.from_numpy(noise),
                                      torch.from_numpy(t)).numpy()
    ac = jnp.asarray(schedules.alphas_cumprod(cfg))
    got = jax.jit(fn)(ac, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t, jnp.int32))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_from_dict_ignores_metadata_and_neutral_keys():
    # stable-diffusion-v1-5's scheduler_config.json, plus neutral keys of other classes.
    raw = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0",
           "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
           "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
           "steps_offset": 1, "trained_betas": None, "clip_sample": False,
           "thresholding": False, "dynamic_thresholding_ratio": 0.995,
           "sample_max_value": 1.0, "variance_type": None, "algorithm_type": "dpmsolver++",
           "lambda_min_clipped": -math.inf, "lower_order_final": True,
           "use_karras_sigmas": None, "some_future_key": 3}
    cfg = SchedulerConfig.from_dict(raw)
    assert cfg == SchedulerConfig(**SD1)


@pytest.mark.parametrize("key,value", [("thresholding", True), ("trained_betas", [0.1] * 10),
                                       ("algorithm_type", "sde-dpmsolver++"),
                                       ("variance_type", "learned_range"),
                                       ("solver_order", 3), ("timestep_type", "continuous")])
def test_from_dict_refuses_unsupported_values(key, value):
    with pytest.raises(ValueError, match=key):
        SchedulerConfig.from_dict({key: value})


@pytest.mark.parametrize("field,value", [("beta_schedule", "sigmoid"),
                                         ("prediction_type", "flow_prediction"),
                                         ("timestep_spacing", "karras")])
def test_invalid_field_values(field, value):
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**{field: value})


@pytest.mark.parametrize("cls_name", ["DDIMScheduler", "DDPMScheduler",
                                      "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
                                      "EulerAncestralDiscreteScheduler",
                                      "HeunDiscreteScheduler"])
def test_json_round_trip_through_diffusers(diffusers_mod, tmp_path, cls_name):
    cfg = SchedulerConfig(**dict(SD1, prediction_type="v_prediction",
                                 timestep_spacing="trailing"))
    sched = _ref(diffusers_mod, cls_name, cfg)
    for key, value in cfg.to_dict().items():
        if key in sched.config:
            assert sched.config[key] == value, key
    sched.save_config(str(tmp_path))
    path = tmp_path / "scheduler_config.json"
    loaded = SchedulerConfig.from_json(str(path))
    defaults = SchedulerConfig()
    for key in cfg.to_dict():  # fields the class lacks fall back to jaxdiff's defaults
        expected = getattr(cfg, key) if key in sched.config else getattr(defaults, key)
        assert getattr(loaded, key) == expected, key
    assert json.loads(path.read_text())["_class_name"] == cls_name
