"""Pure-functional flax.linen networks of a Stable Diffusion pipeline (NHWC)."""
from jaxdiff.models.clip_text import CLIPTextConfig, CLIPTextModel
from jaxdiff.models.config import UnsupportedConfigError
from jaxdiff.models.unet import UNet2DConditionModel, UNetConfig
from jaxdiff.models.vae import AutoencoderKL, VAEConfig

__all__ = ["CLIPTextConfig", "CLIPTextModel", "UNetConfig", "UNet2DConditionModel",
           "VAEConfig", "AutoencoderKL", "UnsupportedConfigError"]
