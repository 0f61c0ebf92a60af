"""Applying adapter files to a loaded pipeline: LoRAs (one or several) merged into the
params, a Textual Inversion placeholder added to the tokenizer and the token table."""
from __future__ import annotations

from jaxdiff.adapters import kohya
from jaxdiff.adapters import lora as lora_lib
from jaxdiff.adapters import textual_inversion as ti


def apply_adapters(pipe, params, lora=None, lora_scale=1.0, textual_inversion=None):
    """Merges LoRA files and/or adds a Textual Inversion token to (pipe, params).

    Args:
      pipe, params: the loaded pipeline.
      lora: a LoRA safetensors file (diffusers/peft or kohya/A1111 keys; or a folder holding
        pytorch_lora_weights.safetensors), a sequence of them (each merged with its own
        scale, in order: the deltas add up, as diffusers' ``set_adapters`` with several
        adapters), or None.
      lora_scale: strength, multiplied by each file's alpha / rank (0 = no effect): one
        float for every file, or one per file.
      textual_inversion: a ``learned_embeds.safetensors`` file (or folder), or None.
    Returns:
      ``(pipe, params, expand)``: ``expand(prompt)`` rewrites a prompt's placeholder into
      its tokens (identity without ``textual_inversion``).
    Raises:
      ValueError: one line naming the file (and its ``jaxdiff generate`` flag) when it
        cannot be read or does not fit the model.
    """
    expand = lambda prompt: prompt
    files = [] if not lora else [lora] if isinstance(lora, str) else list(lora)
    scales = [lora_scale] if not isinstance(lora_scale, (list, tuple)) else list(lora_scale)
    if files and len(scales) not in (1, len(files)):
        raise ValueError(f"--lora-scale given {len(scales)} times for {len(files)} LoRA files; "
                         "give it once, or once per --lora.")
    for k, file in enumerate(files):
        params = _merge_file(pipe, params, file, scales[k if len(scales) > 1 else 0])
    if textual_inversion:
        name, tables = read_weights(ti.load_embeddings, textual_inversion,
                                    "--textual-inversion")
        tables = embedding_tables(pipe, params, tables, textual_inversion)
        n = next(iter(tables.values())).shape[0]
        for scope, rows in tables.items():
            field = "tokenizer_2" if scope == "text_encoder_2" else "tokenizer"
            tok = ti.add_tokens(getattr(pipe, field), name, n)
            pipe, params = ti.merge_embeddings(pipe, params, tok, rows, scope)
        expand = lambda prompt: ti.expand_prompt(prompt, name, n)
    return pipe, params, expand


def load_lora(pipe, params, lora, scale=1.0):
    """``params`` with LoRA file(s) merged, as ``jaxdiff generate --lora`` does (exported as
    ``jaxdiff.load_lora``; not ``adapters.lora.load_lora``, which reads a peft file's
    adapter pytree).

    Args:
      lora: a diffusers/peft or kohya/A1111 file (SD 1.x/2.x or SDXL), or a list of them.
      scale: one float, or one per file (each times its file's alpha / rank).
    Returns:
      new params (``params`` is not modified; unadapted leaves are shared).
    """
    return apply_adapters(pipe, params, lora, scale)[1]


def _merge_file(pipe, params, lora, lora_scale):
    """``params`` with one LoRA file merged at ``lora_scale`` (times its alpha / rank)."""
    if kohya.is_kohya_file(lora):  # per-module alpha / rank already folded in
        adapters = read_weights(lambda p: kohya.load_kohya_lora(p, params, pipe.unet.config),
                                lora, "--lora")
        scale = lora_scale
    else:
        adapters, alpha = read_weights(lora_lib.load_lora, lora, "--lora")
        scale = lora_lib.lora_scale(alpha, lora_lib.lora_rank(adapters), lora_scale)
    try:
        return lora_lib.merge_lora(params, adapters, scale)
    except ValueError as e:
        raise ValueError(f"--lora {lora}: does not fit this model ({e})") from None


def embedding_tables(pipe, params, tables: dict, source: str) -> dict:
    """The rows of ``tables`` ({text encoder: [n, D]}) this pipeline uses, checked: an SDXL
    pipeline needs clip_l / clip_g rows for each of its encoders (the refiner: clip_g
    only), SD 1.x / 2.x one tensor; each D must be the encoder's width."""
    have = [name for name in ("text_encoder", "text_encoder_2") if getattr(pipe, name)]
    missing = [s for s in have if s not in tables]
    if missing or (not pipe.is_sdxl and "text_encoder_2" in tables):
        kind = "SDXL (clip_l / clip_g)" if "text_encoder_2" in tables else "SD 1.x / 2.x"
        raise ValueError(f"--textual-inversion {source}: {kind} embeddings do not fit this "
                         f"model (it has {' and '.join(have)}); they were trained for another "
                         "model.")
    for scope in have:
        width = ti.token_table(params, scope).shape[1]
        if tables[scope].shape[1] != width:
            raise ValueError(f"--textual-inversion {source}: embeddings have "
                             f"{tables[scope].shape[1]} dims, this model's {scope} {width}; "
                             "they were trained for another model.")
    return {scope: tables[scope] for scope in have}


def read_weights(load, path, flag):
    """``load(path)`` with any unreadable-file error turned into one ValueError line
    naming ``flag`` and ``path``."""
    try:
        return load(path)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as e:  # noqa: BLE001 -- safetensors raises its own error types
        raise ValueError(f"{flag} {path}: not a readable safetensors file "
                         f"({type(e).__name__}: {e}).") from None
