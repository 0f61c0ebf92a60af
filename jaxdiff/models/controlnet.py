"""ControlNet (Zhang et al. 2023; diffusers ``ControlNetModel``), NHWC, flax.linen.

A trainable copy of the UNet encoder (``conv_in``, time embedding, down blocks, mid
block: the UNet's own ``UNetStage`` / ``UNetMidBlock``), fed the noisy latents plus an
embedded condition image, whose every skip and mid output leaves through a zero-initialised
1x1 convolution. ``apply({"params": p}, sample, t, context, cond, conditioning_scale)``
returns ``(down_residuals, mid_residual)``: exactly the UNet's
``down_block_additional_residuals`` / ``mid_block_additional_residual``. Config fields are
named as in diffusers' ``controlnet/config.json``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Tuple, Union

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxdiff.models import config as config_lib
from jaxdiff.models.conv import Conv
from jaxdiff.models.layers import TimestepEmbedding, conv3x3, timestep_embedding
from jaxdiff.models.unet import (UNET_FIXED, UNet2DConditionModel, UNetConfig, UNetMidBlock,
                                 UNetStage)

# Fields a ControlNet shares with the UNet it controls (same names, same meaning).
_SHARED = ("in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "mid_block_type",
           "block_out_channels", "layers_per_block", "act_fn", "norm_num_groups", "norm_eps",
           "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim",
           "num_attention_heads", "use_linear_projection", "upcast_attention")


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    in_channels: int = 4
    conditioning_channels: int = 3
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: Tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: Union[int, Tuple[int, ...]] = 1
    attention_head_dim: Union[int, Tuple[int, ...]] = 8
    num_attention_heads: Any = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: Tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False

    def unet_config(self) -> UNetConfig:
        """The UNet config whose encoder this ControlNet copies (up blocks mirrored)."""
        ups = tuple("CrossAttnUpBlock2D" if t == "CrossAttnDownBlock2D" else "UpBlock2D"
                    for t in reversed(self.down_block_types))
        return UNetConfig(up_block_types=ups, out_channels=self.in_channels,
                          **{k: getattr(self, k) for k in _SHARED})

    def validate(self, source="controlnet config"):
        if not isinstance(self.layers_per_block, int):
            raise config_lib.UnsupportedConfigError(
                f"{source}: layers_per_block={self.layers_per_block!r} must be an int for a "
                "ControlNet.")
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise config_lib.UnsupportedConfigError(
                f"{source}: controlnet_conditioning_channel_order="
                f"{self.controlnet_conditioning_channel_order!r} must be 'rgb' or 'bgr'.")
        self.unet_config().validate(source)

    @property
    def condition_factor(self) -> int:
        """Condition-image pixels per latent pixel (the conditioning embedding's stride)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    def check_matches(self, unet_cfg: UNetConfig, vae_factor=None,
                      source="controlnet config") -> None:
        """One-line ValueError unless this ControlNet's residuals fit ``unet_cfg`` (and its
        condition embedding the VAE factor ``vae_factor``, when given)."""
        if vae_factor is not None and self.condition_factor != vae_factor:
            raise ValueError(
                f"{source}: conditioning_embedding_out_channels="
                f"{_show(self.conditioning_embedding_out_channels)} downsample condition images "
                f"{self.condition_factor}x but the base model's VAE factor is {vae_factor}; use "
                "a ControlNet trained for this base model.")
        for name in ("in_channels", "cross_attention_dim", "block_out_channels",
                     "down_block_types"):
            mine, theirs = getattr(self, name), getattr(unet_cfg, name)
            if mine != theirs:
                raise ValueError(
                    f"{source}: {name}={_show(mine)} but the base UNet has {name}="
                    f"{_show(theirs)}; use a ControlNet trained for this base model.")
        lpb = unet_cfg.per_block("layers_per_block")
        if lpb != (self.layers_per_block,) * len(lpb):
            raise ValueError(f"{source}: layers_per_block={self.layers_per_block} but the base "
                             f"UNet has layers_per_block={_show(unet_cfg.layers_per_block)}; use a "
                             "ControlNet trained "
                             "for this base model.")

    @classmethod
    def from_dict(cls, d, source="controlnet/config.json"):
        return config_lib.from_dict(cls, d, fixed=CONTROLNET_FIXED, source=source)

    def to_dict(self):
        return config_lib.to_dict(self, "ControlNetModel")


CONTROLNET_FIXED = {k: v for k, v in UNET_FIXED.items()
                    if k in ("only_cross_attention", "encoder_hid_dim", "encoder_hid_dim_type",
                             "class_embed_type", "addition_embed_type",
                             "addition_time_embed_dim", "num_class_embeds",
                             "resnet_time_scale_shift",
                             "projection_class_embeddings_input_dim",
                             "addition_embed_type_num_heads")}


def _show(v):
    return list(v) if isinstance(v, tuple) else v


def guess_mode_scales(n: int) -> np.ndarray:
    """diffusers' guess-mode weights: ``logspace(-1, 0, n)`` (float32), 0.1 .. 1, for the
    ``n - 1`` down residuals then the mid residual."""
    return np.logspace(-1, 0, n, dtype=np.float64).astype(np.float32)


class ControlNetConditioningEmbedding(nn.Module):
    """conv_in -> SiLU -> (conv, SiLU, stride-2 conv, SiLU) x ... -> zero conv_out."""
    out_channels: int
    block_out_channels: Tuple[int, ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, cond):
        boc = self.block_out_channels
        x = nn.silu(conv3x3(boc[0], self.dtype, "conv_in")(cond))
        for i in range(len(boc) - 1):
            x = nn.silu(conv3x3(boc[i], self.dtype, f"blocks_{2 * i}")(x))
            x = nn.silu(conv3x3(boc[i + 1], self.dtype, f"blocks_{2 * i + 1}", stride=2)(x))
        return conv3x3(self.out_channels, self.dtype, "conv_out")(x)


class ControlNetModel(nn.Module):
    """diffusers ``ControlNetModel`` (SD 1.x / 2.x).

    Attributes:
      config: a ``ControlNetConfig``.
      dtype: compute dtype (params stay float32).
    """
    config: ControlNetConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, controlnet_cond,
                 conditioning_scale=1.0, guess_mode: bool = False):
        """Residuals for the UNet.

        Args:
          sample: noisy latents [B, h, w, C].
          timesteps: [B] or scalar.
          encoder_hidden_states: [B, L, D].
          controlnet_cond: condition images [B, 8h, 8w, conditioning_channels] (NHWC,
            in [0, 1] as diffusers' pipelines prepare them).
          conditioning_scale: traced scalar or per-image [B] weight of the residuals.
          guess_mode: static; residuals weighted 0.1 .. 1 from shallow to deep.
        Returns:
          (tuple of down residuals, mid residual), NHWC.
        """
        cfg = self.config
        ucfg = cfg.unet_config()
        plan = UNet2DConditionModel(ucfg).plan()
        x = sample.astype(self.dtype)
        b = x.shape[0]
        t = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
        temb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos,
                                  cfg.freq_shift).astype(self.dtype)
        temb = TimestepEmbedding(cfg.block_out_channels[0] * 4, self.dtype,
                                 name="time_embedding")(temb)
        context = encoder_hidden_states.astype(self.dtype)
        cond = jnp.asarray(controlnet_cond).astype(self.dtype)
        if cfg.controlnet_conditioning_channel_order == "bgr":
            cond = cond[..., ::-1]
        x = conv3x3(cfg.block_out_channels[0], self.dtype, "conv_in")(x)
        emb = ControlNetConditioningEmbedding(
            cfg.block_out_channels[0], cfg.conditioning_embedding_out_channels, self.dtype,
            name="controlnet_cond_embedding")(cond)
        if emb.shape != x.shape:
            raise ValueError(f"controlnet_cond of shape {cond.shape} embeds to {emb.shape[1:3]}"
                             f" but the latents are {x.shape[1:3]}: the condition image must "
                             "be the generated image's size.")
        x = x + emb
        skips = [x]
        for stage in plan:
            if stage["resample"] == "mid":
                x = UNetMidBlock(stage["out_channels"], stage["heads"],
                                 stage["transformer_layers"], stage["first_layer"], ucfg,
                                 self.dtype, name="mid_block")(x, temb, context)
                break
            kw = {k: v for k, v in stage.items() if k != "name"}
            x, outs = UNetStage(**kw, cfg=ucfg, dtype=self.dtype, name=stage["name"])(
                x, temb, context)
            skips.extend(outs)
        down = [Conv(s.shape[-1], (1, 1), dtype=self.dtype,
                        name=f"controlnet_down_blocks_{i}")(s) for i, s in enumerate(skips)]
        mid = Conv(x.shape[-1], (1, 1), dtype=self.dtype, name="controlnet_mid_block")(x)
        scale = jnp.asarray(conditioning_scale, jnp.float32)
        scale = scale.reshape((-1, 1, 1, 1)) if scale.ndim == 1 else scale
        if guess_mode and not cfg.global_pool_conditions:
            w = guess_mode_scales(len(down) + 1)
            down = [d * (scale * w[i]).astype(d.dtype) for i, d in enumerate(down)]
            mid = mid * (scale * w[-1]).astype(mid.dtype)
        else:
            down = [d * scale.astype(d.dtype) for d in down]
            mid = mid * scale.astype(mid.dtype)
        if cfg.global_pool_conditions:
            down = [jnp.mean(d, axis=(1, 2), keepdims=True) for d in down]
            mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
        return tuple(down), mid


def controlnet_dummy_inputs(module: ControlNetModel):
    """Smallest valid inputs for ``module.init``."""
    cfg = module.config
    s, f = 2 ** (len(cfg.block_out_channels) - 1), cfg.condition_factor
    return (jnp.zeros((1, s, s, cfg.in_channels)), jnp.zeros((1,)),
            jnp.zeros((1, 1, cfg.cross_attention_dim)),
            jnp.zeros((1, s * f, s * f, cfg.conditioning_channels)))

