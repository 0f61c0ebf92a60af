"""bench/roofline.py: the UNet and transformer FLOP counts against analytic hand counts
(and DiT-XL/2's against the DiT paper), the whole generation program's count against its
parts (lowering only, no compile, no weights)."""
import json
import math
import re

import jax
import jax.numpy as jnp
import pytest

from torchref.scripts import load_script

CFG = dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8,
           down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
           transformer_layers_per_block=(1, 2, 1), cross_attention_dim=48,
           attention_head_dim=4, sample_size=16)
B, SIDE, CTX = 2, 16, 7


def _dims(s):
    return [int(d) for d in s.split(",") if d]


def matmul_conv_flops(hlo: str) -> int:
    """2 x multiply-adds of every ``dot`` and ``convolution`` in HLO text, from its shapes."""
    shapes = dict(re.findall(r"^\s*(?:ROOT )?(\S+) = \w+\[([\d,]*)\]", hlo, re.M))
    total = 0
    for m in re.finditer(r"= \w+\[([\d,]*)\]\S* (dot|convolution)\(([^,]+), ([^)]+)\)(.*)",
                         hlo):
        out, op, attrs = _dims(m[1]), m[2], m[5]
        lhs, rhs = _dims(shapes[m[3].strip()]), _dims(shapes[m[4].strip()])
        if op == "dot":
            contract = _dims(re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs)[1])
            total += 2 * math.prod(out) * math.prod(lhs[d] for d in contract)
        else:
            labels = re.search(r"dim_labels=\w+_(\w+)->", attrs)[1]
            assert "feature_group_count" not in attrs
            total += 2 * math.prod(out) * math.prod(rhs) // rhs[labels.index("o")]
    return total


@pytest.fixture(scope="module")
def lowered():
    roof = load_script("bench", "roofline")
    cfg = roof.UNetConfig(**CFG)
    pipe = roof.Pipeline(unet=roof.UNet2DConditionModel(cfg), vae=None, text_encoder=None,
                         tokenizer=None, scheduler=None)
    params = {"unet": jax.eval_shape(
        lambda k: pipe.unet.init(k, *roof.dummy_inputs(pipe.unet, "unet"))["params"],
        jax.random.key(0))}
    sds = jax.ShapeDtypeStruct
    low = roof.unet_call.lower(pipe, params, sds((B, SIDE, SIDE, 4), jnp.float32),
                               sds((B,), jnp.float32), sds((B, CTX, 48), jnp.float32))
    return roof, cfg, low


def test_transformer_hand_count_equals_the_programs_matmuls(lowered):
    """DiT and PixArt (cross-attention, caption projection, micro-conditions): the hand
    count equals the lowered call's dot / convolution shapes; DiT-XL/2's is the DiT paper's
    Gflops (multiply-adds: 118.6 at 256², 524.6 at 512²; Peebles & Xie 2023, table 4)."""
    roof = lowered[0]
    for name in ("dit_tiny", "pixart_tiny"):
        an = roof.TransformerAnalyser(name, compile_=False)
        cond, added = an.cond(B)
        sds = jax.ShapeDtypeStruct
        low = roof.transformer_call.lower(an.pipe.transformer, an.params,
                                          sds((B,) + an.latent, jnp.float32),
                                          sds((B,), jnp.float32), cond, added)
        hand = roof.transformer_flops(an.pipe.transformer.config, B, *an.latent[:2], an.ctx or 0)
        assert matmul_conv_flops(low.as_text(dialect="hlo")) == hand
        xla = roof.analyse(low, compile_=False)["flops"]
        assert hand < xla < 1.25 * hand   # + elementwise work (norms, GELU, softmax)
    for side, paper in ((32, 118.6e9), (64, 524.6e9)):
        model, _, _ = roof.build_transformer("dit_xl2_256" if side == 32 else "dit_xl2_512")
        macs = roof.transformer_flops(model.config, 1, side, side) / 2
        assert macs == pytest.approx(paper, rel=2e-3)


def test_hand_count_equals_the_programs_matmuls_and_convolutions(lowered):
    roof, cfg, low = lowered
    hand = roof.unet_flops(cfg, B, SIDE, SIDE, CTX, subpixel_upsample=True)
    assert matmul_conv_flops(low.as_text(dialect="hlo")) == hand
    # XLA's count leaves out kernel taps on zero padding (2 (3n-2)^2 C C' per 3x3 conv on
    # n x n, checked alone in bench/README.md) and adds elementwise work (norms,
    # activations, softmax; ~10% here with 8-wide heads, ~0.5% at SD 1.5's size)
    valid = roof.unet_flops(cfg, B, SIDE, SIDE, CTX, subpixel_upsample=True, padded=False)
    xla = roof.analyse(low, compile_=False)["flops"]
    assert valid < hand and valid < xla < 1.15 * valid
    # the accelerator form (9-tap upsampling) of the two upsamplers (to 8x8 and 16x16, 64
    # channels): per axis 6n - 2 instead of 4n - 2 taps (n: the input side)
    assert roof.upsample_extra_flops(cfg, B, SIDE, SIDE) == 2 * B * 64 * 64 * (
        (22 ** 2 - 14 ** 2) + (46 ** 2 - 30 ** 2))


def test_generation_program_is_its_parts_with_the_loop_counted_once(lowered, tmp_path):
    roof = lowered[0]
    out = tmp_path / "roof.json"
    roof.main(["--models", "tiny", "--programs", "unet", "generate", "--batches", "1",
               "--steps", "3", "--no-compile", "--out", str(out)])
    recs = {r["program"]: r for r in json.loads(out.read_text())["records"]}
    gen, unet = recs["generate"], recs["unet"]
    assert gen["raw_over_parts"] == pytest.approx(1.0, abs=0.01)
    assert gen["flops"] == gen["flops_raw"] + 2 * unet["flops"]
    assert gen["h100_s_per_image"] >= gen["flops"] / roof.HARDWARE["h100"][0]


def test_compiled_analysis_keeps_remat_on_xla_cpu(lowered):
    """A chain of ``jax.checkpoint``'d blocks (as ``UNet2DConditionModel(remat=True)``
    wraps its resnets and transformers): as ``analyse`` compiles it, the recomputation
    stays (one more forward: 4/3 of the FLOPs of 1 forward + 2 backward matmuls) and the
    temporaries drop to about the block inputs; XLA:CPU's default pipeline merges the
    recomputation away (same FLOPs and memory as no remat)."""
    roof = lowered[0]
    rows, d, n = 512, 128, 8

    def block(x, w):
        return x + jnp.tanh(jnp.tanh(x @ w[0]) @ w[1])

    def loss(ws, x, remat):
        for w in ws:
            x = (jax.checkpoint(block) if remat else block)(x, w)
        return jnp.mean(x ** 2)

    sds = jax.ShapeDtypeStruct
    ws = [(sds((d, 4 * d), jnp.float32), sds((4 * d, d), jnp.float32))] * n
    low = {r: jax.jit(jax.grad(loss), static_argnums=2).lower(ws, sds((rows, d), jnp.float32), r)
           for r in (False, True)}
    plain, remat = (roof.analyse(low[r], compile_=True, platform="cpu") for r in (False, True))
    matmuls = 2 * rows * d * 4 * d * 2 * n          # one forward's
    assert plain["flops"] == pytest.approx(3 * matmuls, rel=0.05)
    assert remat["flops"] == pytest.approx(4 * matmuls, rel=0.05)
    assert remat["temp_gb"] < 0.3 * plain["temp_gb"]
    default = low[True].compile().memory_analysis().temp_size_in_bytes / 1e9
    assert default > 2 * remat["temp_gb"]


def test_attention_choice_is_made_in_one_place_logged_and_overridable(monkeypatch, caplog):
    from jaxdiff.models import attention
    q = jax.random.normal(jax.random.key(0), (2, 40, 2, 8))
    k, v = q[:, :24] * 0.5, q[:, 16:] + 1.0
    ref = attention.attend(q, k, v, scale=8 ** -0.5, upcast=False, impl="einsum")
    for forced in ("auto", "xla", "blockwise"):
        monkeypatch.setenv("JAXDIFF_ATTENTION", forced)
        attention.log_choice.cache_clear()
        with caplog.at_level("INFO", logger="jaxdiff.models.attention"):
            out = attention.attend(q, k, v, scale=8 ** -0.5, upcast=False)
        want = "blockwise" if forced == "auto" else forced   # this is a CPU
        assert f"attention on cpu for float32 inputs: {want}" in caplog.text
        assert jnp.abs(out - ref).max() < 1e-5
    monkeypatch.setenv("JAXDIFF_ATTENTION", "flash")
    with pytest.raises(ValueError, match="JAXDIFF_ATTENTION='flash': expected one of"):
        attention.auto_implementation(jnp.float32)


@pytest.mark.slow
def test_accelerator_script_smoke(tmp_path):
    """bench/accelerator.sh --smoke: the recompile count and the ControlNet overhead rows
    (bench/control_speed.py, tiny, both sides), one JSON file."""
    import os
    import subprocess
    root = os.path.join(os.path.dirname(__file__), "..")
    out = tmp_path / "acc.json"
    proc = subprocess.run(["bash", "bench/accelerator.sh", "--smoke", "--only",
                           "recompile,controlnet", "--out", str(out)], cwd=root,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())["results"]
    assert sorted(res) == ["controlnet_b1", "controlnet_b2", "recompile"]
    assert res["recompile"][0]["recompiles"] == 0 and res["recompile"][0]["generate_calls"] == 3
    for name in ("controlnet_b1", "controlnet_b2"):
        row = res[name][0]
        assert "missing" not in row, row
        assert row["jaxdiff_control_overhead"] > 0 and row["torch_control_overhead"] > 0
        assert row["control_effect"] > 0  # the ControlNet acts on the result
    assert "controlnet_b1: ok" in proc.stdout
