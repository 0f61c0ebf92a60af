"""Single-file SD 1.x / 2.x / XL checkpoints in the original layout (A1111 / ComfyUI files).

Reading detects the model type from the keys as diffusers' ``from_single_file`` does
(OpenCLIP text encoder -> SD 2.x, else SD 1.x), takes the configs from a reference
diffusers directory (``config=``, as diffusers' ``from_single_file(config=...)``) or infers
them from the tensor shapes with Stable Diffusion's fixed hyper-parameters (heads, group
norm, time embedding), and picks the scheduler diffusers would fetch: SD 1.x -> PNDM, epsilon;
SD 2.x -> DDIM, v-prediction at 768 px (``prediction_type="epsilon"`` for the 512 px base).
The tokenizer: ``config=``'s, the Hugging Face cache's, or CLIP's built from shipped merges
(``tokenizer_for``). Tensors are read one at a time from the safetensors file (fp16 / bf16
are cast to float32). SDXL base / refiner files (``conditioner.embedders.*``): configs from
``config=`` or inferred (1024 px, Euler, epsilon; both tokenizers CLIP's, the second padding
with '!'). Layouts:
``jaxdiff.weights.original_layout``; writing: ``jaxdiff.weights.single_file_write``.
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Mapping, Optional

import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from transformers import CLIPTokenizer

from jaxdiff.models import (AutoencoderKL, CLIPTextConfig, CLIPTextModel,
                            CLIPTextModelWithProjection, CLIPTextProjectionConfig,
                            UNet2DConditionModel, UNetConfig, VAEConfig)
from jaxdiff.models.config import read_json
from jaxdiff.pipeline import Pipeline
from jaxdiff.schedules import SchedulerConfig
from jaxdiff.weights import convert, diffusers_format, files, hf_cache
from jaxdiff.weights import original_layout as ol
from jaxdiff.weights.clip_tokenizer import CLIP_VOCAB_SIZE, clip_tokenizer
from jaxdiff.weights.original_config import (MODEL_TYPES, clip_prefix, detect,
                                             infer_sdxl_text_configs, infer_text_config,
                                             infer_unet_config, infer_vae_config)
from jaxdiff.weights.convert import WeightsError

SUFFIXES = (".safetensors",) + files.PICKLE_SUFFIXES
_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", set_alpha_to_one=False, steps_offset=1,
                 clip_sample=False)
# Buffers of LDM training checkpoints that are not weights of the three networks.
_IGNORED = re.compile(r"^(betas|alphas_cumprod(_prev)?|sqrt_.*|log_one_minus_alphas_cumprod|"
                      r"posterior_.*|logvar|lvlb_weights|global_step|epoch|model_ema\.(decay|"
                      r"num_updates))$|(^|\.)position_ids$|^" + re.escape(ol.OPENCLIP_PREFIX)
                      + r"(text_projection|logit_scale)$|^conditioner\.embedders\.\d\.model\."
                      r"logit_scale$")


class Checkpoint(Mapping):
    """Lazy key -> float array view of a safetensors file (or an allowed pickle)."""

    def __init__(self, path: str, allow_pickle: bool = False):
        self.path = path
        if path.endswith(files.PICKLE_SUFFIXES):
            if not allow_pickle:
                raise files.PickleRefusedError(
                    f"{path}: pickle-based checkpoints (.ckpt/.pt/.bin) can run arbitrary code "
                    "when loaded; use the .safetensors release of the model, or pass "
                    "allow_pickle=True if you trust the file.")
            self._dict, self._file = files.read_tensors(path), None
            return
        try:
            self._file = safe_open(path, framework="numpy")
            self._keys = list(self._file.keys())
            slices = {k: self._file.get_slice(k) for k in self._keys}
            self._shapes = {k: tuple(v.get_shape()) for k, v in slices.items()}
            self._bf16 = {k for k, v in slices.items() if v.get_dtype() == "BF16"}
        except Exception as e:  # noqa: BLE001 -- safetensors raises its own error types
            raise WeightsError(f"{path}: not a readable safetensors file ({e}); it is corrupt "
                               "or truncated - download or export it again.") from None
        self._dict, self._flax = None, None

    def __getitem__(self, key):
        if self._dict is not None:
            return self._dict[key]
        if key not in self._shapes:
            raise KeyError(key)
        try:
            if key in self._bf16:  # numpy has no bfloat16: read it through jax
                if self._flax is None:
                    self._flax = safe_open(self.path, framework="flax")
                return np.asarray(self._flax.get_tensor(key)).astype(np.float32)
            return self._file.get_tensor(key)
        except Exception as e:  # noqa: BLE001
            raise WeightsError(f"{self.path}: tensor '{key}' cannot be read ({e}); the file is "
                               "corrupt or truncated - download or export it again.") from None

    def __iter__(self):
        return iter(self._dict if self._dict is not None else self._keys)

    def __len__(self):
        return len(self._dict if self._dict is not None else self._keys)

    def __contains__(self, key):
        return key in (self._dict if self._dict is not None else self._shapes)

    def shape(self, key) -> Optional[tuple]:
        if key not in self:
            return None
        return tuple(np.shape(self._dict[key])) if self._dict is not None else self._shapes[key]


# ------------------------------------------------------------------------------ loading

def component_map(kind: str, keys, cfg, text_layout: str = "clip", text_model: bool = True):
    """diffusers key -> (original key, part) for one component (``text_model``: the CLIP
    keys carry transformers' ``text_model.`` level, as all but the oldest SD 1.x files)."""
    if kind == "unet":
        return ol.unet_map(keys, cfg)
    if kind == "vae":
        return ol.vae_map(keys, cfg)
    if text_layout == "openclip":
        return ol.openclip_map(keys)
    if not text_model:
        return {k: (ol.CLIP_PREFIX + k.removeprefix("text_model."), None) for k in keys}
    return ol.clip_map(keys)


class _Component(Mapping):
    """diffusers-keyed view of one component, read (and split / transposed) on access, so
    only the converted params accumulate, one tensor at a time."""

    def __init__(self, ckpt, sources):
        self._ckpt, self._sources = ckpt, sources

    def __getitem__(self, key):
        src, part = self._sources[key]
        return ol.take(np.asarray(self._ckpt[src], np.float32), part)

    def __iter__(self):
        return iter(self._sources)

    def __len__(self):
        return len(self._sources)

    def __contains__(self, key):  # without reading the tensor
        return key in self._sources


def _read_component(ckpt: Checkpoint, expected, kind, key_map, extract_ema, cfg_source):
    sources = {}
    for key, (orig, part) in key_map.items():
        src = ol.ema_key(orig) if extract_ema and kind == "unet" else orig
        if src not in ckpt:
            raise WeightsError(f"{ckpt.path}: tensor '{src}' is missing; the file does not match "
                               f"the {kind} config {cfg_source} (a checkpoint of another model, "
                               "or a truncated export).")
        sources[key] = (src, part)
    state = _Component(ckpt, sources)
    try:
        return convert.torch_to_flax(state, expected, source=ckpt.path, device=True)
    except WeightsError as e:
        names = {k: o for k, (o, _) in key_map.items()}
        msg = str(e)
        for k, o in names.items():
            msg = msg.replace(f"'{k}'", f"'{o}'")
        raise WeightsError(msg) from None


def _module(kind, raw, dtype, source):
    if kind == "unet":
        return UNet2DConditionModel(UNetConfig.from_dict(raw, source), dtype)
    if kind == "vae":
        return AutoencoderKL(VAEConfig.from_dict(raw, source), dtype)
    if kind == "text_encoder_2":
        return CLIPTextModelWithProjection(CLIPTextProjectionConfig.from_dict(raw, source), dtype)
    return CLIPTextModel(CLIPTextConfig.from_dict(raw, source), dtype)


def tokenizer_for(config_dir, model_type: str, vocab_size: int, path: str):
    """The tokenizer of a single file's model: ``config_dir``'s, else the one in the Hugging
    Face cache that diffusers' ``from_single_file`` would use, else CLIP's built from the
    merges jaxdiff ships (when the text encoder has CLIP's 49,408 tokens)."""
    candidates = [os.path.join(config_dir, "tokenizer")] if config_dir else []
    for repo, sub in MODEL_TYPES[model_type]["repos"]:
        snap = hf_cache.find_snapshot(repo)
        if snap:
            candidates.append(os.path.join(snap, sub))
    for folder in candidates:
        if os.path.exists(os.path.join(folder, "vocab.json")) or \
                os.path.exists(os.path.join(folder, "tokenizer.json")):
            return CLIPTokenizer.from_pretrained(folder)
    if vocab_size == CLIP_VOCAB_SIZE:
        return clip_tokenizer(model_type)
    repos = " or ".join(r for r, _ in MODEL_TYPES[model_type]["repos"])
    raise FileNotFoundError(
        f"{path}: a single file holds no tokenizer and its text encoder's {vocab_size} tokens "
        f"are not CLIP's {CLIP_VOCAB_SIZE}; pass config=<a diffusers folder of this model> "
        f"(--model-config), or put {repos} in the Hugging Face cache "
        f"({hf_cache.hub_cache_dir()}).")


def load_single_file(path: str, *, config: Optional[str] = None,
                     prediction_type: Optional[str] = None, extract_ema: bool = False,
                     dtype=jnp.float32, allow_pickle: bool = False):
    """Reads an SD 1.x / 2.x / XL original-layout checkpoint into ``(pipe, params)``.

    Args:
      path: ``.safetensors`` file (``.ckpt``/``.pt`` only with ``allow_pickle``).
      config: a diffusers-layout folder of the same model (or ``org/name`` in the Hugging
        Face cache) whose component configs, tokenizer and scheduler are used; components
        missing from the file are read from it. ``None``: configs inferred from the tensors,
        tokenizer as ``tokenizer_for`` finds it (Hugging Face cache, else CLIP's shipped).
      prediction_type: overrides the scheduler's (e.g. ``"epsilon"`` for SD 2.x base 512).
      extract_ema: use the ``model_ema.*`` UNet weights of a training checkpoint.
    Returns:
      ``(pipe, params)`` as ``jaxdiff.load_pipeline``.
    """
    ckpt = Checkpoint(path, allow_pickle)
    model_type = detect(ckpt)
    if model_type.startswith("xl"):
        return _load_sdxl(ckpt, model_type, config, prediction_type, extract_ema, dtype)
    if extract_ema and not any(k.startswith(ol.EMA_PREFIX + "diffusion_model") for k in ckpt):
        raise WeightsError(f"{path}: no '{ol.EMA_PREFIX}*' UNet tensors to extract (EMA-only and "
                           "pruned files keep their EMA weights as the model's); load it "
                           "without extract_ema.")
    config_dir = hf_cache.resolve(config) if config and not os.path.isdir(config) else config
    sched = _scheduler(ckpt, config_dir, model_type, prediction_type)
    image_size = 768 if sched[0]["prediction_type"] == "v_prediction" and model_type == "v2" \
        else 512
    text_layout = "openclip" if model_type == "v2" else "clip"
    present = {"unet": ol.UNET_PREFIX, "vae": ol.VAE_PREFIX,
               "text_encoder": ol.OPENCLIP_PREFIX if model_type == "v2" else ol.CLIP_PREFIX}
    inferred = {"unet": lambda: infer_unet_config(ckpt, model_type, image_size),
                "vae": lambda: infer_vae_config(ckpt, image_size),
                "text_encoder": lambda: infer_text_config(ckpt, model_type)}
    modules, params = {}, {}
    for kind in ("unet", "vae", "text_encoder"):
        has = any(k.startswith(present[kind]) for k in ckpt)
        cfg_path = os.path.join(config_dir, kind, "config.json") if config_dir else None
        if not has:
            if not config_dir:
                raise WeightsError(f"{path}: holds no {kind} ('{present[kind]}*' tensors); pass "
                                   f"config=<diffusers folder> to take the {kind} from it.")
            modules[kind], params[kind] = diffusers_format.load_component(
                os.path.join(config_dir, kind), kind, dtype, allow_pickle=allow_pickle)
            continue
        raw = read_json(cfg_path) if cfg_path and os.path.exists(cfg_path) else inferred[kind]()
        modules[kind] = _module(kind, raw, dtype, cfg_path or f"{path} ({kind}, inferred)")
        expected = diffusers_format.init_shapes(modules[kind], kind)
        keys = [convert.torch_key(k) for k in traverse_util.flatten_dict(expected)]
        key_map = component_map(kind, keys, modules[kind].config, text_layout,
                                clip_prefix(ckpt).endswith("text_model."))
        source = f"of {config_dir}" if cfg_path and os.path.exists(cfg_path) else \
            "inferred from its tensors (pass config=<its diffusers folder>)"
        params[kind] = _read_component(ckpt, expected, kind, key_map, extract_ema, source)
        _check_unused(ckpt, kind, key_map, present[kind], modules[kind])
    _check_outside(ckpt, present)
    tokenizer = tokenizer_for(config_dir, model_type,
                              modules["text_encoder"].config.vocab_size, path)
    max_pos = modules["text_encoder"].config.max_position_embeddings
    tokenizer.model_max_length = min(tokenizer.model_max_length, max_pos)
    pipe = Pipeline(modules["unet"], modules["vae"], modules["text_encoder"], tokenizer,
                    SchedulerConfig.from_dict(sched[0]), sched[1])
    return pipe, files.to_device(params)


def sdxl_prefixes(model_type: str) -> dict:
    """Component -> original-layout prefix of an SDXL base / refiner file."""
    if model_type == "xl_refiner":
        return {"unet": ol.UNET_PREFIX, "vae": ol.VAE_PREFIX,
                "text_encoder_2": ol.REFINER_OPENCLIP_PREFIX}
    return {"unet": ol.UNET_PREFIX, "vae": ol.VAE_PREFIX,
            "text_encoder": ol.SDXL_CLIP_PREFIX, "text_encoder_2": ol.SDXL_OPENCLIP_PREFIX}


def sdxl_key_map(kind, keys, cfg, prefix):
    """diffusers key -> (original key, part) of one SDXL component (``prefix``: its
    ``sdxl_prefixes`` entry)."""
    if kind in ("unet", "vae"):
        return component_map(kind, keys, cfg)
    if kind == "text_encoder":
        return ol.clip_map(keys, prefix)
    return ol.openclip_map(keys, prefix)


def _sdxl_inferred(ckpt, model_type):
    """Configs of an SDXL file without ``config=`` (1024 px; VAE scaling 0.13025)."""
    out = infer_sdxl_text_configs(ckpt, model_type)
    out["unet"] = infer_unet_config(ckpt, model_type, 1024)
    out["vae"] = dict(infer_vae_config(ckpt, 1024), scaling_factor=0.13025)
    return out


def _load_sdxl(ckpt, model_type, config, prediction_type, extract_ema, dtype):
    """SDXL base / refiner file: configs, tokenizers and scheduler from ``config``, else
    inferred from the tensors (CLIP's shipped tokenizer; the second pads with '!')."""
    config_dir = None
    if config:
        config_dir = hf_cache.resolve(config) if not os.path.isdir(config) else config
    inferred = None if config_dir else _sdxl_inferred(ckpt, model_type)
    prefixes = sdxl_prefixes(model_type)
    modules, params, tokenizers = {"text_encoder": None}, {}, {"text_encoder": None}
    for kind, prefix in prefixes.items():
        cfg_path = os.path.join(config_dir, kind, "config.json") if config_dir else None
        if not any(k.startswith(prefix) for k in ckpt):  # e.g. a file without its VAE
            if not config_dir:
                raise WeightsError(f"{ckpt.path}: holds no {kind} ('{prefix}*' tensors); pass "
                                   f"config=<diffusers folder> to take the {kind} from it.")
            modules[kind], params[kind] = diffusers_format.load_component(
                os.path.join(config_dir, kind), kind, dtype)
        else:
            if cfg_path and not os.path.exists(cfg_path):
                raise FileNotFoundError(f"{cfg_path}: missing; config= must be the diffusers "
                                        f"folder of this SDXL model (with {kind}/config.json).")
            raw = read_json(cfg_path) if cfg_path else inferred[kind]
            modules[kind] = _module(kind, raw, dtype, cfg_path or f"{ckpt.path} ({kind}, "
                                    "inferred)")
            expected = diffusers_format.init_shapes(modules[kind], kind)
            keys = [convert.torch_key(k) for k in traverse_util.flatten_dict(expected)]
            key_map = sdxl_key_map(kind, keys, modules[kind].config, prefix)
            params[kind] = _read_component(
                ckpt, expected, kind, key_map, extract_ema, f"of {config_dir}" if config_dir
                else "inferred from its tensors (pass config=<its diffusers folder>)")
            _check_unused(ckpt, kind, key_map, prefix, modules[kind])
        if kind.startswith("text_encoder"):
            tokenizers[kind] = _sdxl_tokenizer(ckpt, config_dir, kind, modules[kind])
    _check_outside(ckpt, prefixes)
    sched = _scheduler(ckpt, config_dir, model_type, prediction_type)
    index_path = os.path.join(config_dir, "model_index.json") if config_dir else ""
    index = read_json(index_path) if index_path and os.path.exists(index_path) else {}
    pipe = Pipeline(modules["unet"], modules["vae"], modules["text_encoder"],
                    tokenizers["text_encoder"], SchedulerConfig.from_dict(sched[0]), sched[1],
                    text_encoder_2=modules["text_encoder_2"],
                    tokenizer_2=tokenizers["text_encoder_2"],
                    force_zeros_for_empty_prompt=bool(
                        index.get("force_zeros_for_empty_prompt", True)),
                    requires_aesthetics_score=bool(index.get("requires_aesthetics_score",
                                                             model_type == "xl_refiner")))
    return pipe, files.to_device(params)


def _sdxl_tokenizer(ckpt, config_dir, kind, module):
    if not config_dir:
        vocab = module.config.vocab_size
        if vocab != CLIP_VOCAB_SIZE:
            raise FileNotFoundError(
                f"{ckpt.path}: a single file holds no tokenizer and its {kind}'s {vocab} tokens "
                f"are not CLIP's {CLIP_VOCAB_SIZE}; pass config=<a diffusers folder of this "
                "model> (--model-config).")
        tokenizer = clip_tokenizer("v2" if kind == "text_encoder_2" else "v1")
        tokenizer.model_max_length = min(tokenizer.model_max_length,
                                         module.config.max_position_embeddings)
        return tokenizer
    folder = os.path.join(config_dir, kind.replace("text_encoder", "tokenizer"))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: missing; config= must be the diffusers folder of "
                                "this SDXL model (with both tokenizers).")
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    tokenizer.model_max_length = min(tokenizer.model_max_length,
                                     module.config.max_position_embeddings)
    return tokenizer


def _scheduler(ckpt, config_dir, model_type, prediction_type):
    path = os.path.join(config_dir, "scheduler", "scheduler_config.json") if config_dir else ""
    if path and os.path.exists(path):
        raw = read_json(path)
        cls = raw.get("_class_name", "DDIMScheduler")
    else:
        t = MODEL_TYPES[model_type]
        raw, cls = dict(_SCHEDULE, prediction_type=t["prediction_type"]), t["scheduler"]
        # diffusers: the SD 2.0 base (epsilon) checkpoint is the one trained 875000 steps.
        # (a scalar, or a 1-element tensor as some converters write it)
        if model_type == "v2" and "global_step" in ckpt and \
                np.asarray(ckpt["global_step"]).reshape(-1).tolist() == [875000]:
            raw["prediction_type"] = "epsilon"
    if prediction_type:
        raw = dict(raw, prediction_type=prediction_type)
    return raw, cls


def _check_unused(ckpt, kind, key_map, prefix, module):
    used = {o for o, _ in key_map.values()}
    extra = {ol.OPENCLIP_PREFIX + f"transformer.resblocks.{module.config.num_hidden_layers}."} \
        if prefix == ol.OPENCLIP_PREFIX else set()
    unknown = [k for k in ckpt if k.startswith(prefix) and k not in used
               and not _IGNORED.search(k) and not any(k.startswith(e) for e in extra)]
    if unknown:
        raise WeightsError(f"{ckpt.path}: unknown {kind} tensor '{sorted(unknown)[0]}' "
                           f"({len(unknown)} in all) not used by the model; the file does not "
                           "match the config (pass config= with the model's diffusers folder).")


def _check_outside(ckpt, present):
    known = tuple(present.values()) + (ol.EMA_PREFIX,)
    other = sorted(k for k in ckpt if not k.startswith(known) and not _IGNORED.search(k)
                   and not k.startswith(("cond_stage_model.", "first_stage_model.")))
    if other:
        warnings.warn(f"{ckpt.path}: ignoring {len(other)} tensor(s) outside the UNet, VAE and "
                      f"text encoder (first: '{other[0]}').")
