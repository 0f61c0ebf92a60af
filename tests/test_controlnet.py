"""ControlNet (issue #14): parity of the residuals and of the controlled UNet with diffusers'
``ControlNetModel`` / ``UNet2DConditionModel`` on tiny random weights (perturbed, so the
zero convolutions are exercised), files written by jaxdiff loading in diffusers, and the
config checks against the base UNet."""
import dataclasses
import functools

import jax
import numpy as np
import pytest

from torchref import models as ref
from jaxdiff.models.controlnet import ControlNetConfig
from jaxdiff.weights import load_component
from jaxdiff.weights.control import load_controlnet, save_control_model

TOL = 1e-4


@pytest.fixture(scope="module")
def nets(torch, tmp_path_factory):
    """{name: (torch ControlNet, torch UNet, jax ControlNet, params, jax UNet, params)} and
    the shared random inputs (NCHW torch tensors)."""
    out = {}
    for name in ("sd1", "sd2"):
        root = tmp_path_factory.mktemp(f"controlnet_{name}")
        tc, tu = ref.make_controlnet(name, seed=3), ref.make_unet(name)
        tc.save_pretrained(str(root / "cn"), safe_serialization=True)
        tu.save_pretrained(str(root / "unet"), safe_serialization=True)
        out[name] = (tc, tu) + load_controlnet(str(root / "cn")) + load_component(
            str(root / "unet"), "unet")
    g = torch.Generator().manual_seed(1)
    inputs = dict(x=torch.randn(2, 4, 8, 8, generator=g), t=torch.tensor([3, 871]),
                  ctx=torch.randn(2, 5, 32, generator=g), img=torch.rand(2, 3, 16, 16, generator=g))
    return out, inputs


def _jax_inputs(inputs):
    return (ref.nhwc(inputs["x"].numpy()), inputs["t"].numpy(), inputs["ctx"].numpy(),
            ref.nhwc(inputs["img"].numpy()))


@functools.lru_cache(maxsize=None)
def _program(cn, unet):
    """One jitted program: residuals (plain and guess mode) at a traced per-image scale
    [B], the UNet with the plain residuals, and the UNet without control."""
    def run(cp, up, x, t, ctx, img, scale):
        down, mid = cn.apply({"params": cp}, x, t, ctx, img, scale)
        guess = cn.apply({"params": cp}, x, t, ctx, img, scale, guess_mode=True)
        out = unet.apply({"params": up}, x, t, ctx, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid)
        return (down, mid), guess, out, unet.apply({"params": up}, x, t, ctx)
    return jax.jit(run)


@functools.lru_cache(maxsize=None)
def _residuals(cn):
    return jax.jit(cn.apply)


def _check(got, want):
    jd, jm = got
    down, mid = want
    assert len(jd) == len(down) == 6
    for a, b in zip(tuple(jd) + (jm,), tuple(down) + (mid,)):
        np.testing.assert_allclose(ref.nchw(a), b.numpy(), atol=TOL, rtol=0)


def test_residuals_and_controlled_unet_match_diffusers(torch, nets):
    """sd1: residuals (plain and guess mode) and the controlled UNet output. The
    controlled output moves far beyond the tolerance from the plain one."""
    (tc, tu, cn, cp, unet, up), inputs = nets[0]["sd1"], nets[1]
    args = (inputs["x"], inputs["t"], inputs["ctx"], inputs["img"])
    with torch.no_grad():
        res = tc(*args, conditioning_scale=0.7, return_dict=False)
        guess = tc(*args, conditioning_scale=0.7, guess_mode=True, return_dict=False)
        want = tu(*args[:3], down_block_additional_residuals=res[0],
                  mid_block_additional_residual=res[1]).sample.numpy()
        plain = tu(*args[:3]).sample.numpy()
    got_res, got_guess, got, got_plain = _program(cn, unet)(cp, up, *_jax_inputs(inputs),
                                                            np.full(2, 0.7, np.float32))
    _check(got_res, res)
    _check(got_guess, guess)
    np.testing.assert_allclose(ref.nchw(got), want, atol=TOL, rtol=0)
    np.testing.assert_allclose(ref.nchw(got_plain), plain, atol=TOL, rtol=0)
    assert np.abs(want - plain).max() > 100 * TOL


def test_sd2_style_residuals_match_diffusers(torch, nets):
    """Linear projections, per-block heads, several transformer layers, BGR order."""
    (tc, _, cn, cp, _, _), inputs = nets[0]["sd2"], nets[1]
    with torch.no_grad():
        want = tc(inputs["x"], inputs["t"], inputs["ctx"], inputs["img"],
                  conditioning_scale=1.3, return_dict=False)
    _check(_residuals(cn)({"params": cp}, *_jax_inputs(inputs), 1.3), want)


def test_scale_zero_and_per_image_scales(nets):
    """Scale 0 gives the plain UNet's output (to float rounding: one program, the
    residuals times 0); a per-image scale [B] equals each image at its own scale (the
    same compiled program: the scale is traced)."""
    (_, _, cn, cp, unet, up), inputs = nets[0]["sd1"], nets[1]
    run = _program(cn, unet)
    args = (cp, up) + _jax_inputs(inputs)
    _, _, zero, plain = run(*args, np.zeros(2, np.float32))
    np.testing.assert_allclose(np.asarray(zero), np.asarray(plain), atol=1e-6, rtol=0)
    both = run(*args, np.array([0.25, 1.5], np.float32))[2]
    for i, s in enumerate((0.25, 1.5)):
        one = run(*args, np.full(2, s, np.float32))[2]
        np.testing.assert_allclose(np.asarray(both[i]), np.asarray(one[i]), atol=1e-6)
    assert np.abs(np.asarray(both[1] - plain[1])).max() > 1e-2
    assert run._cache_size() == 1


def test_written_folder_loads_in_diffusers(torch, nets, tmp_path):
    """save_control_model -> ControlNetModel.from_pretrained computes jaxdiff's residuals,
    and the written config reloads to the same jaxdiff config."""
    from diffusers import ControlNetModel
    (_, _, cn, cp, _, _), inputs = nets[0]["sd2"], nets[1]
    save_control_model(cn, cp, str(tmp_path / "out"))
    back = ControlNetModel.from_pretrained(str(tmp_path / "out")).eval()
    with torch.no_grad():
        down, mid = back(inputs["x"], inputs["t"], inputs["ctx"], inputs["img"],
                         conditioning_scale=1.3, return_dict=False)
    _check(_residuals(cn)({"params": cp}, *_jax_inputs(inputs), 1.3), (down, mid))
    assert load_controlnet(str(tmp_path / "out"))[0].config == cn.config


def test_config_must_match_the_base_unet(nets):
    """Refused before any compile, naming both values."""
    (_, _, cn, _, unet, _), _ = nets[0]["sd1"], nets[1]
    cn.config.check_matches(unet.config)
    for field, value, want in (
            ("cross_attention_dim", 64, "cross_attention_dim=64 but the base UNet has "
             "cross_attention_dim=32"),
            ("in_channels", 9, "in_channels=9 but the base UNet has in_channels=4"),
            ("block_out_channels", (32, 32), r"block_out_channels=\[32, 32\] but the base "
             r"UNet has block_out_channels=\[32, 64\]"),
            ("layers_per_block", 1, "layers_per_block=1 but the base UNet has "
             "layers_per_block=2")):
        with pytest.raises(ValueError, match=want):
            dataclasses.replace(cn.config, **{field: value}).check_matches(unet.config)


def test_unsupported_config_is_refused():
    with pytest.raises(ValueError, match="controlnet_conditioning_channel_order"):
        ControlNetConfig.from_dict(dict(ref.CONTROLNET_CONFIGS["sd1"],
                                        controlnet_conditioning_channel_order="rbg"))
    with pytest.raises(ValueError, match="class_embed_type"):
        ControlNetConfig.from_dict(dict(ref.CONTROLNET_CONFIGS["sd1"],
                                        class_embed_type="timestep"))
