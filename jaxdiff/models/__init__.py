"""Pure-functional flax.linen networks of a Stable Diffusion pipeline (NHWC)."""
from jaxdiff.models.clip_text import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                                     CLIPTextProjectionConfig)
from jaxdiff.models.config import UnsupportedConfigError
from jaxdiff.models.unet import UNet2DConditionModel, UNetConfig
from jaxdiff.models.vae import AutoencoderKL, VAEConfig

__all__ = ["CLIPTextConfig", "CLIPTextModel", "CLIPTextModelWithProjection",
           "CLIPTextProjectionConfig", "UNetConfig", "UNet2DConditionModel",
           "VAEConfig", "AutoencoderKL", "UnsupportedConfigError"]
