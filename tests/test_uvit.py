"""U-ViT (issue #18): parity with a PyTorch re-implementation of the reference code
(torchref/uvit.py) on tiny random weights, text-to-image and class-conditional; the
reference's state-dict keys load through weights.convert; bad latent sizes refused. The
parity runs through ``denoiser.denoise`` (text embeddings or class labels as the condition)."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from torchref import models as ref
from torchref import uvit as uvit_ref
from jaxdiff.denoiser import denoise
from jaxdiff.models.uvit import UViT, UViTConfig, uvit_dummy_inputs
from jaxdiff.weights import convert

TOL = 1e-4
CONFIGS = {
    # text: time MLP, final conv, long skips (the reference's t2i model, tiny)
    "t2i": dict(img_size=8, patch_size=2, in_chans=4, embed_dim=16, depth=4, num_heads=2,
                mlp_time_embed=True, clip_dim=12, num_clip_token=5),
    # classes: label token first, qkv bias, no final conv, odd depth (mid block only extra)
    "class": dict(img_size=8, patch_size=2, in_chans=4, embed_dim=16, depth=3, num_heads=4,
                  qkv_bias=True, clip_dim=None, num_classes=10, conv=False),
}


@pytest.fixture(scope="module")
def nets(torch):
    out = {}
    for name, cfg in CONFIGS.items():
        torch.manual_seed(0)
        tm = ref.perturb(uvit_ref.build(torch, **cfg), scale=0.05, seed=3)
        module = UViT(UViTConfig(**cfg))
        shapes = jax.eval_shape(lambda m=module: m.init(jax.random.key(0),
                                                        *uvit_dummy_inputs(m)))["params"]
        state = {k: v.numpy() for k, v in tm.state_dict().items()}
        params = convert.torch_to_flax(state, shapes, source=f"uvit {name}")
        out[name] = (tm, module, params)
    return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_uvit_matches_reference(torch, nets, name):
    tm, module, params = nets[name]
    cfg = CONFIGS[name]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    t = np.array([3, 870])
    ctx = (rng.standard_normal((2, 5, 12)).astype(np.float32) if cfg.get("clip_dim")
           else None)
    y = np.array([2, 9]) if cfg.get("num_classes", -1) > 0 else None
    with torch.no_grad():
        want = tm(torch.tensor(x), torch.tensor(t),
                  None if ctx is None else torch.tensor(ctx),
                  None if y is None else torch.tensor(y)).numpy()
    # through the one denoiser interface: the condition is the text or the class labels
    pipe = types.SimpleNamespace(unet=module)
    got = jax.jit(lambda p, x, c: denoise(pipe, p, x, t, c))(params, ref.nhwc(x),
                                                             y if ctx is None else ctx)
    np.testing.assert_allclose(ref.nchw(got), want, atol=TOL, rtol=0)
    assert np.abs(want).max() > 0.1
    back = convert.flax_to_torch(params)  # the reference's own keys, strict load
    tm.load_state_dict({k: torch.tensor(v) for k, v in back.items()}, strict=True)


def test_bad_latent_size_is_one_line(nets):
    _, module, params = nets["class"]
    for size, msg in ((7, "not divisible by patch_size=2"), (10, "differs from the config's "
                                                               "img_size=8")):
        with pytest.raises(ValueError, match=msg):
            jax.eval_shape(lambda: module.apply({"params": params}, jnp.zeros((1, size, size, 4)),
                                                1, None, jnp.zeros((1,), jnp.int32)))
    with pytest.raises(ValueError, match="clip_dim and num_classes"):
        UViTConfig(clip_dim=8, num_classes=10)


def test_reference_init_is_uvits(nets):
    """``uvit.reference_init`` (the reference's _init_weights): Dense kernels N(0, 0.02),
    Dense biases zero; convolutions, LayerNorms and the position table kept."""
    from jaxdiff.models import uvit
    _, _, params = nets["t2i"]
    flat = lambda p: {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
                      for path, v in jax.tree_util.tree_flatten_with_path(p)[0]}
    old, new = flat(params), flat(uvit.reference_init(params, jax.random.key(0)))
    dense = np.concatenate([w.ravel() for n, w in new.items()
                            if n.endswith("kernel") and w.ndim == 2])
    assert dense.size > 1000 and 0.018 < dense.std() < 0.022 and abs(dense.mean()) < 0.002
    for n, w in new.items():
        if n.endswith("bias") and "norm" not in n and not n.startswith(("patch_embed",
                                                                         "final_layer")):
            assert not w.any(), n
        elif w.ndim != 2 or not n.endswith("kernel"):
            np.testing.assert_array_equal(w, old[n], err_msg=n)
