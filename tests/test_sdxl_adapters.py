"""Adapters on SDXL (issue #15, points 1 and 3): kohya / peft LoRA files, clip_l / clip_g
Textual Inversion files, DreamBooth-LoRA and Textual-Inversion training on a tiny random
SDXL base equal, or are read by, diffusers."""
import functools

import jax
import numpy as np
import pytest

import jaxdiff
from torchref import models as ref

PROMPTS = ["a red circle", "blue square"]


@pytest.fixture(scope="module")
def saved(tiny_sdxl):
    """The session's tiny SDXL base / refiner folders (tests/conftest.py, ``tiny_sdxl``)."""
    return tiny_sdxl


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
    (--lora), and both at once with separate scales, equal diffusers' load_lora_weights
    (+ set_adapters) on the same base: UNet output, context and pooled embeddings."""
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
    # each alone, then both at once with separate scales (--lora A --lora B --lora-scale
    # 0.7 --lora-scale -0.4): diffusers' set_adapters with two adapters and weights
    for names, scales in ((["kohya"], [0.7]), (["peft"], [0.7]), (["kohya", "peft"],
                                                                   [0.7, -0.4])):
        tp.set_adapters(names, adapter_weights=scales)
        want = _torch_outputs(tp, torch)
        files = [{"kohya": kohya_file, "peft": peft_file}[n] for n in names]
        if len(files) > 1:  # the library call: jaxdiff.load_lora
            merged = jaxdiff.load_lora(pipe, params, files, scales)
        else:
            _, merged, _ = apply_adapters(pipe, params, lora=files[0], lora_scale=scales[0])
        for g, w, b in zip(_sdxl_outputs(pipe, merged), want, base):
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=0, err_msg=str(names))
            assert np.abs(w - b).max() > 1e-3, names  # each output is moved by the LoRA
    with pytest.raises(ValueError, match="--lora-scale given 3 times for 2"):
        apply_adapters(pipe, params, lora=[kohya_file, peft_file], lora_scale=[1.0] * 3)


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


@pytest.mark.slow
def test_sdxl_textual_inversion_trains_both_encoders_and_diffusers_reads_it(torch, saved,
                                                                            tmp_path):
    """Two Textual-Inversion steps on the tiny SDXL base (the SD training code: one row
    table per encoder, time ids of the 16 px images): both encoders' rows move and no
    frozen weight does; the clip_l / clip_g file it saves loads back (--textual-inversion,
    placeholder = file name) into the trained pipeline's encoding, and diffusers'
    load_textual_inversion of its two tensors encodes the prompt the same."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.numpy import load_file
    from jaxdiff.adapters import apply_adapters
    from jaxdiff.adapters import textual_inversion as ti
    from jaxdiff.training import textual_inversion as ti_train
    folder = saved["pipeline"][1]
    pipe, params = jaxdiff.load_pipeline(folder)
    images = np.random.default_rng(9).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    result = ti_train.train_textual_inversion(
        pipe, params, images, str(tmp_path / "run"), placeholder="<xlthing>",
        initializer_token="a", steps=2, batch_size=1, lr=0.1, log_every=1, ckpt_every=100)
    assert set(result.rows) == {"text_encoder", "text_encoder_2"}
    for name in result.rows:
        start = ti.init_embeddings(params, getattr(pipe, "tokenizer_2" if name[-1] == "2"
                                                   else "tokenizer"), "a", scope=name)
        assert np.abs(result.rows[name] - np.asarray(start)).max() > 1e-3, name
        table = ti.token_table(result.params, name)
        np.testing.assert_array_equal(table[:-1], ti.token_table(params, name))
    file = ti_train.save(result, str(tmp_path / "export"))
    assert file.endswith("<xlthing>.safetensors")
    state = load_file(file)
    assert {k: v.shape for k, v in state.items()} == {"clip_l": (1, 32), "clip_g": (1, 48)}
    prompts = ["a <xlthing> on red"]
    pipe2, params2, expand = apply_adapters(pipe, params, textual_inversion=file)
    got = pipe2.encode_text(params2, pipe2.tokenize([expand(p) for p in prompts]))
    trained = result.pipe.encode_text(result.params, result.pipe.tokenize(prompts))
    tp = StableDiffusionXLPipeline.from_pretrained(folder)
    for key, enc, tok in (("clip_l", tp.text_encoder, tp.tokenizer),
                          ("clip_g", tp.text_encoder_2, tp.tokenizer_2)):
        tp.load_textual_inversion(torch.tensor(state[key]), token="<xlthing>",
                                  text_encoder=enc, tokenizer=tok)
    with torch.no_grad():
        want, _, pooled, _ = tp.encode_prompt(prompts, do_classifier_free_guidance=False)
    for g in (got, trained):
        np.testing.assert_allclose(np.asarray(g["context"]), want.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(np.asarray(g["text_embeds"]), pooled.numpy(), atol=1e-4,
                                   rtol=0)
