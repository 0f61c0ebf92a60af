"""SDXL (issue #15, point 1): the text_time UNet (base and refiner) and
``CLIPTextModelWithProjection`` equal diffusers / transformers on tiny random configs; a
diffusers SDXL pipeline folder loads (two encoders and tokenizers, zeroed negative
embeddings), ``jaxdiff.generate`` equals ``StableDiffusionXLPipeline`` (and, base -> refiner,
``StableDiffusionXLImg2ImgPipeline`` with denoising_end / denoising_start), the
original-layout single file jaxdiff writes is read by diffusers' ``from_single_file``; on
SDXL (issue #15, point 3): SDEdit, kohya / peft LoRA files, clip_l / clip_g Textual
Inversion files and DreamBooth-LoRA training equal or are read by diffusers; the fp16-fix
VAE config is honoured (point 2)."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from torchref import models as ref
from jaxdiff.weights import load_component

TOL = 1e-4


@pytest.fixture(scope="module")
def saved(torch, tmp_path_factory):
    """Tiny diffusers SDXL base and refiner pipeline folders (their UNets and second
    encoder are the parity subjects) and a legacy-eos projection encoder, each saved."""
    root = tmp_path_factory.mktemp("sdxl")
    out = {}
    for name, refiner in (("pipeline", False), ("refiner_pipeline", True)):
        tp = ref.make_torch_sdxl_pipeline(str(root / name), seed=int(refiner), refiner=refiner)
        out[name] = (tp, str(root / name))
        out["refiner" if refiner else "unet"] = (tp.unet, str(root / name / "unet"))
    tp = out["pipeline"][0]
    out["text_encoder_2"] = (tp.text_encoder_2, str(root / "pipeline" / "text_encoder_2"))
    legacy = ref.make_text_encoder_2(seed=2, eos_token_id=2)
    legacy.save_pretrained(str(root / "legacy_eos"), safe_serialization=True)
    out["legacy_eos"] = (legacy, str(root / "legacy_eos"))
    return out


@pytest.mark.parametrize("name,n_ids", [("unet", 6), ("refiner", 5)])
def test_sdxl_unet_matches_diffusers(torch, saved, name, n_ids):
    tm, folder = saved[name]
    module, params = load_component(folder, "unet")
    apply = jax.jit(module.apply)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 5, tm.config.cross_attention_dim, generator=g)
    text = torch.randn(2, 32, generator=g)
    # sizes / crops / aesthetic scores as SDXL passes them (floats of pixel counts).
    ids = torch.tensor([[1024., 768, 0, 16, 1024, 1024, 0][:n_ids],
                        [512., 512, 8, 0, 6.0, 896, 640][:n_ids]])
    t = torch.tensor([3, 871])
    with torch.no_grad():
        want = tm(x, t, ctx, added_cond_kwargs={"text_embeds": text, "time_ids": ids}).sample
    got = apply({"params": params}, jnp.asarray(ref.nhwc(x.numpy())),
                       jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy()),
                       added_cond_kwargs={"text_embeds": jnp.asarray(text.numpy()),
                                          "time_ids": jnp.asarray(ids.numpy())})
    np.testing.assert_allclose(ref.nchw(got), want.numpy(), atol=TOL, rtol=0)
    # The conditioning matters: other time ids move the output.
    moved = apply({"params": params}, jnp.asarray(ref.nhwc(x.numpy())),
                         jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy()),
                         added_cond_kwargs={"text_embeds": jnp.asarray(text.numpy()),
                                            "time_ids": jnp.asarray(ids.numpy()[::-1])})
    assert float(np.abs(np.asarray(moved) - np.asarray(got)).max()) > 1e-3
    with pytest.raises(ValueError, match="time ids"):
        apply({"params": params}, jnp.asarray(ref.nhwc(x.numpy())), 3,
                     jnp.asarray(ctx.numpy()),
                     added_cond_kwargs={"text_embeds": jnp.asarray(text.numpy()),
                                        "time_ids": jnp.zeros((2, n_ids + 1))})


@pytest.mark.parametrize("name", ["text_encoder_2", "legacy_eos"])
def test_text_encoder_with_projection_matches_transformers(torch, saved, name):
    tm, folder = saved[name]
    module, params = load_component(folder, "text_encoder_2")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, tm.config.vocab_size - 2, (3, 16), generator=g)
    eos = tm.config.vocab_size - 1
    for row, end in enumerate((4, 9, 15)):  # the tokenizer's [bos, ..., eos, pad=eos ...]
        ids[row, 0], ids[row, end:] = tm.config.vocab_size - 2, eos
    with torch.no_grad():
        want = tm(ids, output_hidden_states=True)
    embeds, last, hidden = module.apply({"params": params}, jnp.asarray(ids.numpy()),
                                        output_hidden_states=True)
    np.testing.assert_allclose(np.asarray(embeds), want.text_embeds.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(last), want.last_hidden_state.numpy(), atol=TOL,
                               rtol=0)
    # SDXL's context: the penultimate hidden state.
    np.testing.assert_allclose(np.asarray(hidden[-2]), want.hidden_states[-2].numpy(),
                               atol=TOL, rtol=0)


PROMPTS = ["a red circle", "blue square"]


def test_sdxl_pipeline_folder_loads_and_encodes_as_diffusers(torch, saved, tmp_path):
    tp, folder = saved["pipeline"]
    pipe, params = jaxdiff.load_pipeline(folder)
    assert pipe.is_sdxl and pipe.force_zeros_for_empty_prompt
    assert set(params) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    ids = pipe.tokenize(PROMPTS)
    # Each encoder's own tokenizer: the second pads with '!' (SDXL's), the first with eos.
    assert ids.shape == (2, 2, 16)
    assert (ids[:, 1, -1] == pipe.tokenizer_2.convert_tokens_to_ids("!")).all()
    assert (ids[:, 0, -1] == pipe.tokenizer.eos_token_id).all()
    cond = jax.jit(lambda p, i: pipe.encode_text(p, i))(params, ids)
    with torch.no_grad():
        want, _, pooled, _ = tp.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    np.testing.assert_allclose(np.asarray(cond["context"]), want.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(cond["text_embeds"]), pooled.numpy(), atol=1e-4,
                               rtol=0)
    np.testing.assert_array_equal(pipe.time_ids(16, 24), [16, 24, 0, 0, 16, 24])
    # Written back by jaxdiff, read by diffusers as the same SDXL pipeline.
    from diffusers import StableDiffusionXLPipeline
    jaxdiff.save_pipeline(pipe, params, str(tmp_path / "out"))
    back = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "out"))
    assert back.config.force_zeros_for_empty_prompt and back.tokenizer_2.pad_token == "!"
    for a, b in ((back.unet, tp.unet), (back.text_encoder_2, tp.text_encoder_2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_sdxl_refiner_folder_loads_and_encodes_as_diffusers(torch, saved, tmp_path):
    """The refiner (StableDiffusionXLImg2ImgPipeline): second encoder only, aesthetic-score
    time ids as diffusers' _get_add_time_ids with its defaults (6.0 / 2.5)."""
    tp, folder = saved["refiner_pipeline"]
    pipe, params = jaxdiff.load_pipeline(folder)
    assert pipe.text_encoder is None and pipe.requires_aesthetics_score
    assert not pipe.force_zeros_for_empty_prompt
    assert set(params) == {"unet", "vae", "text_encoder_2"}
    ids = pipe.tokenize(PROMPTS)
    assert ids.shape == (2, 1, 16)
    cond = jax.jit(lambda p, i: pipe.encode_text(p, i))(params, ids)
    with torch.no_grad():
        want, _, pooled, _ = tp.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    np.testing.assert_allclose(np.asarray(cond["context"]), want.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(cond["text_embeds"]), pooled.numpy(), atol=1e-4,
                               rtol=0)
    pos, neg = tp._get_add_time_ids((16, 24), (0, 0), (16, 24), 6.0, 2.5, (16, 24), (0, 0),
                                    (16, 24), torch.float32, 32)
    np.testing.assert_array_equal(pipe.time_ids(16, 24), pos.numpy()[0])
    np.testing.assert_array_equal(pipe.time_ids(16, 24, negative=True), neg.numpy()[0])
    from diffusers import StableDiffusionXLImg2ImgPipeline
    jaxdiff.save_pipeline(pipe, params, str(tmp_path / "out"))
    back = StableDiffusionXLImg2ImgPipeline.from_pretrained(str(tmp_path / "out"))
    assert back.text_encoder is None and back.config.requires_aesthetics_score


def test_sdxl_generate_matches_diffusers(torch, saved):
    """No negative prompt: zero negative embeddings (force_zeros_for_empty_prompt); time
    ids (16, 16, 0, 0, 16, 16) as diffusers computes them."""
    tp, folder = saved["pipeline"]
    pipe, params = jaxdiff.load_pipeline(folder)
    noise = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    with torch.no_grad():
        want = tp(PROMPTS, num_inference_steps=4, guidance_scale=5.0,
                  latents=torch.tensor(ref.nchw(noise)), output_type="latent").images.numpy()
    got = jaxdiff.generate(pipe, params, PROMPTS, steps=4, guidance_scale=5.0, latents=noise,
                           output="latents")
    np.testing.assert_allclose(ref.nchw(got), want, atol=1e-3, rtol=0)
    assert np.abs(want).max() > 0.1


def test_sdxl_single_file_round_trip(torch, saved, tmp_path):
    """jaxdiff writes the original SDXL layout; diffusers' from_single_file (local config)
    reads it into exactly the source tensors, and jaxdiff reads it back (config=)."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open
    tp, folder = saved["pipeline"]
    pipe, params = jaxdiff.load_pipeline(folder)
    file = str(tmp_path / "xl.safetensors")
    jaxdiff.save_pipeline(pipe, params, file, format="single_file")
    with safe_open(file, "np") as f:
        keys = set(f.keys())
    assert {"model.diffusion_model.label_emb.0.0.weight",
            "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
            "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
            "conditioner.embedders.1.model.text_projection"} <= keys
    got = StableDiffusionXLPipeline.from_single_file(file, config=folder, local_files_only=True)
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want, have = getattr(tp, comp).state_dict(), getattr(got, comp).state_dict()
        want = {k: v for k, v in want.items() if not k.endswith("position_ids")}
        have = {k: v for k, v in have.items() if not k.endswith("position_ids")}
        assert want.keys() == have.keys(), comp
        for k in want:
            np.testing.assert_array_equal(have[k].numpy(), want[k].numpy(), err_msg=k)
    back, back_params = jaxdiff.load_pipeline(file, config=folder)
    assert back.is_sdxl and back.force_zeros_for_empty_prompt
    jax.tree.map(np.testing.assert_array_equal, back_params, params)
    # Without config=: configs inferred, but this tiny vocabulary is not CLIP's (no tokenizer).
    with pytest.raises(FileNotFoundError, match="config="):
        jaxdiff.load_pipeline(file)


class _Shapes(dict):
    """key -> shape: what config inference reads of a checkpoint (no tensor data)."""
    path = "sdxl-size.safetensors"

    def shape(self, key):
        return self.get(key)


# The SDXL base / refiner diffusers configs (stabilityai/stable-diffusion-xl-base-1.0 and
# -refiner-1.0), as diffusers' from_single_file fetches them.
XL_UNET = {
    "xl": dict(block_out_channels=(320, 640, 1280), layers_per_block=2,
               down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
               up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",),
               attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
               transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
               addition_embed_type="text_time", addition_time_embed_dim=256,
               projection_class_embeddings_input_dim=2816),
    "xl_refiner": dict(block_out_channels=(384, 768, 1536, 1536), layers_per_block=2,
                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                         "CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D",
                                       "CrossAttnUpBlock2D", "UpBlock2D"),
                       attention_head_dim=(6, 12, 24, 24), cross_attention_dim=1280,
                       transformer_layers_per_block=4, use_linear_projection=True,
                       addition_embed_type="text_time", addition_time_embed_dim=256,
                       projection_class_embeddings_input_dim=2560),
}
XL_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, hidden_act="quick_gelu")
XL_TEXT_2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, hidden_act="gelu", projection_dim=1280)


@pytest.mark.parametrize("model_type", ["xl", "xl_refiner"])
def test_sdxl_configs_inferred_at_real_size_equal_the_hub_configs(torch, model_type):
    """Full-size SDXL layouts on PyTorch's meta device (shapes only) written through the
    original-layout maps: the model type and the inferred configs equal the hub's."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from jaxdiff.weights import original_config as oc
    from jaxdiff.weights import original_layout as ol
    refiner = model_type == "xl_refiner"
    with torch.device("meta"):
        unet = UNet2DConditionModel(**XL_UNET[model_type])
        te = CLIPTextModel(CLIPTextConfig(**XL_TEXT))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**XL_TEXT_2))
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()
                        if not k.endswith("position_ids")}
    s1 = {("" if k.startswith("text_model.") else "text_model.") + k: v
          for k, v in shapes(te).items()}
    m1, m2 = ol.sdxl_text_maps({} if refiner else s1, shapes(te2), refiner=refiner)
    ckpt = _Shapes()
    for key_map, s in ((ol.unet_map(shapes(unet), unet.config), shapes(unet)), (m1, s1),
                       (m2, shapes(te2))):
        for k, (orig, part) in key_map.items():
            shape = s[k]
            if part == "T":
                shape = shape[::-1]
            elif isinstance(part, tuple):
                shape = (ckpt.get(orig, (0,) + shape[1:])[0] + shape[0],) + shape[1:]
            ckpt[orig] = shape
    assert oc.detect(ckpt) == model_type
    u = oc.infer_unet_config(ckpt, model_type, 1024)
    u = {k: tuple(v) if isinstance(v, list) else v for k, v in u.items()}
    want = dict(XL_UNET[model_type], sample_size=128, upcast_attention=False)
    if refiner:  # blocks without attention ignore their depth; the mid block uses the last
        want["transformer_layers_per_block"] = (1, 4, 4, 4)
    assert {k: u[k] for k in want} == want
    texts = oc.infer_sdxl_text_configs(ckpt, model_type)
    assert set(texts) == ({"text_encoder_2"} if refiner else {"text_encoder", "text_encoder_2"})
    assert {k: texts["text_encoder_2"][k] for k in XL_TEXT_2} == XL_TEXT_2
    if not refiner:
        assert {k: texts["text_encoder"][k] for k in XL_TEXT} == XL_TEXT


@pytest.mark.parametrize("sampler", ["euler"])  # SDXL's; "ddim" passes too (left out: time)
def test_sdxl_base_to_refiner_handoff_matches_diffusers(torch, saved, sampler):
    """Base with denoising_end=0.6 (timesteps 801, 601, 401 of 5) returns latents;
    the refiner (aesthetic-score time ids, second encoder only) finishes them from
    denoising_start=0.6 (201, 1): both equal diffusers' StableDiffusionXLPipeline ->
    StableDiffusionXLImg2ImgPipeline(image=latents) chain; prompt / seed changes reuse
    the compiled programs."""
    from diffusers import EulerDiscreteScheduler
    from jaxdiff import parallel, sampling
    (tb, base_dir), (tr, ref_dir) = saved["pipeline"], saved["refiner_pipeline"]
    if sampler == "euler":  # copies: the fixture's pipelines keep DDIM
        tb, tr = (type(t).from_pipe(t, scheduler=EulerDiscreteScheduler.from_config(
            t.scheduler.config)) for t in (tb, tr))
    pipe, params = jaxdiff.load_pipeline(base_dir)
    rpipe, rparams = jaxdiff.load_pipeline(ref_dir)
    noise = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
    kw = dict(num_inference_steps=5, guidance_scale=5.0, output_type="latent")
    with torch.no_grad():
        mid_want = tb(PROMPTS, latents=torch.tensor(ref.nchw(noise)), denoising_end=0.6,
                      **kw).images
        want = tr(PROMPTS, image=mid_want, denoising_start=0.6, **kw).images.numpy()
    common = dict(sampler=sampler, steps=5, guidance_scale=5.0, output="latents")
    mid = jaxdiff.generate(pipe, params, PROMPTS, latents=noise, denoising_end=0.6, **common)
    np.testing.assert_allclose(ref.nchw(mid), mid_want.numpy(), atol=1e-3, rtol=0)
    got = jaxdiff.generate(rpipe, rparams, PROMPTS, latents=mid, denoising_start=0.6, **common)
    np.testing.assert_allclose(ref.nchw(got), want, atol=1e-3, rtol=0)
    assert np.abs(want - mid_want.numpy()).max() > 0.1  # the refiner's steps did something
    assert sampling.step_span(pipe, sampler, 5, None, 0.6) == (0, 3, False)
    assert sampling.step_span(rpipe, sampler, 5, 0.6) == (3, 5, True)
    mesh = parallel.make_mesh()
    programs = [sampling._compiled(pipe, sampler, 5, False, mesh, (), True, (0, 3, False)),
                sampling._compiled(rpipe, sampler, 5, False, mesh, (), False, (3, 5, True))]
    jaxdiff.generate(pipe, params, ["a green ring", "x"], seed=7, denoising_end=0.6, **common)
    jaxdiff.generate(rpipe, rparams, ["a green ring", "x"], seed=7, latents=mid,
                     denoising_start=0.6, **common)
    assert [p._cache_size() for p in programs] == [1, 1]


def test_sdxl_handoff_bad_requests_fail_before_compiling(saved):
    pipe, params = jaxdiff.load_pipeline(saved["pipeline"][1])
    bad = [(dict(denoising_end=0.6), "output='latents'"),
           (dict(denoising_start=0.6, output="latents"), "needs latents="),
           (dict(denoising_end=1.0, output="latents"), "strictly between"),
           (dict(denoising_start=0.7, denoising_end=0.6, output="latents"), "below"),
           (dict(denoising_end=0.6, sampler="heun", output="latents"), "heun"),
           (dict(denoising_start=0.99, denoising_end=0.995, output="latents",
                 latents=np.zeros((1, 8, 8, 4), np.float32)), "no step")]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            jaxdiff.generate(pipe, params, "a", **dict(dict(steps=5), **kw))


def test_sdxl_sdedit_on_the_refiner_matches_diffusers_img2img(torch, saved):
    """SDEdit on the refiner is diffusers' StableDiffusionXLImg2ImgPipeline (strength 0.6
    of 5 DDIM steps; aesthetic-score time ids of the image size); P2P / null-text and the
    other edit methods refuse SDXL in one line before compiling."""
    from jaxdiff.editing import blended, p2p_pipeline, sdedit
    tr, folder = saved["refiner_pipeline"]
    pipe, params = jaxdiff.load_pipeline(folder)
    images = np.random.default_rng(2).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    z0 = np.asarray(pipe.encode_images(params, jnp.asarray(images)))
    with torch.no_grad():
        noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3))
        want = tr(PROMPTS, image=torch.tensor(ref.nchw(z0)), strength=0.6,
                  num_inference_steps=5, guidance_scale=5.0,
                  generator=torch.Generator().manual_seed(3), output_type="latent").images
    got = sdedit.sdedit(pipe, params, images, PROMPTS, strength=0.6, steps=5,
                        guidance_scale=5.0, noise=ref.nhwc(noise.numpy()))["latents"]
    np.testing.assert_allclose(ref.nchw(got), want.numpy(), atol=1e-3, rtol=0)
    assert np.abs(want.numpy() - ref.nchw(z0)).max() > 0.1
    with pytest.raises(ValueError, match="SDXL"):
        blended.blended(pipe, params, images, np.ones((2, 16, 16)), PROMPTS)
    with pytest.raises(ValueError, match="SDXL"):
        p2p_pipeline.p2p_edit(pipe, params, images, PROMPTS, PROMPTS,
                              p2p_pipeline.P2PSettings())


def test_fp16_fix_vae_config_loads_and_is_honoured(torch, saved, tmp_path):
    """madebyollin/sdxl-vae-fp16-fix's config (force_upcast false, scaling 0.13025): read,
    used to scale latents as diffusers does, kept on save; float16 pipelines keep an
    upcast VAE in float32 and this one in float16."""
    import json
    import shutil
    from diffusers import AutoencoderKL
    folder = str(tmp_path / "fix")
    shutil.copytree(saved["pipeline"][1], folder)
    path = f"{folder}/vae/config.json"
    cfg = json.load(open(path))
    assert cfg.get("force_upcast", True)  # the tiny base: diffusers' default, upcast
    cfg.update(force_upcast=False, scaling_factor=0.13025)
    json.dump(cfg, open(path, "w"))
    pipe, params = jaxdiff.load_pipeline(folder)
    assert not pipe.vae.config.force_upcast and pipe.vae.config.scaling_factor == 0.13025
    up = dataclasses.replace(pipe, vae=pipe.vae.clone(config=dataclasses.replace(
        pipe.vae.config, force_upcast=True)))
    assert up.with_dtype(jnp.float16).vae.dtype == jnp.float32
    assert pipe.with_dtype(jnp.float16).vae.dtype == jnp.float16
    assert pipe.with_dtype(jnp.bfloat16).vae.dtype == jnp.bfloat16  # diffusers: fp16 only
    x = np.random.default_rng(4).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    tv = AutoencoderKL.from_pretrained(f"{folder}/vae")
    with torch.no_grad():
        want = tv.encode(torch.tensor(ref.nchw(x))).latent_dist.mean * tv.config.scaling_factor
    got = jax.jit(lambda p, v: pipe.encode_images(p, v))(params, jnp.asarray(x))
    np.testing.assert_allclose(ref.nchw(got), want.numpy(), atol=1e-4, rtol=0)
    jaxdiff.save_pipeline(pipe, params, str(tmp_path / "out"))
    back = AutoencoderKL.from_pretrained(str(tmp_path / "out" / "vae"))
    assert back.config.force_upcast is False and back.config.scaling_factor == 0.13025


def _sdxl_outputs(pipe, params):
    """(UNet output NCHW, context, pooled) of jaxdiff on fixed inputs (see _torch_outputs)."""
    x, t, ctx, text, ids = _lora_inputs()
    out, cond = _jax_outputs(pipe, params, ref.nhwc(x), t, ctx, text, ids,
                             pipe.tokenize(PROMPTS))
    return ref.nchw(out), np.asarray(cond["context"]), np.asarray(cond["text_embeds"])


@functools.partial(jax.jit, static_argnums=0)
def _jax_outputs(pipe, params, x, t, ctx, text, ids, tokens):
    added = {"text_embeds": text, "time_ids": ids}
    return (pipe.unet.apply({"params": params["unet"]}, x, t, ctx, added_cond_kwargs=added),
            pipe.encode_text(params, tokens))


def _torch_outputs(tp, torch):
    x, t, ctx, text, ids = (torch.tensor(v) for v in _lora_inputs())
    with torch.no_grad():
        out = tp.unet(x, t, ctx, added_cond_kwargs={"text_embeds": text, "time_ids": ids})
        context, _, pooled, _ = tp.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    return out.sample.numpy(), context.numpy(), pooled.numpy()


def _lora_inputs():
    rng = np.random.default_rng(5)
    return (rng.standard_normal((2, 4, 8, 8)).astype(np.float32), np.array([3, 871]),
            rng.standard_normal((2, 5, 80)).astype(np.float32),
            rng.standard_normal((2, 32)).astype(np.float32),
            np.array([[16., 16, 0, 0, 16, 16]] * 2, np.float32))


def test_sdxl_loras_equal_diffusers_load_lora_weights(torch, saved, tmp_path):
    """A kohya SDXL file (UNet modules by their original-layout SGM names, lora_te1_ /
    lora_te2_ with out_proj as real files have it (diffusers 0.42 drops q_proj-only text
    LoRAs: its format detection needs 'to_out_lora'), a LoCon 3x3 conv, alpha != rank) and
    a diffusers/peft file with text_encoder_2 modules, each through apply_adapters
    (--lora), equal diffusers' load_lora_weights on the same base: UNet output, context
    and pooled embeddings."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.numpy import save_file
    from jaxdiff.adapters import apply_adapters, lora as lora_lib
    from jaxdiff.weights import original_layout as ol
    folder = saved["pipeline"][1]
    pipe, params = jaxdiff.load_pipeline(folder)
    tp = StableDiffusionXLPipeline.from_pretrained(folder)
    rng = np.random.default_rng(6)
    state = {}
    for prefix, model in (("lora_unet_", tp.unet), ("lora_te1_", tp.text_encoder),
                          ("lora_te2_", tp.text_encoder_2)):
        for name, mod in model.named_modules():
            if not (name.endswith(("attn1.to_q", "attn2.to_k", "ff.net.2", "proj_in",
                                   "resnets.0.conv1", "q_proj", "out_proj", "mlp.fc1"))
                    and isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))):
                continue
            if prefix == "lora_unet_":  # kohya's SDXL names: the original (SGM) layout
                key = ol.unet_map([name + ".weight"], pipe.unet.config)[name + ".weight"][0]
                name = key[len(ol.UNET_PREFIX):-len(".weight")]
            elif not name.startswith("text_model."):
                name = "text_model." + name
            w, key = mod.weight, prefix + name.replace(".", "_")
            r = 2 if w.ndim == 4 else 4
            state[key + ".lora_down.weight"] = rng.normal(0, 0.3, (r,) + tuple(w.shape[1:])
                                                          ).astype(np.float32)
            state[key + ".lora_up.weight"] = rng.normal(
                0, 0.3, (w.shape[0], r) + ((1, 1) if w.ndim == 4 else ())).astype(np.float32)
            state[key + ".alpha"] = np.array(1.0 if w.ndim == 4 else 8.0, np.float32)
    assert any(k.startswith("lora_unet_input_blocks_") for k in state)
    assert any(v.ndim == 4 and v.shape[-1] == 3 for v in state.values())
    kohya_file = str(tmp_path / "kohya_xl.safetensors")
    save_file(state, kohya_file)
    key = jax.random.key(0)
    peft = {**lora_lib.init_lora(params, 4, key=key),
            **lora_lib.init_lora(params, 4, key=key, scope="text_encoder_2")}
    peft = jax.tree.map(lambda v: v + 0.2 * jax.random.normal(key, v.shape), peft)
    peft_file = lora_lib.save_lora(peft, str(tmp_path / "peft_xl"), alpha=2.0)
    base = _torch_outputs(tp, torch)
    for file, name in ((kohya_file, "kohya"), (peft_file, "peft")):
        tp.load_lora_weights(file, adapter_name=name)
        tp.set_adapters([name], adapter_weights=[0.7])
        want = _torch_outputs(tp, torch)
        tp.delete_adapters(name)
        _, merged, _ = apply_adapters(pipe, params, lora=file, lora_scale=0.7)
        for g, w, b in zip(_sdxl_outputs(pipe, merged), want, base):
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=0, err_msg=name)
            assert np.abs(w - b).max() > 1e-3, name  # each output is moved by the LoRA


def test_sdxl_textual_inversion_clip_l_clip_g_equals_diffusers(torch, saved, tmp_path):
    """An SDXL embedding file {clip_l: [2, 32], clip_g: [2, 48]} (placeholder = file name)
    through apply_adapters (--textual-inversion): both tokenizers and tables extended, the
    prompt's encoding equals diffusers' load_textual_inversion into each encoder; an SD 1.x
    file on SDXL is one line."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.numpy import save_file
    from jaxdiff.adapters import apply_adapters
    folder = saved["pipeline"][1]
    pipe, params = jaxdiff.load_pipeline(folder)
    rng = np.random.default_rng(7)
    state = {"clip_l": rng.normal(0, 0.5, (2, 32)).astype(np.float32),
             "clip_g": rng.normal(0, 0.5, (2, 48)).astype(np.float32)}
    file = str(tmp_path / "xlthing.safetensors")
    save_file(state, file)
    pipe2, params2, expand = apply_adapters(pipe, params, textual_inversion=file)
    prompts = ["a xlthing on red", "blue xlthing"]
    cond = pipe2.encode_text(params2, pipe2.tokenize([expand(p) for p in prompts]))
    tp = StableDiffusionXLPipeline.from_pretrained(folder)
    for key, enc, tok in (("clip_l", tp.text_encoder, tp.tokenizer),
                          ("clip_g", tp.text_encoder_2, tp.tokenizer_2)):
        tp.load_textual_inversion(torch.tensor(state[key]), token="xlthing", text_encoder=enc,
                                  tokenizer=tok)
    with torch.no_grad():
        want, _, pooled, _ = tp.encode_prompt(prompts, do_classifier_free_guidance=False)
    np.testing.assert_allclose(np.asarray(cond["context"]), want.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(cond["text_embeds"]), pooled.numpy(), atol=1e-4,
                               rtol=0)
    base = pipe.encode_text(params, pipe.tokenize(prompts))["context"]
    assert np.abs(np.asarray(base) - want.numpy()).max() > 1e-2  # the tokens mattered
    sd1 = str(tmp_path / "learned_embeds.safetensors")
    save_file({"<cat>": state["clip_l"]}, sd1)
    with pytest.raises(ValueError, match="SD 1.x / 2.x embeddings do not fit") as e:
        apply_adapters(pipe, params, textual_inversion=sd1)
    assert sd1 in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_sdxl_dreambooth_lora_trains_and_diffusers_reads_it(torch, saved, tmp_path):
    """Two DreamBooth-LoRA steps on the tiny SDXL base (UNet and both text encoders, time
    ids of the 16 px images): the adapters move, and the saved file loaded by diffusers'
    load_lora_weights gives the UNet output and embeddings of jaxdiff's merged params."""
    from diffusers import StableDiffusionXLPipeline
    from jaxdiff.adapters import lora as lora_lib
    from jaxdiff.training.dreambooth import train_dreambooth
    folder = saved["pipeline"][1]
    pipe, params = jaxdiff.load_pipeline(folder)
    images = np.random.default_rng(8).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    merged, lora = train_dreambooth(pipe, params, images, str(tmp_path / "run"),
                                    instance_prompt="a sks circle", steps=2, batch_size=1,
                                    lr=1e-2, lora_rank=2, train_text_encoder=True,
                                    log_every=1, ckpt_every=100)
    assert set(lora) == {"unet", "text_encoder", "text_encoder_2"}
    moved = {p[0] for p, m in lora_lib.adapters(lora).items() if np.abs(m["up"]).max() > 0}
    assert moved == {"unet", "text_encoder", "text_encoder_2"}
    file = lora_lib.save_lora(lora, str(tmp_path / "lora"))
    tp = StableDiffusionXLPipeline.from_pretrained(folder)
    tp.load_lora_weights(file)
    for g, w in zip(_sdxl_outputs(pipe, merged), _torch_outputs(tp, torch)):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)
