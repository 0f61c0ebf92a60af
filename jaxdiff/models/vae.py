"""AutoencoderKL (diffusers): encoder -> diagonal Gaussian -> decoder, NHWC.

``apply(v, images, method="encode")`` returns ``(mean, logvar)`` of the *unscaled*
posterior; ``apply(v, latents, method="decode")`` decodes *unscaled* latents. Scaling by
``scaling_factor`` is the pipeline's job, as in diffusers.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models import config as config_lib
from jaxdiff.models.attention import attend
from jaxdiff.models.conv import Conv
from jaxdiff.models.layers import Downsample2D, ResnetBlock2D, Upsample2D, conv3x3


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    sample_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: Tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: Tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: Tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: Any = None
    # float16 pipelines keep this VAE in float32 (its activations overflow float16);
    # False for VAEs fine-tuned to stay in range, e.g. SDXL's "fp16-fix" VAE.
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def validate(self, source="vae config"):
        n = len(self.block_out_channels)
        if list(self.down_block_types) != ["DownEncoderBlock2D"] * n or \
                list(self.up_block_types) != ["UpDecoderBlock2D"] * n:
            raise config_lib.UnsupportedConfigError(
                f"{source}: down/up_block_types must be {n} x DownEncoderBlock2D / "
                "UpDecoderBlock2D.")
        if self.act_fn != "silu":
            raise config_lib.UnsupportedConfigError(f"{source}: act_fn={self.act_fn!r} is not "
                                                    "supported (only 'silu').")

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d, source="vae/config.json"):
        return config_lib.from_dict(cls, d, fixed={"norm_type": ("group",)}, source=source)

    def to_dict(self):
        return config_lib.to_dict(self, "AutoencoderKL")


class VAEAttention(nn.Module):
    """Single-head spatial self-attention with GroupNorm and residual (mid block)."""
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        y = nn.GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="group_norm")(x)
        y = y.reshape(b, h * w, 1, c)
        q, k, v = (nn.Dense(c, dtype=self.dtype, name=n)(y) for n in ("to_q", "to_k", "to_v"))
        # One head of width c (512 in SD) is beyond cuDNN's head sizes, so accelerators keep
        # the einsum; the CPU blocks the queries (see attention._CPU_SCORE_BLOCK_BYTES).
        impl = "blockwise" if jax.default_backend() == "cpu" else "einsum"
        y = attend(q, k, v, scale=c ** -0.5, upcast=False, impl=impl)
        y = nn.Dense(c, dtype=self.dtype, name="to_out_0")(y.reshape(b, h * w, c))
        return x + y.reshape(b, h, w, c)


class _Mid(nn.Module):
    channels: int
    groups: int
    attention: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = ResnetBlock2D(self.channels, self.groups, 1e-6, self.dtype, name="resnets_0")(x)
        if self.attention:
            x = VAEAttention(self.groups, self.dtype, name="attentions_0")(x)
        return ResnetBlock2D(self.channels, self.groups, 1e-6, self.dtype, name="resnets_1")(x)


class _Block(nn.Module):
    out_channels: int
    num_resnets: int
    groups: int
    resample: str  # "down" | "up" | ""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_resnets):
            x = ResnetBlock2D(self.out_channels, self.groups, 1e-6, self.dtype,
                              name=f"resnets_{j}")(x)
        if self.resample == "down":
            x = Downsample2D(self.out_channels, padding=0, dtype=self.dtype,
                             name="downsamplers_0")(x)
        elif self.resample == "up":
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


def _out(x, groups, channels, dtype):
    x = nn.GroupNorm(groups, epsilon=1e-6, dtype=dtype, name="conv_norm_out")(x)
    return conv3x3(channels, dtype, "conv_out")(nn.silu(x))


class Encoder(nn.Module):
    cfg: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, n = self.cfg, len(self.cfg.block_out_channels)
        x = conv3x3(cfg.block_out_channels[0], self.dtype, "conv_in")(x)
        for i, ch in enumerate(cfg.block_out_channels):
            x = _Block(ch, cfg.layers_per_block, cfg.norm_num_groups,
                       "down" if i < n - 1 else "", self.dtype, name=f"down_blocks_{i}")(x)
        x = _Mid(cfg.block_out_channels[-1], cfg.norm_num_groups, cfg.mid_block_add_attention,
                 self.dtype, name="mid_block")(x)
        return _out(x, cfg.norm_num_groups, 2 * cfg.latent_channels, self.dtype)


class Decoder(nn.Module):
    cfg: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        cfg, n = self.cfg, len(self.cfg.block_out_channels)
        x = conv3x3(cfg.block_out_channels[-1], self.dtype, "conv_in")(z)
        x = _Mid(cfg.block_out_channels[-1], cfg.norm_num_groups, cfg.mid_block_add_attention,
                 self.dtype, name="mid_block")(x)
        for i, ch in enumerate(reversed(cfg.block_out_channels)):
            x = _Block(ch, cfg.layers_per_block + 1, cfg.norm_num_groups,
                       "up" if i < n - 1 else "", self.dtype, name=f"up_blocks_{i}")(x)
        return _out(x, cfg.norm_num_groups, cfg.out_channels, self.dtype)


class AutoencoderKL(nn.Module):
    """diffusers ``AutoencoderKL``. Images are NHWC in [-1, 1]."""
    config: VAEConfig
    dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype)
        self.decoder = Decoder(cfg, self.dtype)
        if cfg.use_quant_conv:
            self.quant_conv = Conv(2 * cfg.latent_channels, (1, 1), dtype=self.dtype)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = Conv(cfg.latent_channels, (1, 1), dtype=self.dtype)

    def encode(self, images):
        """images [B,H,W,3] -> (mean, logvar), each [B,H/f,W/f,latent_channels], float32."""
        moments = self.encoder(images.astype(self.dtype))
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents):
        """Unscaled latents [B,h,w,C] -> images [B,H,W,out_channels] (float32)."""
        z = latents.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images, key=None):
        """Reconstruction (posterior mean, or a sample when ``key`` is given)."""
        mean, logvar = self.encode(images)
        z = mean if key is None else sample_posterior(key, mean, logvar)
        return self.decode(z)


def sample_posterior(key, mean, logvar):
    """Draws from the diagonal Gaussian posterior ``N(mean, exp(logvar))``."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
