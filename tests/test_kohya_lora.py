"""kohya-ss / A1111 LoRA files through ``--lora`` (``apply_adapters``), against diffusers'
``load_lora_weights`` of the same file on the same tiny SD 1.x pipeline.

The file is written here from the PyTorch modules' names and shapes (nothing from jaxdiff):
attention q/k/v/out, GEGLU and output MLP, 1x1-conv proj_in/proj_out, a 3x3 LoCon resnet
conv, time_emb_proj and text-encoder attention/MLP; rank 4 / alpha 8 for linear layers,
rank 2 / alpha 1 for convolutions.
"""
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

import jaxdiff
from jaxdiff.adapters import apply_adapters, kohya
from torchref import models as ref

STRENGTH = 0.7
UNET_MODULES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q",
                "attn2.to_k", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1",
                "time_emb_proj")
TEXT_MODULES = ("self_attn.q_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def _kohya_state(torch_pipe, seed=0):
    """kohya tensors for every selected Linear/Conv2d of the torch UNet and text encoder."""
    import torch
    rng = np.random.default_rng(seed)
    state = {}
    for prefix, model, wanted in (("lora_unet_", torch_pipe.unet, UNET_MODULES),
                                  ("lora_te_", torch_pipe.text_encoder, TEXT_MODULES)):
        for name, mod in model.named_modules():
            if not name.endswith(wanted) or not isinstance(mod, (torch.nn.Linear,
                                                                 torch.nn.Conv2d)):
                continue
            if prefix == "lora_te_" and not name.startswith("text_model."):
                name = "text_model." + name  # kohya's (transformers 4) module names
            key = prefix + name.replace(".", "_")
            w = mod.weight
            conv = w.ndim == 4
            r = 2 if conv else 4
            down = rng.normal(0, 0.3, (r,) + tuple(w.shape[1:]) if conv else (r, w.shape[1]))
            up = rng.normal(0, 0.3, (w.shape[0], r, 1, 1) if conv else (w.shape[0], r))
            state[key + ".lora_down.weight"] = down.astype(np.float32)
            state[key + ".lora_up.weight"] = up.astype(np.float32)
            # kohya writes one network_alpha for linear layers and one conv_alpha for LoCon
            # convolutions (diffusers 0.42 passes only the most common alpha to attention
            # and text-encoder modules, so per-module values there would not compare).
            state[key + ".alpha"] = np.array(1.0 if conv else 8.0, np.float32)
    return state


@pytest.fixture(scope="module")
def sd(tiny_pipe_dir, tmp_path_factory):
    from diffusers import StableDiffusionPipeline
    tp = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    state = _kohya_state(tp)
    file = str(tmp_path_factory.mktemp("kohya") / "style.safetensors")
    save_file(state, file)
    pipe, params = jaxdiff.load_pipeline(tiny_pipe_dir)
    return tp, pipe, params, file, state


def test_kohya_file_equals_diffusers_load_lora_weights(sd, torch):
    tp, pipe, params, file, state = sd
    assert any(v.ndim == 4 and v.shape[2] == 3 for v in state.values())  # a LoCon conv
    assert kohya.is_kohya_file(file)
    ids = pipe.tokenize(["a red star"], warn=False)
    with torch.no_grad():
        base = tp.unet(*_unet_inputs(tp, torch)).sample.numpy()
        base_text = tp.text_encoder(torch.tensor(ids.astype(np.int64)))[0].numpy()
    tp.load_lora_weights(file, adapter_name="k")
    tp.set_adapters(["k"], adapter_weights=[STRENGTH])
    _, merged, _ = apply_adapters(pipe, params, lora=file, lora_scale=STRENGTH)
    got, want = ref.unet_outputs(tp.unet, pipe.unet, merged["unet"])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.abs(want - base).max() > 1e-2  # the LoRA really changes the output
    with torch.no_grad():
        want_text = tp.text_encoder(torch.tensor(ids.astype(np.int64)))[0].numpy()
    np.testing.assert_allclose(pipe.encode_text(merged, ids), want_text, atol=1e-4, rtol=0)
    assert np.abs(want_text - base_text).max() > 1e-2
    tp.delete_adapters("k")


def _unet_inputs(tp, torch):
    cfg = tp.unet.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    return x, torch.tensor([7, 640]), torch.randn(2, 5, cfg.cross_attention_dim, generator=g)


def _write(path, state):
    save_file(state, str(path))
    return str(path)


def test_bad_kohya_files_are_one_line_naming_file_and_key(sd, tmp_path):
    _, pipe, params, _, state = sd
    key = sorted(k for k in state if "attn2_to_k.lora_down" in k)[0]
    wide = dict(state, **{key: np.zeros((4, 48), np.float32)})  # a LoRA for another base
    cases = [
        (wide, f"'{key[:-len('.lora_down.weight')]}.lora_down.weight' .* does not fit this "
               "model's layer"),
        (dict(state, **{"lora_unet_down_blocks_9_x.lora_down.weight": np.zeros((1, 2)),
                        "lora_unet_down_blocks_9_x.lora_up.weight": np.zeros((2, 1))}),
         "module 'lora_unet_down_blocks_9_x' has no layer in this model"),
        (dict(state, **{"lora_unet_a.hada_w1_a": np.zeros(1)}), "LyCORIS LoHa"),
        (dict(state, **{"lora_te2_text_model_x.lora_down.weight": np.zeros((1, 2))}),
         "text encoder this model lacks"),  # an SDXL file on SD 1.x
        (dict(state, **{key.replace("lora_down", "lora_up"): np.zeros((3, 9), np.float32)}),
         "does not match lora_down"),
    ]
    for i, (bad, match) in enumerate(cases):
        path = _write(tmp_path / f"bad{i}.safetensors", {k: np.asarray(v, np.float32)
                                                         for k, v in bad.items()})
        with pytest.raises(ValueError, match=match) as e:
            apply_adapters(pipe, params, lora=path)
        assert path in str(e.value) and "\n" not in str(e.value), str(e.value)
    good = open(_write(tmp_path / "good.safetensors", state), "rb").read()
    (tmp_path / "cut.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors") as e:
        apply_adapters(pipe, params, lora=str(tmp_path / "cut.safetensors"))
    assert "cut.safetensors" in str(e.value) and "\n" not in str(e.value)
    assert not kohya.is_kohya_file(os.path.dirname(path))


def test_each_module_gets_its_own_alpha_over_rank(sd):
    """kohya's rule (networks/lora.py): scale alpha / r per module, alpha = r when absent."""
    _, _, params, _, _ = sd
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    rng = np.random.default_rng(1)
    state = {name + ".lora_down.weight": rng.normal(size=(4, 32)),
             name + ".lora_up.weight": rng.normal(size=(32, 4)), name + ".alpha": np.array(2.0),
             te + ".lora_down.weight": rng.normal(size=(3, 32)),
             te + ".lora_up.weight": rng.normal(size=(32, 3))}
    lora = kohya.from_state_dict(state, params)
    unet = lora["unet"]["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]
    np.testing.assert_allclose(unet["up"], state[name + ".lora_up.weight"].T * 0.5, rtol=1e-6)
    np.testing.assert_allclose(unet["down"], state[name + ".lora_down.weight"].T, rtol=1e-6)
    text = lora["text_encoder"]["text_model"]["encoder"]["layers_0"]["self_attn"]["q_proj"]
    np.testing.assert_allclose(text["up"], state[te + ".lora_up.weight"].T, rtol=1e-6)
