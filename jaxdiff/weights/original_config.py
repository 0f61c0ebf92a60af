"""Model type and configs of an original-layout SD 1.x / 2.x / XL checkpoint, from its keys.

The model type is read from the keys as diffusers' ``from_single_file`` does (an OpenCLIP
text encoder means SD 2.x). Configs follow from the tensor shapes plus Stable Diffusion's
fixed hyper-parameters that shapes cannot tell (UNet heads: 8 in SD 1.x, 64-wide in SD 2.x;
64-wide text heads; 32 GroupNorm groups; LDM's time embedding), so a file of an unusual
model needs ``config=`` (a diffusers folder). ``ckpt`` is a key -> tensor mapping with a
``shape(key)`` method (``single_file.Checkpoint``).
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from jaxdiff.weights import original_layout as ol
from jaxdiff.weights.convert import WeightsError

# What diffusers' from_single_file fetches per model type (the SD 1.5 / 2.1 hub configs):
# scheduler and prediction type, and the repositories whose tokenizer it uses.
MODEL_TYPES = {
    "v1": dict(scheduler="PNDMScheduler", prediction_type="epsilon",
               repos=(("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer"),
                      ("openai/clip-vit-large-patch14", ""))),
    "v2": dict(scheduler="DDIMScheduler", prediction_type="v_prediction",
               repos=(("stabilityai/stable-diffusion-2-1", "tokenizer"),
                      ("stabilityai/stable-diffusion-2", "tokenizer"))),
    # SDXL base / refiner (configs inferred as for SD 1.x/2.x, or config=).
    "xl": dict(scheduler="EulerDiscreteScheduler", prediction_type="epsilon",
               repos=(("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer"),)),
    "xl_refiner": dict(scheduler="EulerDiscreteScheduler", prediction_type="epsilon",
                       repos=(("stabilityai/stable-diffusion-xl-refiner-1.0", "tokenizer_2"),)),
}

# --------------------------------------------------------------------------- detection

def detect(ckpt: Mapping) -> str:
    """``"v1"`` (CLIP text encoder), ``"v2"`` (OpenCLIP), ``"xl"`` (SDXL base: both, under
    ``conditioner.embedders.``) or ``"xl_refiner"``; a one-line error otherwise."""
    keys = list(ckpt)
    sdxl = any(k.startswith("conditioner.embedders.") for k in keys)
    if sdxl != (ol.UNET_PREFIX + "label_emb.0.0.weight" in ckpt):
        raise WeightsError(f"{ckpt.path}: " + (
            "SDXL text encoders without the UNet's 'label_emb' (text_time) tensors" if sdxl
            else "a class-conditioned UNet ('label_emb') without SDXL's text encoders") +
            "; jaxdiff reads SD 1.x / 2.x / XL checkpoints - use one of those.")
    if sdxl:
        return ("xl" if any(k.startswith(ol.SDXL_OPENCLIP_PREFIX) for k in keys)
                else "xl_refiner")
    if ol.UNET_PREFIX + "input_blocks.0.0.weight" not in ckpt:
        first = sorted(keys)[:2]
        hint = (" (this looks like a LoRA: pass it with --lora / load_lora)"
                if any(k.startswith(("lora_", "unet.", "text_encoder.")) for k in keys) else "")
        raise WeightsError(f"{ckpt.path}: unknown layout: no '{ol.UNET_PREFIX}*' tensors (keys "
                           f"start {first}){hint}; expected an SD 1.x/2.x original-layout "
                           "checkpoint, or pass a diffusers folder instead.")
    c_in = ckpt.shape(ol.UNET_PREFIX + "input_blocks.0.0.weight")[1]
    c_out = (ckpt.shape(ol.UNET_PREFIX + "out.2.weight") or (c_in,))[0]
    if c_in != c_out:
        raise WeightsError(f"{ckpt.path}: a UNet with {c_in} input and {c_out} output channels "
                           "(an inpainting or InstructPix2Pix checkpoint); jaxdiff's "
                           "text-to-image pipeline needs a plain SD 1.x/2.x checkpoint.")
    if ol.OPENCLIP_PREFIX + "token_embedding.weight" in ckpt:
        return "v2"
    if any(k.startswith(ol.CLIP_PREFIX) for k in keys):
        return "v1"
    k = ol.UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    return "v2" if (ckpt.shape(k) or (0,))[-1] == 1024 else "v1"


# ---------------------------------------------------------------------- config inference

def _indices(keys, pattern):
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys for m in [rx.match(k)] if m})


def _one(values):
    return values[0] if len(set(values)) == 1 else tuple(values)


def infer_unet_config(ckpt: Mapping, model_type: str, image_size: int) -> dict:
    """diffusers UNet config from the tensor shapes (heads: SD 1.x 8, SD 2.x / XL 64
    channels). SDXL: ``text_time`` with the time-id width from ``label_emb``'s input (pooled
    projection + 6 ids, the refiner's 5)."""
    vae_levels = _indices(list(ckpt), re.escape(ol.VAE_PREFIX) + r"encoder\.down\.(\d+)\.")
    vae_factor = 2 ** (len(vae_levels) - 1) if vae_levels else 8
    p = ol.UNET_PREFIX
    keys = [k[len(p):] for k in ckpt if k.startswith(p)]
    shape = lambda k: ckpt.shape(p + k)
    blocks = _indices(keys, r"input_blocks\.(\d+)\.")
    downs = [i for i in blocks if shape(f"input_blocks.{i}.0.op.weight")]
    levels, start = [], 1
    for end in downs + [max(blocks) + 1]:
        levels.append(list(range(start, end)))
        start = end + 1
    first = [lv[0] for lv in levels]
    attn = [bool(shape(f"input_blocks.{i}.1.proj_in.weight")) for i in first]
    channels = [shape(f"input_blocks.{i}.0.out_layers.3.weight")[0] for i in first]
    mid = len(_indices(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\.")) or 1
    depth = [len(_indices(keys, rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\."))
             for i in first]  # a level without attention: the mid block's (it uses the last)
    depth = [d or (mid if j == len(depth) - 1 else 1) for j, d in enumerate(depth)]
    a = next(i for i, has in zip(first, attn) if has)
    per_up = [len(lv) + 1 for lv in reversed(levels)]
    up_first = np.cumsum([0] + per_up[:-1])
    up_attn = [bool(shape(f"output_blocks.{i}.1.proj_in.weight")) for i in up_first]
    heads = [8] * len(levels) if model_type == "v1" else [max(1, c // 64) for c in channels]
    extra = {}
    if model_type.startswith("xl"):
        proj = ckpt.shape(_sdxl_openclip(model_type) + "text_projection")[1]
        ids = 5 if model_type == "xl_refiner" else 6
        total = shape("label_emb.0.0.weight")[1]
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=(total - proj) // ids,
                     projection_class_embeddings_input_dim=total)
    return dict(**extra,
        sample_size=image_size // vae_factor, in_channels=shape("input_blocks.0.0.weight")[1],
        out_channels=shape("out.2.weight")[0], block_out_channels=channels,
        layers_per_block=_one([len(lv) for lv in levels]),
        down_block_types=["CrossAttnDownBlock2D" if x else "DownBlock2D" for x in attn],
        up_block_types=["CrossAttnUpBlock2D" if x else "UpBlock2D" for x in up_attn],
        cross_attention_dim=shape(f"input_blocks.{a}.1.transformer_blocks.0.attn2.to_k.weight")[1],
        attention_head_dim=_one(heads), transformer_layers_per_block=_one(depth),
        use_linear_projection=len(shape(f"input_blocks.{a}.1.proj_in.weight")) == 2,
        upcast_attention=model_type == "v2", norm_num_groups=_groups(channels))


def _sdxl_openclip(model_type: str) -> str:
    return ol.REFINER_OPENCLIP_PREFIX if model_type == "xl_refiner" else ol.SDXL_OPENCLIP_PREFIX


def infer_sdxl_text_configs(ckpt: Mapping, model_type: str) -> dict:
    """``{"text_encoder": CLIP-L (base only), "text_encoder_2": OpenCLIP-bigG with
    projection}`` configs from the shapes (64-wide heads; every OpenCLIP block is used)."""
    out = {}
    if model_type == "xl":
        p = ol.SDXL_CLIP_PREFIX + "text_model."
        vocab, hidden = ckpt.shape(p + "embeddings.token_embedding.weight")
        out["text_encoder"] = dict(
            vocab_size=vocab, hidden_size=hidden,
            intermediate_size=ckpt.shape(p + "encoder.layers.0.mlp.fc1.weight")[0],
            num_hidden_layers=len(_indices([k[len(p):] for k in ckpt if k.startswith(p)],
                                           r"encoder\.layers\.(\d+)\.")),
            num_attention_heads=max(1, hidden // 64), hidden_act="quick_gelu",
            max_position_embeddings=ckpt.shape(p + "embeddings.position_embedding.weight")[0])
    p = _sdxl_openclip(model_type)
    vocab, hidden = ckpt.shape(p + "token_embedding.weight")
    out["text_encoder_2"] = dict(
        vocab_size=vocab, hidden_size=hidden,
        intermediate_size=ckpt.shape(p + "transformer.resblocks.0.mlp.c_fc.weight")[0],
        num_hidden_layers=len(_indices(list(ckpt),
                                       re.escape(p) + r"transformer\.resblocks\.(\d+)\.")),
        num_attention_heads=max(1, hidden // 64), hidden_act="gelu",
        max_position_embeddings=ckpt.shape(p + "positional_embedding")[0],
        projection_dim=ckpt.shape(p + "text_projection")[1])
    return out


def _groups(channels) -> int:
    """Stable Diffusion's 32 GroupNorm groups (fewer when 32 does not divide a width)."""
    return int(np.gcd.reduce([32] + [int(c) for c in channels]))


def infer_vae_config(ckpt: Mapping, image_size: int) -> dict:
    p = ol.VAE_PREFIX
    keys = [k[len(p):] for k in ckpt if k.startswith(p)]
    shape = lambda k: ckpt.shape(p + k)
    levels = _indices(keys, r"encoder\.down\.(\d+)\.")
    return dict(
        sample_size=image_size, in_channels=shape("encoder.conv_in.weight")[1],
        out_channels=shape("decoder.conv_out.weight")[0],
        block_out_channels=[shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in levels],
        down_block_types=["DownEncoderBlock2D"] * len(levels),
        up_block_types=["UpDecoderBlock2D"] * len(levels),
        layers_per_block=len(_indices(keys, r"encoder\.down\.0\.block\.(\d+)\.")),
        latent_channels=shape("encoder.conv_out.weight")[0] // 2, scaling_factor=0.18215,
        norm_num_groups=_groups([shape(f"encoder.down.{i}.block.0.conv1.weight")[0]
                                 for i in levels]),
        use_quant_conv=bool(shape("quant_conv.weight")),
        use_post_quant_conv=bool(shape("post_quant_conv.weight")))


def infer_text_config(ckpt: Mapping, model_type: str) -> dict:
    """CLIP-L (SD 1.x, quick_gelu) or OpenCLIP-H (SD 2.x, gelu) shapes; 64-wide heads."""
    if model_type == "v2":
        p = ol.OPENCLIP_PREFIX
        vocab, hidden = ckpt.shape(p + "token_embedding.weight")
        layers = _openclip_layers(ckpt)
        inter = ckpt.shape(p + "transformer.resblocks.0.mlp.c_fc.weight")[0]
        positions, act = ckpt.shape(p + "positional_embedding")[0], "gelu"
    else:
        p = clip_prefix(ckpt)
        vocab, hidden = ckpt.shape(p + "embeddings.token_embedding.weight")
        layers = len(_indices([k[len(p):] for k in ckpt if k.startswith(p)],
                              r"encoder\.layers\.(\d+)\."))
        inter = ckpt.shape(p + "encoder.layers.0.mlp.fc1.weight")[0]
        positions = ckpt.shape(p + "embeddings.position_embedding.weight")[0]
        act = "quick_gelu"
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                max_position_embeddings=positions, hidden_act=act)


def clip_prefix(ckpt) -> str:
    with_tm = ol.CLIP_PREFIX + "text_model."
    return with_tm if any(k.startswith(with_tm) for k in ckpt) else ol.CLIP_PREFIX


def _openclip_layers(ckpt) -> int:
    """Blocks SD 2.x uses: a full OpenCLIP model (with ``text_projection``) has one more,
    the last, which SD 2.x skips (it conditions on the penultimate layer)."""
    pattern = re.escape(ol.OPENCLIP_PREFIX) + r"transformer\.resblocks\.(\d+)\."
    n = len(_indices(list(ckpt), pattern))
    return n - 1 if ol.OPENCLIP_PREFIX + "text_projection" in ckpt else n
