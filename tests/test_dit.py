"""Transformer backbones (issue #18): DiT and PixArt parity with diffusers on tiny random
weights (perturbed, so zero-initialised gates act), diffusers-format round trips, DiT
class-conditional sampling against ``DiTPipeline`` with the same latents, bad input."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from torchref import models as ref
from jaxdiff import dit_sampling
from jaxdiff.denoiser import denoise
from jaxdiff.models import UnsupportedConfigError
from jaxdiff.models.dit import DiTConfig
from jaxdiff.models import pixart
from jaxdiff.models.pixart import PixArtConfig
from jaxdiff.samplers import SampleState
from jaxdiff.samplers.ddpm_learned import make_learned_range_ddpm
from jaxdiff.schedules import SchedulerConfig
from jaxdiff.weights.backbones import (load_dit_pipeline, load_transformer, save_dit_pipeline,
                                       save_transformer)

TOL = 1e-4
E2E_TOL = 1e-3  # as test_generate's end-to-end DDIM comparison with diffusers
# diffusers' DiTPipeline hard-codes the null class 1000, so the tiny model keeps 1000 classes.
DIT = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
           num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
PIXART = dict(num_attention_heads=2, attention_head_dim=6, in_channels=4, out_channels=8,
              num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=12,
              caption_channels=16, use_additional_conditions=True)


@pytest.fixture(scope="module")
def nets(torch, tmp_path_factory):
    """Torch DiTPipeline (saved, then loaded by jaxdiff) and PixArt transformer (saved,
    loaded), and random inputs."""
    from diffusers import (DDIMScheduler, DiTPipeline, DiTTransformer2DModel,
                           PixArtTransformer2DModel)
    root = tmp_path_factory.mktemp("dit")
    torch.manual_seed(0)
    tdit = ref.perturb(DiTTransformer2DModel(**DIT), scale=0.05, seed=1)
    tpipe = DiTPipeline(transformer=tdit, vae=ref.make_vae("sd1"), scheduler=DDIMScheduler())
    tpipe.save_pretrained(str(root / "dit_pipe"), safe_serialization=True)
    tpix = ref.perturb(PixArtTransformer2DModel(**PIXART), scale=0.05, seed=2)
    tpix.save_pretrained(str(root / "pixart"), safe_serialization=True)
    rng = np.random.default_rng(0)
    inputs = dict(x=rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
                  x12=rng.standard_normal((2, 4, 12, 12)).astype(np.float32),
                  ctx=rng.standard_normal((2, 5, 16)).astype(np.float32),
                  t=np.array([10, 640]), labels=np.array([3, 1000]),
                  added={"resolution": np.array([[64., 64.], [32., 48.]], np.float32),
                         "aspect_ratio": np.array([[1.], [1.5]], np.float32)})
    return dict(root=root, tpipe=tpipe, tpix=tpix, inputs=inputs,
                dit=load_dit_pipeline(str(root / "dit_pipe")),
                pixart=load_transformer(str(root / "pixart")))


def _pixart_torch(torch, tpix, inputs, x, mask=None):
    with torch.no_grad():
        return tpix(torch.tensor(x), encoder_hidden_states=torch.tensor(inputs["ctx"]),
                    timestep=torch.tensor(inputs["t"]),
                    added_cond_kwargs={k: torch.tensor(v) for k, v in inputs["added"].items()},
                    encoder_attention_mask=None if mask is None else torch.tensor(mask)
                    ).sample.numpy()


def _pixart_jax(module, params, inputs, x, mask=None):
    return ref.nchw(jax.jit(module.apply)({"params": params}, ref.nhwc(x), inputs["t"],
                                          inputs["ctx"], inputs["added"], None, mask))


def test_dit_matches_diffusers(torch, nets):
    """Learned sigma (8 output channels), a class label and the null class; called through
    ``denoiser.denoise`` (class labels as the condition): the whole output with
    ``variance=True``, its noise half by default."""
    (pipe, params), inputs = nets["dit"], nets["inputs"]
    with torch.no_grad():
        want = nets["tpipe"].transformer(torch.tensor(inputs["x"]),
                                         timestep=torch.tensor(inputs["t"]),
                                         class_labels=torch.tensor(inputs["labels"])).sample
    got, noise = jax.jit(lambda p, x, t, y: (denoise(pipe, p, x, t, y, variance=True),
                                             denoise(pipe, p, x, t, y)))(
        params["transformer"], ref.nhwc(inputs["x"]), inputs["t"], inputs["labels"])
    assert got.shape == (2, 8, 8, 8)
    np.testing.assert_allclose(ref.nchw(got), want.numpy(), atol=TOL, rtol=0)
    np.testing.assert_array_equal(noise, got[..., :4])


@pytest.mark.parametrize("size", [8, 12])
def test_pixart_matches_diffusers(torch, nets, size):
    """Micro-conditions, caption projection, cross-attention (at 8x8 with a caption mask
    that hides different tokens per sample); at 12x12 (not the config's 8x8) diffusers
    recomputes the sincos table for the larger grid, as jaxdiff does."""
    module, params = nets["pixart"]
    x = nets["inputs"]["x" if size == 8 else "x12"]
    mask = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]], np.float32) if size == 8 else None
    want = _pixart_torch(torch, nets["tpix"], nets["inputs"], x, mask)
    np.testing.assert_allclose(_pixart_jax(module, params, nets["inputs"], x, mask), want,
                               atol=TOL, rtol=0)
    if mask is not None:  # the mask really changes the output
        assert np.abs(want - _pixart_torch(torch, nets["tpix"], nets["inputs"], x)).max() > 1e-3


def test_reference_init_is_pixarts_and_predicts_zero(nets):
    """``pixart.reference_init`` (PixArt-α's initialize_weights): zero biases, zero
    cross-attention outputs and final projection (so the output is exactly 0), N(0, 0.02)
    timestep / t_block / caption MLPs, xavier-uniform elsewhere with the fused qkv / kv fans;
    the scale-shift tables are kept."""
    module, params = nets["pixart"]
    new = pixart.reference_init(params, jax.random.key(0))
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(new)[0]}
    old = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
           for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    d = PIXART["num_attention_heads"] * PIXART["attention_head_dim"]
    for name, w in flat.items():
        if name.endswith("bias") or name.startswith("proj_out") or "attn2/to_out_0" in name:
            assert not w.any(), name
        elif name.endswith("scale_shift_table"):
            np.testing.assert_array_equal(w, old[name])
    for name, fan_out in (("transformer_blocks_0/attn1/to_q", 3 * d),
                          ("transformer_blocks_1/attn2/to_v", 2 * d),
                          ("transformer_blocks_0/ff/net_2", d), ("pos_embed/proj", d)):
        w = flat[name + "/kernel"]
        bound = np.sqrt(6.0 / (w[..., 0].size + fan_out))
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.8 * bound, name
    small = np.concatenate([flat[n + "/kernel"].ravel() for n in (
        "adaln_single/linear", "adaln_single/emb/timestep_embedder/linear_1",
        "caption_projection/linear_1", "caption_projection/linear_2")])
    assert 0.018 < small.std() < 0.022
    x = nets["inputs"]["x"]
    assert not _pixart_jax(module, new, nets["inputs"], x).any()
    assert _pixart_jax(module, params, nets["inputs"], x).any()
    from jaxdiff.training import recipes   # the recipe's switch: DiT only, one line
    for backbone, init in (("unet", "reference"), ("dit", "xavier")):
        with pytest.raises(ValueError, match="'flax', or 'reference' with 'dit' or 'uvit'"):
            recipes.fresh_denoiser(None, {}, {}, backbone, init=init)


def test_saved_folders_load_in_diffusers(torch, nets, tmp_path):
    """save_transformer / save_dit_pipeline write what diffusers' from_pretrained reads,
    with the same tensors and the same outputs."""
    from diffusers import DiTPipeline, PixArtTransformer2DModel
    module, params = nets["pixart"]
    save_transformer(module, params, str(tmp_path / "pixart"))
    back = PixArtTransformer2DModel.from_pretrained(str(tmp_path / "pixart")).eval()
    x = nets["inputs"]["x"]
    np.testing.assert_allclose(_pixart_torch(torch, back, nets["inputs"], x),
                               _pixart_jax(module, params, nets["inputs"], x), atol=TOL, rtol=0)
    pipe, dparams = nets["dit"]
    named = dataclasses.replace(pipe, id2label=((0, "tench, Tinca tinca"), (7, "cock")))
    assert named.label_ids(["Tinca tinca", "cock"]) == [0, 7]
    with pytest.raises(ValueError, match="class label 'zebra' is not one of this model's 3"):
        named.label_ids(["zebra"])
    save_dit_pipeline(named, dparams, str(tmp_path / "dit"))
    tback = DiTPipeline.from_pretrained(str(tmp_path / "dit"))
    assert tback.get_label_ids(["tench", "cock"]) == [0, 7]
    assert load_dit_pipeline(str(tmp_path / "dit"))[0].id2label == named.id2label
    for name in ("transformer", "vae"):
        want = getattr(nets["tpipe"], name).state_dict()
        got = getattr(tback, name).state_dict()
        assert sorted(got) == sorted(want)
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert type(tback.scheduler).__name__ == "DDIMScheduler"
    assert not os.path.exists(str(tmp_path / "dit") + ".tmp")


@pytest.mark.parametrize("scale", [4.0, 1.0])
def test_class_sampling_matches_dit_pipeline(torch, nets, scale):
    """DDIM, 6 steps, the same initial latents: decoded images equal DiTPipeline's
    (guided: the cond/null batch, guidance on the noise channels, variance dropped)."""
    pipe, params = nets["dit"]
    g = torch.Generator().manual_seed(7)
    noise = torch.randn((2, 4, 8, 8), generator=g)
    with torch.no_grad():
        want = nets["tpipe"](class_labels=[3, 7], guidance_scale=scale,
                             generator=torch.Generator().manual_seed(7), num_inference_steps=6,
                             output_type="np").images
    got = dit_sampling.generate_classes(pipe, params, [3, 7], steps=6, guidance_scale=scale,
                                        latents=ref.nhwc(noise.numpy()))
    np.testing.assert_allclose((np.asarray(got) + 1) / 2, want, atol=E2E_TOL, rtol=0)
    assert np.asarray(got).std() > 0.05  # real images, not a constant


def test_learned_variance_ddpm_matches_diffusers(torch, nets):
    """Every step of a 5-step schedule against DDPMScheduler(variance_type="learned_range")
    with the noise its generator draws; then the DiT samples with it (guided, a smoke run:
    the 2C-channel output reaches the step)."""
    from diffusers import DDPMScheduler
    sched = DDPMScheduler(variance_type="learned_range", clip_sample=False, steps_offset=1)
    sched.set_timesteps(5)
    cfg = SchedulerConfig.from_dict({k: v for k, v in sched.config.items()
                                     if k != "variance_type"})
    sampler = make_learned_range_ddpm(cfg, 5)
    np.testing.assert_array_equal(sampler.timesteps, sched.timesteps.numpy())
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    out = np.concatenate([rng.standard_normal((2, 4, 4, 4)),
                          rng.uniform(-1, 1, (2, 4, 4, 4))], -1).astype(np.float32)
    for i, t in enumerate(sched.timesteps):
        want = sched.step(torch.tensor(ref.nchw(out)), t, torch.tensor(ref.nchw(x)),
                          generator=torch.Generator().manual_seed(i)).prev_sample.numpy()
        noise = torch.randn((2, 4, 4, 4), generator=torch.Generator().manual_seed(i)).numpy()
        got = sampler.step(SampleState(jnp.asarray(x)), i, out, ref.nhwc(noise)).x
        np.testing.assert_allclose(ref.nchw(got), want, atol=1e-5, rtol=0)
    pipe, params = nets["dit"]
    lat = dit_sampling.generate_classes(pipe, params, [5], steps=3, sampler="ddpm",
                                        variance="learned", output="latents")
    assert lat.shape == (1, 8, 8, 4) and np.isfinite(lat).all()


def test_new_guidance_scale_reuses_the_program(nets):
    pipe, params = nets["dit"]
    dit_sampling.generate_classes(pipe, params, [1], steps=2, guidance_scale=3.0,
                                  output="latents")
    program = dit_sampling._compiled(pipe, "ddim", 2, True, False, "fixed")
    before = program._cache_size()
    a = dit_sampling.generate_classes(pipe, params, [1], steps=2, guidance_scale=5.0,
                                      output="latents")
    b = dit_sampling.generate_classes(pipe, params, [1], steps=2, guidance_scale=3.0,
                                      output="latents")
    assert program._cache_size() == before == 1
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3  # the scale does act


def test_bad_input_is_one_line_before_compiling(nets, tmp_path):
    pipe, params = nets["dit"]
    misses = dit_sampling._compiled.cache_info().misses
    with pytest.raises(ValueError, match=r"class_labels: 1000 is out of range; this model has "
                                         r"1000 classes \(0\.\.999\)"):
        dit_sampling.generate_classes(pipe, params, [3, 1000])
    with pytest.raises(ValueError, match="not divisible by patch_size=2"):
        dit_sampling.generate_classes(pipe, params, [3], latents=np.zeros((1, 7, 7, 4)))
    with pytest.raises(ValueError, match="variance='learned' needs sampler='ddpm'"):
        dit_sampling.generate_classes(pipe, params, [3], variance="learned")
    assert dit_sampling._compiled.cache_info().misses == misses
    with pytest.raises(ValueError, match="latent size 6x7 is not divisible by patch_size=2"):
        jax.eval_shape(lambda: pipe.transformer.apply({"params": params["transformer"]},
                                                      jnp.zeros((1, 6, 7, 4)), 1,
                                                      jnp.zeros((1,), jnp.int32)))
    for bad, field in ((dict(norm_type="ada_norm"), "norm_type"),
                       (dict(activation_fn="geglu"), "activation_fn"),
                       (dict(norm_elementwise_affine=True), "norm_elementwise_affine")):
        with pytest.raises(UnsupportedConfigError, match=f"{field}=.* is not supported"):
            DiTConfig.from_dict(dict(DIT, **bad))
    with pytest.raises(UnsupportedConfigError, match="attention_type='gated' is not supported"):
        PixArtConfig.from_dict(dict(PIXART, attention_type="gated"))
    folder = tmp_path / "unknown"
    folder.mkdir()
    (folder / "config.json").write_text('{"_class_name": "SD3Transformer2DModel"}')
    with pytest.raises(UnsupportedConfigError, match="_class_name='SD3Transformer2DModel' is "
                                                     "not supported"):
        load_transformer(str(folder))
