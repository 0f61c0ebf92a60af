"""LoRA: pure merge, adapter-only training, peft-style files that diffusers loads exactly."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import jaxdiff
from torchref import models as ref
from jaxdiff.adapters import lora as lora_lib
from jaxdiff.training import state as state_lib
from jaxdiff.training.lora import make_lora_loss
from jaxdiff.training.step import make_train_step

RANK, ALPHA = 3, 6.0
# Non-square layers (GEGLU "proj" [32, 256], CLIP "fc1" [32, 37]) catch transposed layouts.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out_0", "proj")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1")


@pytest.fixture(scope="module")
def sd(tiny_pipe_dir):
    return (tiny_pipe_dir,) + tuple(jaxdiff.load_pipeline(tiny_pipe_dir))


_with_micro_unet = ref.with_micro_unet


def _equal(a, b):
    a, b = jax.device_get((a, b))
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _lora(params, seed=0, random_up=True, unet_targets=UNET_TARGETS):
    k1, k2 = jax.random.split(jax.random.key(seed))
    lora = {**lora_lib.init_lora(params, RANK, unet_targets, key=k1),
            **lora_lib.init_lora(params, RANK, TEXT_TARGETS, key=k2, scope="text_encoder")}
    if not random_up:
        return lora
    flat = traverse_util.flatten_dict(lora)
    rng = np.random.default_rng(seed)
    for path in sorted(p for p in flat if p[-1] == "up"):
        flat[path] = jnp.asarray(rng.normal(0, 0.3, flat[path].shape), jnp.float32)
    return traverse_util.unflatten_dict(flat)


def test_init_is_identity_and_merge_is_pure(sd):
    _, _, params = sd
    fresh = _lora(params, random_up=False)
    mods = lora_lib.adapters(fresh)
    # 6 transformer blocks x (attn1 + attn2) x q/k/v/out + 6 GEGLU proj; 2 CLIP layers x 5.
    assert len([p for p in mods if p[0] == "unet"]) == 6 * 9
    assert len([p for p in mods if p[0] == "text_encoder"]) == 2 * 5
    assert _equal(lora_lib.merge_lora(params, fresh, 1.0), params)

    lora = _lora(params)
    before = jax.device_get(params)
    merged = jax.device_get(lora_lib.merge_lora(params, lora, 0.5))
    assert _equal(params, before)
    flat_p, flat_m = (traverse_util.flatten_dict(t) for t in (before, merged))
    changed = {p[:-1] for p in flat_p if not np.array_equal(flat_p[p], flat_m[p])}
    assert changed == set(mods)
    path = ("unet", "down_blocks_0", "attentions_1", "transformer_blocks_0", "ff", "net_0",
            "proj")
    m = jax.device_get(lora_lib.adapters(lora)[path])
    np.testing.assert_allclose(flat_m[path + ("kernel",)], flat_p[path + ("kernel",)]
                               + 0.5 * m["down"] @ m["up"], atol=1e-6)


def test_scale_is_traced():
    params = {"unet": {"a": {"to_q": {"kernel": jnp.ones((4, 6))}}}}
    lora = lora_lib.init_lora(params, 2, key=jax.random.key(0))
    merge = jax.jit(lambda p, l, s: lora_lib.merge_lora(p, l, s))
    for s in (0.0, 0.5, 2.0):
        merge(params, lora, s)
    assert merge._cache_size() == 1


def test_errors():
    params = {"unet": {"a": {"to_q": {"kernel": jnp.ones((4, 6))}}}}
    with pytest.raises(ValueError, match="no Dense layer"):
        lora_lib.init_lora(params, 2, ("to_k",), key=jax.random.key(0))
    with pytest.raises(ValueError, match="rank"):
        lora_lib.init_lora(params, 0, key=jax.random.key(0))
    bad = {"unet": {"b": {"to_q": {"down": jnp.ones((4, 2)), "up": jnp.ones((2, 6))}}}}
    with pytest.raises(ValueError, match="no Dense kernel"):
        lora_lib.merge_lora(params, bad, 1.0)


def test_file_round_trip(sd, tmp_path):
    _, _, params = sd
    lora = _lora(params)
    file = lora_lib.save_lora(lora, str(tmp_path / "out"), alpha=ALPHA, rank=RANK)
    assert file.endswith("out/pytorch_lora_weights.safetensors")
    from safetensors import safe_open
    with safe_open(file, framework="numpy") as f:
        keys, meta = set(f.keys()), json.loads(f.metadata()["lora_adapter_metadata"])
        a = f.get_tensor("unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"
                         ".lora_A.weight")
        b = f.get_tensor("text_encoder.text_model.encoder.layers.1.mlp.fc1.lora_B.weight")
    assert a.shape == (RANK, 32) and b.shape == (37, RANK)
    assert "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight" in keys
    assert meta["unet.r"] == RANK and meta["unet.lora_alpha"] == ALPHA
    assert meta["text_encoder.lora_alpha"] == ALPHA
    back, alpha = lora_lib.load_lora(str(tmp_path / "out"))
    assert alpha == ALPHA and lora_lib.lora_rank(back) == RANK
    assert jax.tree.structure(back) == jax.tree.structure(lora)
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), back, lora))


def test_diffusers_load_lora_weights_matches(sd, tmp_path, torch):
    # diffusers' LoRA loading needs peft (a pinned test dependency in pyproject.toml).
    from diffusers import StableDiffusionPipeline
    folder, pipe, params = sd
    lora = _lora(params, seed=1)
    lora_lib.save_lora(lora, str(tmp_path / "lora"), alpha=ALPHA, rank=RANK)
    tp = StableDiffusionPipeline.from_pretrained(folder)
    g = torch.Generator().manual_seed(3)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([7, 640]), torch.randn(
        2, 5, 32, generator=g)
    ids = pipe.tokenize(["a red star", "two blue dots"])
    unet = jax.jit(lambda p, l, s: pipe.unet.apply(
        {"params": lora_lib.merge_lora(p, l, s)["unet"]}, jnp.asarray(ref.nhwc(x.numpy())),
        jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy())))
    with torch.no_grad():
        base = tp.unet(x, t, ctx).sample.numpy()
        tp.load_lora_weights(str(tmp_path / "lora"))
        for s in (1.0, 0.4):
            want = tp.unet(x, t, ctx, cross_attention_kwargs={"scale": s}).sample.numpy()
            got = unet(params, lora, lora_lib.lora_scale(ALPHA, RANK, s))
            np.testing.assert_allclose(ref.nchw(got), want, atol=1e-4, rtol=0)
        assert np.abs(want - base).max() > 1e-2  # the adapters really change the output
        want_text = tp.text_encoder(torch.from_numpy(ids.astype(np.int64)))[0].numpy()
    # diffusers' training scripts write 'lora.down' / 'lora_linear_layer.up' names, no alpha.
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    layers = {f"{c}_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(
        getattr(tp, c), adapter_name="default_0")) for c in ("unet", "text_encoder")}
    assert any(".lora.down." in k for k in layers["unet_lora_layers"])
    StableDiffusionPipeline.save_lora_weights(str(tmp_path / "from_diffusers"), **layers)
    back, alpha = lora_lib.load_lora(str(tmp_path / "from_diffusers"))
    assert alpha == RANK and _equal(back, lora)

    encode = jax.jit(lambda p, l: pipe.encode_text(lora_lib.merge_lora(p, l, ALPHA / RANK), ids))
    got_text = encode(params, lora)
    np.testing.assert_allclose(got_text, want_text, atol=1e-4, rtol=0)
    assert np.abs(want_text - encode(params, jax.tree.map(jnp.zeros_like, lora))).max() > 1e-2


def test_training_updates_only_adapters(sd):
    pipe, params = _with_micro_unet(*sd[1:])
    lora = _lora(params, random_up=False, unet_targets=lora_lib.DEFAULT_TARGETS["unet"])
    opt = optax.adam(1e-2)
    loss_fn = make_lora_loss(pipe, params, lora_lib.lora_scale(ALPHA, RANK))
    state = state_lib.create(lora, opt, ema=False)
    step = jax.jit(make_train_step(loss_fn, opt))
    batch = (jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, 4)), jnp.float32),
             jnp.asarray(pipe.tokenize(["a red star", "a blue dot"])))
    for _ in range(2):
        state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    n_lora = sum(x.size for x in jax.tree.leaves(lora))
    assert sum(x.size for x in jax.tree.leaves(state.opt_state)) <= 2 * n_lora + 8  # adam mu, nu
    for path, m in lora_lib.adapters(state.params).items():
        assert np.abs(np.asarray(m["up"])).max() > 0, path  # zero-initialised B learns


def test_reads_alpha_keys_and_refuses_other_formats(tmp_path):
    from safetensors.numpy import save_file
    rng = np.random.default_rng(0)
    down, up = rng.normal(size=(4, 2)).astype(np.float32), rng.normal(size=(2, 6)).astype(
        np.float32)
    save_file({"unet.a.to_q.lora.down.weight": down.T.copy(),
               "unet.a.to_q.lora.up.weight": up.T.copy(),
               "unet.a.to_q.alpha": np.asarray(4.0, np.float32)}, str(tmp_path / "k.safetensors"))
    lora, alpha = lora_lib.load_lora(str(tmp_path / "k.safetensors"))
    assert alpha == 4.0
    np.testing.assert_array_equal(lora["unet"]["a"]["to_q"]["down"], down)
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": down},
              str(tmp_path / "kohya.safetensors"))
    with pytest.raises(ValueError, match="kohya"):
        lora_lib.load_lora(str(tmp_path / "kohya.safetensors"))
