"""SDXL (issue #15, point 1): the text_time UNet (base and refiner) and
``CLIPTextModelWithProjection`` equal diffusers / transformers on tiny random configs; a
diffusers SDXL pipeline folder loads (two encoders and tokenizers, zeroed negative
embeddings) and ``jaxdiff.generate`` equals ``StableDiffusionXLPipeline``; the
original-layout single file jaxdiff writes is read by diffusers' ``from_single_file``;
configs inferred at the real size equal the hub's; the fp16-fix VAE config is honoured
(point 2). The base -> refiner hand-off and micro-conditioning:
tests/test_sdxl_handoff.py; adapters on SDXL: tests/test_sdxl_adapters.py; editing:
tests/test_sdxl_editing.py."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from torchref import models as ref
from jaxdiff.weights import load_component

TOL = 1e-4


@pytest.fixture(scope="module")
def saved(sdxl_loaded):
    """The session's tiny SDXL folders and loaded pipelines (tests/conftest.py)."""
    return sdxl_loaded


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


@pytest.mark.parametrize("name", ["pipeline", "refiner_pipeline"])
def test_sdxl_single_file_round_trip(torch, saved, tmp_path, name):
    """jaxdiff writes the original SDXL base / refiner layout; diffusers' from_single_file
    (local config) reads it into exactly the source tensors, and jaxdiff reads it back
    (config=). The refiner's one encoder is OpenCLIP at ``conditioner.embedders.0``."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from safetensors import safe_open
    refiner = name == "refiner_pipeline"
    tp, folder = saved[name]
    pipe, params = saved["jax_refiner" if refiner else "jax_base"]
    file = str(tmp_path / "xl.safetensors")
    jaxdiff.save_pipeline(pipe, params, file, format="single_file")
    with safe_open(file, "np") as f:
        keys = set(f.keys())
    openclip = "conditioner.embedders.0.model." if refiner else "conditioner.embedders.1.model."
    assert {"model.diffusion_model.label_emb.0.0.weight", openclip + "text_projection",
            openclip + "transformer.resblocks.0.attn.in_proj_weight"} <= keys
    clip_l = "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"
    assert (clip_l in keys) != refiner
    cls = StableDiffusionXLImg2ImgPipeline if refiner else StableDiffusionXLPipeline
    got = cls.from_single_file(file, config=folder, local_files_only=True)
    for comp in ("unet", "vae", "text_encoder_2") + (() if refiner else ("text_encoder",)):
        want, have = getattr(tp, comp).state_dict(), getattr(got, comp).state_dict()
        want = {k: v for k, v in want.items() if not k.endswith("position_ids")}
        have = {k: v for k, v in have.items() if not k.endswith("position_ids")}
        assert want.keys() == have.keys(), comp
        for k in want:
            np.testing.assert_array_equal(have[k].numpy(), want[k].numpy(), err_msg=k)
    back, back_params = jaxdiff.load_pipeline(file, config=folder)
    assert back.is_sdxl and back.force_zeros_for_empty_prompt != refiner
    assert back.requires_aesthetics_score == refiner and (back.text_encoder is None) == refiner
    jax.tree.map(np.testing.assert_array_equal, back_params, params)
    # Without config=: configs inferred, but this tiny vocabulary is not CLIP's (no tokenizer).
    with pytest.raises(FileNotFoundError, match="config="):
        jaxdiff.load_pipeline(file)


def test_sdxl_loads_stream_tensor_by_tensor(saved, tmp_path, monkeypatch):
    """Point 5's structure (bench/load.py measures the memory): from a diffusers folder and
    from a single file, every tensor is read from the mapped file and put on the device
    before the next is read, so the host never holds a converted copy of the model."""
    from jaxdiff.weights import convert, files, single_file
    pipe, params = saved["jax_base"]
    file = jaxdiff.save_pipeline(pipe, params, str(tmp_path / "xl.safetensors"),
                                 format="single_file")
    log = []
    for cls in (files.LazyTensors, single_file.Checkpoint):
        read = cls.__getitem__
        monkeypatch.setattr(cls, "__getitem__",
                            lambda self, k, read=read: log.append("read") or read(self, k))
    put = convert.jax.device_put
    monkeypatch.setattr(convert.jax, "device_put", lambda x, *a, **kw: log.append("put")
                        or put(x, *a, **kw))
    n = len(jax.tree.leaves(params))
    for source, kw in ((saved["pipeline"][1], {}), (file, dict(config=saved["pipeline"][1]))):
        log.clear()
        _, loaded = jaxdiff.load_pipeline(source, **kw)
        # then one device_put of the whole (already device) tree: files.to_device
        assert log == ["read", "put"] * n + ["put"], source
        assert all(isinstance(v, jax.Array) for v in jax.tree.leaves(loaded))
        jax.tree.map(np.testing.assert_array_equal, loaded, params)


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
