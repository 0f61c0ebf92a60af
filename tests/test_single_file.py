"""Single-file (original CompVis / Stability layout) SD 1.x / 2.x checkpoints.

Truth: tiny random diffusers pipelines. A file jaxdiff writes is read by diffusers' own
``from_single_file`` (local config, its original -> diffusers conversion functions) into
exactly the source tensors; jaxdiff reads the same file into networks whose outputs equal
diffusers' (<= 1e-4); real-world extras (fp16, EMA copies, schedule buffers, the full
OpenCLIP model) load; configs inferred from the tensors equal the source configs.
"""
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jaxdiff
from jaxdiff.weights import PickleRefusedError, WeightsError, single_file
from torchref import models as ref

pytestmark = pytest.mark.reference


@pytest.fixture(scope="module")
def sd(tmp_path_factory, tiny_pipe_dir):
    """{"sd1"|"sd2": (diffusers folder, torch pipeline, jaxdiff-written single file,
    jaxdiff params read from the folder)}; sd1 is the session's tiny pipeline (read only)."""
    from diffusers import StableDiffusionPipeline
    out = {}
    for name in ("sd1", "sd2"):
        if name == "sd1":
            folder = tiny_pipe_dir
            tp = StableDiffusionPipeline.from_pretrained(folder)
        else:
            folder = str(tmp_path_factory.mktemp(name))
            tp = ref.make_torch_pipeline(folder, unet=name, vae="sd1", text=name)
        pipe, params = jaxdiff.load_pipeline(folder)
        file = jaxdiff.save_pipeline(pipe, params, str(tmp_path_factory.mktemp(name + "_file")
                                                       / "model.safetensors"),
                                     format="single_file")
        out[name] = (folder, tp, file, params)
    return out


def _state(module):
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_diffusers_from_single_file_reads_the_written_file(sd, name):
    from diffusers import StableDiffusionPipeline
    folder, tp, file, _ = sd[name]
    keys = set(load_file(file))
    text = ("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" if name == "sd2"
            else "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight")
    assert {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
            "model.diffusion_model.output_blocks.2.1.conv.weight" if name == "sd1" else
            "model.diffusion_model.output_blocks.1.1.conv.weight",
            "first_stage_model.decoder.up.0.block.0.conv1.weight",
            "first_stage_model.encoder.mid.attn_1.q.weight", text} <= keys
    got = StableDiffusionPipeline.from_single_file(file, config=folder, local_files_only=True)
    for comp in ("unet", "vae", "text_encoder"):
        want, have = _state(getattr(tp, comp)), _state(getattr(got, comp))
        assert want.keys() == have.keys(), comp
        for k in want:
            np.testing.assert_array_equal(have[k], want[k], err_msg=f"{comp}.{k}")


def test_jaxdiff_reads_the_file_as_diffusers_computes(sd, torch):
    """SD 2.x: OpenCLIP text encoder, linear projections, per-block depth and heads (the SD
    1.x file is read into exactly the folder's params in the .ckpt test below)."""
    folder, tp, file, _ = sd["sd2"]
    pipe, params = jaxdiff.load_pipeline(file, config=folder)
    got, want = ref.unet_outputs(tp.unet, pipe.unet, params["unet"])
    np.testing.assert_allclose(got, want, atol=1e-4)
    ids = pipe.tokenize(["a red circle"], warn=False)
    with torch.no_grad():
        want = tp.text_encoder(torch.tensor(ids)).last_hidden_state.numpy()
    np.testing.assert_allclose(pipe.encode_text(params, ids), want, atol=1e-4)
    assert pipe.scheduler_class == type(tp.scheduler).__name__


def _write(path, tensors):
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path)
    return path


def test_real_world_extras_fp16_bf16_ema_buffers_full_openclip(sd, tmp_path, torch):
    from safetensors.torch import save_file as save_torch
    folder, _, file, base = sd["sd2"]
    t = {k: v.astype(np.float16) for k, v in load_file(file).items()}
    d = int(t["cond_stage_model.model.token_embedding.weight"].shape[1])
    n = 1 + max(int(k.split(".")[4]) for k in t if ".resblocks." in k)
    for k in [k for k in t if ".resblocks.0." in k]:  # the last block SD 2.x never runs
        t[k.replace(".resblocks.0.", f".resblocks.{n}.")] = t[k]
    t["cond_stage_model.model.text_projection"] = np.eye(d, dtype=np.float16)
    t["cond_stage_model.model.logit_scale"] = np.ones((), np.float16)
    t["alphas_cumprod"] = np.linspace(1, 0, 1000).astype(np.float32)
    t["model_ema.decay"] = np.array(0.9999, np.float32)
    unet = [k for k in t if k.startswith("model.diffusion_model.")]
    for k in unet:
        t["model_ema." + "".join(k.split(".")[1:])] = t[k] + np.float16(1)
    tt = {k: torch.from_numpy(np.array(v)) for k, v in t.items()}  # no shared storage
    tt.update({k: v.to(torch.bfloat16) for k, v in tt.items() if k.startswith("first_stage")})
    path = str(tmp_path / "real.safetensors")
    save_torch(tt, path)
    pipe, params = jaxdiff.load_pipeline(path, config=folder, extract_ema=True)
    assert pipe.text_encoder.config.num_hidden_layers == n
    rounded = jax.tree.map(lambda x: np.asarray(x).astype(np.float16).astype(np.float32), base)
    jax.tree.map(np.testing.assert_array_equal, params["text_encoder"], rounded["text_encoder"])
    bf16 = jax.tree.map(lambda x: torch.from_numpy(np.asarray(x)).to(torch.bfloat16).float()
                        .numpy(), rounded["vae"])
    jax.tree.map(np.testing.assert_array_equal, params["vae"], bf16)
    ema = jax.tree.map(lambda x: (np.asarray(x, np.float16) + np.float16(1)).astype(np.float32),
                       rounded["unet"])
    jax.tree.map(np.testing.assert_array_equal, params["unet"], ema)


def _fake_hub(root, repo, source_folder):
    snap = os.path.join(root, "models--" + repo.replace("/", "--"), "snapshots", "c0ffee")
    os.makedirs(snap)
    os.symlink(os.path.join(source_folder, "tokenizer"), os.path.join(snap, "tokenizer"))
    os.makedirs(os.path.join(os.path.dirname(os.path.dirname(snap)), "refs"))
    with open(os.path.join(os.path.dirname(os.path.dirname(snap)), "refs", "main"), "w") as f:
        f.write("c0ffee")


STRUCTURE = {"unet": ("block_out_channels", "layers_per_block", "down_block_types",
                      "up_block_types", "cross_attention_dim", "use_linear_projection",
                      "in_channels", "out_channels"),
             "vae": ("block_out_channels", "layers_per_block", "latent_channels"),
             "text_encoder": ("vocab_size", "hidden_size", "intermediate_size",
                              "num_hidden_layers", "max_position_embeddings", "hidden_act")}


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_configs_inferred_from_tensors_and_scheduler_as_diffusers(sd, name, tmp_path,
                                                                 monkeypatch):
    folder, tp, file, _ = sd[name]
    repo = single_file.MODEL_TYPES["v2" if name == "sd2" else "v1"]["repos"][0][0]
    _fake_hub(str(tmp_path), repo, folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    pipe, _ = jaxdiff.load_pipeline(file)
    for comp, fields in STRUCTURE.items():
        got = getattr(pipe, comp).config
        want = getattr(tp, comp).config
        for f in fields:
            w = want[f] if comp != "text_encoder" else getattr(want, f)
            if name == "sd2" and comp == "text_encoder" and f == "hidden_act":
                w = "gelu"  # OpenCLIP's; the tiny reference uses it too
            assert getattr(got, f) == (tuple(w) if isinstance(w, list) else w), (comp, f)
    if name == "sd2":
        assert pipe.unet.config.per_block("transformer_layers_per_block") == (1, 2, 1)
        assert (pipe.scheduler.prediction_type, pipe.scheduler_class) == ("v_prediction",
                                                                          "DDIMScheduler")
        assert pipe.image_size == 768
        eps, _ = jaxdiff.load_pipeline(file, prediction_type="epsilon")
        assert (eps.scheduler.prediction_type, eps.image_size) == ("epsilon", 512)
        # diffusers' rule: the SD 2.0 512 px base (epsilon) is the file at global_step 875000
        # (a 0-d tensor, or 1-element as some converters write it: that was a TypeError)
        for step, want in ((875000, "epsilon"), ([875000], "epsilon"), (1000, "v_prediction")):
            raw, _ = single_file._scheduler({"global_step": np.array(step)}, None, "v2", None)
            assert raw["prediction_type"] == want, step
    else:
        assert pipe.unet.config.heads() == (8, 8)
        assert (pipe.scheduler.prediction_type, pipe.scheduler_class) == ("epsilon",
                                                                          "PNDMScheduler")
        assert pipe.image_size == 512
    assert pipe.scheduler.beta_schedule == "scaled_linear" and pipe.scheduler.steps_offset == 1


def test_bad_input_is_one_line_naming_the_file(sd, tmp_path, monkeypatch):
    folder, _, file, _ = sd["sd1"]
    data = open(file, "rb").read()
    cases = []
    trunc = tmp_path / "truncated.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    cases.append((str(trunc), WeightsError, "corrupt or truncated"))
    cases.append((_write(str(tmp_path / "other.safetensors"), {"foo.weight": np.zeros(2)}),
                  WeightsError, "unknown layout"))
    cases.append((_write(str(tmp_path / "lora.safetensors"),
                         {"lora_unet_x.lora_down.weight": np.zeros((2, 2), np.float32)}),
                  WeightsError, "--lora"))
    sdxl = dict(load_file(file), **{"conditioner.embedders.0.x": np.zeros(1, np.float32)})
    cases.append((_write(str(tmp_path / "xl.safetensors"), sdxl), WeightsError, "SDXL"))
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not read")
    cases.append((str(ckpt), PickleRefusedError, "allow_pickle=True"))
    extra = dict(load_file(file), **{"first_stage_model.decoder.extra.weight": np.zeros(1)})
    cases.append((_write(str(tmp_path / "extra.safetensors"), extra), WeightsError,
                  "unknown vae tensor 'first_stage_model.decoder.extra.weight'"))
    inpaint = dict(load_file(file))
    w = inpaint["model.diffusion_model.input_blocks.0.0.weight"]
    inpaint["model.diffusion_model.input_blocks.0.0.weight"] = np.concatenate([w, w, w[:, :1]], 1)
    cases.append((_write(str(tmp_path / "inpaint.safetensors"), inpaint), WeightsError,
                  "9 input and 4 output channels"))
    partial = {k: v for k, v in load_file(file).items() if "out.2." not in k}
    cases.append((_write(str(tmp_path / "partial.safetensors"), partial), WeightsError,
                  "'model.diffusion_model.out.2.bias' is missing"))
    for path, err, match in cases + [(file, WeightsError, "no 'model_ema.[*]' UNet tensors")]:
        with pytest.raises(err, match=match) as e:
            jaxdiff.load_pipeline(path, config=folder, extract_ema=path == file)
        assert path in str(e.value) and "\n" not in str(e.value), str(e.value)
    # a file for another model than the config folder: the first misfit tensor is named
    with pytest.raises(WeightsError, match="'model.diffusion_model.*(is missing|has shape)") as e:
        jaxdiff.load_pipeline(sd["sd2"][2], config=folder)
    assert sd["sd2"][2] in str(e.value)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no tokenizer.*not CLIP's 49408.*config="):
        jaxdiff.load_pipeline(file)  # the tiny text encoder's vocabulary is not CLIP's


@pytest.mark.parametrize("model_type,pad", [("v1", 49407), ("v2", 0)])
def test_shipped_clip_tokenizer_when_nothing_else_is_there(model_type, pad, tmp_path,
                                                          monkeypatch):
    """CLIP's published ids for the SD example prompt; SD 2.x pads with '!' (id 0)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    tok = single_file.tokenizer_for(None, model_type, 49408, "model.safetensors")
    assert len(tok) == 49408
    ids = tok("a photo of an astronaut riding a horse", padding="max_length").input_ids
    assert ids[:10] == [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407]
    assert ids[10:] == [pad] * 67 and tok.model_max_length == 77


def test_old_ckpt_read_only_with_allow_pickle_and_cli_model_file(sd, tmp_path, monkeypatch, torch):
    from jaxdiff import cli
    folder, _, file, base = sd["sd1"]
    ckpt = str(tmp_path / "model.ckpt")
    # the oldest SD 1.x layout: CLIP keys without transformers' "text_model." level, ids
    old = {k.replace("transformer.text_model.", "transformer."): torch.from_numpy(v)
           for k, v in load_file(file).items()}
    old["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(16)[None]
    torch.save({"global_step": 1, "state_dict": old}, ckpt)
    with pytest.raises(PickleRefusedError):
        jaxdiff.load_pipeline(ckpt, config=folder)
    _, params = jaxdiff.load_pipeline(ckpt, config=folder, allow_pickle=True)
    jax.tree.map(np.testing.assert_array_equal, params, base)
    # jaxdiff generate --model FILE --model-config DIR reaches the single-file reader
    seen = {}

    def stop(pipe, params, *args):
        seen["params"] = params
        raise ValueError("stop after loading")
    monkeypatch.setattr(cli.generate, "apply_adapters", stop)
    argv = ["generate", "--model", file, "--model-config", folder, "--prompt", "x", "--out",
            str(tmp_path / "out")]
    assert cli.main(argv) == 2
    jax.tree.map(np.testing.assert_array_equal, seen["params"], base)


def test_sdxl_key_maps_invert_diffusers_conversion(torch):
    """SDXL maps (for the SDXL models still to come): a tiny diffusers SDXL UNet and both
    text encoders, written in the original layout by these maps, come back as the same
    tensors through diffusers' own original -> diffusers conversion functions."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from jaxdiff.weights import original_layout as ol
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8, sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=64,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80)
    common = dict(vocab_size=100, max_position_embeddings=8, num_hidden_layers=2)
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37,
                                       num_attention_heads=4, **common))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=2, hidden_act="gelu",
        projection_dim=24, **common))
    np_state = lambda m, pre="": {pre + k: v.detach().numpy() for k, v in m.state_dict().items()
                                  if not k.endswith("position_ids")}
    s_unet = np_state(unet)
    s1 = {("" if k.startswith("text_model.") else "text_model.") + k: v
          for k, v in np_state(te1).items()}
    s2 = np_state(te2)
    m1, m2 = ol.sdxl_text_maps(s1, s2)
    original = {**ol.to_original(s_unet, ol.unet_map(s_unet, unet.config)),
                **ol.to_original(s1, m1), **ol.to_original(s2, m2)}
    assert "model.diffusion_model.label_emb.0.0.weight" in original
    assert "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight" in original
    ckpt = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in original.items()}
    back_unet = sfu.convert_ldm_unet_checkpoint(ckpt, dict(unet.config))
    back1 = sfu.convert_ldm_clip_checkpoint(ckpt)
    back2 = sfu.convert_open_clip_checkpoint(te2, ckpt, prefix=ol.SDXL_OPENCLIP_PREFIX)
    for want, got in ((s_unet, back_unet), (s1, back1), (s2, back2)):
        got = {k: v.numpy() for k, v in got.items() if not k.endswith("position_ids")}
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    _, refiner = ol.sdxl_text_maps({}, s2, refiner=True)
    assert {o for o, _ in refiner.values()} == {o.replace("embedders.1", "embedders.0")
                                                for o, _ in m2.values()}


class _Shapes(dict):
    """key -> shape: what config inference reads of a checkpoint (no tensor data)."""
    path = "real-size.safetensors"

    def shape(self, key):
        return self.get(key)


HUB = {  # the SD 1.5 / SD 2.1 diffusers configs diffusers' from_single_file fetches
    "v1": dict(unet=dict(attention_head_dim=8, cross_attention_dim=768, sample_size=64,
                         use_linear_projection=False, upcast_attention=False),
               text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, hidden_act="quick_gelu"), vae_size=512),
    "v2": dict(unet=dict(attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                         sample_size=96, use_linear_projection=True, upcast_attention=True),
               text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                         num_attention_heads=16, hidden_act="gelu"), vae_size=768),
}


@pytest.mark.parametrize("model_type", ["v1", "v2"])
def test_configs_inferred_at_real_size_equal_the_hub_configs(model_type, torch):
    """Full-size SD 1.5 / 2.1 layouts built on PyTorch's meta device (shapes only): the
    original file's key set (SD 2.x: the whole 24-block OpenCLIP with text_projection)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from jaxdiff.weights import original_config as oc
    from jaxdiff.weights import original_layout as ol
    hub = HUB[model_type]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**{k: v for k, v in hub["unet"].items()
                                       if k != "sample_size"})
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4)
        t = hub["text"]
        layers = t["num_hidden_layers"] + (model_type == "v2")
        text = CLIPTextModel(CLIPTextConfig(**dict(t, num_hidden_layers=layers)))
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}
    s_text = {("" if k.startswith("text_model.") else "text_model.") + k: v
              for k, v in shapes(text).items() if not k.endswith("position_ids")}
    text_map = ol.openclip_map(s_text) if model_type == "v2" else ol.clip_map(s_text)
    ckpt = _Shapes()
    for key_map, s in ((ol.unet_map(shapes(unet), unet.config), shapes(unet)),
                       (ol.vae_map(shapes(vae), vae.config), shapes(vae)), (text_map, s_text)):
        for k, (orig, part) in key_map.items():
            shape = s[k]
            if part == "1x1" and len(shape) == 2:
                shape = shape + (1, 1)
            elif isinstance(part, tuple):
                shape = (ckpt.get(orig, (0,) + shape[1:])[0] + shape[0],) + shape[1:]
            ckpt[orig] = shape
    if model_type == "v2":
        ckpt[ol.OPENCLIP_PREFIX + "text_projection"] = (1024, 1024)
    assert oc.detect(ckpt) == model_type
    size = hub["vae_size"]
    u = oc.infer_unet_config(ckpt, model_type, size)
    assert {k: (tuple(v) if isinstance(v, list) else v) for k, v in u.items()
            if k in hub["unet"]} == hub["unet"]
    assert (tuple(u["block_out_channels"]), u["layers_per_block"], u["norm_num_groups"]) == (
        (320, 640, 1280, 1280), 2, 32)
    assert tuple(u["down_block_types"]) == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    v = oc.infer_vae_config(ckpt, size)
    assert (tuple(v["block_out_channels"]), v["layers_per_block"], v["latent_channels"],
            v["norm_num_groups"], v["sample_size"]) == ((128, 256, 512, 512), 2, 4, 32, size)
    got = oc.infer_text_config(ckpt, model_type)
    assert {k: got[k] for k in t} == t
    assert (got["vocab_size"], got["max_position_embeddings"]) == (49408, 77)
