"""``load_pipeline`` / ``save_pipeline``: one entry for every checkpoint form jaxdiff reads.

* a diffusers-layout folder (``model_index.json``; ``None``: the embedded default model),
* a single original-layout file (``.safetensors``; A1111 / ComfyUI SD 1.x / 2.x),
* ``org/name``: a model in the local Hugging Face cache (``--model org/name``),
* ``embedded:NAME``: a model shipped under ``jaxdiff/assets/`` (``EMBEDDED``: ``shapes``,
  the default U-Net model, also ``embedded``; ``dit``, the text-DiT model).
"""
from __future__ import annotations

import os
from typing import Optional

import jax.numpy as jnp
import numpy as np

from jaxdiff.weights import diffusers_format, hf_cache, single_file, single_file_write

FORMATS = ("diffusers", "single_file")
# --model embedded:NAME -> the shipped pipeline folder.
EMBEDDED = {"shapes": diffusers_format.DEFAULT_MODEL, "dit": diffusers_format.DIT_MODEL}


def is_embedded(name: Optional[str]) -> bool:
    """``embedded`` or ``embedded:NAME`` (any NAME: unknown ones are refused on loading),
    unless a local path of that name exists."""
    return bool(name) and (name == "embedded" or name.startswith("embedded:")) \
        and not os.path.exists(name)


def embedded_folder(name: str) -> str:
    """The folder of ``embedded`` / ``embedded:NAME``; a one-line error for unknown names."""
    key = name.partition(":")[2] or "shapes"
    if key not in EMBEDDED:
        raise FileNotFoundError(f"--model {name}: no such embedded model; use one of "
                                f"{', '.join('embedded:' + k for k in EMBEDDED)}.")
    return EMBEDDED[key]


def load_pipeline(path: Optional[str] = None, *, dtype=jnp.float32, variant=None,
                  allow_pickle: bool = False, revision: Optional[str] = None,
                  config: Optional[str] = None, prediction_type: Optional[str] = None,
                  extract_ema: bool = False):
    """Reads a pipeline from a folder, a single file or the Hugging Face cache.

    Args:
      path: diffusers-layout folder, original-layout ``.safetensors`` file, ``org/name`` of
        a model in the local Hugging Face cache, ``embedded:NAME`` (``EMBEDDED``), or
        ``None`` (the embedded default model).
      dtype: compute dtype of the networks (params are always float32).
      variant: weight-file variant of a folder, such as ``"fp16"``.
      allow_pickle: permit ``.bin``/``.ckpt`` weights (they can execute code).
      revision: for ``org/name``: a branch/tag under ``refs/`` or a commit hash.
      config: single files only: a diffusers folder (or ``org/name``) of the same model
        giving configs and tokenizer (see ``single_file.load_single_file``).
      prediction_type: single files only: overrides the scheduler's prediction type.
      extract_ema: single files only: the UNet from the ``model_ema.*`` copy of a training
        checkpoint that holds both.
    Returns:
      ``(pipe, params)`` with params ``{"text_encoder", "unet", "vae"}``.
    """
    if is_embedded(path):
        path = embedded_folder(path)
    if path is not None and os.path.isfile(path):
        return single_file.load_single_file(path, config=config, prediction_type=prediction_type,
                                            extract_ema=extract_ema, dtype=dtype,
                                            allow_pickle=allow_pickle)
    if path is not None and not os.path.exists(path) and path.endswith(single_file.SUFFIXES):
        raise FileNotFoundError(f"{path}: no such checkpoint file.")
    if path is not None and hf_cache.is_repo_id(path):
        try:
            path = hf_cache.resolve(path, revision)
        except FileNotFoundError as e:  # also a mistyped relative path: say both
            raise FileNotFoundError(str(e).replace(": not in", ": no such local folder or "
                                                   "file, and not in", 1)) from None
    return diffusers_format.load_pipeline(path, dtype=dtype, variant=variant,
                                          allow_pickle=allow_pickle)


def save_pipeline(pipe, params, out: str, *, overwrite: bool = True,
                  format: str = "diffusers", dtype=None) -> str:
    """Writes ``pipe`` + ``params`` (atomically).

    Args:
      out: folder (``format="diffusers"``, loadable by diffusers' ``from_pretrained``) or
        ``.safetensors`` file (``format="single_file"``: the original SD 1.x/2.x layout that
        A1111, ComfyUI and diffusers' ``from_single_file`` read).
      overwrite: replace an existing output.
      format: ``"diffusers"`` or ``"single_file"``.
      dtype: the tensors' dtype (default float32; ``numpy.float16`` halves the size as
        most released files; loading gives float32 params either way).
    """
    if format == "diffusers":
        return diffusers_format.save_pipeline(
            pipe, params, out, overwrite=overwrite,
            dtype=np.dtype(dtype) if dtype is not None else np.float32)
    if format != "single_file":
        raise ValueError(f"format={format!r} is not one of {FORMATS}.")
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out}: already exists; pass overwrite=True or choose another "
                              "output file.")
    return single_file_write.save_single_file(pipe, params, out,
                                              dtype=dtype if dtype is not None else "float32")
