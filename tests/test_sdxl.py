"""SDXL (issue #15, point 1): the text_time UNet (base and refiner) and
``CLIPTextModelWithProjection`` equal diffusers / transformers on tiny random configs; a
diffusers SDXL pipeline folder loads (two encoders and tokenizers, zeroed negative
embeddings), ``jaxdiff.generate`` equals ``StableDiffusionXLPipeline`` (and, base -> refiner,
``StableDiffusionXLImg2ImgPipeline`` with denoising_end / denoising_start, dpmpp_2m and
heun; ``jaxdiff generate --refiner`` writes the same images, also for a refiner in the
Hugging Face cache with ``--refiner-revision`` / ``--refiner-variant``), the
original-layout single file jaxdiff writes is read by diffusers' ``from_single_file``; the
fp16-fix VAE config is honoured (point 2). Adapters on SDXL: tests/test_sdxl_adapters.py;
editing: tests/test_sdxl_editing.py."""
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
def saved(tiny_sdxl):
    """The session's tiny SDXL base / refiner folders (tests/conftest.py, ``tiny_sdxl``),
    and jaxdiff's (pipe, params) of both loaded once ("jax_base", "jax_refiner"): the
    hand-off tests and the command-line test share their compiled programs (cached per
    pipeline object)."""
    out = dict(tiny_sdxl)
    out["jax_base"] = jaxdiff.load_pipeline(tiny_sdxl["pipeline"][1])
    out["jax_refiner"] = jaxdiff.load_pipeline(tiny_sdxl["refiner_pipeline"][1])
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


# dpmpp_2m: the refiner's first step has no history (first order, as diffusers). heun:
# the base stops after a predictor evaluation, the refiner starts one evaluation earlier
# (diffusers' order-2 "+1"). SDXL's default "euler" passed here too (left out for time
# since the dpmpp_2m case was added).
@pytest.mark.parametrize("sampler,spans", [("dpmpp_2m", ((0, 3), (3, 5))),
                                           ("heun", ((0, 5), (4, 9)))])
def test_sdxl_base_to_refiner_handoff_matches_diffusers(torch, saved, sampler, spans):
    """Base with denoising_end=0.6 (timesteps 801, 601, 401 of 5; heun: 801, 601, 601,
    401, 401 of 9 evaluations) returns latents; the refiner (aesthetic-score time ids,
    second encoder only) finishes them from denoising_start=0.6 (201, 1; heun: 401, 201,
    201, 1, 1): both equal diffusers' StableDiffusionXLPipeline ->
    StableDiffusionXLImg2ImgPipeline(image=latents) chain; prompt / seed changes reuse
    the compiled programs."""
    from diffusers import (DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                           HeunDiscreteScheduler)
    from jaxdiff import parallel, sampling
    tb, tr = saved["pipeline"][0], saved["refiner_pipeline"][0]
    kind = {"euler": EulerDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler,
            "heun": HeunDiscreteScheduler}
    if sampler in kind:  # copies: the fixture's pipelines keep DDIM
        tb, tr = (type(t).from_pipe(t, scheduler=kind[sampler].from_config(
            t.scheduler.config)) for t in (tb, tr))
    (pipe, params), (rpipe, rparams) = saved["jax_base"], saved["jax_refiner"]
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
    assert sampling.step_span(pipe, sampler, 5, None, 0.6) == spans[0] + (False,)
    assert sampling.step_span(rpipe, sampler, 5, 0.6) == spans[1] + (True,)
    mesh = parallel.make_mesh()
    programs = [sampling._compiled(pipe, sampler, 5, False, mesh, (), True, spans[0] + (False,)),
                sampling._compiled(rpipe, sampler, 5, False, mesh, (), False, spans[1] + (True,))]
    jaxdiff.generate(pipe, params, ["a green ring", "x"], seed=7, denoising_end=0.6, **common)
    jaxdiff.generate(rpipe, rparams, ["a green ring", "x"], seed=7, latents=mid,
                     denoising_start=0.6, **common)
    assert [p._cache_size() for p in programs] == [1, 1]


def test_sdxl_handoff_bad_requests_fail_before_compiling(saved):
    pipe, params = saved["jax_base"]
    bad = [(dict(denoising_end=0.6), "output='latents'"),
           (dict(denoising_start=0.6, output="latents"), "needs latents="),
           (dict(denoising_end=1.0, output="latents"), "strictly between"),
           (dict(denoising_start=0.7, denoising_end=0.6, output="latents"), "below"),
           (dict(denoising_start=0.99, denoising_end=0.995, output="latents",
                 latents=np.zeros((1, 8, 8, 4), np.float32)), "no step")]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            jaxdiff.generate(pipe, params, "a", **dict(dict(steps=5), **kw))


def _reuse_loaded(saved, monkeypatch):
    """``jaxdiff generate`` gets the module's already loaded base / refiner for their
    folders, so it runs the hand-off test's programs; other paths load once each."""
    from jaxdiff.cli import generate as gen, refiner_args
    loaded = saved.setdefault("by_path", {saved["pipeline"][1]: saved["jax_base"],
                                          saved["refiner_pipeline"][1]: saved["jax_refiner"]})

    def load(path=None, **kw):  # others (the SD 1.x folder of the error tests): once each
        if path not in loaded:
            loaded[path] = jaxdiff.load_pipeline(path, **kw)
        return loaded[path]
    monkeypatch.setattr(gen, "load_pipeline", load)
    monkeypatch.setattr(refiner_args, "load_pipeline", load)
    return saved["pipeline"][1], saved["refiner_pipeline"][1]


def test_refiner_command_line_writes_the_library_handoff(saved, tmp_path, monkeypatch):
    """``jaxdiff generate --model BASE --refiner REFINER --denoising-end 0.6`` writes the
    images of the library's two calls (base ``denoising_end`` -> latents -> refiner
    ``denoising_start``), itself equal to diffusers above; same sampler, steps and batch
    as the dpmpp_2m hand-off test, so no new program compiles after it."""
    from PIL import Image
    from jaxdiff import cli
    base_dir, ref_dir = _reuse_loaded(saved, monkeypatch)
    (pipe, params), (rpipe, rparams) = saved["jax_base"], saved["jax_refiner"]
    out = tmp_path / "out"
    argv = ["generate", "--model", base_dir, "--refiner", ref_dir, "--denoising-end", "0.6",
            "--sampler", "dpmpp_2m", "--steps", "5", "--guidance", "5", "--seed", "3",
            "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--out", str(out)]
    assert cli.main(argv) == 0
    common = dict(sampler="dpmpp_2m", steps=5, guidance_scale=5.0, seed=3)
    mid = jaxdiff.generate(pipe, params, PROMPTS, denoising_end=0.6, output="latents",
                           **common)
    want = jaxdiff.generate(rpipe, rparams, PROMPTS, latents=mid, denoising_start=0.6,
                            **common)
    got = np.stack([np.asarray(Image.open(out / f"{i:04d}.png").convert("RGB"))
                    for i in range(2)])
    np.testing.assert_array_equal(got, want)
    import json
    with open(out / "settings.json") as f:
        settings = json.load(f)
    assert settings["refiner"] == ref_dir and settings["denoising_end"] == 0.6


def test_refiner_from_the_hf_cache_with_revision_and_variant(saved, tmp_path, monkeypatch,
                                                             capsys):
    """``--refiner org/name --refiner-revision v0 --refiner-variant fp16`` (as --revision /
    --variant for --model) reads the tag's snapshot's *.fp16.safetensors from a local
    Hugging Face cache laid out as huggingface_hub does (refs/v0 -> snapshots/<commit>, no
    refs/main): the refiner the command runs has the float16 values of the refiner's
    weights and its images are the library's two calls with them; a revision or variant
    that is not there is one line naming --refiner, before any compile or output."""
    import json
    import shutil
    from PIL import Image
    from safetensors.numpy import load_file, save_file
    from jaxdiff import cli
    from jaxdiff.cli import refiner_args
    base_dir, ref_dir = _reuse_loaded(saved, monkeypatch)
    (pipe, params), (rpipe, rparams) = saved["jax_base"], saved["jax_refiner"]
    repo = tmp_path / "hub" / "models--org--xl-refiner"
    commit = "c" * 40
    shutil.copytree(ref_dir, repo / "snapshots" / commit)
    for f in (repo / "snapshots" / commit).glob("*/*.safetensors"):
        save_file({k: v.astype(np.float16) for k, v in load_file(str(f)).items()},
                  str(f.with_suffix(".fp16.safetensors")))
    (repo / "refs").mkdir()
    (repo / "refs" / "v0").write_text(commit + "\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    loads = []

    def load(path=None, **kw):  # the real cache lookup; the module's refiner object (and
        got_pipe, got = jaxdiff.load_pipeline(path, **kw)  # its compiled program) with
        assert got_pipe.unet.config == rpipe.unet.config   # the params read
        loads.append((path, kw, got))
        return rpipe, got
    monkeypatch.setattr(refiner_args, "load_pipeline", load)
    argv = ["generate", "--model", base_dir, "--refiner", "org/xl-refiner",
            "--denoising-end", "0.6", "--sampler", "dpmpp_2m", "--steps", "5", "--guidance",
            "5", "--seed", "3", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1]]
    for flags, says in ((["--refiner-revision", "v9"], "revision 'v9'"),
                        ([], "revision 'main'"),
                        (["--refiner-revision", "v0", "--refiner-variant", "bf16"],
                         "bf16.safetensors")):
        assert cli.main(argv + flags + ["--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --refiner: ") and "\n" not in err and says in err, err
        assert not (tmp_path / "bad").exists()
    out = tmp_path / "out"
    flags = ["--refiner-revision", "v0", "--refiner-variant", "fp16", "--out", str(out)]
    assert cli.main(argv + flags) == 0
    (path, kw, got), = loads
    assert (path, kw) == ("org/xl-refiner", dict(revision="v0", variant="fp16"))
    half = jax.tree.map(lambda a: np.asarray(a).astype(np.float16).astype(np.float32), rparams)
    jax.tree.map(np.testing.assert_array_equal, got, half)
    assert any(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a != b).any()), got, rparams)))
    common = dict(sampler="dpmpp_2m", steps=5, guidance_scale=5.0, seed=3)
    mid = jaxdiff.generate(pipe, params, PROMPTS, denoising_end=0.6, output="latents",
                           **common)
    want = jaxdiff.generate(rpipe, got, PROMPTS, latents=mid, denoising_start=0.6, **common)
    images = np.stack([np.asarray(Image.open(out / f"{i:04d}.png").convert("RGB"))
                       for i in range(2)])
    np.testing.assert_array_equal(images, want)
    with open(out / "settings.json") as f:
        settings = json.load(f)
    assert (settings["refiner"], settings["refiner_revision"], settings["refiner_variant"]) \
        == ("org/xl-refiner", "v0", "fp16")


@pytest.mark.parametrize("extra,match", [
    (["--denoising-end", "1.2"], "strictly between 0 and 1"),
    (["--denoising-end", "0.6", "--steps", "1"], "leave no step"),
    (["--textual-inversion", "x.safetensors"], "cannot be combined with --textual-inversion"),
    (["--model", "SD1"], "needs an SDXL --model"),
    (["--refiner", "SD1"], "is not an SDXL model"),
    (["--refiner", None], "--denoising-end needs --refiner"),
    (["--refiner", None, "--denoising-end", None, "--refiner-variant", "fp16"],
     "--refiner-variant needs --refiner"),
    (["--model", "SD1", "--refiner", None, "--denoising-end", None, "--original-size", "8 8"],
     "--original-size is SDXL micro-conditioning"),
    (["--refiner", None, "--denoising-end", None, "--aesthetic-score", "3"],
     "--aesthetic-score is the SDXL refiner's"),
    (["--negative-original-size", "8 8"], "only given both --negative-original-size")])
def test_refiner_command_line_bad_flags_are_one_line(saved, tmp_path, monkeypatch, capsys,
                                                     tiny_pipe_dir, extra, match):
    """Each: exit status 2, one ``error:`` line naming the flag, no output folder."""
    from jaxdiff import cli
    base_dir, ref_dir = _reuse_loaded(saved, monkeypatch)
    flags = {"--model": base_dir, "--refiner": ref_dir, "--denoising-end": "0.6"}
    for flag, value in zip(extra[::2], extra[1::2]):
        flags[flag] = tiny_pipe_dir if value == "SD1" else value
    argv = ["generate", "--prompt", "a", "--out", str(tmp_path / "out")]
    for flag, value in flags.items():
        argv += [flag] + value.split(" ") if value is not None else []
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and match in err, err
    assert not (tmp_path / "out").exists()


def test_micro_conditioning_command_line_writes_the_library_images(saved, tmp_path,
                                                                   monkeypatch):
    """``--original-size --crop-top-left --target-size --negative-* --aesthetic-score
    --negative-aesthetic-score`` with ``--refiner``: the base gets the sizes and crops, the
    (aesthetic-score) refiner the original size, crops and scores; the images are the
    library's calls (the programs of the dpmpp_2m hand-off), settings.json records them."""
    import json
    from PIL import Image
    from jaxdiff import cli
    base_dir, ref_dir = _reuse_loaded(saved, monkeypatch)
    (pipe, params), (rpipe, rparams) = saved["jax_base"], saved["jax_refiner"]
    out = tmp_path / "out"
    argv = ["generate", "--model", base_dir, "--refiner", ref_dir, "--denoising-end", "0.6",
            "--sampler", "dpmpp_2m", "--steps", "5", "--guidance", "5", "--seed", "3",
            "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--out", str(out),
            "--original-size", "40", "24", "--crop-top-left", "4", "12", "--target-size", "16",
            "32", "--negative-original-size", "8", "8", "--negative-crop-top-left", "2", "0",
            "--negative-target-size", "24", "16", "--aesthetic-score", "3",
            "--negative-aesthetic-score", "7.5"]
    assert cli.main(argv) == 0
    common = dict(sampler="dpmpp_2m", steps=5, guidance_scale=5.0, seed=3)
    mid = jaxdiff.generate(pipe, params, PROMPTS, denoising_end=0.6, output="latents",
                           **common, **MICRO)
    refine = {k: v for k, v in MICRO.items() if "target" not in k}
    want = jaxdiff.generate(rpipe, rparams, PROMPTS, latents=mid, denoising_start=0.6,
                            **common, **refine, aesthetic_score=3.0,
                            negative_aesthetic_score=7.5)
    got = np.stack([np.asarray(Image.open(out / f"{i:04d}.png").convert("RGB"))
                    for i in range(2)])
    np.testing.assert_array_equal(got, want)
    with open(out / "settings.json") as f:
        settings = json.load(f)
    assert settings["crops_coords_top_left"] == [4, 12] and settings["aesthetic_score"] == 3.0
    assert settings["negative_target_size"] == [24, 16]


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


# Micro-conditioning away from the defaults (base: negative sizes and crop as well; the
# refiner: its original size, crop and aesthetic scores), pixels of the 16 x 16 images.
MICRO = dict(original_size=(40, 24), crops_coords_top_left=(4, 12), target_size=(16, 32),
             negative_original_size=(8, 8), negative_crops_coords_top_left=(2, 0),
             negative_target_size=(24, 16))
REFINE = dict(original_size=(48, 32), crops_coords_top_left=(0, 8), aesthetic_score=3.0,
              negative_original_size=(8, 16), negative_crops_coords_top_left=(4, 0),
              negative_aesthetic_score=7.5)


def test_sdxl_micro_conditioning_matches_diffusers_without_recompiling(torch, saved):
    """``generate(..., original_size=, crops_coords_top_left=, target_size=, negative_*=)``
    (base, denoising_end) and ``aesthetic_score=`` / ``negative_aesthetic_score=`` (refiner,
    denoising_start) equal diffusers' StableDiffusionXLPipeline ->
    StableDiffusionXLImg2ImgPipeline with the same keyword arguments (diffusers' base one
    image at a time: its time ids misalign with differing negatives for a batch of 2, see
    the comment); the defaults give
    other latents (the arguments are used); the time ids are traced: the dpmpp_2m hand-off
    test's two programs run every call, none compiles again."""
    from diffusers import DPMSolverMultistepScheduler
    from jaxdiff import parallel, sampling
    tb, tr = (type(t).from_pipe(t, scheduler=DPMSolverMultistepScheduler.from_config(
        t.scheduler.config)) for t in (saved["pipeline"][0], saved["refiner_pipeline"][0]))
    (pipe, params), (rpipe, rparams) = saved["jax_base"], saved["jax_refiner"]
    noise = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
    kw = dict(num_inference_steps=5, guidance_scale=5.0, output_type="latent")
    with torch.no_grad():  # the base one image at a time: for B > 1 diffusers pairs its
        # [negative; positive] time ids with the embeddings' [negatives; positives] wrongly
        mid_want = torch.cat([tb(p, latents=torch.tensor(ref.nchw(noise[i:i + 1])),
                                 denoising_end=0.6, **kw, **MICRO).images
                              for i, p in enumerate(PROMPTS)])
        want = tr(PROMPTS, image=mid_want, denoising_start=0.6, **kw, **REFINE).images.numpy()
    common = dict(sampler="dpmpp_2m", steps=5, guidance_scale=5.0, output="latents")
    mid = jaxdiff.generate(pipe, params, PROMPTS, latents=noise, denoising_end=0.6, **common,
                           **MICRO)
    np.testing.assert_allclose(ref.nchw(mid), mid_want.numpy(), atol=1e-3, rtol=0)
    got = jaxdiff.generate(rpipe, rparams, PROMPTS, latents=mid, denoising_start=0.6,
                           **common, **REFINE)
    np.testing.assert_allclose(ref.nchw(got), want, atol=1e-3, rtol=0)
    plain = jaxdiff.generate(pipe, params, PROMPTS, latents=noise, denoising_end=0.6, **common)
    plain_refined = jaxdiff.generate(rpipe, rparams, PROMPTS, latents=mid,
                                     denoising_start=0.6, **common)
    assert np.abs(plain - mid).max() > 1e-2 and np.abs(plain_refined - got).max() > 1e-2
    mesh = parallel.make_mesh()
    programs = [sampling._compiled(pipe, "dpmpp_2m", 5, False, mesh, (), True, (0, 3, False)),
                sampling._compiled(rpipe, "dpmpp_2m", 5, False, mesh, (), False, (3, 5, True))]
    assert [p._cache_size() for p in programs] == [1, 1]


def test_sdxl_micro_conditioning_bad_requests_are_one_line(saved):
    """Before any compile: a non-SDXL pipeline, values diffusers would ignore, wrong
    lengths, unknown names."""
    (pipe, params), (rpipe, _) = saved["jax_base"], saved["jax_refiner"]
    sd = dataclasses.replace(pipe, text_encoder_2=None)  # one encoder: not SDXL
    bad = [(sd, dict(original_size=(8, 8)), "original_size is SDXL micro-conditioning"),
           (pipe, dict(aesthetic_score=5.0), "only a refiner"),
           (rpipe, dict(target_size=(8, 8)), "aesthetic score, not a target size"),
           (pipe, dict(negative_original_size=(8, 8)), "only given both"),
           (pipe, dict(original_size=(8, 8, 8)), "must be 2 number")]
    for p, kw, msg in bad:
        with pytest.raises(ValueError, match=msg) as e:
            jaxdiff.generate(p, params, "a", steps=5, **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(TypeError, match="unknown micro-conditioning argument 'crop'"):
        jaxdiff.generate(pipe, params, "a", steps=5, crop=(1, 1))
