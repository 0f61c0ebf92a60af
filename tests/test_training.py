"""Training recipe: a tiny end-to-end run, exact resume, and a diffusers-loadable export."""
import itertools
import json
import os

import jax
import numpy as np
import pytest

import jaxdiff
from jaxdiff.data import WorldSpec, iterate
from jaxdiff.data.tokenizer import build_tokenizer, load_tokenizer
from jaxdiff.training import batching
from jaxdiff.training import recipes, text_to_image as t2i
from torchref import models as ref



def _tiny_config():
    from torchref.scripts import load_script
    return load_script("configs", "shapes").get_config("tiny")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("t2i"))
    export = recipes.train_and_evaluate(_tiny_config(), workdir)
    return workdir, export


def test_recipe_runs_logs_samples_and_exports(trained):
    workdir, export = trained
    for stage in ("autoencoder", "diffusion"):
        lines = [json.loads(x) for x in open(os.path.join(workdir, stage, "log.jsonl"))]
        assert lines and all(np.isfinite(x["loss"]) for x in lines)
        assert lines[-1]["step"] == 4
    assert os.listdir(os.path.join(workdir, "samples"))
    pipe, params = jaxdiff.load_pipeline(export)
    images = jaxdiff.generate(pipe, params, ["a red circle"], sampler="dpmpp_2m", steps=2)
    assert images.shape == (1, 32, 32, 3)


def test_export_loads_in_diffusers_and_computes_what_jaxdiff_does(trained, torch):
    """diffusers loads the export and samples; its tokenizer, text encoder (last hidden
    state), UNet and VAE scaling factor agree with jaxdiff's on the same inputs."""
    from diffusers import StableDiffusionPipeline
    _, export = trained
    tp = StableDiffusionPipeline.from_pretrained(export)
    out = tp("a red circle", num_inference_steps=2, output_type="np").images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()
    pipe, params = jaxdiff.load_pipeline(export)
    assert tp.vae.config.scaling_factor == pipe.vae.config.scaling_factor != 1.0
    prompts = ["a red circle", "two blue squares"]
    ids = pipe.tokenize(prompts)
    np.testing.assert_array_equal(ids, tp.tokenizer(prompts, padding="max_length",
                                                    max_length=ids.shape[1]).input_ids)
    with torch.no_grad():
        want = tp.text_encoder(torch.from_numpy(ids.astype(np.int64)))[0].numpy()
    np.testing.assert_allclose(pipe.encode_text(params, ids), want, atol=1e-4, rtol=0)
    got, want = ref.unet_outputs(tp.unet, pipe.unet, params["unet"])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_scaling_factor_normalises_latents(trained):
    _, export = trained
    pipe, params = jaxdiff.load_pipeline(export)
    x = np.stack([e["image"] for e in itertools.islice(iterate(0, WorldSpec()), 64)])
    lat = pipe.encode_images(params, jaxdiff.pipeline.from_uint8(x))
    assert 0.5 < float(np.std(np.asarray(lat))) < 2.0


def test_resume_reproduces_uninterrupted_run(tmp_path):
    cfg = _tiny_config()
    tok = load_tokenizer(build_tokenizer(str(tmp_path / "tok"), model_max_length=16))
    pipe = recipes.build_pipeline(cfg.model.to_dict(), tok)
    params = jaxdiff.pipeline.init_params(pipe, 0)
    source = [e for e in itertools.islice(iterate(1, WorldSpec()), 32)]
    kw = dict(batch_size=8, lr=1e-3, warmup=1, log_every=1, ckpt_every=2, seed=0)
    full = t2i.train_autoencoder(pipe, params, source, str(tmp_path / "a"), steps=4, **kw)
    t2i.train_autoencoder(pipe, params, source, str(tmp_path / "b"), steps=2, **kw)
    resumed = t2i.train_autoencoder(pipe, params, source, str(tmp_path / "b"), steps=4, **kw)
    for a, b in zip(jax.tree.leaves(full["vae"]), jax.tree.leaves(resumed["vae"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert not np.allclose(jax.tree.leaves(full["vae"])[0], jax.tree.leaves(params["vae"])[0])


def test_batches_are_a_pure_function_of_step():
    a = batching.batch_indices(100, 8, 37, seed=3)
    assert np.array_equal(a, batching.batch_indices(100, 8, 37, seed=3))
    epoch = np.concatenate([batching.batch_indices(96, 8, s, 0) for s in range(12)])
    assert sorted(epoch.tolist()) == list(range(96))  # one epoch sees every example once


def test_init_from_fine_tunes_an_existing_pipeline(trained, tmp_path):
    """config.init_from: the VAE and tokenizer come from the given pipeline; the UNet moves;
    config.scheduler_update changes the loaded scheduler (here: to v-prediction with zero
    terminal SNR, as configs/shapes.py:v2_zsnr does) and the export keeps the change."""
    _, export = trained
    cfg = _tiny_config()
    cfg.init_from, cfg.stages = export, "diffusion"
    cfg.sample_every = 0
    update = dict(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                  timestep_spacing="trailing")
    cfg.scheduler_update = update
    out = recipes.train_and_evaluate(cfg, str(tmp_path / "ft"))
    (p0, before), (p1, after) = jaxdiff.load_pipeline(export), jaxdiff.load_pipeline(out)
    assert p0.scheduler.prediction_type == "epsilon"
    assert {k: getattr(p1.scheduler, k) for k in update} == update
    with open(os.path.join(out, "scheduler", "scheduler_config.json")) as f:
        saved = json.load(f)
    assert {k: saved[k] for k in update} == update
    cfg.scheduler_update = dict(prediction="v")
    with pytest.raises(ValueError, match=r"scheduler_update: unknown .*\['prediction'\]"):
        recipes.train_and_evaluate(cfg, str(tmp_path / "bad"))
    assert p1.vae.config.scaling_factor == p0.vae.config.scaling_factor
    for a, b in zip(jax.tree.leaves(before["vae"]), jax.tree.leaves(after["vae"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before["unet"]),
                                                         jax.tree.leaves(after["unet"])))


@pytest.mark.parametrize("object_weight", [0.0, 4.0])
def test_decoder_stage_moves_only_the_decoder_and_lowers_its_loss(trained, tmp_path,
                                                                  object_weight):
    """stage "decoder": encoder, quant_conv, UNet, text encoder and scaling factor are kept
    bit for bit; post_quant_conv + decoder move, and reconstructions of the training images
    get closer (L1 + L2 from the posterior mean, before vs after). With
    ``decoder.object_weight`` (``configs/shapes.py:v2_sharp``'s loss) the same holds, and
    ``export_dtype="float16"`` writes float16 tensors."""
    _, export = trained
    cfg = _tiny_config()
    cfg.init_from, cfg.stages = export, "decoder"
    cfg.decoder.update(steps=30, lr=3e-3, object_weight=object_weight)
    cfg.log_every = 10
    if object_weight:
        cfg.export_dtype = "float16"
    out = recipes.train_and_evaluate(cfg, str(tmp_path / "dec"))
    from safetensors.numpy import load_file
    stored = load_file(os.path.join(out, "vae", "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in stored.values()} == {np.dtype(np.float16 if object_weight
                                                           else np.float32)}
    (p0, before), (p1, after) = jaxdiff.load_pipeline(export), jaxdiff.load_pipeline(out)
    assert p1.vae.config.scaling_factor == p0.vae.config.scaling_factor
    kept = [before["unet"], before["text_encoder"], before["vae"]["encoder"],
            before["vae"]["quant_conv"]]
    now = [after["unet"], after["text_encoder"], after["vae"]["encoder"],
           after["vae"]["quant_conv"]]
    stored_as = np.float16 if object_weight else np.float32   # kept up to that rounding
    for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(now)):
        np.testing.assert_array_equal(np.asarray(a).astype(stored_as).astype(np.float32),
                                      np.asarray(b))
    for part in ("decoder", "post_quant_conv"):
        assert not all(np.array_equal(a, b) for a, b in zip(
            jax.tree.leaves(before["vae"][part]), jax.tree.leaves(after["vae"][part])))

    spec = WorldSpec(image_size=32)
    images = np.stack([ex["image"] for ex in itertools.islice(iterate(0, spec), 32)])
    x = jaxdiff.pipeline.from_uint8(images)

    def error(pipe, params):
        vae = params["vae"]
        mean, _ = pipe.vae.apply({"params": vae}, x, method=type(pipe.vae).encode)
        recon = pipe.vae.apply({"params": vae}, mean, method=type(pipe.vae).decode)
        return float(np.mean(np.abs(np.asarray(recon) - x)))

    assert error(p1, after) < 0.9 * error(p0, before)


def test_recipe_trains_a_text_dit_on_the_frozen_vae_and_text_encoder(trained, tmp_path):
    """config.model.backbone="dit" with init_from: a fresh PixArt text DiT replaces the
    loaded U-Net and trains (2 steps, PixArt-α's initialisation) on its VAE and text encoder,
    which are exported bit for bit; the export loads as a text-DiT pipeline. "uvit" is refused before any work."""
    _, export = trained
    cfg = _tiny_config()
    cfg.model.backbone = "uvit"
    with pytest.raises(ValueError, match="backbone='uvit'.*no diffusers layout"):
        recipes.train_and_evaluate(cfg, str(tmp_path / "uvit"))
    assert not os.path.exists(tmp_path / "uvit")
    cfg.init_from, cfg.stages, cfg.model.backbone = export, "diffusion", "dit"
    cfg.model.dit.update(num_attention_heads=2, attention_head_dim=8, num_layers=1)
    cfg.diffusion.update(steps=2, train_text_encoder=False)
    cfg.sample_every = 0
    cfg.model.init = "reference"   # PixArt-α's: the output projection starts at zero
    out = recipes.train_and_evaluate(cfg, str(tmp_path / "dit"))
    (p0, before), (p1, after) = jaxdiff.load_pipeline(export), jaxdiff.load_pipeline(out)
    assert p1.is_transformer and not p0.is_transformer
    assert p1.uses_caption_mask  # config.model.caption_mask's default (PixArt's)
    # two Adam steps from zero, where flax's default init draws O(0.1) weights
    assert 0 < np.abs(np.asarray(after["unet"]["proj_out"]["kernel"])).max() < 0.01
    c = p1.unet.config
    assert (c.num_layers, c.inner_dim, c.sample_size, c.caption_channels) == (
        1, 16, p0.unet.config.sample_size, p0.text_encoder.config.hidden_size)
    for kind in ("vae", "text_encoder"):
        for a, b in zip(jax.tree.leaves(before[kind]), jax.tree.leaves(after[kind])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    lines = [json.loads(x) for x in open(tmp_path / "dit" / "diffusion" / "log.jsonl")]
    assert lines[-1]["step"] == 2 and np.isfinite(lines[-1]["loss"])
