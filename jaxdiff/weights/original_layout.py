"""The original (CompVis / Stability "LDM") key layout of single-file checkpoints.

A1111 / ComfyUI checkpoints hold one state dict with the UNet under
``model.diffusion_model.``, the VAE under ``first_stage_model.`` and the text encoder under
``cond_stage_model.transformer.`` (SD 1.x: a transformers ``CLIPTextModel`` state dict) or
``cond_stage_model.model.`` (SD 2.x: OpenCLIP, fused q/k/v ``in_proj_weight``).

Every map here goes from a diffusers key (``convert.torch_key`` of jaxdiff's tree) to the
original key, given the model config; reading inverts it over the keys the model expects,
so the read and the written layout cannot drift apart. A map value is
``(original_key, part)``: ``part`` is ``None`` (same tensor), ``(i, n)`` (row block ``i``
of ``n`` of a fused tensor: OpenCLIP q/k/v), ``"T"`` (transposed: OpenCLIP's
``text_projection``) or ``"1x1"`` (a linear weight stored as a 1x1 convolution: the LDM
VAE's attention); ``take`` and ``to_original`` apply them. The maps follow diffusers'
``scripts/convert_diffusers_to_original_stable_diffusion.py`` and the inverse functions in
``diffusers.loaders.single_file_utils``.

SDXL (read and written by ``single_file`` with a reference diffusers folder): the UNet as above
plus ``label_emb`` (``add_embedding``), CLIP-L under ``conditioner.embedders.0.transformer.``
and OpenCLIP-bigG (with ``text_projection``) under ``conditioner.embedders.1.model.``; the
refiner has only the OpenCLIP encoder, under ``conditioner.embedders.0.model.``.
"""
from __future__ import annotations

from typing import Dict, Iterable, Tuple, Union

import numpy as np

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
EMA_PREFIX = "model_ema."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
REFINER_OPENCLIP_PREFIX = "conditioner.embedders.0.model."

Part = Union[None, Tuple[int, int], str]
KeyMap = Dict[str, Tuple[str, Part]]

_UNET_RESNET = (("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."),
                ("time_emb_proj.", "emb_layers.1."), ("norm2.", "out_layers.0."),
                ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection."))
_UNET_TOP = (("time_embedding.linear_1.", "time_embed.0."),
             ("time_embedding.linear_2.", "time_embed.2."), ("conv_in.", "input_blocks.0.0."),
             ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
             ("add_embedding.linear_1.", "label_emb.0.0."),  # SDXL's text_time embedding
             ("add_embedding.linear_2.", "label_emb.0.2."))
_VAE_RESNET = (("conv_shortcut.", "nin_shortcut."),)
_VAE_ATTN = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
             ("to_out.0.", "proj_out."))
_OPENCLIP_LAYER = (("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."),
                   ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."),
                   ("self_attn.out_proj.", "attn.out_proj."))
_QKV = ("q_proj", "k_proj", "v_proj")


def _per_block(value, n):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def unet_prefixes(cfg) -> list:
    """(diffusers prefix, original prefix, inner renames) for every UNet submodule."""
    n = len(cfg.block_out_channels)
    layers = _per_block(cfg.layers_per_block, n)
    out = [(d, o, ()) for d, o in _UNET_TOP]
    idx = 1
    for i in range(n):
        attn = cfg.down_block_types[i].startswith("CrossAttn")
        for j in range(layers[i]):
            out.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{idx}.0.", _UNET_RESNET))
            if attn:
                out.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{idx}.1.", ()))
            idx += 1
        if i < n - 1:
            out.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{idx}.0.op.",
                        ()))
            idx += 1
    out += [("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET),
            ("mid_block.attentions.0.", "middle_block.1.", ()),
            ("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET)]
    idx = 0
    for i, n_layers in enumerate(reversed(layers)):
        attn = cfg.up_block_types[i].startswith("CrossAttn")
        for j in range(n_layers + 1):
            out.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{idx}.0.", _UNET_RESNET))
            if attn:
                out.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{idx}.1.", ()))
            if j == n_layers and i < n - 1:
                out.append((f"up_blocks.{i}.upsamplers.0.",
                            f"output_blocks.{idx}.{2 if attn else 1}.", ()))
            idx += 1
    return out


def vae_prefixes(cfg) -> list:
    """(diffusers prefix, original prefix, inner renames) for every VAE submodule."""
    n = len(cfg.block_out_channels)
    out = [("encoder.conv_norm_out.", "encoder.norm_out.", ()),
           ("decoder.conv_norm_out.", "decoder.norm_out.", ())]
    for part in ("encoder", "decoder"):
        out += [(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", _VAE_RESNET),
                (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", _VAE_RESNET),
                (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTN)]
    for i in range(n):
        out += [(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.", _VAE_RESNET),
                (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.",
                 ()),
                (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block.",
                 _VAE_RESNET),
                (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.",
                 ())]
    return out


def _apply(key: str, prefixes) -> str:
    best = max((p for p in prefixes if key.startswith(p[0])), key=lambda p: len(p[0]),
               default=None)
    if best is None:
        return key
    d, o, renames = best
    rest = key[len(d):]
    if d.endswith(".resnets."):  # VAE: "<j>.<name>" inside a block list
        j, _, rest = rest.partition(".")
        o, rest = f"{o}{j}.", rest
    for new, old in renames:
        if rest.startswith(new):
            rest = old + rest[len(new):]
            break
    return o + rest


def unet_map(keys: Iterable[str], cfg) -> KeyMap:
    prefixes = unet_prefixes(cfg)
    return {k: (UNET_PREFIX + _apply(k, prefixes), None) for k in keys}


def vae_map(keys: Iterable[str], cfg) -> KeyMap:
    prefixes = vae_prefixes(cfg)
    return {k: (VAE_PREFIX + _apply(k, prefixes),
                "1x1" if ".attentions." in k and k.endswith(".weight") and "group_norm" not in k
                else None) for k in keys}


def clip_map(keys: Iterable[str], prefix: str = CLIP_PREFIX) -> KeyMap:
    """SD 1.x: the transformers state dict under ``prefix`` (``text_model.`` kept)."""
    return {k: (prefix + k, None) for k in keys}


def openclip_map(keys: Iterable[str], prefix: str = OPENCLIP_PREFIX) -> KeyMap:
    """SD 2.x: OpenCLIP names; q/k/v are row blocks of ``attn.in_proj_weight/bias``."""
    fixed = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias"}
    out: KeyMap = {}
    for k in keys:
        if k in fixed:
            out[k] = (prefix + fixed[k], None)
            continue
        if k == "text_projection.weight":  # CLIPTextModelWithProjection (SDXL)
            out[k] = (prefix + "text_projection", "T")
            continue
        head = "text_model.encoder.layers."
        if not k.startswith(head):
            raise KeyError(f"no OpenCLIP name for text-encoder tensor {k!r}")
        i, _, rest = k[len(head):].partition(".")
        base = f"{prefix}transformer.resblocks.{i}."
        mod, _, leaf = rest.rpartition(".")
        if mod.startswith("self_attn.") and mod.split(".")[1] in _QKV:
            kind = "in_proj_weight" if leaf == "weight" else "in_proj_bias"
            out[k] = (f"{base}attn.{kind}", (_QKV.index(mod.split(".")[1]), 3))
            continue
        for new, old in _OPENCLIP_LAYER:
            if rest.startswith(new):
                rest = old + rest[len(new):]
                break
        out[k] = (base + rest, None)
    return out


def ema_key(key: str) -> str:
    """``model.diffusion_model.a.b.weight`` -> ``model_ema.diffusion_modelabweight``: the
    flattened names LDM's EMA copy uses (diffusers' ``extract_ema``)."""
    return EMA_PREFIX + "".join(key.split(".")[1:])


def sdxl_text_maps(keys_1, keys_2, refiner: bool = False) -> Tuple[KeyMap, KeyMap]:
    """SDXL text encoders: (CLIP-L ``text_encoder``, OpenCLIP-bigG ``text_encoder_2``) maps;
    the refiner has only the second (``keys_1`` is then empty)."""
    if refiner:
        return {}, openclip_map(keys_2, REFINER_OPENCLIP_PREFIX)
    return clip_map(keys_1, SDXL_CLIP_PREFIX), openclip_map(keys_2, SDXL_OPENCLIP_PREFIX)


def take(value: np.ndarray, part: Part) -> np.ndarray:
    """The diffusers tensor held by original tensor ``value`` (see the module docstring)."""
    if part is None:
        return value
    if part == "T":
        return value.T
    if part == "1x1":
        return value[:, :, 0, 0] if value.ndim == 4 else value
    i, n = part
    return np.split(value, n, axis=0)[i]


def to_original(state: Dict[str, np.ndarray], key_map: KeyMap) -> Dict[str, np.ndarray]:
    """diffusers-keyed tensors -> original-keyed tensors (fused parts concatenated)."""
    out, fused = {}, {}
    for key, value in state.items():
        orig, part = key_map[key]
        if part is None:
            out[orig] = value
        elif part == "T":
            out[orig] = value.T
        elif part == "1x1":
            out[orig] = value[:, :, None, None] if value.ndim == 2 else value
        else:
            fused.setdefault(orig, [None] * part[1])[part[0]] = value
    out.update({k: np.concatenate(v, axis=0) for k, v in fused.items()})
    return out
