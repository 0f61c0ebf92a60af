"""Model configs read straight from diffusers' / transformers' ``config.json``.

A config dataclass lists the fields jaxdiff implements, named exactly as upstream.
Fields upstream has but jaxdiff does not implement are accepted only at their default
value (``FIXED``); anything else raises a clear error naming the field.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from typing import Any, Mapping


class UnsupportedConfigError(ValueError):
    """A checkpoint config asks for something jaxdiff does not implement."""


def _tupled(value):
    return tuple(value) if isinstance(value, list) else value


def from_dict(cls, d: Mapping[str, Any], *, fixed: Mapping[str, tuple] = (),
              source: str = "config"):
    """Builds dataclass ``cls`` from an upstream config dict.

    Args:
      cls: a frozen dataclass whose field names are upstream's.
      d: the parsed ``config.json``.
      fixed: upstream fields jaxdiff does not implement -> the values it accepts.
      source: file name used in error messages.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs, unknown = {}, []
    for key, value in d.items():
        if key in names:
            kwargs[key] = _tupled(value)
        elif key.startswith("_") or key in _IGNORED_KEYS:
            continue
        elif key in fixed:
            if _tupled(value) not in fixed[key]:
                raise UnsupportedConfigError(
                    f"{source}: {key}={value!r} is not supported by jaxdiff "
                    f"(supported: {', '.join(repr(v) for v in fixed[key])}).")
        else:
            unknown.append(key)
    if unknown:
        warnings.warn(f"{source}: ignoring unknown config keys {sorted(unknown)}")
    cfg = cls(**kwargs)
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        validate(source)
    return cfg


def to_dict(cfg, class_name: str, extra: Mapping[str, Any] = ()) -> dict:
    """Upstream ``config.json`` content for ``cfg``."""
    out = {"_class_name": class_name}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    out.update(dict(extra))
    return out


def read_json(path) -> dict:
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); re-export the checkpoint.") from None


# Bookkeeping keys written by diffusers / transformers that carry no model meaning.
_IGNORED_KEYS = {
    "transformers_version", "architectures", "output_hidden_states", "return_dict",
    "dtype", "torch_dtype", "chunk_size_feed_forward", "is_encoder_decoder", "id2label",
    "label2id", "problem_type", "model_type", "output_attentions", "initializer_range",
    "initializer_factor", "attention_dropout", "dropout", "use_cache", "tie_word_embeddings",
    "sample_size", "force_upcast", "latents_mean", "latents_std", "pad_token_id",
    "bos_token_id", "eos_token_id", "projection_dim", "mid_block_scale_factor",
    "downsample_padding", "center_input_sample",
}
