"""Builders for tiny random PyTorch reference models (diffusers / transformers).

Shared by parity, weights, sampling and benchmark code. PyTorch is imported lazily: it is
a test-only reference, never a dependency of the library.
"""
from __future__ import annotations

import json
import os

import numpy as np

UNET_CONFIGS = {
    # SD1-style: conv projections, one head count for all blocks.
    "sd1": dict(block_out_channels=(32, 64), layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                attention_head_dim=8, norm_num_groups=8, sample_size=8),
    # One cross-attention block and the mid block, one resnet each (cheap to compile).
    "sd1_micro": dict(block_out_channels=(32,), layers_per_block=1,
                      down_block_types=("CrossAttnDownBlock2D",),
                      up_block_types=("CrossAttnUpBlock2D",), cross_attention_dim=32,
                      attention_head_dim=8, norm_num_groups=8, sample_size=8),
    # SD2-style: linear projections, per-block head counts, upcast attention,
    # several transformer layers per block, sin/cos order and freq shift changed.
    "sd2": dict(block_out_channels=(32, 64, 64), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                  "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=32, attention_head_dim=(2, 4, 4),
                use_linear_projection=True, upcast_attention=True, norm_num_groups=8,
                transformer_layers_per_block=(1, 2, 1), flip_sin_to_cos=False, freq_shift=1,
                sample_size=8),
    # SDXL base: no attention in the first block, per-block transformer depth, pooled text
    # (32) + 6 time ids x 8 through add_embedding; context = the 32- and 48-wide encoders
    # (widths differ, as CLIP-L's and bigG's: diffusers' from_single_file tells them apart so).
    "sdxl": dict(block_out_channels=(32, 64), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=80,
                 attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
                 transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
                 sample_size=8),
    # SDXL refiner-style: context = the second encoder only, an int transformer depth,
    # 5 time ids (original size, crop, aesthetic score).
    "sdxl_refiner": dict(block_out_channels=(32, 64), layers_per_block=1,
                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                         cross_attention_dim=48, attention_head_dim=(2, 4),
                         use_linear_projection=True, norm_num_groups=8,
                         transformer_layers_per_block=2, addition_embed_type="text_time",
                         addition_time_embed_dim=8,
                         projection_class_embeddings_input_dim=32 + 5 * 8, sample_size=8),
}

VAE_CONFIGS = {
    "sd1": dict(block_out_channels=(16, 32), layers_per_block=1,
                down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                norm_num_groups=8, sample_size=16),
    "deep": dict(block_out_channels=(8, 16, 16), layers_per_block=2,
                 down_block_types=("DownEncoderBlock2D",) * 3,
                 up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=3,
                 norm_num_groups=8, scaling_factor=0.5, sample_size=16),
}

TEXT_CONFIGS = {
    "sd1": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu"),
    "sd2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=2, max_position_embeddings=16, hidden_act="gelu"),
    # SDXL's second encoder (OpenCLIP-bigG-style, with text_projection to 32).
    "sdxl_g": dict(hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                   num_attention_heads=4, max_position_embeddings=16, hidden_act="gelu",
                   projection_dim=32),
}


def perturb(module, scale=0.02, seed=0):
    """Adds noise to every parameter so zero-initialised layers are exercised."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


def make_unet(name="sd1", seed=0):
    import torch
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    return perturb(UNet2DConditionModel(**UNET_CONFIGS[name]), seed=seed)


def make_vae(name="sd1", seed=0):
    import torch
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return perturb(AutoencoderKL(**VAE_CONFIGS[name]), seed=seed)


def make_text_encoder(name="sd1", vocab_size=None, seed=0):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    vocab_size = vocab_size or len(tiny_vocab())
    cfg = CLIPTextConfig(vocab_size=vocab_size, bos_token_id=vocab_size - 2,
                         eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                         **TEXT_CONFIGS[name])
    return CLIPTextModel(cfg).eval()


def make_text_encoder_2(name="sdxl_g", vocab_size=None, seed=0, eos_token_id=None):
    """A perturbed transformers ``CLIPTextModelWithProjection`` (``eos_token_id`` default:
    the tiny vocabulary's last id; 2 selects transformers' legacy largest-id pooling)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    vocab_size = vocab_size or len(tiny_vocab())
    eos = vocab_size - 1 if eos_token_id is None else eos_token_id
    cfg = CLIPTextConfig(vocab_size=vocab_size, bos_token_id=vocab_size - 2, eos_token_id=eos,
                         pad_token_id=vocab_size - 1, **TEXT_CONFIGS[name])
    return perturb(CLIPTextModelWithProjection(cfg), seed=seed)


def tiny_vocab():
    """A character-level CLIP BPE vocabulary (byte alphabet, with and without </w>)."""
    chars = _byte_alphabet()
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}


def _byte_alphabet():
    """GPT-2/CLIP's reversible byte -> unicode character table, in byte order."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    extra, out = 0, []
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def write_tiny_tokenizer(folder, max_length=16, pad_token="<|endoftext|>"):
    """Writes a CLIP-format tokenizer folder loadable by ``CLIPTokenizer.from_pretrained``
    (``pad_token="!"``: SDXL's second tokenizer, padding with id 0)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(tiny_vocab(), f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": max_length, "tokenizer_class": "CLIPTokenizer",
                   "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "pad_token": pad_token, "unk_token": "<|endoftext|>"}, f)
    from transformers import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(folder)


SCHEDULER_SD1 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                     beta_schedule="scaled_linear", prediction_type="epsilon",
                     timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
                     clip_sample=False)


def make_torch_pipeline(folder, unet="sd1", vae="sd1", text="sd1", scheduler=None, seed=0):
    """Builds and saves a tiny random diffusers ``StableDiffusionPipeline`` in ``folder``."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    tokenizer = write_tiny_tokenizer(os.path.join(folder, "_tok"))
    pipe = StableDiffusionPipeline(
        unet=make_unet(unet, seed), vae=make_vae(vae, seed),
        text_encoder=make_text_encoder(text, seed=seed), tokenizer=tokenizer,
        scheduler=DDIMScheduler(**(scheduler or SCHEDULER_SD1)), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def make_torch_instruct_pipeline(folder, unet="sd1", seed=0):
    """Builds and saves a tiny random diffusers ``StableDiffusionInstructPix2PixPipeline``
    in ``folder``: the sd1 pipeline with an 8-channel UNet (noisy + image latents; ``unet``
    names its other settings in ``UNET_CONFIGS``) and Euler-ancestral sampling (the
    released InstructPix2Pix checkpoint's scheduler)."""
    import torch
    from diffusers import (DDIMScheduler, EulerAncestralDiscreteScheduler,
                           StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel)
    torch.manual_seed(seed)
    unet = perturb(UNet2DConditionModel(**dict(UNET_CONFIGS[unet], in_channels=8)),
                   seed=seed)
    scheduler = EulerAncestralDiscreteScheduler.from_config(
        DDIMScheduler(**SCHEDULER_SD1).config)
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=make_vae("sd1", seed), text_encoder=make_text_encoder("sd1", seed=seed),
        tokenizer=write_tiny_tokenizer(os.path.join(folder, "_tok")), unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def make_torch_sdxl_pipeline(folder, seed=0, refiner=False):
    """Builds and saves a tiny random diffusers SDXL pipeline in ``folder``: CLIP-L-style and
    projection encoders (32 + 48 = the UNet's 80-wide context, pooled 32), the second
    tokenizer padding with '!' as SDXL's, DDIM. ``refiner``: a
    ``StableDiffusionXLImg2ImgPipeline`` as the SDXL refiner (second encoder only, 48-wide
    context, aesthetic-score time ids, no zeroed negative embeddings)."""
    from diffusers import (DDIMScheduler, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLPipeline)
    common = dict(vae=make_vae("sd1", seed), scheduler=DDIMScheduler(**SCHEDULER_SD1),
                  text_encoder_2=make_text_encoder_2("sdxl_g", seed=seed + 1),
                  tokenizer_2=write_tiny_tokenizer(os.path.join(folder, "_tok2"),
                                                   pad_token="!"))
    if refiner:
        pipe = StableDiffusionXLImg2ImgPipeline(
            text_encoder=None, tokenizer=None, unet=make_unet("sdxl_refiner", seed),
            requires_aesthetics_score=True, force_zeros_for_empty_prompt=False, **common)
    else:
        pipe = StableDiffusionXLPipeline(
            text_encoder=perturb(make_text_encoder("sd1", seed=seed)),
            tokenizer=write_tiny_tokenizer(os.path.join(folder, "_tok")),
            unet=make_unet("sdxl", seed), force_zeros_for_empty_prompt=True, **common)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def with_micro_unet(pipe, params, cross: bool = False, sample_size: int = 4):
    """The pipeline with a one-block UNet (random params): a cheap backward pass for
    training tests (``cross``: a cross-attention block, e.g. for LoRA). Params come from
    numpy: compiling flax's init of even this UNet takes ~10 s on CPU."""
    import dataclasses
    import jax
    import jax.numpy as jnp
    from jaxdiff.models import UNet2DConditionModel, UNetConfig
    from jaxdiff.pipeline import dummy_inputs
    cfg = UNetConfig.from_dict(dict(
        block_out_channels=(8,), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D" if cross else "DownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D" if cross else "UpBlock2D",),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=4,
        sample_size=sample_size))
    unet = UNet2DConditionModel(cfg)
    shapes = jax.eval_shape(unet.init, jax.random.key(0), *dummy_inputs(unet, "unet"))
    rng = np.random.default_rng(0)
    unet_params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape), jnp.float32),
                               shapes["params"])
    return dataclasses.replace(pipe, unet=unet), dict(params, unet=unet_params)


def nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


def nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)


def unet_outputs(torch_unet, jax_unet, unet_params, seed=0, **torch_kwargs):
    """One UNet call on the same random inputs in diffusers and in jaxdiff: returns
    (jaxdiff's output as NCHW, diffusers' output), float32 numpy. Inputs: 2 latents of the
    diffusers UNet's ``sample_size``, timesteps (7, 640), a 5-token context; ``torch_kwargs``
    go to the diffusers call (e.g. ``cross_attention_kwargs={"scale": s}``)."""
    import jax
    import jax.numpy as jnp
    import torch
    cfg = torch_unet.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    t = torch.tensor([7, 640])
    ctx = torch.randn(2, 5, cfg.cross_attention_dim, generator=g)
    with torch.no_grad():
        want = torch_unet(x, t, ctx, **torch_kwargs).sample.numpy()
    got = jax.jit(jax_unet.apply)({"params": unet_params}, jnp.asarray(nhwc(x.numpy())),
                                  jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy()))
    return nchw(got), want


# Tiny ControlNets / T2I-Adapters for the UNET_CONFIGS of the same name ("light": "sd2")
# behind a VAE of factor 2 (VAE_CONFIGS["sd1"]).
CONTROLNET_CONFIGS = {
    "sd1": dict(block_out_channels=(32, 64), layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
                conditioning_embedding_out_channels=(8, 16)),
    # SD2-style, BGR condition, pooled residuals (module-level parity only).
    "sd2": dict(block_out_channels=(32, 64, 64), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                  "DownBlock2D"),
                cross_attention_dim=32, attention_head_dim=(2, 4, 4),
                use_linear_projection=True, upcast_attention=True, norm_num_groups=8,
                transformer_layers_per_block=(1, 2, 1), flip_sin_to_cos=False, freq_shift=1,
                conditioning_embedding_out_channels=(8, 16),
                controlnet_conditioning_channel_order="bgr", global_pool_conditions=True),
}

ADAPTER_CONFIGS = {
    "full": dict(in_channels=3, channels=(32, 64), num_res_blocks=2, downscale_factor=2,
                 adapter_type="full_adapter"),
    "light": dict(in_channels=3, channels=(32, 64), num_res_blocks=2, downscale_factor=2,
                  adapter_type="light_adapter"),
}


def make_controlnet(name="sd1", seed=0, **overrides):
    import torch
    from diffusers import ControlNetModel
    torch.manual_seed(seed)
    return perturb(ControlNetModel(**dict(CONTROLNET_CONFIGS[name], **overrides)), seed=seed)


def make_adapter(name="full", seed=0):
    import torch
    from diffusers import T2IAdapter
    torch.manual_seed(seed)
    return perturb(T2IAdapter(**ADAPTER_CONFIGS[name]), seed=seed)
