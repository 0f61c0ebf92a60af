"""The Pipeline bundle: modules + configs + tokenizer, and the pure encode/decode functions.

The denoiser is called through ``jaxdiff.denoiser.denoise`` (the one denoiser interface).

A ``Pipeline`` holds no parameters. Every method that computes takes the params pytree
``{"text_encoder": ..., "unet": ..., "vae": ...}`` (SDXL: also ``"text_encoder_2"``; the
refiner has no ``"text_encoder"``) explicitly (docs/design.md, "Parameters are one pytree").
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.denoiser import caption_attention_mask, is_transformer_backbone
from jaxdiff.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel
from jaxdiff.models.dit import DiTConfig, dit_dummy_inputs
from jaxdiff.models.gligen import ATTENTION_TYPES, dummy_gligen
from jaxdiff.models.pixart import PixArtConfig, pixart_dummy_inputs
from jaxdiff.models.uvit import UViTConfig, uvit_dummy_inputs
from jaxdiff.models.vae import sample_posterior


# SDXL micro-conditioning: diffusers' StableDiffusionXL(Img2Img)Pipeline argument names
# (sizes and crops as (height, width) / (top, left) pixels; scores: the refiner's).
MICRO_CONDITIONING = ("original_size", "crops_coords_top_left", "target_size",
                      "negative_original_size", "negative_crops_coords_top_left",
                      "negative_target_size", "aesthetic_score", "negative_aesthetic_score")


@dataclasses.dataclass(frozen=True, eq=False)
class Pipeline:
    """Stable-Diffusion-style text-to-image pipeline (modules only, no weights).

    Attributes:
      unet: the denoiser (backbone): a ``UNet2DConditionModel``, or a text-conditioned
        ``PixArtTransformer2DModel`` (``is_transformer``); every algorithm calls it through
        ``denoiser.denoise`` and its params sit under ``"unet"`` either way.
      vae, text_encoder: flax modules (their ``config`` fields are upstream's).
      tokenizer: a transformers ``CLIPTokenizer`` loaded from the checkpoint.
      text_encoder_2, tokenizer_2, force_zeros_for_empty_prompt, requires_aesthetics_score:
        SDXL only (see below); ``is_sdxl`` is true when ``text_encoder_2`` is set.
      scheduler: a ``jaxdiff.schedules.SchedulerConfig``.
      scheduler_class: the diffusers scheduler class named in the checkpoint.
      caption_mask: PixArt text DiT only (``uses_caption_mask``): its cross-attention
        reads the prompt's tokens only (BOS .. first EOS, the tokenizer's attention mask),
        as diffusers' ``PixArtAlphaPipeline`` passes ``encoder_attention_mask``. False:
        every token (a model trained that way, e.g. ``embedded:dit``; saved as
        ``"_caption_mask": false`` in model_index.json, which diffusers ignores).
    """
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: Optional[CLIPTextModel]
    tokenizer: Any
    scheduler: Any
    scheduler_class: str = "DDIMScheduler"
    # SDXL: the second encoder (CLIPTextModelWithProjection) and its tokenizer; the
    # refiner has only these (text_encoder / tokenizer None). force_zeros_for_empty_prompt:
    # no negative prompt means zero negative embeddings (diffusers' SDXL pipeline config).
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    force_zeros_for_empty_prompt: bool = False
    requires_aesthetics_score: bool = False
    caption_mask: bool = True

    @property
    def is_sdxl(self) -> bool:
        """Two-encoder pipeline whose UNet takes pooled text and time ids (SDXL)."""
        return self.text_encoder_2 is not None

    def _encoders(self):
        """(text encoder, tokenizer) pairs present, in SDXL's concatenation order."""
        pairs = ((self.text_encoder, self.tokenizer), (self.text_encoder_2, self.tokenizer_2))
        return tuple(p for p in pairs if p[0] is not None)

    @property
    def is_transformer(self) -> bool:
        """The denoiser is a text DiT (``PixArtTransformer2DModel``), not the U-Net (told by
        its config, so wrappers such as the web app's progress counter keep it)."""
        return is_transformer_backbone(self.unet)

    @property
    def uses_caption_mask(self) -> bool:
        """A PixArt text DiT with ``caption_mask``: its condition is ``{"context": [B, L, D],
        "mask": [B, L]}`` (``encode_text``)."""
        return isinstance(self.unet.config, PixArtConfig) and self.caption_mask

    @property
    def micro_conditions(self) -> bool:
        """A PixArt text DiT whose config uses micro-conditions (``use_additional_conditions``,
        PixArt-alpha 1024): ``add_time_ids`` adds the image's resolution and aspect ratio."""
        return isinstance(self.unet.config, PixArtConfig) and self.unet.config.micro_conditions

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.downscale

    @property
    def image_size(self) -> int:
        """The model's native image side in pixels (UNet sample size x VAE factor)."""
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (VAE factor x UNet downsampling, or x the
        transformer's patch size)."""
        if self.is_transformer:
            return self.vae_scale_factor * self.unet.config.patch_size
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def check_size(self, height: int, width: int) -> None:
        """Raises a one-line ValueError unless (height, width) is valid for this model."""
        mult = self.size_multiple
        for name, v in (("height", height), ("width", width)):
            if v <= 0 or v % mult:
                raise ValueError(f"{name}={v} must be a positive multiple of {mult} for this "
                                 "model (VAE factor x UNet downsampling or patch size).")

    def latent_shape(self, height: int, width: int) -> tuple:
        """(h, w, C) of the latents of a height x width image (C: the VAE's latent channels,
        which an InstructPix2Pix UNet takes twice)."""
        f = self.vae_scale_factor
        return (height // f, width // f, self.vae.config.latent_channels)

    @property
    def is_instruct(self) -> bool:
        """InstructPix2Pix pipeline: the UNet takes the noisy latents and the source image's
        latents concatenated along channels (``in_channels`` = 2 x the VAE's latent
        channels); saved as diffusers' ``StableDiffusionInstructPix2PixPipeline``."""
        return self.unet.config.in_channels == 2 * self.vae.config.latent_channels

    @property
    def max_length(self) -> int:
        lengths = {int(min(tok.model_max_length, enc.config.max_position_embeddings))
                   for enc, tok in self._encoders()}
        if len(lengths) != 1:
            raise ValueError(f"the two text encoders take {sorted(lengths)} tokens; jaxdiff "
                             "needs one length (set both tokenizers' model_max_length).")
        return lengths.pop()

    def with_dtype(self, dtype) -> "Pipeline":
        """The same pipeline computing in ``dtype`` (params stay as they are). As diffusers'
        SDXL pipelines, float16 leaves a VAE whose config has ``force_upcast`` in float32."""
        clone = lambda m: None if m is None else m.clone(dtype=dtype)
        upcast = jnp.dtype(dtype) == jnp.float16 and self.vae.config.force_upcast
        return dataclasses.replace(
            self, unet=self.unet.clone(dtype=dtype),
            vae=self.vae.clone(dtype=jnp.float32 if upcast else dtype),
            text_encoder=clone(self.text_encoder), text_encoder_2=clone(self.text_encoder_2))

    def tokenize(self, prompts: Sequence[str], warn: bool = True) -> np.ndarray:
        """Prompts -> int32 [B, L] ids, padded/truncated to the model's max length; SDXL:
        [B, E, L], one row per text encoder (E = 2, the refiner's 1).

        Over-long prompts are truncated with a warning, as diffusers does.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        rows = [self._tokenize(tok, list(prompts), warn and i == 0)
                for i, (_, tok) in enumerate(self._encoders())]
        return np.stack(rows, axis=1) if self.is_sdxl else rows[0]

    def _tokenize(self, tokenizer, prompts, warn):
        ids = tokenizer(prompts, padding="max_length", max_length=self.max_length,
                        truncation=True, return_tensors="np").input_ids
        if warn:
            full = tokenizer(prompts, padding="longest", return_tensors="np").input_ids
            if full.shape[1] > self.max_length:
                dropped = tokenizer.batch_decode(full[:, self.max_length - 1:-1])
                warnings.warn("The following part of your input was truncated because the "
                              f"text encoder can only handle {self.max_length} tokens: "
                              f"{[d for d in dropped if d.strip()]}")
        return ids.astype(np.int32)

    @property
    def encoder_names(self) -> tuple:
        """The params keys of the text encoders present, in ``tokenize``'s row order."""
        return tuple(n for n in ("text_encoder", "text_encoder_2") if getattr(self, n) is not None)

    def encode_text(self, params, ids, embeddings=None):
        """ids [B, L] -> last hidden state [B, L, D] (float32).

        SDXL: ids [B, E, L] -> ``{"context": [B, L, D1 + D2], "text_embeds": [B, P]}``:
        every encoder's penultimate hidden state concatenated along features and the
        second encoder's pooled, projected output (as diffusers' ``encode_prompt``).
        ``embeddings``: token embeddings used in place of the table look-up (Textual
        Inversion training): [B, L, D]; SDXL: ``{encoder name: [B, L, D]}``."""
        if not self.is_sdxl:
            hidden = self.text_encoder.apply({"params": params["text_encoder"]},
                                             jnp.asarray(ids), embeddings=embeddings)
            if not self.uses_caption_mask:
                return hidden
            return {"context": hidden,
                    "mask": caption_attention_mask(ids, self.tokenizer.eos_token_id)}
        ids, hidden = jnp.asarray(ids), []
        for i, ((enc, _), name) in enumerate(zip(self._encoders(), self.encoder_names)):
            out = enc.apply({"params": params[name]}, ids[:, i], output_hidden_states=True,
                            embeddings=(embeddings or {}).get(name))
            hidden.append(out[-1][-2])
        return {"context": jnp.concatenate(hidden, axis=-1), "text_embeds": out[0]}

    def time_ids(self, height: int, width: int, negative: bool = False) -> np.ndarray:
        """SDXL micro-conditioning as diffusers computes it by default: original size =
        target size = (height, width), crop (0, 0); the refiner's aesthetic score (6, and
        2.5 for the ``negative`` half) in place of the target size. float32 [K]."""
        score = 2.5 if negative else 6.0
        tail = (score,) if self.requires_aesthetics_score else (height, width)
        return np.asarray((height, width, 0, 0) + tail, np.float32)

    def time_id_pair(self, height: int, width: int, img2img: bool = False, **micro):
        """SDXL's (positive, negative) time ids float32 [2, K] with micro-conditioning
        ``micro`` (``MICRO_CONDITIONING``'s names, diffusers' ``__call__`` arguments; None
        = default), as diffusers' ``_get_add_time_ids``: original / target size default to
        (height, width), crops to (0, 0), aesthetic scores to 6 / 2.5. ``img2img`` False
        (``StableDiffusionXLPipeline``): the negative half is the positive one unless
        ``negative_original_size`` and ``negative_target_size`` are both given; True
        (``StableDiffusionXLImg2ImgPipeline``, the refiner's hand-off): negative sizes
        default to the positive ones, and a non-aesthetic model's negative half keeps the
        positive crop. A value diffusers would ignore, or any for a pipeline without time
        ids, is a one-line ValueError. Non-SDXL pipelines without ``micro``: None."""
        given = {k: v for k, v in micro.items() if v is not None}
        for k in sorted(set(micro) - set(MICRO_CONDITIONING)):
            raise TypeError(f"unknown micro-conditioning argument {k!r}; choose from "
                            f"{MICRO_CONDITIONING}.")
        if not self.is_sdxl:
            for k in sorted(given):
                raise ValueError(f"{k} is SDXL micro-conditioning (time ids); this pipeline "
                                 "has none (SD 1.x/2.x or text DiT): leave it out.")
            return None
        aesthetic = self.requires_aesthetics_score
        img2img = img2img or aesthetic  # the refiner's one diffusers pipeline
        unused = [k for k in given if ("target" if aesthetic else "aesthetic") in k]
        if not img2img and not ({"negative_original_size", "negative_target_size"} <= set(given)):
            unused += [k for k in given if k.startswith("negative_")]
        if img2img and not aesthetic:
            unused += [k for k in given if k == "negative_crops_coords_top_left"]
        for k in sorted(set(unused)):
            why = ("this model's time ids end with an aesthetic score, not a target size"
                   if aesthetic and "target" in k else "only a refiner "
                   "(requires_aesthetics_score) takes aesthetic scores" if "aesthetic" in k
                   else "a base model continuing latents keeps the positive crop (as "
                   "diffusers' img2img pipeline)" if img2img else "diffusers' base pipeline "
                   "uses negative micro-conditioning only given both negative_original_size "
                   "and negative_target_size")
            raise ValueError(f"{k}={given[k]}: {why}.")

        def pair(name, default):
            v = tuple(float(x) for x in np.ravel(given.get(name, default)))
            if len(v) != len(default):
                raise ValueError(f"{name}={given[name]} must be {len(default)} number(s).")
            return v
        size = (height, width)
        orig, crop = pair("original_size", size), pair("crops_coords_top_left", (0, 0))
        tail = pair("aesthetic_score", (6.0,)) if aesthetic else pair("target_size", size)
        if img2img or "negative_original_size" in given:
            neg_orig = pair("negative_original_size", orig)
            neg_crop = (crop if img2img and not aesthetic
                        else pair("negative_crops_coords_top_left", (0, 0)))
            neg_tail = (pair("negative_aesthetic_score", (2.5,)) if aesthetic
                        else pair("negative_target_size", tail))
        else:
            neg_orig, neg_crop, neg_tail = orig, crop, tail
        return np.asarray([orig + crop + tail, neg_orig + neg_crop + neg_tail], np.float32)

    def add_time_ids(self, cond, height: int, width: int, negative: bool = False, ids=None):
        """``cond`` with SDXL's ``time_ids`` [B, K] for a height x width image (the
        ``negative`` half: the refiner's lower aesthetic score), or ``ids`` [K] given
        (``time_id_pair``'s rows, traced); a micro-conditioned text DiT: with
        ``"resolution"`` [B, 2] = (height, width) and ``"aspect_ratio"`` [B, 1] = height /
        width in pixels, as ``PixArtAlphaPipeline``; other pipelines: ``cond``."""
        if self.micro_conditions:
            cond = dict(cond) if isinstance(cond, dict) else {"context": cond}
            b = cond["context"].shape[0]
            return dict(cond, resolution=jnp.broadcast_to(
                jnp.asarray([height, width], jnp.float32), (b, 2)),
                aspect_ratio=jnp.full((b, 1), height / width, jnp.float32))
        if not self.is_sdxl:
            return cond
        ids = jnp.asarray(self.time_ids(height, width, negative) if ids is None else ids,
                          jnp.float32)
        return dict(cond, time_ids=jnp.broadcast_to(ids, (cond["context"].shape[0],
                                                          ids.shape[-1])))

    def zeroes_negative(self, negative_prompts) -> bool:
        """True when no negative prompt means zero negative embeddings (SDXL pipelines with
        ``force_zeros_for_empty_prompt``, as diffusers); static for compiled programs."""
        return self.is_sdxl and self.force_zeros_for_empty_prompt and negative_prompts is None

    def condition(self, params, ids, height: int, width: int, negative: bool = False):
        """The UNet condition of token ids for a height x width image: ``encode_text``'s
        embeddings [B, L, D]; SDXL: its pytree with ``time_ids`` (``add_time_ids``)."""
        return self.add_time_ids(self.encode_text(params, ids), height, width, negative)

    def encode_prompts(self, params, ids, neg_ids, height: int, width: int,
                       zero_uncond: bool = False, time_ids=None):
        """(cond, uncond): the conditions of the prompts and of the negative prompts, as every
        guided sampling and edit program feeds the UNet (docs/design.md, "Parameters are one
        pytree"). ``zero_uncond`` (``zeroes_negative``): zero negative embeddings in place
        of ``neg_ids``' (SDXL's time ids stay those of the negative half). ``time_ids``:
        None (defaults), or SDXL's (positive, negative) [2, K] (``time_id_pair``)."""
        cond = self.encode_text(params, ids)
        uncond = (jax.tree.map(jnp.zeros_like, cond) if zero_uncond
                  else self.encode_text(params, neg_ids))
        pos, neg = (None, None) if time_ids is None else (time_ids[0], time_ids[1])
        return (self.add_time_ids(cond, height, width, ids=pos),
                self.add_time_ids(uncond, height, width, negative=True, ids=neg))

    @property
    def word_tokenizer(self):
        """The tokenizer whose token positions the UNet's cross-attention sees (word
        alignment of Prompt-to-Prompt and LocalBlend): the first text encoder's (SDXL's two
        CLIP tokenizers give the same positions; the refiner has only the second)."""
        return self._encoders()[0][1]

    def encode_images(self, params, images, key: Optional[jax.Array] = None) -> jax.Array:
        """images [B, H, W, 3] in [-1, 1] -> scaled latents [B, H/f, W/f, C].

        The posterior mean, or a posterior sample when ``key`` is given.
        """
        mean, logvar = self.vae.apply({"params": params["vae"]}, images,
                                      method=AutoencoderKL.encode)
        z = mean if key is None else sample_posterior(key, mean, logvar)
        cfg = self.vae.config
        shift = cfg.shift_factor or 0.0
        return (z - shift) * cfg.scaling_factor

    def decode_latents(self, params, latents) -> jax.Array:
        """Scaled latents [B, h, w, C] -> images [B, H, W, 3] in [-1, 1] (clipped)."""
        cfg = self.vae.config
        z = latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        images = self.vae.apply({"params": params["vae"]}, z, method=AutoencoderKL.decode)
        return jnp.clip(images, -1.0, 1.0)


def dummy_inputs(module, kind: str):
    """Smallest valid inputs for ``module.init`` ("unet" | "vae" | "text_encoder[_2]")."""
    if kind == "unet" and isinstance(module.config, UViTConfig):
        return uvit_dummy_inputs(module)
    if kind == "unet" and isinstance(module.config, DiTConfig):
        return dit_dummy_inputs(module)
    if kind == "unet" and is_transformer_backbone(module):
        return pixart_dummy_inputs(module)
    if kind == "unet":
        cfg = module.config
        s = 2 ** (len(cfg.block_out_channels) - 1)
        args = (jnp.zeros((1, s, s, cfg.in_channels)), jnp.zeros((1,)),
                jnp.zeros((1, 1, cfg.cross_attention_dim)))
        if cfg.text_time:  # one time id: only the concatenated width fixes the shapes
            width = cfg.projection_class_embeddings_input_dim - cfg.addition_time_embed_dim
            args += (None,) * 4 + ({"text_embeds": jnp.zeros((1, width)),
                                    "time_ids": jnp.zeros((1, 1))},)
        if cfg.attention_type in ATTENTION_TYPES:  # GLIGEN: position_net and the fusers
            args += (None,) * (8 - len(args)) + (
                dummy_gligen(cfg.attention_type, cfg.cross_attention_dim),)
        return args
    if kind == "vae":
        s = module.config.downscale
        return (jnp.zeros((1, s, s, module.config.in_channels)),)
    return (jnp.zeros((1, 1), jnp.int32),)


def init_params(pipe: Pipeline, seed: int = 0) -> dict:
    """Randomly initialised params ``{"text_encoder", "unet", "vae"}`` for ``pipe``.

    Each module's init runs as one jitted program (eagerly, flax dispatches and compiles
    hundreds of small ops: 45 s for the tiny shapes config on 2 CPU cores)."""
    key = jax.random.key(seed)
    return {kind: _compiled_init(pipe, kind)(jax.random.fold_in(key, i),
                                             *dummy_inputs(getattr(pipe, kind), kind))
            for i, kind in enumerate(("text_encoder", "unet", "vae", "text_encoder_2"))
            if getattr(pipe, kind) is not None}


@functools.lru_cache(maxsize=16)
def _compiled_init(pipe: Pipeline, kind: str):
    module = getattr(pipe, kind)
    return jax.jit(lambda key, *args: module.init(key, *args)["params"])


def to_uint8(images) -> np.ndarray:
    """[-1, 1] float images -> uint8 (rounded as diffusers' ``numpy_to_pil``)."""
    x = (np.asarray(images, np.float32) + 1.0) / 2.0
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def from_uint8(images) -> jax.Array:
    """uint8 [..., H, W, 3] -> float32 in [-1, 1]."""
    return jnp.asarray(images, jnp.float32) / 127.5 - 1.0
