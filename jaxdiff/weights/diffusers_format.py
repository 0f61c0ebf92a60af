"""Load and save diffusers-layout pipeline directories (safetensors).

Layout: ``model_index.json``, ``unet/``, ``vae/`` (``config.json`` +
``diffusion_pytorch_model.safetensors``), ``text_encoder/`` (``config.json`` +
``model.safetensors``), ``tokenizer/`` and ``scheduler/scheduler_config.json``; SDXL adds
``text_encoder_2/`` (``CLIPTextModelWithProjection``) and ``tokenizer_2/`` (the refiner has
only these two). An InstructPix2Pix pipeline (``Pipeline.is_instruct``: a UNet taking twice
the VAE's latent channels) has the SD layout under diffusers' class name
``StableDiffusionInstructPix2PixPipeline``. A text-DiT pipeline (``Pipeline.is_transformer``)
has ``transformer/`` (a ``PixArtTransformer2DModel`` folder) in place of ``unet/``, under
diffusers' PixArt-alpha class name, with the CLIP text encoder and tokenizer of the SD
layout (diffusers' own PixArt-alpha pipeline uses T5: diffusers reads the components, the
whole pipeline is jaxdiff's).
"""
from __future__ import annotations

import json
import os
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from transformers import CLIPTokenizer

from jaxdiff.models import (AutoencoderKL, CLIPTextConfig, CLIPTextModel,
                            CLIPTextModelWithProjection, CLIPTextProjectionConfig,
                            UNet2DConditionModel, UNetConfig, VAEConfig)
from jaxdiff.models.config import UnsupportedConfigError, read_json
from jaxdiff.models.pixart import PixArtConfig, PixArtTransformer2DModel
from jaxdiff.pipeline import Pipeline, dummy_inputs
from jaxdiff.schedules import SchedulerConfig
from jaxdiff.weights import convert, files

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "shapes")
# The embedded text-DiT model (``load_pipeline("embedded:dit")``; bench/README.md).
DIT_MODEL = os.path.join(os.path.dirname(DEFAULT_MODEL), "shapes_dit")
# The embedded model's InstructPix2Pix weights (present once shipped).
INSTRUCT_MODEL = os.path.join(os.path.dirname(DEFAULT_MODEL), "shapes_instruct")
INSTRUCT_CLASS = "StableDiffusionInstructPix2PixPipeline"
GLIGEN_CLASS = "StableDiffusionGLIGENPipeline"  # a UNet with attention_type="gated"
TEXT_DIT_CLASS = "PixArtAlphaPipeline"  # denoiser: transformer/ (PixArtTransformer2DModel)
_TEXT_PREFIX = "text_model."


def init_shapes(module, kind: str):
    """Param shapes of ``module`` (no compute), used to drive weight conversion."""
    args = dummy_inputs(module, kind)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), *args))["params"]


def component_module(folder: str, kind: str, dtype=jnp.float32):
    """The network of one diffusers/transformers component folder, from its config.json
    alone: ``(module, weights file stem, key prefixes to strip)``."""
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: missing; a diffusers-layout {kind} folder needs "
                                "config.json next to its weights.")
    raw = read_json(cfg_path)
    if kind == "unet":
        return (UNet2DConditionModel(UNetConfig.from_dict(raw, cfg_path), dtype),
                "diffusion_pytorch_model", ("",))
    if kind == "transformer":  # a text-DiT pipeline's denoiser
        if raw.get("_class_name") != "PixArtTransformer2DModel":
            raise UnsupportedConfigError(
                f"{cfg_path}: _class_name={raw.get('_class_name')!r}; a text pipeline's "
                "transformer must be a PixArtTransformer2DModel (class-conditional DiT "
                "folders: jaxdiff.weights.backbones.load_dit_pipeline).")
        return (PixArtTransformer2DModel(PixArtConfig.from_dict(raw, cfg_path), dtype),
                "diffusion_pytorch_model", ("",))
    if kind == "vae":
        return (AutoencoderKL(VAEConfig.from_dict(raw, cfg_path), dtype),
                "diffusion_pytorch_model", ("",))
    if kind == "text_encoder_2":  # SDXL's second encoder
        return (CLIPTextModelWithProjection(CLIPTextProjectionConfig.from_dict(raw, cfg_path),
                                            dtype), "model", (_TEXT_PREFIX,))
    return (CLIPTextModel(CLIPTextConfig.from_dict(raw, cfg_path), dtype), "model",
            (_TEXT_PREFIX,))


def load_component(folder: str, kind: str, dtype=jnp.float32, variant=None,
                   allow_pickle=False):
    """Loads one network from a diffusers/transformers component folder.

    Returns:
      (module, params): params are float32 arrays in jaxdiff's layout, on the device.
    """
    module, stem, prefixes = component_module(folder, kind, dtype)
    path = files.find_weights(folder, stem, variant, allow_pickle)
    shapes = init_shapes(module, "unet" if kind == "transformer" else kind)
    params = convert.torch_to_flax(files.open_tensors(path), shapes,
                                   source=path, strip_prefixes=prefixes, device=True)
    return module, params


def load_pipeline(path: Optional[str] = None, *, dtype=jnp.float32, variant=None,
                  allow_pickle: bool = False) -> Tuple[Pipeline, dict]:
    """Reads a diffusers-layout directory (``None``: the embedded default model).

    Args:
      path: checkpoint directory with ``model_index.json``.
      dtype: compute dtype of the networks (params are always float32).
      variant: weight-file variant such as ``"fp16"`` (``*.fp16.safetensors``).
      allow_pickle: permit ``.bin``/``.ckpt`` weights (they can execute code).
    Returns:
      ``(pipe, params)`` with params ``{"text_encoder", "unet", "vae"}`` (SDXL: and
      ``"text_encoder_2"``; the refiner: no ``"text_encoder"``; a text-DiT folder's
      ``transformer/`` is the pipeline's denoiser, its params under ``"unet"``).
    """
    path = DEFAULT_MODEL if path is None else path
    index_path = os.path.join(path, "model_index.json")
    if not os.path.exists(index_path):
        raise FileNotFoundError(f"{index_path}: not found; --model must be a diffusers-layout "
                                "pipeline directory (with model_index.json).")
    index = read_json(index_path)
    modules, params, tokenizers = {}, {}, {}
    kinds = ("unet", "vae", "text_encoder", "text_encoder_2")
    for kind in kinds:
        if kind.startswith("text_encoder") and not _listed(index, kind):
            modules[kind] = tokenizers[kind] = None  # SDXL refiner: no first encoder
            continue
        folder = "transformer" if kind == "unet" and _listed(index, "transformer") else kind
        modules[kind], params[kind] = load_component(os.path.join(path, folder), folder,
                                                     dtype, variant, allow_pickle)
        if kind.startswith("text_encoder"):
            tok_dir = os.path.join(path, kind.replace("text_encoder", "tokenizer"))
            if not os.path.isdir(tok_dir):
                raise FileNotFoundError(f"{tok_dir}: missing tokenizer folder.")
            tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
            max_pos = modules[kind].config.max_position_embeddings
            if tokenizer.model_max_length > max_pos:
                tokenizer.model_max_length = max_pos
            tokenizers[kind] = tokenizer
    if modules["text_encoder"] is None and modules["text_encoder_2"] is None:
        raise FileNotFoundError(f"{index_path}: lists no text_encoder; jaxdiff needs one.")
    sdxl = modules["text_encoder_2"] is not None
    if sdxl != getattr(modules["unet"].config, "text_time", False):
        raise ValueError(f"{index_path}: text_encoder_2 and a UNet with addition_embed_type="
                         "'text_time' go together (SDXL); this folder has only one of them.")
    sched_path = os.path.join(path, "scheduler", "scheduler_config.json")
    if not os.path.exists(sched_path):
        raise FileNotFoundError(f"{sched_path}: missing scheduler config.")
    sched_raw = read_json(sched_path)
    scheduler_class = sched_raw.get("_class_name") or index.get("scheduler", [None, None])[1]
    pipe = Pipeline(modules["unet"], modules["vae"], modules["text_encoder"],
                    tokenizers["text_encoder"], SchedulerConfig.from_dict(sched_raw),
                    scheduler_class or "DDIMScheduler",
                    text_encoder_2=modules["text_encoder_2"],
                    tokenizer_2=tokenizers["text_encoder_2"],
                    force_zeros_for_empty_prompt=bool(
                        sdxl and index.get("force_zeros_for_empty_prompt", True)),
                    requires_aesthetics_score=bool(index.get("requires_aesthetics_score", False)),
                    caption_mask=bool(index.get("_caption_mask", True)))
    if index.get("_class_name") == INSTRUCT_CLASS and not pipe.is_instruct:
        raise ValueError(f"{index_path}: names a {INSTRUCT_CLASS} but its UNet takes "
                         f"{pipe.unet.config.in_channels} input channels; an instruct UNet "
                         f"takes {2 * pipe.vae.config.latent_channels} (noisy + image latents).")
    return pipe, files.to_device(params)


def _listed(index: dict, kind: str) -> bool:
    """Whether model_index.json names a class for ``kind`` (SD 1.x/2.x: text_encoder
    only; SDXL base: both; the refiner: text_encoder_2 only)."""
    entry = index.get(kind)
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def save_pipeline(pipe: Pipeline, params, out_dir: str, *, overwrite: bool = True,
                  dtype=np.float32) -> str:
    """Writes ``pipe`` + ``params`` as a diffusers directory (loadable by diffusers), the
    tensors in ``dtype`` (float16: half the size; loading gives float32 params either way).

    The write is atomic: ``out_dir`` is replaced only once every file is written.
    """
    if pipe.is_transformer and not isinstance(pipe.unet, PixArtTransformer2DModel):
        raise ValueError(f"save_pipeline: a {type(pipe.unet).__name__} denoiser has no "
                         "diffusers pipeline layout; only U-Net and PixArt text-DiT pipelines "
                         "are saved.")
    with files.atomic_directory(out_dir, overwrite) as tmp:
        _write_json(os.path.join(tmp, "model_index.json"), _model_index(pipe))
        for kind, module, stem, tokenizer in (
                ("unet", pipe.unet, "diffusion_pytorch_model", None),  # or transformer/
                ("vae", pipe.vae, "diffusion_pytorch_model", None),
                ("text_encoder", pipe.text_encoder, "model", pipe.tokenizer),
                ("text_encoder_2", pipe.text_encoder_2, "model", pipe.tokenizer_2)):
            if module is None:
                continue
            folder = "transformer" if kind == "unet" and pipe.is_transformer else kind
            os.makedirs(os.path.join(tmp, folder))
            cfg = module.config.to_dict()
            if tokenizer is not None:
                cfg.update(bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
                if kind == "text_encoder_2":  # pooling follows the config's eos id
                    cfg["eos_token_id"] = module.config.eos_token_id
                _save_tokenizer(tokenizer, os.path.join(tmp, kind.replace("text_encoder",
                                                                           "tokenizer")))
            _write_json(os.path.join(tmp, folder, "config.json"), cfg)
            files.write_tensors(os.path.join(tmp, folder, f"{stem}.safetensors"),
                                convert.flax_to_torch(params[kind], dtype=dtype))
        os.makedirs(os.path.join(tmp, "scheduler"))
        sched = dict(pipe.scheduler.to_dict(), _class_name=pipe.scheduler_class)
        _write_json(os.path.join(tmp, "scheduler", "scheduler_config.json"), sched)
    return out_dir


def _model_index(pipe: Pipeline) -> dict:
    if pipe.is_transformer:
        return {"_class_name": TEXT_DIT_CLASS, "_diffusers_version": "0.42.1",
                "scheduler": ["diffusers", pipe.scheduler_class],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "transformer": ["diffusers", "PixArtTransformer2DModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                # a text DiT trained without the caption mask (diffusers ignores "_" keys)
                **({} if pipe.caption_mask else {"_caption_mask": False})}
    if pipe.is_sdxl:
        none = [None, None]
        first = pipe.text_encoder is not None
        return {
            "_class_name": ("StableDiffusionXLPipeline" if first
                            else "StableDiffusionXLImg2ImgPipeline"),
            "_diffusers_version": "0.42.1", "feature_extractor": none, "image_encoder": none,
            "force_zeros_for_empty_prompt": pipe.force_zeros_for_empty_prompt,
            **({} if first else {"requires_aesthetics_score": pipe.requires_aesthetics_score}),
            "scheduler": ["diffusers", pipe.scheduler_class],
            "text_encoder": ["transformers", "CLIPTextModel"] if first else none,
            "tokenizer": ["transformers", "CLIPTokenizer"] if first else none,
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
    return {
        "_class_name": (INSTRUCT_CLASS if pipe.is_instruct else GLIGEN_CLASS
                        if pipe.unet.config.attention_type == "gated"
                        else "StableDiffusionPipeline"),
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None], "image_encoder": [None, None],
        "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", pipe.scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _save_tokenizer(tokenizer, folder):
    """Saves the tokenizer in SD's layout: ``vocab.json`` + ``merges.txt`` (+ configs).

    transformers 5 writes only ``tokenizer.json``; the BPE tables are taken from it so
    that older readers (transformers 4, maxdiffusion) find the files they expect.
    """
    tokenizer.save_pretrained(folder)
    fast = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(fast):
        return
    with open(fast, encoding="utf-8") as f:
        model = json.load(f)["model"]
    if model.get("type") != "BPE":
        return
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(model["vocab"], f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for m in model["merges"]:
            f.write((m if isinstance(m, str) else " ".join(m)) + "\n")


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
