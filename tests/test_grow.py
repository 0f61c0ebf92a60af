"""Growing a trained U-Net deeper (jaxdiff.training.grow): same function, more layers.

On model v1 (``candidates/shapes_v1``, one layer per block): the step that made model v2.
"""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff.training import grow


@pytest.fixture(scope="module")
def grown(shapes_v1):
    pipe, params = shapes_v1
    new_pipe, new_params = grow.deepen_unet(pipe, params, seed=1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([40, 800])
    ctx = rng.standard_normal((2, 16, 64)).astype(np.float32)
    before = np.asarray(jax.jit(pipe.unet.apply)({"params": params["unet"]}, x, t, ctx))

    def loss(net):  # mean square of the grown U-Net's output, and the output
        out = new_pipe.unet.apply({"params": net}, x, t, ctx)
        return jnp.mean(out ** 2), out

    # One program for the grown U-Net's output and its gradient (no second compile).
    (_, after), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(new_params["unet"])
    return dict(pipe=pipe, params=params, new_pipe=new_pipe, new_params=new_params,
                inputs=(x, t, ctx), before=before, after=np.asarray(after), grads=grads)


def test_deeper_unet_computes_what_the_trained_one_did(grown):
    old, new = grown["pipe"].unet.config, grown["new_pipe"].unet.config
    assert new.layers_per_block == old.layers_per_block + 1
    count = lambda net: sum(v.size for v in jax.tree.leaves(net))
    assert count(grown["new_params"]["unet"]) > 1.4 * count(grown["params"]["unet"])
    assert np.abs(grown["before"]).max() > 0.1                # a trained, non-trivial output
    np.testing.assert_allclose(grown["after"], grown["before"], rtol=0, atol=2e-5)


def test_diffusers_runs_the_saved_deeper_unet_as_the_old_one(grown, torch, tmp_path):
    """diffusers' own UNet2DConditionModel (layers_per_block + 1, its skip order) gives the
    trained model's output: the growth matches diffusers' block structure, not only ours."""
    from diffusers import UNet2DConditionModel

    jaxdiff.save_pipeline(grown["new_pipe"], grown["new_params"], str(tmp_path))
    ref = UNet2DConditionModel.from_pretrained(str(tmp_path / "unet")).eval()
    x, t, ctx = grown["inputs"]
    with torch.no_grad():
        out = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                  torch.from_numpy(ctx)).sample.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(out, grown["before"], rtol=0, atol=5e-5)


def test_new_layers_get_gradients_and_bad_input_is_refused(grown):
    """The gradient of the grown U-Net's mean square output (fixture) reaches the inserted
    layers, whose conv2 / proj_out start at zero."""
    net, g = grown["new_params"]["unet"], grown["grads"]
    for block, layer in (("down_blocks_0", "resnets_1"), ("up_blocks_1", "resnets_1")):
        assert float(jnp.abs(g[block][layer]["conv2"]["kernel"]).max()) > 0
        assert float(jnp.abs(net[block][layer]["conv2"]["kernel"]).max()) == 0
    assert float(jnp.abs(g["down_blocks_1"]["attentions_1"]["proj_out"]["kernel"]).max()) > 0
    with pytest.raises(ValueError, match="only a UNet2DConditionModel can be deepened"):
        grow.deepen_unet(types.SimpleNamespace(unet=object()), {})
