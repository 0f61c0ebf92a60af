"""CLIP folders in transformers' layout: load, save, and the ``CLIP`` bundle that uses them.

A folder holds ``config.json`` (``CLIPModel``, ``CLIPVisionModelWithProjection`` or
``CLIPTextModelWithProjection``, told apart by ``model_type``) and ``model.safetensors``
with transformers' tensor names, so ``transformers.CLIPModel.from_pretrained(folder)``
reads what ``save_clip`` writes. ``save_clip`` also writes the tokenizer (if given) and a
``preprocessor_config.json`` (``CLIPImageProcessor``) with the model's image size,
mean and std. A noise-aware CLIP adds ``time_embedding.safetensors`` and
``noise_schedule.json`` (jaxdiff's own files; transformers ignores them and loads the
clean towers).

The two parameters that are tensors of their own rather than a layer's ``weight``
(``logit_scale``, ``vision_model.embeddings.class_embedding``) are mapped here; every
other tensor goes through ``convert.torch_to_flax`` / ``flax_to_torch``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxdiff.models.clip import (CLIPConfig, CLIPModel, CLIPVisionConfig,
                                 CLIPVisionModelWithProjection, TimeToken, normalize)
from jaxdiff.models.clip_text import CLIPTextModelWithProjection, CLIPTextProjectionConfig
from jaxdiff.models.config import read_json
from jaxdiff.weights import convert, files
from jaxdiff.weights.diffusers_format import DEFAULT_MODEL

# The shipped shapes-world CLIP (configs/clip.py; figures in bench/README.md).
SHAPES_CLIP = os.path.join(os.path.dirname(DEFAULT_MODEL), "clip_shapes")

_RAW = {("logit_scale",): "logit_scale",
        ("vision_model", "embeddings", "class_embedding"):
            "vision_model.embeddings.class_embedding"}
_TIME_FILE, _SCHEDULE_FILE = "time_embedding.safetensors", "noise_schedule.json"


def clip_module(raw: dict, source: str = "config.json"):
    """The jaxdiff module for a transformers CLIP ``config.json`` dict."""
    kind = raw.get("model_type", "clip")
    if kind == "clip":
        return CLIPModel(CLIPConfig.from_dict(raw, source))
    if kind == "clip_vision_model":
        return CLIPVisionModelWithProjection(CLIPVisionConfig.from_dict(raw, source))
    if kind == "clip_text_model":
        return CLIPTextModelWithProjection(CLIPTextProjectionConfig.from_dict(raw, source))
    raise ValueError(f"{source}: model_type={kind!r} is not a CLIP model (expected 'clip', "
                     "'clip_vision_model' or 'clip_text_model').")


def init_shapes(module):
    """Param shapes of a CLIP module (no compute)."""
    ids = jnp.zeros((1, 2), jnp.int32)
    if isinstance(module, CLIPTextModelWithProjection):
        args = (ids,)
    else:
        vis = module.config if isinstance(module, CLIPVisionModelWithProjection) \
            else module.config.vision_config
        pix = jnp.zeros((1, vis.image_size, vis.image_size, vis.num_channels))
        args = (pix,) if isinstance(module, CLIPVisionModelWithProjection) else (ids, pix)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), *args))["params"]


def params_from_torch(module, state: dict, source: str) -> dict:
    """A transformers CLIP state dict -> the module's params (shape-checked)."""
    state = dict(state)
    flat = traverse_util.flatten_dict(init_shapes(module))
    raw = {}
    for path, key in _RAW.items():
        if path not in flat:
            continue
        spec = flat.pop(path)
        if key not in state or tuple(np.shape(state[key])) != tuple(spec.shape):
            raise convert.WeightsError(f"{source}: tensor '{key}' is missing or has the wrong "
                                       f"shape (the model config needs {tuple(spec.shape)}).")
        raw[path] = np.asarray(state.pop(key), spec.dtype)
    params = traverse_util.flatten_dict(convert.torch_to_flax(
        state, traverse_util.unflatten_dict(flat), source=source))
    return traverse_util.unflatten_dict({**params, **raw})


def params_to_torch(params) -> dict:
    """The module's params -> a transformers state dict (float32 numpy)."""
    flat = traverse_util.flatten_dict(params)
    raw = {key: np.asarray(flat.pop(path), np.float32) for path, key in _RAW.items()
           if path in flat}
    return {**convert.flax_to_torch(traverse_util.unflatten_dict(flat)), **raw}


@dataclasses.dataclass(frozen=True, eq=False)
class CLIP:
    """A CLIP model with what it needs to read text and images (hashable by identity, so
    it can be a static argument of a compiled program, like ``Pipeline``).

    Params are ``{"model": CLIPModel params}`` plus ``"time_embedding"`` for a
    noise-aware CLIP (``time_token`` set: the timestep is added to the class token).
    """
    model: CLIPModel
    tokenizer: Any
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    time_token: Optional[TimeToken] = None
    noise_schedule: Optional[dict] = None   # the scheduler config the noisy CLIP saw

    @property
    def image_size(self) -> int:
        return self.model.config.vision_config.image_size

    def tokenize(self, texts) -> np.ndarray:
        """Texts -> int32 [B, L] ids padded to the tokenizer's max length."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = min(self.tokenizer.model_max_length,
                     self.model.config.text_config.max_position_embeddings)
        return self.tokenizer(texts, padding="max_length", max_length=length,
                              truncation=True, return_tensors="np").input_ids.astype(np.int32)

    def pixel_values(self, images):
        """Images [B, H, W, 3] in [-1, 1] -> the vision tower's normalised input."""
        mean, std = jnp.asarray(self.image_mean), jnp.asarray(self.image_std)
        return ((images + 1.0) / 2.0 - mean) / std

    def text_embeds(self, params, ids):
        """ids [B, L] -> L2-normalised text embeddings [B, P]."""
        return normalize(self.model.apply({"params": params["model"]}, ids,
                                          method=CLIPModel.get_text_features))

    def image_embeds(self, params, images, t=None):
        """Images [B, H, W, 3] in [-1, 1] (noised ones with their timesteps ``t`` [B] for a
        noise-aware CLIP) -> L2-normalised image embeddings [B, P]."""
        offset = None
        if self.time_token is not None:
            if t is None:
                raise ValueError("this CLIP is noise-aware: pass the timesteps t.")
            offset = self.time_token.apply({"params": params["time_embedding"]}, t)
        return normalize(self.model.apply({"params": params["model"]},
                                          self.pixel_values(images), offset,
                                          method=CLIPModel.get_image_features))

    def logit_scale(self, params):
        return jnp.exp(params["model"]["logit_scale"])


def load_clip(folder: str) -> tuple[CLIP, dict]:
    """Reads a transformers ``CLIPModel`` folder -> ``(CLIP, params)``."""
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: missing; a CLIP folder needs config.json "
                                "(transformers CLIPModel layout).")
    module = clip_module(read_json(cfg_path), cfg_path)
    if not isinstance(module, CLIPModel):
        raise ValueError(f"{cfg_path}: a CLIPModel (model_type 'clip') is needed here, "
                         f"not {type(module).__name__}.")
    path = files.find_weights(folder, "model")
    params = {"model": params_from_torch(module, files.read_tensors(path), path)}
    from transformers import CLIPTokenizer
    tokenizer = CLIPTokenizer.from_pretrained(folder) if os.path.exists(
        os.path.join(folder, "tokenizer_config.json")) else None
    mean, std = (0.5,) * 3, (0.5,) * 3
    pre = os.path.join(folder, "preprocessor_config.json")
    if os.path.exists(pre):
        raw = read_json(pre)
        mean, std = tuple(raw.get("image_mean", mean)), tuple(raw.get("image_std", std))
    time_token, schedule = None, None
    if os.path.exists(os.path.join(folder, _TIME_FILE)):
        time_token = TimeToken(module.config.vision_config.hidden_size)
        shapes = jax.eval_shape(lambda: time_token.init(jax.random.key(0),
                                                        jnp.zeros((1,))))["params"]
        tpath = os.path.join(folder, _TIME_FILE)
        params["time_embedding"] = convert.torch_to_flax(files.read_tensors(tpath), shapes,
                                                         source=tpath)
        schedule = read_json(os.path.join(folder, _SCHEDULE_FILE))
    return CLIP(module, tokenizer, mean, std, time_token, schedule), params


def save_clip(clip: CLIP, params, out_dir: str, *, overwrite: bool = True) -> str:
    """Writes ``clip`` + ``params`` as a transformers ``CLIPModel`` folder (atomically)."""
    tok = clip.tokenizer
    cfg = clip.model.config
    with files.atomic_directory(out_dir, overwrite) as tmp:
        ids = {} if tok is None else dict(bos_token_id=tok.bos_token_id,
                                          pad_token_id=tok.pad_token_id)
        _write_json(os.path.join(tmp, "config.json"), cfg.to_dict(**ids))
        files.write_tensors(os.path.join(tmp, "model.safetensors"),
                            params_to_torch(params["model"]))
        size = cfg.vision_config.image_size
        _write_json(os.path.join(tmp, "preprocessor_config.json"), {
            "image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor",
            "do_resize": True, "size": {"shortest_edge": size}, "resample": 3,
            "do_center_crop": True, "crop_size": {"height": size, "width": size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(clip.image_mean), "image_std": list(clip.image_std),
            "do_convert_rgb": True})
        if tok is not None:
            tok.save_pretrained(tmp)
        if clip.time_token is not None:
            files.write_tensors(os.path.join(tmp, _TIME_FILE),
                                convert.flax_to_torch(params["time_embedding"]))
            _write_json(os.path.join(tmp, _SCHEDULE_FILE), dict(clip.noise_schedule or {}))
    return out_dir


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
