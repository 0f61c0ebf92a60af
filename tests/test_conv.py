"""jaxdiff.models.conv: forward and both gradients equal lax.conv_general_dilated's."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxdiff.models.conv import Conv, conv_general_dilated

CASES = [  # (input [B, H, W, C], kernel [kh, kw, C, D], strides, padding, rhs_dilation)
    ((2, 9, 7, 3), (3, 3, 3, 5), (1, 1), ((1, 1), (1, 1)), (1, 1)),
    ((2, 8, 8, 4), (3, 3, 4, 6), (2, 2), ((0, 1), (0, 1)), (1, 1)),   # VAE downsample
    ((1, 9, 11, 4), (3, 3, 4, 2), (2, 2), ((1, 1), (1, 1)), (1, 1)),  # UNet downsample, odd
    ((2, 8, 8, 4), (1, 1, 4, 3), (1, 1), "VALID", (1, 1)),
    ((2, 8, 12, 3), (4, 4, 3, 5), (4, 4), "VALID", (1, 1)),           # patch embedding
    ((1, 10, 9, 2), (3, 2, 2, 3), (1, 2), "SAME", (2, 1)),
    ((1, 7, 7, 2), (3, 3, 2, 2), (3, 1), ((2, 0), (1, 3)), (1, 2)),
]


@pytest.mark.parametrize("case", CASES, ids=range(len(CASES)))
def test_forward_and_gradients_equal_lax(case):
    xs, ws, strides, padding, dil = case
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, xs)
    w = jax.random.normal(kw, ws)
    args = dict(window_strides=strides, padding=padding, rhs_dilation=dil,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                precision=lax.Precision.HIGHEST)
    ours, vjp_ours = jax.vjp(lambda a, b: conv_general_dilated(a, b, **args), x, w)
    ref, vjp_ref = jax.vjp(lambda a, b: lax.conv_general_dilated(a, b, **args), x, w)
    g = jax.random.normal(kg, ref.shape)
    np.testing.assert_array_equal(ours, ref)
    for a, b in zip(vjp_ours(g), vjp_ref(g)):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_bfloat16_and_second_order():
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 6, 6, 2))
    w = jax.random.normal(jax.random.PRNGKey(2), (3, 3, 2, 2))
    args = dict(window_strides=(1, 1), padding="SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"))
    gx = jax.grad(lambda a: jnp.sum(conv_general_dilated(a, w.astype(jnp.bfloat16), **args)
                                    .astype(jnp.float32) ** 2))(x.astype(jnp.bfloat16))
    assert gx.dtype == jnp.bfloat16
    # grad of grad goes through the custom backward pass (the gradients are convs too).
    def hvp(f):
        return jax.grad(lambda a: jnp.sum(jax.grad(lambda b: jnp.sum(jnp.sin(f(b, w, **args))))(a) ** 2))(x)
    np.testing.assert_allclose(hvp(conv_general_dilated), hvp(lax.conv_general_dilated),
                               rtol=1e-4, atol=1e-4)


def test_other_layouts_fall_back_to_lax():
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 3, 8, 8))   # NCHW
    w = jax.random.normal(jax.random.PRNGKey(4), (4, 3, 3, 3))   # OIHW
    for kw in ({}, {"feature_group_count": 1}):
        np.testing.assert_array_equal(conv_general_dilated(x, w, (1, 1), "SAME", **kw),
                                      lax.conv_general_dilated(x, w, (1, 1), "SAME", **kw))


def test_conv_module_has_nn_conv_parameters():
    import flax.linen as nn
    x = jnp.ones((1, 8, 8, 3))
    ours = Conv(5, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), name="conv")
    ref = nn.Conv(5, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), name="conv")
    params = ref.init(jax.random.PRNGKey(0), x)
    assert jax.tree_util.tree_structure(ours.init(jax.random.PRNGKey(0), x)) == \
        jax.tree_util.tree_structure(params)
    np.testing.assert_array_equal(ours.apply(params, x), ref.apply(params, x))
