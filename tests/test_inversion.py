"""Inversion: timestep alignment (analytic), batch independence, and the published ordering
of reconstruction quality on the embedded model's held-out shapes-world images."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff.data import WorldSpec, held_out_examples
from jaxdiff.editing import inversion as inv
from jaxdiff.samplers.ddim import ddim_tables
from jaxdiff.schedules import SchedulerConfig, alphas_cumprod

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
          set_alpha_to_one=False)
SIGMA = 0.5


def _gaussian_denoiser(cfg):
    """The exact denoiser of data ~ N(0, SIGMA^2 I), in the config's prediction type."""
    ac = jnp.asarray(alphas_cumprod(cfg))

    def denoise(x, t, context):
        a = ac[t]
        x0 = a ** 0.5 * SIGMA ** 2 / (a * SIGMA ** 2 + 1 - a) * x
        eps = (x - a ** 0.5 * x0) / (1 - a) ** 0.5
        return eps if cfg.prediction_type == "epsilon" else a ** 0.5 * eps - (1 - a) ** 0.5 * x0

    return denoise


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_inversion_round_trip_converges(prediction_type):
    cfg = SchedulerConfig(**SD, prediction_type=prediction_type)
    den = _gaussian_denoiser(cfg)
    z0 = SIGMA * jax.random.normal(jax.random.key(1), (2, 4, 4, 3))
    errors = []
    for steps in (10, 50):
        tab = ddim_tables(cfg, steps)
        traj = inv.ddim_invert(den, tab, z0, None, prediction_type)
        assert traj.shape == (steps + 1,) + z0.shape
        np.testing.assert_array_equal(traj[0], z0)
        assert 0.8 < float(traj[-1].std()) < 1.3  # inverted to (roughly) unit noise
        rec = inv.ddim_sample(den, tab, traj[-1], jnp.zeros((2, 1, 1)),
                              jnp.zeros((steps, 2, 1, 1)), 1.0, prediction_type)
        errors.append(float(jnp.abs(rec - z0).max() / jnp.abs(z0).max()))
    assert errors[1] < 0.1 and errors[1] < errors[0] / 3, errors  # first-order convergence


def test_inversion_visits_sampling_levels_in_reverse():
    cfg = SchedulerConfig(**SD)
    tab = ddim_tables(cfg, 50)
    assert int(tab.timesteps[0]) == 981 and int(tab.timesteps[-1]) == 1
    ac = alphas_cumprod(cfg)
    np.testing.assert_allclose(tab.alpha_prev[:-1], tab.alpha[1:])
    assert float(tab.alpha_prev[-1]) == pytest.approx(float(ac[0]))  # set_alpha_to_one=False


@pytest.fixture(scope="module")
def world(embedded):
    """Embedded model + 4 held-out images with their captions."""
    pipe, params = embedded
    side = pipe.image_size
    ex = held_out_examples(WorldSpec(image_size=side), 4)
    images = np.stack([e["image"] for e in ex])
    z0 = pipe.encode_images(params, jaxdiff.pipeline.from_uint8(images))
    cond = pipe.encode_text(params, pipe.tokenize([e["caption"] for e in ex]))
    uncond = pipe.encode_text(params, pipe.tokenize([""] * len(ex)))
    den = lambda x, t, c: pipe.unet.apply({"params": params["unet"]}, x, t, c)
    return pipe, den, z0, cond, uncond


STEPS = 10


@pytest.fixture(scope="module")
def inverted(world):
    pipe, den, z0, cond, uncond = world
    pt = pipe.scheduler.prediction_type
    tab = ddim_tables(pipe.scheduler, STEPS)
    traj = jax.jit(lambda z, c: inv.ddim_invert(den, tab, z, c, pt))(z0, cond)
    nulls, taken = jax.jit(lambda: inv.null_text_invert(den, tab, traj, cond, uncond, 7.5, pt))()
    return tab, traj, nulls, taken


@pytest.fixture(scope="module")
def sample(world, inverted):
    """Jitted DDIM sampling from an inverted latent (guidance and offsets traced, zero
    offsets when not given: one compile per batch size)."""
    pipe, den = world[:2]
    tab = inverted[0]
    run = jax.jit(lambda x, c, nulls, g, offsets: inv.ddim_sample(
        den, tab, x, c, nulls, g, pipe.scheduler.prediction_type, offsets))
    return lambda x, c, nulls, g, offsets=None: run(
        x, c, nulls, g, jnp.zeros((STEPS,) + x.shape) if offsets is None else offsets)


def _rec_mse(world, sample, traj, nulls, guidance, offsets=None):
    z0, cond = world[2], world[3]
    rec = sample(traj[-1], cond, nulls, jnp.float32(guidance), offsets)
    return np.asarray(jnp.mean((rec - z0) ** 2, axis=(1, 2, 3)))


def test_published_reconstruction_ordering(world, inverted, sample):
    pipe, den, z0, cond, uncond = world
    tab, traj, nulls, taken = inverted
    empty = jnp.broadcast_to(uncond, (STEPS,) + uncond.shape)
    ddim_1 = _rec_mse(world, sample, traj, empty, 1.0)
    ddim_75 = _rec_mse(world, sample, traj, empty, 7.5)
    npi = _rec_mse(world, sample, traj, inv.negative_prompt_nulls(cond, STEPS), 7.5)
    null_text = _rec_mse(world, sample, traj, nulls, 7.5)
    offsets = jax.jit(lambda: inv.direct_offsets(den, tab, traj, cond, empty, 7.5,
                                                 pipe.scheduler.prediction_type))()
    direct = _rec_mse(world, sample, traj, empty, 7.5, offsets)
    assert ddim_75.mean() > 3 * null_text.mean(), (ddim_75, null_text)
    assert ddim_75.mean() > 3 * npi.mean(), (ddim_75, npi)
    assert direct.max() < 1e-8
    assert (np.asarray(taken) >= 1).all() and (np.asarray(taken) <= 10).all()
    assert ddim_1.mean() < ddim_75.mean()


def test_null_text_stops_early_on_the_embedded_model(world):
    """The early stop (loss < 1e-5 + i * 2e-5) really fires on the shipped weights at the
    reference's 50 steps: some steps take fewer than the 10 inner Adam steps, others all
    10 (measured on this image: 10 for the first 24 steps, then mostly 1-3). (At this file's 10 steps the DDIM steps are too coarse: every count is
    10, so the batch-vs-single test below cannot see early stopping.)"""
    pipe, den, z0, cond, uncond = world
    pt = pipe.scheduler.prediction_type
    tab = ddim_tables(pipe.scheduler, 50)

    @jax.jit
    def taken(z, c, u):
        traj = inv.ddim_invert(den, tab, z, c, pt)
        return inv.null_text_invert(den, tab, traj, c, u, 7.5, pt)[1]

    counts = np.asarray(taken(z0[:1], cond[:1], uncond[:1]))[:, 0]
    print("inner steps per step:", counts.tolist())
    assert (counts >= 1).all() and (counts <= 10).all()
    assert (counts < 10).any() and (counts == 10).any(), counts


def test_null_text_batch_matches_single_images_within_float32(world, inverted, sample):
    """Batch == single only as far as float32 allows (not bit-exact): each image is
    optimised independently, but XLA's float32 round-off differs between batch sizes and
    Adam's normalised steps amplify it over the late steps (and can flip an early stop that
    sits at its threshold). Checked: the first step's null agrees to 1e-3, >= 80 % of the
    per-step inner-step counts agree, and both reconstruct equally well (MSE within 2x)."""
    pipe, den, z0, cond, uncond = world
    tab, traj, nulls, taken = inverted
    pt = pipe.scheduler.prediction_type
    invert = jax.jit(lambda tr, c, u: inv.null_text_invert(den, tab, tr, c, u, 7.5, pt))
    rec_all = sample(traj[-1], cond, nulls, jnp.float32(7.5))
    for i in (0, 3):
        one = lambda a: a[i:i + 1]
        n1, t1 = invert(traj[:, i:i + 1], one(cond), one(uncond))
        # Each image is optimised independently, but float32 round-off differs between batch
        # sizes and Adam's normalised steps amplify it over the late steps (and can flip an
        # early stop sitting at its threshold). So: the first step's null agrees, most
        # early-stop counts agree, and both runs reconstruct equally well.
        same = np.asarray(t1[:, 0]) == np.asarray(taken[:, i])
        assert same.mean() >= 0.8, same
        assert float(jnp.max(jnp.abs(n1[0, 0] - nulls[0, i]))) < 1e-3
        rec_one = sample(traj[-1, i:i + 1], one(cond), n1, jnp.float32(7.5))
        err_one = float(jnp.mean((rec_one[0] - z0[i]) ** 2))
        err_all = float(jnp.mean((rec_all[i] - z0[i]) ** 2))
        assert err_one < 2 * err_all + 1e-4 and err_all < 2 * err_one + 1e-4, (err_one, err_all)
