"""T2I-Adapter (Mou et al. 2023; diffusers ``T2IAdapter``), NHWC, flax.linen.

A small convolutional network that maps a condition image to one feature map per UNet
down block; the UNet adds them inside its encoder (``down_intrablock_additional_residuals``).
``apply({"params": p}, images [B, H, W, in_channels] in [0, 1], scale)`` -> list of
features. Adapter kinds (``adapter_type``): ``full_adapter``, ``full_adapter_xl`` and
``light_adapter``. Parameter names are diffusers' (``adapter.body.0.resnets.1.block1``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Tuple

import flax.linen as nn
import jax.numpy as jnp

from jaxdiff.models import config as config_lib
from jaxdiff.models.conv import Conv

ADAPTER_TYPES = ("full_adapter", "full_adapter_xl", "light_adapter")


@dataclasses.dataclass(frozen=True)
class T2IAdapterConfig:
    in_channels: int = 3
    channels: Tuple[int, ...] = (320, 640, 1280, 1280)
    num_res_blocks: int = 2
    downscale_factor: int = 8
    adapter_type: str = "full_adapter"

    def validate(self, source="adapter config"):
        if self.adapter_type not in ADAPTER_TYPES:
            raise config_lib.UnsupportedConfigError(
                f"{source}: adapter_type={self.adapter_type!r} is not supported; choose one of "
                f"{list(ADAPTER_TYPES)}.")

    @property
    def total_downscale_factor(self) -> int:
        """Image pixels per feature pixel of the deepest feature map."""
        n = len(self.channels)
        if self.adapter_type == "full_adapter":
            return self.downscale_factor * 2 ** (n - 1)
        if self.adapter_type == "full_adapter_xl":
            return self.downscale_factor * 2
        return self.downscale_factor * 2 ** n

    def check_matches(self, unet_cfg, vae_factor: int, source="adapter config") -> None:
        """One-line ValueError unless the features fit a UNet with ``unet_cfg`` behind a
        VAE of factor ``vae_factor`` (SD 1.x / 2.x adapters: one feature per down block)."""
        boc = tuple(unet_cfg.block_out_channels)
        feats = self.feature_channels()
        if self.adapter_type == "full_adapter_xl" or feats != boc:
            raise ValueError(f"{source}: the adapter's features have channels {list(feats)} "
                             f"but the base UNet's down blocks have {list(boc)}; use an "
                             "adapter trained for this base model.")
        if self.downscale_factor != vae_factor:
            raise ValueError(f"{source}: downscale_factor={self.downscale_factor} but the base "
                             f"model's VAE factor is {vae_factor}; use an adapter trained for "
                             "this base model.")

    def feature_channels(self) -> Tuple[int, ...]:
        if self.adapter_type == "light_adapter":
            return tuple(self.channels) + (self.channels[-1],)
        return tuple(self.channels)

    @classmethod
    def from_dict(cls, d, source="adapter/config.json"):
        return config_lib.from_dict(cls, d, source=source)

    def to_dict(self):
        return config_lib.to_dict(self, "T2IAdapter")


def pixel_unshuffle(x, r: int):
    """torch ``PixelUnshuffle(r)`` in NHWC: [B, H, W, C] -> [B, H/r, W/r, C*r*r], channel
    index ``c*r*r + i*r + j`` for the pixel at row offset i, column offset j."""
    b, h, w, c = x.shape
    if h % r or w % r:
        raise ValueError(f"adapter input {h}x{w} is not divisible by its downscale factor {r}.")
    x = x.reshape(b, h // r, r, w // r, r, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, h // r, w // r, c * r * r)


def avg_pool_2x2_ceil(x):
    """torch ``AvgPool2d(2, 2, ceil_mode=True)``: edge windows average only their pixels."""
    b, h, w, c = x.shape
    ph, pw = h % 2, w % 2
    if ph or pw:
        x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
        ones = jnp.pad(jnp.ones((1, h, w, 1), x.dtype), ((0, 0), (0, ph), (0, pw), (0, 0)))
        count = ones.reshape(1, (h + ph) // 2, 2, (w + pw) // 2, 2, 1).sum(axis=(2, 4))
    else:
        count = 4.0
    s = x.reshape(b, (h + ph) // 2, 2, (w + pw) // 2, 2, c).sum(axis=(2, 4))
    return s / count


def _conv(features, k, dtype, name):
    p = k // 2
    return Conv(features, (k, k), padding=((p, p), (p, p)), dtype=dtype, name=name)


class _ResBlock(nn.Module):
    """``h = block2(relu(block1(x))) + x``; block2 is 1x1 (full) or 3x3 (light)."""
    channels: int
    k2: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.relu(_conv(self.channels, 3, self.dtype, "block1")(x))
        return _conv(self.channels, self.k2, self.dtype, "block2")(h) + x


class _AdapterBlock(nn.Module):
    """Full adapter block: [avg-pool], [1x1 in_conv], resnets."""
    in_channels: int
    out_channels: int
    num_res_blocks: int
    down: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.down:
            x = avg_pool_2x2_ceil(x)
        if self.in_channels != self.out_channels:
            x = _conv(self.out_channels, 1, self.dtype, "in_conv")(x)
        for i in range(self.num_res_blocks):
            x = _ResBlock(self.out_channels, 1, self.dtype, name=f"resnets_{i}")(x)
        return x


class _LightBlock(nn.Module):
    """Light adapter block: [avg-pool], 1x1 in_conv to out/4, resnets, 1x1 out_conv."""
    out_channels: int
    num_res_blocks: int
    down: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.down:
            x = avg_pool_2x2_ceil(x)
        mid = self.out_channels // 4
        x = _conv(mid, 1, self.dtype, "in_conv")(x)
        for i in range(self.num_res_blocks):
            x = _ResBlock(mid, 3, self.dtype, name=f"resnets_{i}")(x)
        return _conv(self.out_channels, 1, self.dtype, "out_conv")(x)


class _Body(nn.Module):
    config: T2IAdapterConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, ch, n = self.config, self.config.channels, self.config.num_res_blocks
        x = pixel_unshuffle(x, cfg.downscale_factor)
        if cfg.adapter_type == "light_adapter":
            blocks = [_LightBlock(ch[0], n, False, self.dtype, name="body_0")]
            blocks += [_LightBlock(ch[i + 1], n, True, self.dtype, name=f"body_{i + 1}")
                       for i in range(len(ch) - 1)]
            blocks.append(_LightBlock(ch[-1], n, True, self.dtype, name=f"body_{len(ch)}"))
        else:
            x = _conv(ch[0], 3, self.dtype, "conv_in")(x)
            if cfg.adapter_type == "full_adapter":
                specs = [(ch[0], ch[0], False)] + [(ch[i - 1], ch[i], True)
                                                    for i in range(1, len(ch))]
            else:  # full_adapter_xl
                specs = [(ch[i - 1], ch[i], i == 2) if i in (1, 2) else (ch[i], ch[i], False)
                         for i in range(len(ch))]
            blocks = [_AdapterBlock(a, b, n, d, self.dtype, name=f"body_{i}")
                      for i, (a, b, d) in enumerate(specs)]
        features = []
        for block in blocks:
            x = block(x)
            features.append(x)
        return features


class T2IAdapter(nn.Module):
    """diffusers ``T2IAdapter``.

    Attributes:
      config: a ``T2IAdapterConfig``.
      dtype: compute dtype (params stay float32).
    """
    config: T2IAdapterConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, adapter_conditioning_scale=1.0):
        """images [B, H, W, in_channels] (NHWC, [0, 1] as diffusers' pipelines prepare
        them) -> list of features, each times the traced scale (scalar or per-image [B])."""
        feats = _Body(self.config, self.dtype, name="adapter")(
            jnp.asarray(images).astype(self.dtype))
        scale = jnp.asarray(adapter_conditioning_scale, jnp.float32)
        scale = scale.reshape((-1, 1, 1, 1)) if scale.ndim == 1 else scale
        return [f * scale.astype(f.dtype) for f in feats]


def adapter_dummy_inputs(module: T2IAdapter):
    """Smallest valid input for ``module.init``."""
    s = module.config.total_downscale_factor
    return (jnp.zeros((1, s, s, module.config.in_channels)),)
