"""diffusers-format transformer backbones and class-conditional DiT pipeline folders.

A transformer folder is ``config.json`` + ``diffusion_pytorch_model.safetensors`` as
``DiTTransformer2DModel`` / ``PixArtTransformer2DModel`` ``save_pretrained`` writes it. A
DiT pipeline folder is diffusers' ``DiTPipeline`` layout: ``model_index.json``,
``transformer/``, ``vae/``, ``scheduler/scheduler_config.json``. Reads check every tensor
(``weights.convert``); writes are atomic (``files.atomic_directory``).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp

from jaxdiff.models.config import UnsupportedConfigError, read_json
from jaxdiff.models.dit import DiTConfig, DiTTransformer2DModel, dit_dummy_inputs
from jaxdiff.models.pixart import PixArtConfig, PixArtTransformer2DModel, pixart_dummy_inputs
from jaxdiff.schedules import SchedulerConfig
from jaxdiff.weights import convert, files
from jaxdiff.weights.diffusers_format import load_component

_STEM = "diffusion_pytorch_model"
# _class_name -> (config class, module class, dummy inputs)
TRANSFORMERS = {
    "DiTTransformer2DModel": (DiTConfig, DiTTransformer2DModel, dit_dummy_inputs),
    "PixArtTransformer2DModel": (PixArtConfig, PixArtTransformer2DModel, pixart_dummy_inputs),
}


def transformer_shapes(module):
    """Param shapes of a transformer backbone (no compute)."""
    dummy = TRANSFORMERS[module.config.to_dict()["_class_name"]][2]
    return jax.eval_shape(lambda: module.init(jax.random.key(0), *dummy(module)))["params"]


def load_transformer(folder: str, dtype=jnp.float32, variant=None, allow_pickle=False):
    """Reads a diffusers ``DiTTransformer2DModel`` / ``PixArtTransformer2DModel`` folder.

    Returns:
      (module, params): params are float32 jax arrays in jaxdiff's layout.
    Raises:
      UnsupportedConfigError naming the class or config field jaxdiff does not implement;
      WeightsError naming a missing, misshapen or unknown tensor.
    """
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: missing; a diffusers transformer folder needs "
                                "config.json next to its weights.")
    raw = read_json(cfg_path)
    name = raw.get("_class_name")
    if name not in TRANSFORMERS:
        raise UnsupportedConfigError(f"{cfg_path}: _class_name={name!r} is not supported "
                                     f"(supported: {', '.join(sorted(TRANSFORMERS))}).")
    config_cls, module_cls, _ = TRANSFORMERS[name]
    module = module_cls(config_cls.from_dict(raw, cfg_path), dtype)
    path = files.find_weights(folder, _STEM, variant, allow_pickle)
    params = convert.torch_to_flax(files.read_tensors(path), transformer_shapes(module),
                                   source=path)
    return module, files.to_device(params)


def _write_transformer(module, params, folder):
    os.makedirs(folder, exist_ok=True)
    _write_json(os.path.join(folder, "config.json"),
                dict(module.config.to_dict(), _diffusers_version="0.42.1"))
    files.write_tensors(os.path.join(folder, f"{_STEM}.safetensors"),
                        convert.flax_to_torch(params))


def save_transformer(module, params, out_dir: str, *, overwrite: bool = True) -> str:
    """Writes a transformer backbone as a diffusers folder (``from_pretrained`` reads it)."""
    with files.atomic_directory(out_dir, overwrite) as tmp:
        _write_transformer(module, params, tmp)
    return out_dir


@dataclasses.dataclass(frozen=True, eq=False)  # hashable by identity, like Pipeline
class DiTPipeline:
    """A class-conditional DiT pipeline: modules and configs, never weights.

    Params are ``{"transformer": ..., "vae": ...}``. ``id2label``: class index -> name
    (comma-separated synonyms, as diffusers' ``DiTPipeline``), or None.
    """
    transformer: DiTTransformer2DModel
    vae: Any
    scheduler: SchedulerConfig
    scheduler_class: str = "DDIMScheduler"
    id2label: Optional[Tuple[Tuple[int, str], ...]] = None

    @property
    def num_classes(self) -> int:
        return self.transformer.config.num_classes

    @property
    def unet(self) -> DiTTransformer2DModel:
        """The denoiser under the name ``denoiser.denoise`` reads (params["transformer"])."""
        return self.transformer

    def label_ids(self, names) -> list:
        """Class ids of label names (any comma-separated synonym); one-line error if unknown."""
        table = {s.strip(): int(k) for k, v in (self.id2label or ()) for s in v.split(",")}
        missing = [n for n in names if n not in table]
        if missing:
            raise ValueError(f"class label {missing[0]!r} is not one of this model's "
                             f"{len(table)} label names.")
        return [table[n] for n in names]


def load_dit_pipeline(path: str, *, dtype=jnp.float32, variant=None,
                      allow_pickle: bool = False) -> Tuple[DiTPipeline, dict]:
    """Reads a diffusers ``DiTPipeline`` folder. Returns (pipe, params)."""
    index_path = os.path.join(path, "model_index.json")
    if not os.path.exists(index_path):
        raise FileNotFoundError(f"{index_path}: not found; a DiT pipeline folder needs "
                                "model_index.json, transformer/, vae/ and scheduler/.")
    index = read_json(index_path)
    transformer, tparams = load_transformer(os.path.join(path, "transformer"), dtype, variant,
                                            allow_pickle)
    if not isinstance(transformer, DiTTransformer2DModel):
        raise UnsupportedConfigError(f"{path}/transformer: a DiT pipeline needs a "
                                     "DiTTransformer2DModel (class-conditional).")
    vae, vparams = load_component(os.path.join(path, "vae"), "vae", dtype, variant,
                                  allow_pickle)
    sched_path = os.path.join(path, "scheduler", "scheduler_config.json")
    if not os.path.exists(sched_path):
        raise FileNotFoundError(f"{sched_path}: missing scheduler config.")
    sched_raw = read_json(sched_path)
    id2label = index.get("id2label")
    pipe = DiTPipeline(transformer, vae, SchedulerConfig.from_dict(sched_raw),
                       sched_raw.get("_class_name") or "DDIMScheduler",
                       tuple((int(k), v) for k, v in id2label.items()) if id2label else None)
    return pipe, {"transformer": tparams, "vae": files.to_device(vparams)}


def save_dit_pipeline(pipe: DiTPipeline, params, out_dir: str, *, overwrite=True) -> str:
    """Writes ``pipe`` + ``params`` as a diffusers ``DiTPipeline`` folder (atomically)."""
    with files.atomic_directory(out_dir, overwrite) as tmp:
        index = {"_class_name": "DiTPipeline", "_diffusers_version": "0.42.1",
                 "scheduler": ["diffusers", pipe.scheduler_class],
                 "transformer": ["diffusers", "DiTTransformer2DModel"],
                 "vae": ["diffusers", "AutoencoderKL"]}
        if pipe.id2label:
            index["id2label"] = {str(k): v for k, v in pipe.id2label}
        _write_json(os.path.join(tmp, "model_index.json"), index)
        _write_transformer(pipe.transformer, params["transformer"], os.path.join(tmp,
                                                                                 "transformer"))
        os.makedirs(os.path.join(tmp, "vae"))
        _write_json(os.path.join(tmp, "vae", "config.json"), pipe.vae.config.to_dict())
        files.write_tensors(os.path.join(tmp, "vae", f"{_STEM}.safetensors"),
                            convert.flax_to_torch(params["vae"]))
        os.makedirs(os.path.join(tmp, "scheduler"))
        _write_json(os.path.join(tmp, "scheduler", "scheduler_config.json"),
                    dict(pipe.scheduler.to_dict(), _class_name=pipe.scheduler_class))
    return out_dir


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
