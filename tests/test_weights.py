"""diffusers-layout load/save: exact round trips and clear errors on bad checkpoints."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

import jaxdiff
from torchref import models as ref
from jaxdiff.models import UnsupportedConfigError
from jaxdiff.weights import PickleRefusedError, WeightsError, load_component


@pytest.fixture(scope="module")
def torch_pipe_dir(tmp_path_factory):
    import torch  # noqa: F401  (reference)
    folder = str(tmp_path_factory.mktemp("sd_tiny"))
    ref.make_torch_pipeline(folder, unet="sd2", vae="sd1", text="sd1")
    return folder


def _state(module):
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _public(config):
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in d.items() if not k.startswith("_")}


def test_pipeline_round_trip_is_exact(torch_pipe_dir, tmp_path):
    from diffusers import StableDiffusionPipeline
    pipe, params = jaxdiff.load_pipeline(torch_pipe_dir)
    assert set(params) == {"text_encoder", "unet", "vae"}
    out = jaxdiff.save_pipeline(pipe, params, str(tmp_path / "export"))
    a = StableDiffusionPipeline.from_pretrained(torch_pipe_dir)
    b = StableDiffusionPipeline.from_pretrained(out)
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = _state(getattr(a, name)), _state(getattr(b, name))
        assert sa.keys() == sb.keys(), name
        for k in sa:
            np.testing.assert_array_equal(sa[k], sb[k], err_msg=f"{name}.{k}")
        ca, cb = (_public(getattr(p, name).config) for p in (a, b))
        if name == "text_encoder":  # transformers bookkeeping differs; the model must not
            ca, cb = ({k: c[k] for k in ref.TEXT_CONFIGS["sd1"]} for c in (ca, cb))
        assert ca == cb, name
    assert type(a.scheduler) is type(b.scheduler)
    for k, v in a.scheduler.config.items():
        if not k.startswith("_"):
            assert b.scheduler.config[k] == v, k
    prompts = ["a red circle", "two blue squares on the left"]
    np.testing.assert_array_equal(a.tokenizer(prompts, padding="max_length", truncation=True).input_ids,
                                  b.tokenizer(prompts, padding="max_length", truncation=True).input_ids)
    np.testing.assert_array_equal(pipe.tokenize(prompts, warn=False),
                                  a.tokenizer(prompts, padding="max_length",
                                              truncation=True, return_tensors="np").input_ids)


def test_pipeline_encoders_match_diffusers(torch_pipe_dir, torch):
    from diffusers import StableDiffusionPipeline
    tp = StableDiffusionPipeline.from_pretrained(torch_pipe_dir)
    pipe, params = jaxdiff.load_pipeline(torch_pipe_dir)
    ids = pipe.tokenize(["a green star"])
    with torch.no_grad():
        want = tp.text_encoder(torch.tensor(ids)).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(pipe.encode_text(params, ids)), want, atol=1e-4)
    x = np.random.default_rng(0).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        mean = tp.vae.encode(torch.tensor(ref.nchw(x))).latent_dist.mean
        want_lat = mean * tp.vae.config.scaling_factor
        want_img = tp.vae.decode(want_lat / tp.vae.config.scaling_factor).sample.clamp(-1, 1)
    lat = pipe.encode_images(params, x)
    np.testing.assert_allclose(ref.nchw(lat), want_lat.numpy(), atol=1e-4)
    np.testing.assert_allclose(ref.nchw(pipe.decode_latents(params, lat)), want_img.numpy(),
                               atol=1e-4)
    sampled = pipe.encode_images(params, x, jax.random.key(0))
    assert sampled.shape == lat.shape and not np.allclose(sampled, lat)


def test_long_prompt_is_truncated_with_warning(torch_pipe_dir):
    pipe, _ = jaxdiff.load_pipeline(torch_pipe_dir)
    with pytest.warns(UserWarning, match="truncated"):
        ids = pipe.tokenize(["a very long prompt that cannot fit"])
    assert ids.shape == (1, pipe.max_length)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_missing_directory_and_files(tmp_path, torch_pipe_dir):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        jaxdiff.load_pipeline(str(tmp_path / "nope"))
    d = _copy(torch_pipe_dir, tmp_path / "m")
    os.remove(os.path.join(d, "vae", "diffusion_pytorch_model.safetensors"))
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        jaxdiff.load_pipeline(d)


def test_pickle_weights_are_refused_unless_allowed(tmp_path, torch):
    tm = ref.make_vae("sd1")
    tm.save_pretrained(str(tmp_path), safe_serialization=False)
    with pytest.raises(PickleRefusedError, match="allow_pickle=True"):
        load_component(str(tmp_path), "vae")
    module, params = load_component(str(tmp_path), "vae", allow_pickle=True)
    np.testing.assert_array_equal(params["encoder"]["conv_in"]["bias"],
                                  tm.encoder.conv_in.bias.detach().numpy())


def _edit_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)


def test_shape_mismatch_names_tensor_and_file(tmp_path, torch_pipe_dir):
    d = _copy(torch_pipe_dir, tmp_path / "m")
    _edit_config(os.path.join(d, "unet"), cross_attention_dim=48)
    with pytest.raises(WeightsError, match=r"diffusion_pytorch_model\.safetensors: tensor "
                                           r"'.*attn2\.to_k\.weight' has shape"):
        jaxdiff.load_pipeline(d)


def test_unknown_tensor_is_an_error(tmp_path, torch_pipe_dir):
    from safetensors.numpy import load_file, save_file
    d = _copy(torch_pipe_dir, tmp_path / "m")
    path = os.path.join(d, "vae", "diffusion_pytorch_model.safetensors")
    tensors = load_file(path)
    tensors["decoder.extra_layer.weight"] = np.zeros(3, np.float32)
    save_file(tensors, path)
    with pytest.raises(WeightsError, match="unknown tensor.*decoder.extra_layer.weight"):
        jaxdiff.load_pipeline(d)


def test_missing_tensor_is_an_error(tmp_path, torch_pipe_dir):
    from safetensors.numpy import load_file, save_file
    d = _copy(torch_pipe_dir, tmp_path / "m")
    path = os.path.join(d, "vae", "diffusion_pytorch_model.safetensors")
    tensors = load_file(path)
    del tensors["decoder.conv_out.bias"]
    save_file(tensors, path)
    with pytest.raises(WeightsError, match="'decoder.conv_out.bias' is missing"):
        jaxdiff.load_pipeline(d)


@pytest.mark.parametrize("field,value", [("class_embed_type", "timestep"),
                                         ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
                                         ("down_block_types", ["SimpleCrossAttnDownBlock2D"] * 3)])
def test_unsupported_unet_config_names_field(tmp_path, torch_pipe_dir, field, value):
    d = _copy(torch_pipe_dir, tmp_path / "m")
    _edit_config(os.path.join(d, "unet"), **{field: value})
    with pytest.raises(UnsupportedConfigError, match=field):
        jaxdiff.load_pipeline(d)


def test_failed_save_leaves_previous_export_intact(tmp_path, torch_pipe_dir):
    pipe, params = jaxdiff.load_pipeline(torch_pipe_dir)
    out = str(tmp_path / "export")
    jaxdiff.save_pipeline(pipe, params, out)
    before = sorted(os.listdir(out))
    broken = dict(params, vae={"not": "a vae"})
    with pytest.raises(Exception):
        jaxdiff.save_pipeline(pipe, broken, out)
    assert sorted(os.listdir(out)) == before
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".export")]
    jaxdiff.load_pipeline(out)


@pytest.mark.slow
def test_loading_compiles_no_program_per_tensor():
    """Reading weights is host work plus one transfer. The embedded model's ~470 arrays
    must not each be staged through a program compiled for their shape (``jnp.asarray`` on
    numpy arrays, or safetensors' flax reader, did that: ~80 compiles in every process that
    loads a model). A fresh process, so no program is already in the in-process caches."""
    import subprocess
    import sys
    script = (
        "import jax, jaxdiff\n"
        "seen = []\n"
        "jax.monitoring.register_event_duration_secs_listener(lambda e, d, **k: seen.append(e)"
        " if e == '/jax/core/compile/jaxpr_to_mlir_module_duration' else None)\n"
        "pipe, params = jaxdiff.load_pipeline(None)\n"
        "print(len(jax.tree.leaves(params)), len(seen))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    arrays, lowered = map(int, out.stdout.split()[-2:])
    assert arrays > 400 and lowered < 10, (arrays, lowered)
