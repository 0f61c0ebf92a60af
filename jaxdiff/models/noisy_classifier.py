"""A time-conditioned classifier of noisy latents, for classifier guidance.

The encoder half of a UNet (``conv_in``, the sinusoidal time embedding, per level
``layers_per_block`` time-conditioned resnet blocks and a stride-2 downsampler but at
the last level, one middle resnet block), then GroupNorm-SiLU, global average pooling and
one linear head per attribute (Dhariwal & Nichol 2021, sec. 4.1, with average instead of
attention pooling). Input: the noisy latents x_t [B, h, w, C] the UNet sees and the
timestep t [B]; output: ``{head: logits [B, classes]}``.

Saved as a folder: ``config.json`` (the ``NoisyClassifierConfig`` fields) and
``model.safetensors`` (parameter paths joined by "."), written atomically.

References: Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis", NeurIPS 2021.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxdiff.models.layers import (Downsample2D, ResnetBlock2D, TimestepEmbedding, conv3x3,
                                   timestep_embedding)

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
# The shipped classifier of the embedded model's latents (configs/classifier.py, world v2).
DEFAULT_CLASSIFIER = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets",
                                  "shapes_classifier")


@dataclasses.dataclass(frozen=True)
class NoisyClassifierConfig:
    """Sizes of a ``NoisyClassifier``.

    Attributes:
      in_channels: latent channels.
      block_out_channels: channels per level (one downsampling between levels).
      layers_per_block: resnet blocks per level.
      norm_num_groups: GroupNorm groups (must divide every level's channels).
      heads: ``((name, classes), ...)``, e.g. ``(("colour", 9), ("shape", 5))``.
      labels: ``((name, (class names...)), ...)`` for the heads (documentation and the
        command line; may be empty).
    """
    in_channels: int = 4
    block_out_channels: Tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    heads: Tuple[Tuple[str, int], ...] = (("colour", 9), ("shape", 5))
    labels: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()

    def __post_init__(self):
        if not self.heads or any(n < 2 for _, n in self.heads):
            raise ValueError(f"heads {self.heads}: give at least one head of >= 2 classes.")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"block_out_channels {self.block_out_channels} must be multiples "
                             f"of norm_num_groups={self.norm_num_groups}.")

    @classmethod
    def from_dict(cls, d) -> "NoisyClassifierConfig":
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"classifier config: unknown fields {sorted(unknown)}.")
        d["block_out_channels"] = tuple(d.get("block_out_channels", cls.block_out_channels))
        d["heads"] = tuple((str(n), int(k)) for n, k in d.get("heads", cls.heads))
        d["labels"] = tuple((str(n), tuple(v)) for n, v in d.get("labels", ()))
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class NoisyClassifier(nn.Module):
    """``(x_t [B,h,w,C], t [B] or []) -> {head: logits [B, classes]}`` (module docstring)."""
    config: NoisyClassifierConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, t):
        cfg = self.config
        x = x.astype(self.dtype)
        t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
        width = cfg.block_out_channels[0]
        temb = timestep_embedding(t, width, flip_sin_to_cos=True, downscale_freq_shift=0.0)
        temb = TimestepEmbedding(4 * width, self.dtype, name="time_embedding")(
            temb.astype(self.dtype))
        x = conv3x3(width, self.dtype, "conv_in")(x)
        last = len(cfg.block_out_channels) - 1
        for i, ch in enumerate(cfg.block_out_channels):
            for j in range(cfg.layers_per_block):
                x = ResnetBlock2D(ch, cfg.norm_num_groups, dtype=self.dtype,
                                  name=f"down_{i}_resnet_{j}")(x, temb)
            if i < last:
                x = Downsample2D(ch, dtype=self.dtype, name=f"down_{i}_downsample")(x)
        x = ResnetBlock2D(cfg.block_out_channels[-1], cfg.norm_num_groups, dtype=self.dtype,
                          name="mid_resnet")(x, temb)
        x = nn.GroupNorm(cfg.norm_num_groups, dtype=self.dtype, name="norm_out")(x)
        pooled = jnp.mean(nn.silu(x), axis=(1, 2)).astype(jnp.float32)
        return {name: nn.Dense(n, name=f"head_{name}")(pooled) for name, n in cfg.heads}


def save_classifier(folder: str, config: NoisyClassifierConfig, params) -> str:
    """Writes ``config.json`` + ``model.safetensors`` into ``folder`` atomically."""
    from safetensors.numpy import save_file
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp_classifier_")
    flat = {".".join(k): np.asarray(v, np.float32)
            for k, v in traverse_util.flatten_dict(params).items()}
    save_file(flat, os.path.join(tmp, WEIGHTS_FILE))
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
        json.dump(config.to_dict(), f, indent=2)
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def load_classifier(folder: Optional[str] = None):
    """(``NoisyClassifier``, params) from a folder ``save_classifier`` wrote (None: the
    shipped one, ``DEFAULT_CLASSIFIER``); one-line errors naming the folder for a missing
    or mismatched file."""
    from safetensors.numpy import load_file
    folder = DEFAULT_CLASSIFIER if folder is None else folder
    paths = [os.path.join(folder, f) for f in (CONFIG_FILE, WEIGHTS_FILE)]
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: missing; a noisy-classifier folder holds "
                                    f"{CONFIG_FILE} and {WEIGHTS_FILE} (train/classifier.py).")
    with open(paths[0]) as f:
        config = NoisyClassifierConfig.from_dict(json.load(f))
    model = NoisyClassifier(config)
    flat = load_file(paths[1])
    params = traverse_util.unflatten_dict({tuple(k.split(".")): jnp.asarray(v)
                                           for k, v in flat.items()})
    want = traverse_util.flatten_dict(init_shapes(model))
    got = traverse_util.flatten_dict(params)
    for k in sorted(set(want) | set(got)):
        if k not in got or k not in want or got[k].shape != want[k].shape:
            raise ValueError(f"{paths[1]}: parameter {'.'.join(k)} does not fit "
                             f"{CONFIG_FILE} (missing, unknown or another shape).")
    return model, params


def init_shapes(model: NoisyClassifier):
    """Parameter shapes of ``model`` (``jax.ShapeDtypeStruct`` pytree), without computing."""
    cfg = model.config
    s = 2 ** (len(cfg.block_out_channels) - 1)
    x = jnp.zeros((1, s, s, cfg.in_channels))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x, jnp.zeros((1,))))["params"]
