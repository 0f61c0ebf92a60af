"""diffusers-format ControlNet and T2I-Adapter folders: ``config.json`` +
``diffusion_pytorch_model.safetensors``, as ``ControlNetModel.from_pretrained`` /
``T2IAdapter.from_pretrained`` read and ``save_pretrained`` writes them."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.config import read_json
from jaxdiff.models.controlnet import ControlNetConfig, ControlNetModel, controlnet_dummy_inputs
from jaxdiff.models.t2i_adapter import T2IAdapter, T2IAdapterConfig, adapter_dummy_inputs
from jaxdiff.weights import convert, files
from jaxdiff.weights.diffusers_format import DEFAULT_MODEL

_STEM = "diffusion_pytorch_model"
# The embedded model's shipped control models (configs/controlnet.py, configs/t2i_adapter.py;
# figures in bench/README.md): ``--controlnet shipped`` / ``--adapter shipped``.
SHAPES_CONTROLNET = os.path.join(os.path.dirname(DEFAULT_MODEL), "shapes_controlnet_seg")
SHAPES_ADAPTER = os.path.join(os.path.dirname(DEFAULT_MODEL), "shapes_adapter_edges")


def _shapes(module, args):
    return jax.eval_shape(lambda: module.init(jax.random.key(0), *args))["params"]


def _config(folder, what):
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such {what} directory.")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: missing; a diffusers {what} folder needs "
                                "config.json next to its weights.")
    raw = read_json(cfg_path)
    return cfg_path, raw


def load_controlnet(folder: str, dtype=jnp.float32, variant=None, allow_pickle=False):
    """Reads a diffusers ``ControlNetModel`` folder.

    Returns:
      (module, params): a ``ControlNetModel`` and its float32 params (jax arrays).
    """
    cfg_path, raw = _config(folder, "ControlNet")
    if raw.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise ValueError(f"{cfg_path}: _class_name={raw['_class_name']!r}; expected a "
                         "ControlNetModel folder.")
    module = ControlNetModel(ControlNetConfig.from_dict(raw, cfg_path), dtype)
    return module, _read(folder, module, controlnet_dummy_inputs(module), variant, allow_pickle)


def load_t2i_adapter(folder: str, dtype=jnp.float32, variant=None, allow_pickle=False):
    """Reads a diffusers ``T2IAdapter`` folder. Returns (module, params)."""
    cfg_path, raw = _config(folder, "T2I-Adapter")
    if raw.get("_class_name", "T2IAdapter") != "T2IAdapter":
        raise ValueError(f"{cfg_path}: _class_name={raw['_class_name']!r}; expected a "
                         "T2IAdapter folder.")
    module = T2IAdapter(T2IAdapterConfig.from_dict(raw, cfg_path), dtype)
    return module, _read(folder, module, adapter_dummy_inputs(module), variant, allow_pickle)


def _read(folder, module, args, variant, allow_pickle):
    path = files.find_weights(folder, _STEM, variant, allow_pickle)
    params = convert.torch_to_flax(files.read_tensors(path), _shapes(module, args), source=path)
    return files.to_device(params)


def save_control_model(module, params, out_dir: str, *, overwrite: bool = True,
                       dtype=np.float32) -> str:
    """Writes a ``ControlNetModel`` or ``T2IAdapter`` and its params as a diffusers folder
    (atomically: ``out_dir`` is replaced only once every file is written), the tensors in
    ``dtype`` (float16: half the size; loading gives float32 params either way)."""
    return files.write_model_folder(out_dir, module.config.to_dict(), f"{_STEM}.safetensors",
                                    convert.flax_to_torch(params, dtype=dtype),
                                    overwrite=overwrite)
