"""attend(): the CPU blockwise path equals plain softmax attention, including padding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models import attention


def _naive(q, k, v, scale):
    s = jnp.einsum("bqnh,bknh->bnqk", q, k) * scale
    return jnp.einsum("bnqk,bknh->bqnh", jax.nn.softmax(s, axis=-1), v)


@pytest.mark.parametrize("lq,lk", [(1000, 77), (1031, 1031)])  # several blocks; odd -> padded
def test_blockwise_matches_naive(monkeypatch, lq, lk):
    monkeypatch.setattr(attention, "_CPU_SCORE_BLOCK_BYTES", 64 * 1024)  # force many blocks
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, lq, 2, 8))
    k, v = jax.random.normal(kk, (2, lk, 2, 8)), jax.random.normal(kv, (2, lk, 2, 8))
    out = attention.attend(q, k, v, scale=8 ** -0.5, upcast=False, impl="blockwise")
    np.testing.assert_allclose(np.asarray(out), np.asarray(_naive(q, k, v, 8 ** -0.5)),
                               atol=1e-5)
    g = jax.grad(lambda q: attention.attend(q, k, v, scale=0.3, upcast=False,
                                            impl="blockwise").sum())(q)
    g_ref = jax.grad(lambda q: _naive(q, k, v, 0.3).sum())(q)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-4)


def test_unknown_impl_is_an_error():
    q = jnp.zeros((1, 4, 1, 8))
    with pytest.raises(ValueError, match="impl"):
        attention.attend(q, q, q, scale=1.0, upcast=False, impl="flash")


def test_tpu_splash_kernel_in_interpret_mode_matches_naive(monkeypatch):
    """The TPU Pallas splash kernel (Pallas interpret mode on CPU): forward and q-gradient
    equal plain attention over 2 x 2 blocks of 128; a forced "splash" falls back to XLA's
    op for lengths it does not take (77 caption tokens)."""
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(kq, (2, 256, 2, 8))
    k, v = jax.random.normal(kk, (2, 256, 2, 8)), jax.random.normal(kv, (2, 256, 2, 8))
    fn = jax.jit(lambda q, k, v: attention.attend(q, k, v, scale=0.3, upcast=False,
                                                  impl="splash"))
    np.testing.assert_allclose(np.asarray(fn(q, k, v)), np.asarray(_naive(q, k, v, 0.3)),
                               atol=1e-5)
    g = jax.jit(jax.grad(lambda q: fn(q, k, v).sum()))(q)
    g_ref = jax.grad(lambda q: _naive(q, k, v, 0.3).sum())(q)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-4)
    monkeypatch.setenv("JAXDIFF_ATTENTION", "splash")
    assert attention.auto_implementation(jnp.bfloat16, lq=4096, lk=4096) == "splash"
    assert attention.auto_implementation(jnp.bfloat16, lq=4096, lk=77) == "xla"
    assert attention.auto_implementation(jnp.bfloat16, True, lq=4096, lk=4096) == "xla"
