"""Learning-rate schedules of the training optimizers, read back from optax's state."""
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdiff.training.optim import adamw_with_warmup, constant_adamw


def _first_updates(opt, n):
    """Per-step |update| of one scalar parameter with gradient 1 (Adam: ~lr per step)."""
    params, state, out = jnp.zeros(()), None, []
    state = opt.init(params)
    for _ in range(n):
        upd, state = opt.update(jnp.ones(()), state, params)
        out.append(float(-upd))
    return np.asarray(out)


@pytest.mark.parametrize("make", [lambda: adamw_with_warmup(1e-2, 0, 100, weight_decay=0.0),
                                  lambda: constant_adamw(1e-2, 0, weight_decay=0.0)])
def test_no_warmup_means_full_rate_from_the_first_step(make):
    np.testing.assert_allclose(_first_updates(make(), 1), [1e-2], rtol=1e-3)


def test_warmup_then_cosine_to_a_tenth():
    u = _first_updates(adamw_with_warmup(1e-2, 4, 20, weight_decay=0.0), 20)
    np.testing.assert_allclose(u[:5], [0, 2.5e-3, 5e-3, 7.5e-3, 1e-2], rtol=1e-3, atol=1e-9)
    assert np.all(np.diff(u[4:]) < 0) and u[-1] > 1e-3   # decays towards lr / 10
    sched = optax.cosine_decay_schedule(1e-2, 16, alpha=0.1)
    np.testing.assert_allclose(u[19], float(sched(15)), rtol=1e-3)
