"""ControlNet (issue #14): parity of the residuals and of the controlled UNet with diffusers'
``ControlNetModel`` / ``UNet2DConditionModel`` on tiny random weights (perturbed, so the
zero convolutions are exercised), files written by jaxdiff loading in diffusers, and the
config checks against the base UNet."""
import dataclasses
import functools
import re

import jax
import numpy as np
import pytest

import jaxdiff
from torchref import models as ref
from jaxdiff import cli
from jaxdiff import control as control_lib
from jaxdiff import sampling as gen_lib
from jaxdiff.adapters import lora as lora_lib
from jaxdiff.data.images import load_image
from jaxdiff.control import Control
from jaxdiff.models.controlnet import ControlNetConfig
from jaxdiff.weights import load_component
from jaxdiff.weights.control import load_controlnet, save_control_model

TOL = 1e-4


@pytest.fixture(scope="module")
def nets(torch, tiny_pipe_dir, tmp_path_factory):
    """({name: (torch ControlNet, torch UNet, jax ControlNet, params, jax UNet, params)},
    the shared random inputs (NCHW torch tensors), and for sampling: the tiny pipeline
    (its UNet is "sd1") loaded in jaxdiff, a second "sd1" ControlNet, the folders."""
    out, dirs = {}, {}
    for name in ("sd1", "sd2"):
        root = tmp_path_factory.mktemp(f"controlnet_{name}")
        tc, tu = ref.make_controlnet(name, seed=3), ref.make_unet(name)
        tc.save_pretrained(str(root / "cn"), safe_serialization=True)
        tu.save_pretrained(str(root / "unet"), safe_serialization=True)
        out[name] = (tc, tu) + load_controlnet(str(root / "cn")) + load_component(
            str(root / "unet"), "unet")
        dirs[name] = str(root / "cn")
    dirs["sd1_b"] = str(tmp_path_factory.mktemp("controlnet_b") / "cn")
    ref.make_controlnet("sd1", seed=4).save_pretrained(dirs["sd1_b"], safe_serialization=True)
    g = torch.Generator().manual_seed(1)
    inputs = dict(x=torch.randn(2, 4, 8, 8, generator=g), t=torch.tensor([3, 871]),
                  ctx=torch.randn(2, 5, 32, generator=g), img=torch.rand(2, 3, 16, 16, generator=g))
    return out, inputs, dict(dirs=dirs, pipe_dir=tiny_pipe_dir,
                             loaded=jaxdiff.load_pipeline(tiny_pipe_dir),
                             second=load_controlnet(dirs["sd1_b"]))


def _jax_inputs(inputs):
    return (ref.nhwc(inputs["x"].numpy()), inputs["t"].numpy(), inputs["ctx"].numpy(),
            ref.nhwc(inputs["img"].numpy()))


@functools.lru_cache(maxsize=None)
def _program(cn, unet):
    """One jitted program: residuals (plain and guess mode) at a traced per-image scale
    [B] and the UNet with the plain residuals."""
    def run(cp, up, x, t, ctx, img, scale):
        down, mid = cn.apply({"params": cp}, x, t, ctx, img, scale)
        guess = cn.apply({"params": cp}, x, t, ctx, img, scale, guess_mode=True)
        out = unet.apply({"params": up}, x, t, ctx, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid)
        return (down, mid), guess, out
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
    got_res, got_guess, got = _program(cn, unet)(cp, up, *_jax_inputs(inputs),
                                                 np.full(2, 0.7, np.float32))
    _check(got_res, res)
    _check(got_guess, guess)
    np.testing.assert_allclose(ref.nchw(got), want, atol=TOL, rtol=0)
    assert np.abs(want - plain).max() > 100 * TOL


def test_sd2_style_residuals_match_diffusers(torch, nets):
    """Linear projections, per-block heads, several transformer layers, BGR order, pooled
    conditions (global_pool_conditions: [B, 1, 1, C] residuals)."""
    (tc, _, cn, cp, _, _), inputs = nets[0]["sd2"], nets[1]
    with torch.no_grad():
        want = tc(inputs["x"], inputs["t"], inputs["ctx"], inputs["img"],
                  conditioning_scale=1.3, return_dict=False)
    got = _residuals(cn)({"params": cp}, *_jax_inputs(inputs), 1.3)
    assert {d.shape[1:3] for d in got[0]} == {(1, 1)}
    _check(got, want)


def test_scale_zero_and_per_image_scales(nets):
    """Scale 0 gives the plain UNet's output (to float rounding); a per-image scale [B]
    equals each image at its own scale (the same compiled program: the scale is traced)."""
    (_, _, cn, cp, unet, up), inputs = nets[0]["sd1"], nets[1]
    run = _program(cn, unet)
    args = (cp, up) + _jax_inputs(inputs)
    zero = run(*args, np.zeros(2, np.float32))[2]
    plain = jax.jit(unet.apply)({"params": up}, *args[2:5])
    np.testing.assert_allclose(np.asarray(zero), np.asarray(plain), atol=1e-5, rtol=0)
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
    # float16 (the shipped form): diffusers reads it, jaxdiff reads float32 params equal to
    # the rounded originals.
    save_control_model(cn, cp, str(tmp_path / "half"), dtype=np.float16)
    half = load_controlnet(str(tmp_path / "half"))[1]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(
        np.asarray(a), np.asarray(b).astype(np.float16).astype(np.float32)), half, cp)
    back = ControlNetModel.from_pretrained(str(tmp_path / "half")).eval()
    with torch.no_grad():
        down, mid = back(inputs["x"], inputs["t"], inputs["ctx"], inputs["img"],
                         conditioning_scale=1.3, return_dict=False)
    _check(_residuals(cn)({"params": half}, *_jax_inputs(inputs), 1.3), (down, mid))


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
    cn.config.check_matches(unet.config, vae_factor=2)
    with pytest.raises(ValueError, match=r"conditioning_embedding_out_channels=\[8, 16\] "
                                         "downsample condition images 2x but the base model's "
                                         "VAE factor is 8"):
        cn.config.check_matches(unet.config, vae_factor=8)


def test_unsupported_config_is_refused():
    with pytest.raises(ValueError, match="controlnet_conditioning_channel_order"):
        ControlNetConfig.from_dict(dict(ref.CONTROLNET_CONFIGS["sd1"],
                                        controlnet_conditioning_channel_order="rbg"))
    with pytest.raises(ValueError, match="class_embed_type"):
        ControlNetConfig.from_dict(dict(ref.CONTROLNET_CONFIGS["sd1"],
                                        class_embed_type="timestep"))


# --- sampling with control (jaxdiff.generate(control=...), the CLI) -----------------------

PROMPTS = ["red dot", "blue sq"]  # the tiny tokenizer holds 14 characters
GEN = dict(sampler="ddim", steps=4, guidance_scale=5.0)


def _cond_images(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)


def _noise(seed=0):
    return np.random.default_rng(seed).standard_normal((2, 8, 8, 4)).astype(np.float32)


def _two_controls(nets, images, scales=(0.8, 1.2)):
    """Two ControlNets with their own images, scales and step windows (4 steps: the
    first acts on steps 0-1, the second on 1-3)."""
    (_, _, cn, cp, _, _), second = nets[0]["sd1"], nets[2]["second"]
    return [Control(cn, cp, images, scales[0], 0.0, 0.5),
            Control(*second, images[::-1], scales[1], 0.25, 1.0)]


def test_generate_matches_diffusers_multi_controlnet_pipeline(torch, nets):
    """Equal to StableDiffusionControlNetPipeline (MultiControlNet, per-net scales and
    control_guidance_start/end) from the same latents, within test_generate.py's 1e-3."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from PIL import Image
    extra = nets[2]
    pipe, params = extra["loaded"]
    images, noise = _cond_images(), _noise()
    tp = StableDiffusionControlNetPipeline.from_pretrained(
        extra["pipe_dir"], controlnet=[ControlNetModel.from_pretrained(extra["dirs"]["sd1"]),
                                       ControlNetModel.from_pretrained(extra["dirs"]["sd1_b"])],
        safety_checker=None, requires_safety_checker=False)
    tp.set_progress_bar_config(disable=True)
    pil = [Image.fromarray(i) for i in images]
    with torch.no_grad():
        want = tp(PROMPTS, image=[pil, pil[::-1]], num_inference_steps=4, guidance_scale=5.0,
                  controlnet_conditioning_scale=[0.8, 1.2], control_guidance_start=[0.0, 0.25],
                  control_guidance_end=[0.5, 1.0], latents=torch.tensor(ref.nchw(noise)),
                  output_type="latent").images.numpy()
    got = jaxdiff.generate(pipe, params, PROMPTS, latents=noise, output="latents",
                           control=_two_controls(nets, images), **GEN)
    np.testing.assert_allclose(ref.nchw(got), want, atol=1e-3, rtol=0)
    plain = jaxdiff.generate(pipe, params, PROMPTS, latents=noise, output="latents", **GEN)
    assert np.abs(ref.nchw(plain) - want).max() > 0.05  # control really acts


def test_control_values_are_traced_and_scale_zero_is_the_plain_path(nets):
    """Scales (per image: a sweep is a batch), images and step windows are traced: one
    compiled program for all. Scale 0 equals generation without control (float rounding)."""
    pipe, params = nets[2]["loaded"]
    noise = _noise()
    kw = dict(latents=noise, output="latents", **GEN)
    for scales, seed in (((0.0, 0.0), 0), ((np.array([0.3, 1.5]), 0.7), 1),
                         ((1.0, np.array([2.0, 0.0])), 2)):
        got = jaxdiff.generate(pipe, params, PROMPTS, control=_two_controls(
            nets, _cond_images(seed), scales), **kw)
        if seed == 0:
            plain = jaxdiff.generate(pipe, params, PROMPTS, **kw)
            np.testing.assert_allclose(got, plain, atol=1e-5, rtol=0)
        else:
            assert np.abs(got - plain).max() > 0.05
    specs = control_lib.control_inputs(pipe, _two_controls(nets, _cond_images()), 2, 2, 16, 16)[0]
    # generate's own call (zero_uncond False: not SDXL), so the same cached program
    run = gen_lib._compiled(pipe, "ddim", 4, False, jaxdiff.parallel.make_mesh(), specs, False,
                            None)
    assert run._cache_size() == 1


def test_controlnet_with_lora(nets):
    """ControlNet + a merged LoRA: runs in the same compiled program, both act, and
    control scale 0 equals the LoRA-only path."""
    pipe, params = nets[2]["loaded"]
    lora = lora_lib.init_lora(params, 2, ("to_q", "to_v"), key=jax.random.key(0))
    lora = jax.tree.map(lambda a: a + 0.3 if a.shape[0] == 2 else a, lora)  # nonzero "up"
    merged = lora_lib.merge_lora(params, lora, 1.0)
    kw = dict(latents=_noise(), output="latents", **GEN)
    images = _cond_images()
    both = jaxdiff.generate(pipe, merged, PROMPTS, control=_two_controls(nets, images), **kw)
    lora_only = jaxdiff.generate(pipe, merged, PROMPTS, **kw)
    control_only = jaxdiff.generate(pipe, params, PROMPTS, control=_two_controls(nets, images),
                                    **kw)
    zero = jaxdiff.generate(pipe, merged, PROMPTS, control=_two_controls(nets, images, (0, 0)),
                            **kw)
    np.testing.assert_allclose(zero, lora_only, atol=1e-5, rtol=0)
    assert np.abs(both - lora_only).max() > 0.05 and np.abs(both - control_only).max() > 0.05


def _png(path, size, seed=0):
    from PIL import Image
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, size + (3,), np.uint8)).save(
        path)
    return str(path)


def test_cli_controlnet_equals_library(nets, tmp_path, monkeypatch):
    """``jaxdiff generate --controlnet DIR --control-image PNG --control-scale s``: a
    condition image of another size is resized (Lanczos, as load_image), and the PNGs equal
    the library call with that image."""
    extra = nets[2]
    pipe, params = extra["loaded"]
    monkeypatch.setattr(cli.generate, "load_pipeline", lambda path=None, **kw: extra["loaded"])
    png = _png(tmp_path / "cond.png", (20, 24))
    out = tmp_path / "out"
    argv = ["generate", "--model", extra["pipe_dir"], "--prompt", PROMPTS[0], "--prompt",
            PROMPTS[1], "--sampler", "ddim", "--steps", "4", "--guidance", "5.0",
            "--controlnet", extra["dirs"]["sd1"], "--controlnet", extra["dirs"]["sd1_b"],
            "--control-image", png, "--control-scale", "0.8", "--control-scale", "1.2",
            "--out", str(out)]
    assert cli.main(argv) == 0
    image = load_image(png, (16, 16), fit="resize")
    cn = nets[0]["sd1"]
    want = jaxdiff.generate(pipe, params, PROMPTS, control=[
        Control(cn[2], cn[3], image, 0.8), Control(*extra["second"], image, 1.2)], **GEN)
    from PIL import Image
    got = np.stack([np.asarray(Image.open(out / f"{i:04d}.png").convert("RGB"))
                    for i in range(2)])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("flags,match", [
    (["--controlnet", "{sd2}", "--control-image", "{png16}"],
     r"--controlnet .*: block_out_channels=\[32, 64, 64\] but the base UNet has "
     r"block_out_channels=\[32, 64\]"),
    (["--controlnet", "{sd1}", "--control-image", "{png20}", "--fit", "reject"],
     r"cond20.png: image is 20x20 but the model needs 16x16"),
    (["--controlnet", "{sd1}"], "need a condition image: pass --control-image"),
    (["--control-image", "{png16}"], "--control-image needs a --controlnet or --adapter"),
    (["--controlnet", "{sd1}", "--control-image", "{png16}", "--control-scale", "1",
      "--control-scale", "2"], "--control-scale given 2 times for 1 models"),
])
def test_cli_bad_control_input_is_refused_before_compiling(nets, tmp_path, capsys, monkeypatch,
                                                          flags, match):
    extra = nets[2]
    monkeypatch.setattr(cli.generate, "load_pipeline", lambda path=None, **kw: extra["loaded"])
    monkeypatch.setattr(gen_lib, "_compiled", None)  # any compile attempt would fail loudly
    subs = dict(sd1=extra["dirs"]["sd1"], sd2=extra["dirs"]["sd2"],
                png16=_png(tmp_path / "cond16.png", (16, 16)),
                png20=_png(tmp_path / "cond20.png", (20, 20)))
    out = tmp_path / "out"
    argv = ["generate", "--model", extra["pipe_dir"], "--prompt", "x", "--out", str(out)] + [
        f.format(**subs) for f in flags]
    assert cli.main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(match, errors[0]), errors
    assert not out.exists()
