"""The conditional UNet of Stable Diffusion 1.x / 2.x / XL (diffusers ``UNet2DConditionModel``).

NHWC: ``apply({"params": p}, sample [B,h,w,C], t [B] or scalar, context [B,L,D]) ->
[B,h,w,out_channels]``; SDXL (``addition_embed_type="text_time"``) also takes
``added_cond_kwargs={"text_embeds": [B,P], "time_ids": [B,K]}`` (pooled text embedding and
micro-conditioning: original size, crop top-left, target size, or the refiner's aesthetic
score in place of the target size). Config fields are named as in diffusers'
``unet/config.json``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Tuple, Union

import flax.linen as nn
import jax.numpy as jnp

from jaxdiff.models import config as config_lib
from jaxdiff.models.attention import Transformer2DModel
from jaxdiff.models.gligen import ATTENTION_TYPES, position_net
from jaxdiff.models.layers import (Downsample2D, ResnetBlock2D, TimestepEmbedding, Upsample2D,
                                   conv3x3, timestep_embedding)

_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: Tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: Tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: Union[int, Tuple[int, ...]] = 2
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: Union[int, Tuple[int, ...]] = 1
    attention_head_dim: Union[int, Tuple[int, ...]] = 8
    num_attention_heads: Any = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    # SDXL: the pooled text embedding and sinusoidal time ids added to the time embedding.
    addition_embed_type: Any = None  # None | "text_time"
    addition_time_embed_dim: Any = None
    projection_class_embeddings_input_dim: Any = None
    # GLIGEN: "gated" / "gated-text-image" add position_net and a fuser per block.
    attention_type: str = "default"

    @property
    def text_time(self) -> bool:
        return self.addition_embed_type == "text_time"

    def validate(self, source="unet config"):
        n = len(self.block_out_channels)
        if self.addition_embed_type not in (None, "text_time"):
            raise config_lib.UnsupportedConfigError(
                f"{source}: addition_embed_type={self.addition_embed_type!r} is not supported "
                "(only None and 'text_time', SDXL's).")
        if self.text_time and not (
                isinstance(self.addition_time_embed_dim, int)
                and isinstance(self.projection_class_embeddings_input_dim, int)
                and self.projection_class_embeddings_input_dim > self.addition_time_embed_dim > 0):
            raise config_lib.UnsupportedConfigError(
                f"{source}: addition_embed_type='text_time' needs addition_time_embed_dim and a "
                "larger projection_class_embeddings_input_dim (got "
                f"{self.addition_time_embed_dim!r}, "
                f"{self.projection_class_embeddings_input_dim!r}).")
        if self.attention_type not in ("default",) + ATTENTION_TYPES:
            raise config_lib.UnsupportedConfigError(
                f"{source}: attention_type={self.attention_type!r} is not supported (only "
                f"'default' and GLIGEN's {list(ATTENTION_TYPES)}).")
        for name, types, ok in (("down_block_types", self.down_block_types, _DOWN),
                                ("up_block_types", self.up_block_types, _UP)):
            bad = [t for t in types if t not in ok]
            if bad or len(types) != n:
                raise config_lib.UnsupportedConfigError(
                    f"{source}: {name}={list(types)} is not supported: need {n} entries from "
                    f"{list(ok)}.")
        if self.mid_block_type != "UNetMidBlock2DCrossAttn":
            raise config_lib.UnsupportedConfigError(
                f"{source}: mid_block_type={self.mid_block_type!r} is not supported "
                "(only 'UNetMidBlock2DCrossAttn').")
        if self.act_fn != "silu":
            raise config_lib.UnsupportedConfigError(f"{source}: act_fn={self.act_fn!r} is not "
                                                    "supported (only 'silu').")
        for name in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim"):
            v = getattr(self, name)
            if isinstance(v, tuple) and (len(v) != n or not all(isinstance(x, int) for x in v)):
                raise config_lib.UnsupportedConfigError(
                    f"{source}: {name}={list(v)} must be an int or {n} ints.")

    def per_block(self, name) -> Tuple[int, ...]:
        v = getattr(self, name)
        return v if isinstance(v, tuple) else (v,) * len(self.block_out_channels)

    def heads(self) -> Tuple[int, ...]:
        # diffusers' legacy naming: attention_head_dim holds the number of heads.
        v = self.num_attention_heads if self.num_attention_heads is not None else None
        if v is None:
            return self.per_block("attention_head_dim")
        return v if isinstance(v, tuple) else (v,) * len(self.block_out_channels)

    @classmethod
    def from_dict(cls, d, source="unet/config.json"):
        return config_lib.from_dict(cls, d, fixed=UNET_FIXED, source=source)

    def to_dict(self):
        return config_lib.to_dict(self, "UNet2DConditionModel")


# Upstream UNet fields jaxdiff accepts only at these values (the addition_* entries serve
# the ControlNet; UNetConfig has them as fields, which take precedence).
UNET_FIXED = {
    "only_cross_attention": (False,), "dual_cross_attention": (False,),
    "class_embed_type": (None,), "addition_embed_type": (None,), "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default",), "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0, 1), "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,), "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,), "time_cond_proj_dim": (None,), "conv_in_kernel": (3,),
    "conv_out_kernel": (3,), "projection_class_embeddings_input_dim": (None,),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False), "cross_attention_norm": (None,),
    "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,),
    "addition_time_embed_dim": (None,), "addition_embed_type_num_heads": (64,),
    "reverse_transformer_layers_per_block": (None,), "dropout": (0.0, 0),
}


def _maybe_remat(remat: bool):
    """(resnet, transformer) classes; rematerialised (activations recomputed in the
    backward pass instead of stored) when ``remat``. Parameter names are unchanged."""
    if not remat:
        return ResnetBlock2D, Transformer2DModel
    return nn.remat(ResnetBlock2D), nn.remat(Transformer2DModel)


class UNetStage(nn.Module):
    """One down or up block: resnets, optional transformers, optional resampler (shared
    with the ControlNet encoder). ``intra``: a T2I-Adapter residual added to the output of
    the last resnet/transformer pair (before the downsampler), as diffusers'
    ``CrossAttnDownBlock2D(additional_residuals=...)``."""
    out_channels: int
    num_resnets: int
    cross: bool
    heads: int
    transformer_layers: int
    resample: str  # "down" | "up" | ""
    first_layer: int
    cfg: Any  # UNetConfig (hashable, frozen)
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x, temb, context, skips=None, control=None, up_size=None, intra=None,
                 grounding=None):
        cfg, outputs = self.cfg, []
        Res, Tr = _maybe_remat(self.remat)
        skips = None if skips is None else list(skips)
        for j in range(self.num_resnets):
            if skips is not None:
                x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = Res(self.out_channels, cfg.norm_num_groups, cfg.norm_eps,
                    dtype=self.dtype, name=f"resnets_{j}")(x, temb)
            if self.cross:
                x = Tr(
                    self.heads, self.out_channels // self.heads, self.transformer_layers,
                    cfg.norm_num_groups, cfg.use_linear_projection, cfg.upcast_attention,
                    first_layer=self.first_layer + j * self.transformer_layers,
                    dtype=self.dtype, name=f"attentions_{j}")(x, context, control, grounding)
            if intra is not None and j == self.num_resnets - 1:
                x = x + intra
            outputs.append(x)
        if self.resample == "down":
            x = Downsample2D(self.out_channels, dtype=self.dtype, name="downsamplers_0")(x)
            outputs.append(x)
        elif self.resample == "up":
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x, up_size)
        return x, outputs


class UNetMidBlock(nn.Module):
    """``UNetMidBlock2DCrossAttn``: resnet, transformer, resnet (shared with ControlNet)."""
    channels: int
    heads: int
    transformer_layers: int
    first_layer: int
    cfg: Any
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x, temb, context, control=None, grounding=None):
        cfg = self.cfg
        Res, Tr = _maybe_remat(self.remat)
        res = lambda i: Res(self.channels, cfg.norm_num_groups, cfg.norm_eps,
                            dtype=self.dtype, name=f"resnets_{i}")
        x = res(0)(x, temb)
        x = Tr(self.heads, self.channels // self.heads, self.transformer_layers,
                               cfg.norm_num_groups, cfg.use_linear_projection,
                               cfg.upcast_attention, first_layer=self.first_layer,
                               dtype=self.dtype, name="attentions_0")(x, context, control,
                                                                      grounding)
        return res(1)(x, temb)


class UNet2DConditionModel(nn.Module):
    """SD 1.x / 2.x conditional UNet.

    Attributes:
      config: a ``UNetConfig``.
      dtype: compute dtype (params stay float32); bf16 on accelerators.
      remat: rematerialise every resnet and transformer block in the backward pass
        (training memory ~ one block's activations instead of the whole network's). XLA:CPU
        undoes it (its early optimization-barrier expansion lets CSE merge the recomputation
        into the forward) unless compiled with ``compiler_options={"xla_disable_hlo_passes":
        "cse_barrier_expander"}``; XLA:GPU and TPU keep it (bench/README.md "Memory plan").
    """
    config: UNetConfig
    dtype: Any = jnp.float32
    remat: bool = False

    def layer_count(self) -> int:
        """Number of controllable transformer blocks (controller ``layer`` indices)."""
        return sum(s["transformer_layers"] * s["num_resnets"] for s in self.plan() if s["cross"])

    def plan(self):
        """Static description of every stage, in forward order: down..., mid, up..."""
        cfg, n = self.config, len(self.config.block_out_channels)
        boc, heads = cfg.block_out_channels, cfg.heads()
        lpb, tlpb = cfg.per_block("layers_per_block"), cfg.per_block("transformer_layers_per_block")
        plan, layer = [], 0
        for i, kind in enumerate(cfg.down_block_types):
            cross = kind == "CrossAttnDownBlock2D"
            plan.append(dict(name=f"down_blocks_{i}", out_channels=boc[i], num_resnets=lpb[i],
                             cross=cross, heads=heads[i], transformer_layers=tlpb[i],
                             resample="down" if i < n - 1 else "", first_layer=layer))
            layer += lpb[i] * tlpb[i] if cross else 0
        plan.append(dict(name="mid_block", out_channels=boc[-1], num_resnets=1, cross=True,
                         heads=heads[-1], transformer_layers=tlpb[-1], resample="mid",
                         first_layer=layer))
        layer += tlpb[-1]
        r_heads, r_lpb, r_tlpb, r_boc = heads[::-1], lpb[::-1], tlpb[::-1], boc[::-1]
        for i, kind in enumerate(cfg.up_block_types):
            cross = kind == "CrossAttnUpBlock2D"
            plan.append(dict(name=f"up_blocks_{i}", out_channels=r_boc[i],
                             num_resnets=r_lpb[i] + 1, cross=cross, heads=r_heads[i],
                             transformer_layers=r_tlpb[i],
                             resample="up" if i < n - 1 else "", first_layer=layer))
            layer += (r_lpb[i] + 1) * r_tlpb[i] if cross else 0
        return plan

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, control=None,
                 down_block_additional_residuals=None, mid_block_additional_residual=None,
                 down_intrablock_additional_residuals=None, added_cond_kwargs=None,
                 gligen=None):
        """UNet output [B,h,w,out_channels]; the residual inputs are diffusers'.

        Args:
          added_cond_kwargs: SDXL (``addition_embed_type="text_time"``) only, and required
            there: ``{"text_embeds": [B,P], "time_ids": [B,K]}``; ``P + K *
            addition_time_embed_dim`` must equal ``projection_class_embeddings_input_dim``.
          down_block_additional_residuals: ControlNet residuals, one per skip connection
            (``conv_in`` output, then every resnet/transformer and downsampler output), each
            added to its skip; with ``mid_block_additional_residual`` (added to the mid
            block's output). Broadcastable shapes (e.g. [B,1,1,C]) are allowed.
          down_intrablock_additional_residuals: T2I-Adapter features, one per down block in
            order: added after a cross-attention block's last resnet/transformer pair
            (before its downsampler), or to the output of a block without attention (its
            last skip too, as diffusers' in-place add does); a leftover feature whose shape
            equals the mid block's output is added there (SDXL adapters).
          gligen: GLIGEN grounding (``attention_type`` "gated" / "gated-text-image"
            only): diffusers' ``cross_attention_kwargs["gligen"]`` dict of boxes, masks
            and phrase embeddings (``models.gligen``); None runs the plain UNet. An extra
            key ``"enabled"`` (traced bool scalar) switches the fusers on or off at run
            time (``lax.cond``: off costs nothing; diffusers' ``enable_fuser``).
        """
        cfg = self.config
        sample = sample.astype(self.dtype)
        b = sample.shape[0]
        n_down = len(cfg.block_out_channels) - 1
        if sample.shape[1] % (2 ** n_down) or sample.shape[2] % (2 ** n_down):
            raise ValueError(f"UNet input spatial size {sample.shape[1:3]} must be a multiple "
                             f"of {2 ** n_down}; choose height/width accordingly.")
        t = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
        temb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos,
                                  cfg.freq_shift).astype(self.dtype)
        temb = TimestepEmbedding(cfg.block_out_channels[0] * 4, self.dtype,
                                 name="time_embedding")(temb)
        if cfg.text_time:
            temb = temb + self._text_time_embedding(added_cond_kwargs, b, temb.shape[-1])
        elif added_cond_kwargs is not None:
            raise ValueError("added_cond_kwargs given to a UNet without addition_embed_type="
                             "'text_time' (only SDXL UNets take pooled text and time ids).")
        context = encoder_hidden_states.astype(self.dtype)
        grounding = None
        if gligen is not None:
            if cfg.attention_type not in ATTENTION_TYPES:
                raise ValueError("gligen= given to a UNet without GLIGEN layers (its config "
                                 "has attention_type='default'; load a GLIGEN UNet).")
            gligen = dict(gligen)
            enabled = gligen.pop("enabled", None)
            objs = position_net(cfg.attention_type, cfg.cross_attention_dim, self.dtype)(
                **gligen)
            grounding = (objs, enabled)
        intra = (None if down_intrablock_additional_residuals is None
                 else list(down_intrablock_additional_residuals))

        x = conv3x3(cfg.block_out_channels[0], self.dtype, "conv_in")(sample)
        skips = [x]
        for stage in self.plan():
            kw = {k: v for k, v in stage.items() if k != "name"}
            if stage["resample"] == "mid":
                if down_block_additional_residuals is not None:
                    skips = _add_residuals(skips, down_block_additional_residuals)
                x = UNetMidBlock(stage["out_channels"], stage["heads"], stage["transformer_layers"],
                              stage["first_layer"], cfg, self.dtype, self.remat,
                              name="mid_block")(x, temb, context, control, grounding)
                if intra and intra[0].shape == x.shape:
                    x = x + intra.pop(0).astype(x.dtype)
                if mid_block_additional_residual is not None:
                    x = x + mid_block_additional_residual.astype(x.dtype)
            elif stage["name"].startswith("down"):
                r = intra.pop(0).astype(self.dtype) if intra else None
                x, outs = UNetStage(**kw, cfg=cfg, dtype=self.dtype, remat=self.remat,
                                 name=stage["name"])(x, temb, context, control=control,
                                                     intra=r if stage["cross"] else None,
                                                     grounding=grounding)
                if r is not None and not stage["cross"]:
                    x = x + r
                    outs = outs[:-1] + [x]
                skips.extend(outs)
            else:
                k = stage["num_resnets"]
                mine, skips = skips[-k:], skips[:-k]
                up_size = skips[-1].shape[1:3] if skips else None
                x, _ = UNetStage(**kw, cfg=cfg, dtype=self.dtype, remat=self.remat,
                              name=stage["name"])(x, temb, context, skips=mine,
                                                  control=control, up_size=up_size,
                                                  grounding=grounding)
        x = nn.GroupNorm(cfg.norm_num_groups, epsilon=cfg.norm_eps, dtype=self.dtype,
                         name="conv_norm_out")(x)
        return conv3x3(cfg.out_channels, self.dtype, "conv_out")(nn.silu(x))

    def _text_time_embedding(self, added, b, dim):
        """diffusers' ``get_aug_embed`` for ``text_time``: [text_embeds, sinusoidal time
        ids] through ``add_embedding``."""
        cfg = self.config
        if not added or "text_embeds" not in added or "time_ids" not in added:
            raise ValueError("this SDXL UNet needs added_cond_kwargs={'text_embeds': [B,P], "
                             "'time_ids': [B,K]} (pooled text embedding and size/crop ids).")
        text, ids = jnp.asarray(added["text_embeds"]), jnp.asarray(added["time_ids"])
        text = jnp.broadcast_to(text, (b, text.shape[-1]))
        ids = jnp.broadcast_to(ids, (b, ids.shape[-1]))
        want = cfg.projection_class_embeddings_input_dim
        got = text.shape[-1] + ids.shape[-1] * cfg.addition_time_embed_dim
        if got != want:
            raise ValueError(f"text_embeds width {text.shape[-1]} + {ids.shape[-1]} time ids x "
                             f"{cfg.addition_time_embed_dim} = {got}, but the UNet's "
                             f"projection_class_embeddings_input_dim is {want} (base SDXL takes 6 "
                             "time ids, the refiner 5).")
        t = timestep_embedding(ids.reshape(-1), cfg.addition_time_embed_dim,
                               cfg.flip_sin_to_cos, cfg.freq_shift).reshape(b, -1)
        x = jnp.concatenate([text.astype(jnp.float32), t], axis=-1).astype(self.dtype)
        return TimestepEmbedding(dim, self.dtype, name="add_embedding")(x)


def _add_residuals(skips, residuals):
    residuals = list(residuals)
    if len(residuals) != len(skips):
        raise ValueError(f"down_block_additional_residuals has {len(residuals)} entries; this "
                         f"UNet has {len(skips)} skip connections (ControlNet built for another "
                         "UNet?).")
    return [s + r.astype(s.dtype) for s, r in zip(skips, residuals)]
