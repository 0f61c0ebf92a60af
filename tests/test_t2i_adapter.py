"""T2I-Adapter (issue #14): parity of the features and of the UNet with the features added
(``down_intrablock_additional_residuals``) with diffusers on tiny random weights (perturbed),
full and light adapters, files written by jaxdiff loading in diffusers."""
import functools

import jax
import numpy as np
import pytest

import jaxdiff
from torchref import models as ref
from jaxdiff import cli
from jaxdiff.data.images import load_image
from jaxdiff.control import Control
from jaxdiff.models.t2i_adapter import T2IAdapterConfig, avg_pool_2x2_ceil
from jaxdiff.weights import load_component
from jaxdiff.weights.control import load_t2i_adapter, save_control_model

TOL = 1e-4
# adapter -> the UNet config whose down blocks it feeds (full: a cross-attention block and
# a last block without attention; light: three blocks, SD2-style).
PAIRS = {"full": "sd1", "light": "sd2"}


@pytest.fixture(scope="module")
def nets(torch, tiny_pipe_dir, tmp_path_factory):
    """({name: (torch adapter, torch UNet, jax adapter, params, jax UNet, params)}, shared
    random inputs (NCHW torch tensors), and for sampling: the tiny pipeline (UNet "sd1",
    fed by the "full" adapter) loaded in jaxdiff and the adapter folders."""
    out, dirs = {}, {}
    for name, unet_name in PAIRS.items():
        root = tmp_path_factory.mktemp(f"adapter_{name}")
        ta, tu = ref.make_adapter(name, seed=5), ref.make_unet(unet_name)
        ta.save_pretrained(str(root / "adapter"), safe_serialization=True)
        tu.save_pretrained(str(root / "unet"), safe_serialization=True)
        out[name] = (ta, tu) + load_t2i_adapter(str(root / "adapter")) + load_component(
            str(root / "unet"), "unet")
        dirs[name] = str(root / "adapter")
    g = torch.Generator().manual_seed(2)
    inputs = dict(x=torch.randn(2, 4, 8, 8, generator=g), t=torch.tensor([11, 650]),
                  ctx=torch.randn(2, 5, 32, generator=g), img=torch.rand(2, 3, 16, 16, generator=g))
    return out, inputs, dict(dirs=dirs, pipe_dir=tiny_pipe_dir,
                             loaded=jaxdiff.load_pipeline(tiny_pipe_dir))


@functools.lru_cache(maxsize=None)
def _program(adapter, unet):
    def run(ap, up, x, t, ctx, img, scale):
        feats = adapter.apply({"params": ap}, img, scale)
        return feats, unet.apply({"params": up}, x, t, ctx,
                                 down_intrablock_additional_residuals=feats)
    return jax.jit(run)


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_features_and_adapted_unet_match_diffusers(torch, nets, name):
    """As StableDiffusionAdapterPipeline: features times adapter_conditioning_scale, then
    the UNet with them as intrablock residuals (diffusers pops them in place)."""
    (ta, tu, adapter, ap, unet, up), inputs = nets[0][name], nets[1]
    with torch.no_grad():
        feats = [f * 0.8 for f in ta(inputs["img"])]
        want = tu(inputs["x"], inputs["t"], inputs["ctx"],
                  down_intrablock_additional_residuals=[f.clone() for f in feats]).sample.numpy()
        plain = tu(inputs["x"], inputs["t"], inputs["ctx"]).sample.numpy()
    got_feats, got = _program(adapter, unet)(
        ap, up, ref.nhwc(inputs["x"].numpy()), inputs["t"].numpy(), inputs["ctx"].numpy(),
        ref.nhwc(inputs["img"].numpy()), 0.8)
    assert len(got_feats) == len(feats) == len(unet.config.block_out_channels)
    for a, b in zip(got_feats, feats):
        np.testing.assert_allclose(ref.nchw(a), b.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(ref.nchw(got), want, atol=TOL, rtol=0)
    assert np.abs(want - plain).max() > 100 * TOL


def test_written_folder_loads_in_diffusers(torch, nets, tmp_path):
    from diffusers import T2IAdapter
    (_, _, adapter, ap, _, _), inputs = nets[0]["light"], nets[1]
    save_control_model(adapter, ap, str(tmp_path / "out"))
    back = T2IAdapter.from_pretrained(str(tmp_path / "out")).eval()
    with torch.no_grad():
        want = back(inputs["img"])
    got = jax.jit(adapter.apply)({"params": ap}, ref.nhwc(inputs["img"].numpy()))
    for a, b in zip(got, want):
        np.testing.assert_allclose(ref.nchw(a), b.numpy(), atol=TOL, rtol=0)
    assert load_t2i_adapter(str(tmp_path / "out"))[0].config == adapter.config


def test_xl_adapter_features_match_diffusers(torch, tmp_path):
    """full_adapter_xl (SDXL's layout: downsampling only in its third block), one input
    channel (sketch adapters), a non-square input: module-level parity only (SD 1.x/2.x
    UNets refuse it)."""
    from diffusers import T2IAdapter
    torch.manual_seed(0)
    ta = ref.perturb(T2IAdapter(in_channels=1, channels=(16, 32, 32, 32), num_res_blocks=1,
                                downscale_factor=4, adapter_type="full_adapter_xl"))
    ta.save_pretrained(str(tmp_path / "xl"), safe_serialization=True)
    adapter, ap = load_t2i_adapter(str(tmp_path / "xl"))
    x = torch.rand(2, 1, 24, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ta(x)
    got = jax.jit(adapter.apply)({"params": ap}, ref.nhwc(x.numpy()))
    assert [ref.nchw(g).shape for g in got] == [tuple(w.shape) for w in want]
    for a, b in zip(got, want):
        np.testing.assert_allclose(ref.nchw(a), b.numpy(), atol=TOL, rtol=0)


def test_avg_pool_ceil_mode_matches_torch(torch):
    """Odd sizes: torch's ceil-mode windows past the edge average only their pixels."""
    x = torch.randn(1, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    want = torch.nn.AvgPool2d(2, 2, ceil_mode=True)(x).numpy()
    np.testing.assert_allclose(ref.nchw(avg_pool_2x2_ceil(ref.nhwc(x.numpy()))), want,
                               atol=1e-6)


def test_config_checks(nets):
    _, _, adapter, _, unet, _ = nets[0]["full"]
    adapter.config.check_matches(unet.config, vae_factor=2)
    with pytest.raises(ValueError, match=r"channels \[32, 64\] but the base UNet's down "
                                         r"blocks have \[32, 64, 64\]"):
        adapter.config.check_matches(nets[0]["light"][4].config, vae_factor=2)
    with pytest.raises(ValueError, match="downscale_factor=2 but the base model's VAE "
                                         "factor is 8"):
        adapter.config.check_matches(unet.config, vae_factor=8)
    with pytest.raises(ValueError, match="adapter_type='coadapter'"):
        T2IAdapterConfig.from_dict(dict(ref.ADAPTER_CONFIGS["full"], adapter_type="coadapter"))


# --- sampling with an adapter -----------------------------------------------------------

PROMPTS = ["red dot", "blue sq"]
GEN = dict(sampler="ddim", steps=4, guidance_scale=5.0)


def test_generate_matches_diffusers_adapter_pipeline(torch, nets):
    """Equal to StableDiffusionAdapterPipeline from the same latents (test_generate.py's
    1e-3), per-image condition images, adapter_conditioning_scale 0.7; scale 0 equals
    generation without the adapter."""
    from diffusers import StableDiffusionAdapterPipeline, T2IAdapter
    from PIL import Image
    extra = nets[2]
    pipe, params = extra["loaded"]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    noise = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    tp = StableDiffusionAdapterPipeline.from_pretrained(
        extra["pipe_dir"], adapter=T2IAdapter.from_pretrained(extra["dirs"]["full"]),
        safety_checker=None, requires_safety_checker=False)
    tp.set_progress_bar_config(disable=True)
    with torch.no_grad():
        want = tp(PROMPTS, image=[Image.fromarray(i) for i in images], num_inference_steps=4,
                  guidance_scale=5.0, adapter_conditioning_scale=0.7,
                  latents=torch.tensor(ref.nchw(noise)), output_type="latent").images.numpy()
    _, _, adapter, ap, _, _ = nets[0]["full"]
    kw = dict(latents=noise, output="latents", **GEN)
    got = jaxdiff.generate(pipe, params, PROMPTS, control=Control(adapter, ap, images, 0.7),
                           **kw)
    np.testing.assert_allclose(ref.nchw(got), want, atol=1e-3, rtol=0)
    plain = jaxdiff.generate(pipe, params, PROMPTS, **kw)
    assert np.abs(ref.nchw(plain) - want).max() > 0.05
    zero = jaxdiff.generate(pipe, params, PROMPTS, control=Control(adapter, ap, images, 0.0),
                            **kw)
    np.testing.assert_allclose(zero, plain, atol=1e-5, rtol=0)


def test_cli_adapter_equals_library(nets, tmp_path, monkeypatch):
    """``jaxdiff generate --adapter DIR --control-image PNG --adapter-scale s``."""
    from PIL import Image
    extra = nets[2]
    pipe, params = extra["loaded"]
    monkeypatch.setattr(cli.generate, "load_pipeline", lambda path=None, **kw: extra["loaded"])
    png = str(tmp_path / "cond.png")
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 16, 3), np.uint8)).save(png)
    out = tmp_path / "out"
    assert cli.main(["generate", "--model", extra["pipe_dir"], "--prompt", PROMPTS[0],
                     "--prompt", PROMPTS[1], "--sampler", "ddim", "--steps", "4", "--guidance",
                     "5.0", "--adapter", extra["dirs"]["full"], "--control-image", png,
                     "--adapter-scale", "0.6", "--out", str(out)]) == 0
    _, _, adapter, ap, _, _ = nets[0]["full"]
    want = jaxdiff.generate(pipe, params, PROMPTS, control=Control(
        adapter, ap, load_image(png, (16, 16)), 0.6), **GEN)
    got = np.stack([np.asarray(Image.open(out / f"{i:04d}.png").convert("RGB"))
                    for i in range(2)])
    np.testing.assert_array_equal(got, want)


def test_cli_refuses_an_adapter_for_another_unet(nets, tmp_path, capsys, monkeypatch):
    from PIL import Image
    extra = nets[2]
    monkeypatch.setattr(cli.generate, "load_pipeline", lambda path=None, **kw: extra["loaded"])
    png = str(tmp_path / "cond.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(png)
    out = tmp_path / "out"
    assert cli.main(["generate", "--model", extra["pipe_dir"], "--prompt", "x", "--adapter",
                     extra["dirs"]["light"], "--control-image", png, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--adapter " + extra["dirs"]["light"] + ": the adapter's features have channels " \
        "[32, 64, 64] but the base UNet's down blocks have [32, 64]" in err, err
    assert not out.exists()
