"""Parity of jaxdiff's networks with diffusers / transformers PyTorch on the same weights.

Each network is compared under every attention implementation that runs on CPU: "auto"
(the CPU default, blockwise), "einsum" (materialised scores; the controller path) and
"xla" (``jax.nn.dot_product_attention``'s XLA path, the GPU default for float32). cuDNN
needs a GPU. One subprocess test runs at XLA's default optimisation level and default
matmul precision, as users get them (the suite itself runs at -O0 / "highest").
"""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from torchref import models as ref
from jaxdiff.models import AutoencoderKL, attention, clip_text, vae
from jaxdiff.weights import load_component

TOL = 1e-4
CPU_IMPLS = ("auto", "einsum", "xla")


def _cases(names):
    """The first config under every CPU implementation, the others under "auto"."""
    return ([(names[0], i) for i in CPU_IMPLS] + [(n, "auto") for n in names[1:]])


@pytest.fixture
def impl(request, monkeypatch):
    """Forces every attention call (UNet, VAE, text encoder) onto one implementation."""
    real = attention.attend

    def forced(*args, impl=None, **kw):
        return real(*args, impl=request.param, **kw)

    for module in (attention, vae, clip_text):
        monkeypatch.setattr(module, "attend", forced)
    return request.param


def _save(module, tmp_path):
    module.save_pretrained(str(tmp_path), safe_serialization=True)
    return str(tmp_path)


@pytest.mark.parametrize("name,impl", _cases(["sd2", "sd1"]), indirect=["impl"])
def test_unet_matches_diffusers(torch, tmp_path, name, impl):
    tm = ref.make_unet(name)
    module, params = load_component(_save(tm, tmp_path), "unet")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([3, 871])
    ctx = torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        want = tm(x, t, ctx).sample.numpy()
    got = module.apply({"params": params}, jnp.asarray(ref.nhwc(x.numpy())),
                       jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy()))
    np.testing.assert_allclose(ref.nchw(got), want, atol=TOL, rtol=0)
    # A scalar timestep broadcasts over the batch, as in diffusers.
    with torch.no_grad():
        want_s = tm(x, 500, ctx).sample.numpy()
    got_s = module.apply({"params": params}, jnp.asarray(ref.nhwc(x.numpy())), 500,
                         jnp.asarray(ctx.numpy()))
    np.testing.assert_allclose(ref.nchw(got_s), want_s, atol=TOL, rtol=0)


@pytest.mark.parametrize("name,impl", _cases(["sd1", "deep"]), indirect=["impl"])
def test_vae_matches_diffusers(torch, tmp_path, name, impl):
    tm = ref.make_vae(name)
    module, params = load_component(_save(tm, tmp_path), "vae")
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    f = module.config.downscale
    z = torch.randn(2, module.config.latent_channels, 16 // f, 16 // f, generator=g)
    with torch.no_grad():
        post = tm.encode(x).latent_dist
        dec = tm.decode(z).sample.numpy()
    mean, logvar = module.apply({"params": params}, jnp.asarray(ref.nhwc(x.numpy())),
                                method=AutoencoderKL.encode)
    np.testing.assert_allclose(ref.nchw(mean), post.mean.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(ref.nchw(logvar), post.logvar.numpy(), atol=TOL, rtol=0)
    out = module.apply({"params": params}, jnp.asarray(ref.nhwc(z.numpy())),
                       method=AutoencoderKL.decode)
    np.testing.assert_allclose(ref.nchw(out), dec, atol=TOL, rtol=0)


@pytest.mark.parametrize("name,impl", _cases(["sd2", "sd1"]), indirect=["impl"])
def test_text_encoder_matches_transformers(torch, tmp_path, name, impl):
    tm = ref.make_text_encoder(name)
    module, params = load_component(_save(tm, tmp_path), "text_encoder")
    ids = torch.randint(0, tm.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = tm(ids, output_hidden_states=True)
    last, hidden = module.apply({"params": params}, jnp.asarray(ids.numpy()),
                                output_hidden_states=True)
    np.testing.assert_allclose(np.asarray(last), want.last_hidden_state.numpy(), atol=TOL, rtol=0)
    assert len(hidden) == len(want.hidden_states) == tm.config.num_hidden_layers + 1
    for a, b in zip(hidden, want.hidden_states):
        np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=TOL, rtol=0)


def test_bf16_compute_keeps_fp32_params_and_tracks_fp32(torch, tmp_path):
    tm = ref.make_unet("sd1")
    module, params = load_component(_save(tm, tmp_path), "unet")
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 4))
    ctx = jax.random.normal(jax.random.key(1), (1, 5, 32))
    full = module.apply({"params": params}, x, 10, ctx)
    half = module.clone(dtype=jnp.bfloat16).apply({"params": params}, x, 10, ctx)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    assert half.dtype == jnp.bfloat16
    err = float(jnp.max(jnp.abs(half.astype(jnp.float32) - full)))
    assert err < 0.05 * float(jnp.max(jnp.abs(full))), err


class _Recorder:
    """An attention controller (pure data) that scales cross-attention of one layer."""

    def __init__(self, layer, factor):
        self.layer, self.factor, self.seen = layer, factor, []

    def edit(self, probs, *, layer, cross):
        self.seen.append((layer, cross))
        return probs * self.factor if (cross and layer == self.layer) else probs


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_attention_control_hook(torch, tmp_path, name):
    tm = ref.make_unet(name)
    module, params = load_component(_save(tm, tmp_path), "unet")
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 4))
    ctx = jax.random.normal(jax.random.key(1), (1, 5, 32))
    plain = module.apply({"params": params}, x, 10, ctx)
    identity = _Recorder(layer=-1, factor=1.0)
    same = module.apply({"params": params}, x, 10, ctx, control=identity)
    np.testing.assert_allclose(np.asarray(same), np.asarray(plain), atol=1e-5)
    n = module.layer_count()
    assert sorted(set(identity.seen)) == sorted({(i, c) for i in range(n) for c in (0, 1)})
    changed = module.apply({"params": params}, x, 10, ctx, control=_Recorder(0, 0.0))
    assert float(jnp.max(jnp.abs(changed - plain))) > 1e-4


@pytest.mark.slow
def test_unet_matches_diffusers_at_default_xla_settings(torch, tmp_path):
    """What users run: XLA's default optimisation level and matmul precision, the default
    attention path, in a fresh process (the suite's conftest settings do not apply)."""
    tm = ref.make_unet("sd2")
    folder = _save(tm, tmp_path / "unet")
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        want = tm(x, torch.tensor([3, 871]), ctx).sample.numpy()
    np.savez(tmp_path / "io.npz", x=ref.nhwc(x.numpy()), ctx=ctx.numpy(), want=ref.nhwc(want))
    code = textwrap.dedent(f"""
        import jax, numpy as np
        from jaxdiff.weights import load_component
        assert jax.config.jax_default_matmul_precision is None
        d = np.load({str(tmp_path / "io.npz")!r})
        module, params = load_component({folder!r}, "unet")
        got = module.apply({{"params": params}}, d["x"], np.array([3, 871]), d["ctx"])
        print(float(np.abs(np.asarray(got) - d["want"]).max()))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.split()[-1]) <= TOL
