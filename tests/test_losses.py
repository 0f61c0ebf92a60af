"""Training losses against closed forms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import schedules
from jaxdiff.training import losses


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weight_matches_closed_form(prediction_type):
    a = np.array([0.999, 0.9, 0.5, 0.1, 0.001], np.float64)
    snr = a / (1 - a)
    clipped = np.minimum(snr, 5.0)
    expected = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1),
                "sample": clipped}[prediction_type]
    got = losses.min_snr_weight(jnp.asarray(a, jnp.float32), prediction_type, 5.0)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4)
    if prediction_type == "epsilon":   # noisy steps (SNR < gamma) keep full weight
        assert np.allclose(np.asarray(got)[-2:], 1.0)


def test_denoising_loss_weighting_is_per_sample_min_snr():
    """Same rng -> same (t, noise): weighted / unweighted = min_snr_weight(alpha_bar[t])."""
    sched = schedules.SchedulerConfig(beta_start=0.00085, beta_end=0.012,
                                      beta_schedule="scaled_linear")
    table = np.asarray(schedules.alphas_cumprod(sched))
    zero = lambda x, t, c: jnp.zeros_like(x)
    x0 = jax.random.normal(jax.random.key(1), (256, 2, 2, 2))
    rng = jax.random.key(2)
    plain = losses.denoising_loss(zero, table, "epsilon")(x0, None, rng)
    weighted = losses.denoising_loss(zero, table, "epsilon", 5.0)(x0, None, rng)
    ratio = np.asarray(weighted / plain)
    allowed = np.asarray(losses.min_snr_weight(jnp.asarray(table), "epsilon", 5.0))
    assert np.all(np.min(np.abs(ratio[:, None] - allowed[None]), axis=1) < 1e-5)
    assert ratio.min() < 0.5 and ratio.max() <= 1.0 + 1e-6   # some low-noise steps damped


def test_min_timestep_draws_only_the_noisier_timesteps():
    """A denoiser exact (epsilon from x_t when x0 = 0) only at t >= 500 has zero loss for
    every sample when timesteps come from [500, T), and not when they come from [0, T)."""
    sched = schedules.SchedulerConfig(beta_start=0.00085, beta_end=0.012,
                                      beta_schedule="scaled_linear")
    table = jnp.asarray(schedules.alphas_cumprod(sched))
    exact_late = lambda x, t, c: jnp.where(
        (t >= 500)[:, None, None, None], x / jnp.sqrt(1.0 - table[t])[:, None, None, None], 0.0)
    x0 = jnp.zeros((512, 2, 2, 1))
    late = losses.denoising_loss(exact_late, table, "epsilon", min_timestep=500)(
        x0, None, jax.random.key(0))
    every = losses.denoising_loss(exact_late, table, "epsilon")(x0, None, jax.random.key(0))
    assert float(jnp.max(late)) < 1e-8
    share_early = float(jnp.mean(every > 1e-4))
    assert 0.4 < share_early < 0.6, share_early


def test_pixel_weights_give_the_weighted_mean_of_the_squared_error():
    """A zero denoiser with x0 = 0 and the epsilon target makes the squared error the noise
    squared (same rng -> same noise): the weighted loss is sum(w n^2) / sum(w) per sample;
    uniform weights are the plain mean."""
    table = np.linspace(0.99, 0.01, 1000).astype(np.float32)
    zero = lambda x, t, c: jnp.zeros_like(x)
    x0 = jnp.zeros((3, 4, 4, 2))
    loss = losses.denoising_loss(zero, table, "epsilon")
    rng = jax.random.key(5)
    noise = jax.random.normal(jax.random.split(rng)[1], x0.shape)
    w = jnp.zeros((3, 4, 4, 1)).at[:, :2, :2].set(5.0) + 1.0   # an "object" in one corner
    want = np.sum(np.asarray(w * noise ** 2), (1, 2, 3)) / np.sum(np.broadcast_to(w, x0.shape),
                                                                 (1, 2, 3))
    np.testing.assert_allclose(loss(x0, None, rng, w), want, rtol=1e-5)
    np.testing.assert_allclose(loss(x0, None, rng, jnp.full((3, 4, 4, 1), 2.0)),
                               loss(x0, None, rng), rtol=1e-6)


def test_vae_loss_pixel_weights_give_the_weighted_mean_of_l1_plus_l2():
    """vae_loss(weight=w): per sample sum(w (|d| + d^2)) / sum(w) over pixels and channels
    (plus the KL term); uniform weights are the plain mean."""
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 4, 4, 3)).astype(np.float32)
    recon = rng.uniform(-1, 1, (2, 4, 4, 3)).astype(np.float32)
    zeros = np.zeros((2, 2, 2, 4), np.float32)
    w = np.ones((2, 4, 4, 1), np.float32)
    w[:, 1:3, 1:3] = 9.0                                   # an "object" in the middle
    d = recon - images
    wb = np.broadcast_to(w, d.shape)
    want = np.sum(wb * (np.abs(d) + d ** 2), (1, 2, 3)) / np.sum(wb, (1, 2, 3))
    np.testing.assert_allclose(losses.vae_loss(recon, images, zeros, zeros, 0.0, w), want,
                               rtol=1e-5)
    uniform = losses.vae_loss(recon, images, zeros, zeros, 0.0, 3 * np.ones_like(w))
    np.testing.assert_allclose(uniform, losses.vae_loss(recon, images, zeros, zeros, 0.0),
                               rtol=1e-6)
    assert not np.allclose(want, losses.vae_loss(recon, images, zeros, zeros, 0.0))


def test_object_coverage_pools_the_union_of_the_masks():
    from jaxdiff.training.text_to_image import object_coverage
    masks = np.zeros((2, 8, 8), bool)
    masks[0, :4, :4] = True       # one object fills the top-left latent pixel
    masks[1, 4:6, 4:8] = True     # the other half of the bottom-right one
    cov = object_coverage([{"masks": masks}], factor=4)
    np.testing.assert_array_equal(cov[0, ..., 0], [[1.0, 0.0], [0.0, 0.5]])
    with pytest.raises(ValueError, match="needs ground-truth 'masks'"):
        object_coverage([{"image": np.zeros((8, 8, 3))}], factor=4)
