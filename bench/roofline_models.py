"""bench/roofline.py's model table: the real model sizes as configs, built without weights.

``MODELS``: the SD-style pipelines (UNet, VAE, text encoders, scheduler, image side);
``TRANSFORMERS``: the latent transformer backbones (DiT-XL/2 at 256² and 512², PixArt-α
size at 1024² with its caption features as abstract inputs: no T5 encoder is built).
``build`` / ``build_transformer`` make the modules, ``abstract_params`` /
``transformer_params`` their float32 ``jax.ShapeDtypeStruct`` trees (``jax.eval_shape`` of
the init: nothing allocated).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.models.clip_text import (CLIPTextConfig, CLIPTextModel,
                                      CLIPTextModelWithProjection, CLIPTextProjectionConfig)
from jaxdiff.models.dit import DiTConfig, DiTTransformer2DModel
from jaxdiff.models.pixart import PixArtConfig, PixArtTransformer2DModel
from jaxdiff.models.unet import UNet2DConditionModel, UNetConfig
from jaxdiff.models.vae import AutoencoderKL, VAEConfig
from jaxdiff.pipeline import Pipeline, dummy_inputs
from jaxdiff.schedules import SchedulerConfig
from jaxdiff.weights.backbones import transformer_shapes

HARDWARE = {"h100": (989e12, 3.35e12), "tpu_v5e": (197e12, 819e9)}  # bf16 FLOP/s, B/s
ANCHORS = {  # published seconds per image (issue #20)
    "sd15_generate_h100_pcie_diffusers_sdpa": 1.44,
    "sd15_generate_h100_pcie_diffusers_compiled": 1.11,
    "sd15_generate_h100_pcie_tensorrt": 0.75,
    "sdxl_generate_tpu_v4_flax": 2.7 / 4,
    "sd15_null_text_p2p_a100": 60.0,
}
_VAE_SD = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
               down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4)
_SD_SCHED = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 steps_offset=1, set_alpha_to_one=False)
MODELS = {  # name: (unet, vae, text encoder (None: UNet only), scheduler, image side)
    "sd15": (dict(cross_attention_dim=768), _VAE_SD, {}, _SD_SCHED, 512),
    "sd21v": (dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                   use_linear_projection=True, upcast_attention=True, sample_size=96),
              _VAE_SD, dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                            num_attention_heads=16, hidden_act="gelu"),
              dict(_SD_SCHED, prediction_type="v_prediction"), 768),
    "sdxl": (dict(sample_size=128, block_out_channels=(320, 640, 1280),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                    "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                  use_linear_projection=True, cross_attention_dim=2048,
                  addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816),
             dict(_VAE_SD, scaling_factor=0.13025),
             dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, hidden_act="quick_gelu"), _SD_SCHED, 1024),
    "tiny": (dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=32, attention_head_dim=4, sample_size=16),
             dict(block_out_channels=(32, 64), norm_num_groups=8,
                  down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2),
             dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=16), _SD_SCHED, 32),
}
CTX_LEN = 77
TEXT_2 = {  # SDXL's second encoder (OpenCLIP-bigG with projection)
    "sdxl": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, hidden_act="gelu", projection_dim=1280)}


def build(name: str, dtype="float32", remat: bool = False) -> Pipeline:
    """The pipeline of ``MODELS[name]`` computing in ``dtype`` (no tokenizer, no weights)."""
    unet_kw, vae_kw, text_kw, sched_kw, _ = MODELS[name]
    dt = jnp.dtype(dtype)
    unet = UNet2DConditionModel(UNetConfig(**unet_kw), dtype=dt, remat=remat)
    text = None if text_kw is None else CLIPTextModel(CLIPTextConfig(**text_kw), dtype=dt)
    text_2 = (CLIPTextModelWithProjection(CLIPTextProjectionConfig(**TEXT_2[name]), dtype=dt)
              if name in TEXT_2 else None)
    return Pipeline(unet=unet, vae=AutoencoderKL(VAEConfig(**vae_kw), dtype=dt),
                    text_encoder=text, tokenizer=None, scheduler=SchedulerConfig(**sched_kw),
                    text_encoder_2=text_2)


def abstract_params(pipe: Pipeline) -> dict:
    """``{"text_encoder", "unet", "vae"}`` (SDXL: and ``"text_encoder_2"``) as float32
    ``ShapeDtypeStruct`` trees."""
    out = {}
    for kind in ("text_encoder", "unet", "vae", "text_encoder_2"):
        module = getattr(pipe, kind)
        if module is None:
            continue
        args = dummy_inputs(module, kind)
        out[kind] = jax.eval_shape(lambda k, a=args, m=module: m.init(k, *a)["params"],
                                   jax.random.key(0))
    return out


# name: (kind, config fields, image side, caption tokens (PixArt; None for DiT)); the VAE is
# SD's (the tiny ones: MODELS["tiny"]'s), the scheduler DiT's linear betas.
_DIT_XL = dict(num_attention_heads=16, attention_head_dim=72, num_layers=28, patch_size=2,
               in_channels=4, out_channels=8, num_embeds_ada_norm=1000)
TRANSFORMERS = {
    "dit_xl2_256": ("dit", dict(_DIT_XL, sample_size=32), 256, None),
    "dit_xl2_512": ("dit", dict(_DIT_XL, sample_size=64), 512, None),
    # PixArt-alpha XL/2 1024: T5-XXL caption features (120 tokens x 4096) are inputs here.
    "pixart_1024": ("pixart", dict(num_attention_heads=16, attention_head_dim=72,
                                   num_layers=28, patch_size=2, in_channels=4, out_channels=8,
                                   sample_size=128, cross_attention_dim=1152,
                                   caption_channels=4096), 1024, 120),
    "dit_tiny": ("dit", dict(num_attention_heads=2, attention_head_dim=8, num_layers=2,
                             patch_size=2, in_channels=4, out_channels=8, sample_size=8,
                             num_embeds_ada_norm=10), 16, None),
    "pixart_tiny": ("pixart", dict(num_attention_heads=2, attention_head_dim=12, num_layers=2,
                                   patch_size=2, in_channels=4, out_channels=8, sample_size=8,
                                   cross_attention_dim=24, caption_channels=16,
                                   use_additional_conditions=True), 16, 5),
}
_DIT_SCHED = dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)


def build_transformer(name: str, dtype="float32"):
    """(transformer module, SD VAE module, scheduler config) of ``TRANSFORMERS[name]``."""
    kind, kw, _, _ = TRANSFORMERS[name]
    dt = jnp.dtype(dtype)
    model = (DiTTransformer2DModel(DiTConfig(**kw), dtype=dt) if kind == "dit"
             else PixArtTransformer2DModel(PixArtConfig(**kw), dtype=dt))
    vae_kw = _VAE_SD if kw["sample_size"] >= 32 else MODELS["tiny"][1]
    return model, AutoencoderKL(VAEConfig(**vae_kw), dtype=dt), SchedulerConfig(**_DIT_SCHED)


def transformer_params(model, vae) -> dict:
    """``{"transformer", "vae"}`` as float32 ``ShapeDtypeStruct`` trees."""
    return {"transformer": transformer_shapes(model),
            "vae": jax.eval_shape(lambda k: vae.init(k, *dummy_inputs(vae, "vae"))["params"],
                                  jax.random.key(0))}
