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
