"""Textual Inversion tokens: new token embeddings as a separate array, and their file.

The frozen token-embedding table ``[V, D]`` stays in the params pytree; the learned rows
``new_rows [n, D]`` are their own pytree, and ``embed`` looks ids ``>= V`` up in them. The
optimizer state therefore holds only the new rows, and every other row of the table is
untouched by construction (diffusers' Flax script instead masked the gradient of the whole
table and restored the other rows after each step).

Tokens follow diffusers' multi-vector convention: a placeholder ``"<cat-toy>"`` learned
with n vectors is the n added tokens ``"<cat-toy>"``, ``"<cat-toy>_1"``, ...,
``"<cat-toy>_{n-1}"`` (ids ``V .. V+n-1``), and a prompt's placeholder is expanded to all of
them (``expand_prompt``). Files are ``learned_embeds.safetensors`` with one tensor
``{placeholder: [n, D]}``, as diffusers' ``textual_inversion.py`` writes and
``StableDiffusionPipeline.load_textual_inversion`` reads. SDXL embeddings are one file with
``{"clip_l": [n, 768], "clip_g": [n, 1280]}`` (rows for ``text_encoder`` and
``text_encoder_2``) whose placeholder is the file name, as A1111 and diffusers' SDXL
examples use them (``load_embeddings``).

Learning the rows is ``jaxdiff.training.textual_inversion``.

References:
  Gal et al., 2022, "An Image is Worth One Word: Personalizing Text-to-Image Generation
  using Textual Inversion".
"""
from __future__ import annotations

import copy
import dataclasses
import os
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from jaxdiff.weights import files

WEIGHT_NAME = "learned_embeds.safetensors"
SDXL_KEYS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}


# ---------------------------------------------------------------------------- tokenizer

def placeholder_tokens(placeholder: str, num_vectors: int = 1) -> list:
    """``["<p>", "<p>_1", ..., "<p>_{n-1}"]``: the tokens of an n-vector placeholder."""
    if num_vectors < 1:
        raise ValueError(f"num_vectors must be >= 1, got {num_vectors=}.")
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


def add_tokens(tokenizer, placeholder: str, num_vectors: int = 1):
    """A copy of ``tokenizer`` with the placeholder's tokens added (ids ``len(tokenizer)..``).

    Args:
      tokenizer: a transformers (CLIP) tokenizer; not modified.
      placeholder: new word, e.g. ``"<cat-toy>"``.
      num_vectors: number of embedding vectors (tokens) for the placeholder.
    Returns:
      The new tokenizer.
    Raises:
      ValueError: if a token already is (or tokenizes to) a single token of the vocabulary,
        or does not survive the tokenizer's normalisation (CLIP lower-cases text).
    """
    names = placeholder_tokens(placeholder, num_vectors)
    if not placeholder or any(c.isspace() for c in placeholder):
        raise ValueError(f"placeholder must be one word without spaces, got {placeholder!r}.")
    taken = [n for n in names if _is_existing_token(tokenizer, n)]
    if taken:
        raise ValueError(f"placeholder token(s) {taken} already exist in the tokenizer "
                         "vocabulary; training them would change an existing word. Choose a "
                         "new string such as '<my-concept>'.")
    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(names)
    ids = tok.convert_tokens_to_ids(names)
    want = list(range(len(tokenizer), len(tokenizer) + num_vectors))
    if list(ids) != want:
        raise ValueError(f"added tokens got ids {ids}, expected {want}.")
    for name, i in zip(names, ids):
        if _encode(tok, name) != [i]:
            raise ValueError(f"placeholder token {name!r} does not tokenize to itself "
                             f"(got {_encode(tok, name)}); CLIP lower-cases prompts, so use "
                             "lower case.")
    return tok


def expand_prompt(prompt: str, placeholder: str, num_vectors: int) -> str:
    """Replaces ``placeholder`` by all its tokens (diffusers' ``maybe_convert_prompt``)."""
    return prompt.replace(placeholder, " ".join(placeholder_tokens(placeholder, num_vectors)))


def _encode(tokenizer, text):
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _is_existing_token(tokenizer, name) -> bool:
    ids = _encode(tokenizer, name)
    return name in tokenizer.get_vocab() or (len(ids) == 1 and ids[0] != tokenizer.unk_token_id)


# --------------------------------------------------------------------------- embeddings

def token_table(params, scope: str = "text_encoder") -> jax.Array:
    """The frozen token-embedding table ``[V, D]`` of pipeline params (``scope``: the text
    encoder, ``"text_encoder_2"`` for SDXL's second)."""
    return params[scope]["text_model"]["embeddings"]["token_embedding"]["embedding"]


def init_embeddings(params, tokenizer, initializer_token: str, num_vectors: int = 1,
                    scope: str = "text_encoder"):
    """New rows initialised to the embedding of ``initializer_token`` (as diffusers does).

    Args:
      params: pipeline params ``{"text_encoder", "unet", "vae"}``.
      tokenizer: tokenizer in which ``initializer_token`` is looked up.
      initializer_token: an existing word that is exactly one token (e.g. ``"star"``).
      num_vectors: rows to create.
      scope: the text encoder whose table is read (SDXL: also ``"text_encoder_2"``).
    Returns:
      ``new_rows``: float32 ``[num_vectors, D]``.
    """
    if num_vectors < 1:
        raise ValueError(f"num_vectors must be >= 1, got {num_vectors=}.")
    ids = _encode(tokenizer, initializer_token)
    table = token_table(params, scope)
    if len(ids) != 1:
        raise ValueError(f"initializer_token {initializer_token!r} is {len(ids)} tokens "
                         f"{tokenizer.convert_ids_to_tokens(ids)}; it must be a single token.")
    if ids[0] >= table.shape[0]:
        raise ValueError(f"initializer_token {initializer_token!r} is itself a new token.")
    row = jnp.asarray(table[ids[0]], jnp.float32)
    return jnp.tile(row[None], (num_vectors, 1))


def embed(params, new_rows, ids, vocab_size: Optional[int] = None,
          scope: str = "text_encoder") -> jax.Array:
    """Token embeddings of ``ids`` with ids ``>= vocab_size`` read from ``new_rows``.

    Args:
      params: pipeline params (the frozen table ``[V, D]``).
      new_rows: ``[n, D]`` learned rows for ids ``V .. V+n-1``.
      ids: int ``[B, L]``.
      vocab_size: V, the size of the tokenizer the rows were added to (default: the
        table's row count, which is the same for Stable Diffusion checkpoints).
      scope: the text encoder whose table is read.
    Returns:
      ``[B, L, D]``, to pass as ``text_encoder.apply(..., embeddings=...)``.
    """
    table = token_table(params, scope)
    vocab_size = table.shape[0] if vocab_size is None else vocab_size
    ids = jnp.asarray(ids)
    base = jnp.take(table, jnp.minimum(ids, vocab_size - 1), axis=0)
    extra = jnp.take(new_rows, jnp.clip(ids - vocab_size, 0, new_rows.shape[0] - 1), axis=0)
    return jnp.where((ids >= vocab_size)[..., None], extra.astype(base.dtype), base)


def encode_text(pipe, params, new_rows, ids, vocab_size=None):
    """``pipe.encode_text`` with the learned rows: ids ``[B, L]`` -> ``[B, L, D]``.

    SDXL: ``new_rows`` and ``vocab_size`` are ``{encoder name: rows [n, D_e]}`` /
    ``{encoder name: V_e}`` (every encoder of the pipeline), ids ``[B, E, L]``; returns
    ``pipe.encode_text``'s pytree."""
    if not pipe.is_sdxl:
        return pipe.encode_text(params, ids, embeddings=embed(params, new_rows, ids, vocab_size))
    ids = jnp.asarray(ids)
    emb = {name: embed(params, new_rows[name], ids[:, i], (vocab_size or {}).get(name), name)
           for i, name in enumerate(pipe.encoder_names)}
    return pipe.encode_text(params, ids, embeddings=emb)


def merge_embeddings(pipe, params, tokenizer, new_rows, scope: str = "text_encoder"):
    """A pipeline whose vocabulary includes the learned tokens (for sampling / export).

    Like diffusers' ``resize_token_embeddings``: the table becomes the first
    ``V = len(tokenizer) - n`` rows of the old one followed by the n learned rows.

    Args:
      pipe, params: the base pipeline and its params.
      tokenizer: the tokenizer returned by ``add_tokens``.
      new_rows: ``[n, D]`` learned rows.
      scope: the text encoder (SDXL: ``"text_encoder_2"`` with ``tokenizer_2``).
    Returns:
      ``(pipe, params)`` with the tokenizer, ``vocab_size = V + n`` and the table
      ``[V + n, D]``; usable by ``jaxdiff.generate`` and ``jaxdiff.save_pipeline``.
    """
    table = token_table(params, scope)
    vocab = len(tokenizer) - new_rows.shape[0]
    if not 0 < vocab <= table.shape[0]:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens for {new_rows.shape[0]} new "
                         f"rows, but the table has only {table.shape[0]} rows.")
    merged = jnp.concatenate([table[:vocab], jnp.asarray(new_rows, table.dtype)], axis=0)
    text = params[scope]
    emb = dict(text["text_model"]["embeddings"],
               token_embedding=dict(text["text_model"]["embeddings"]["token_embedding"],
                                    embedding=merged))
    text = dict(text, text_model=dict(text["text_model"], embeddings=emb))
    module = getattr(pipe, scope)
    config = dataclasses.replace(module.config, vocab_size=merged.shape[0])
    tok_field = "tokenizer_2" if scope == "text_encoder_2" else "tokenizer"
    new_pipe = dataclasses.replace(pipe, **{tok_field: tokenizer,
                                            scope: module.clone(config=config)})
    return new_pipe, dict(params, **{scope: text})


# --------------------------------------------------------------------------------- files

def save_learned_embeds(path: str, placeholder: str, rows) -> str:
    """Writes ``{placeholder: rows [n, D]}`` as diffusers' ``learned_embeds.safetensors``.

    Args:
      path: a directory (file ``<path>/learned_embeds.safetensors``) or a ``.safetensors``
        file name.
      placeholder: the placeholder token (the file's only key).
      rows: ``[n, D]`` (or ``[D]``) learned embeddings.
    Returns:
      The file written (atomically).
    """
    rows = np.asarray(rows, np.float32)
    rows = rows[None] if rows.ndim == 1 else rows
    if rows.ndim != 2:
        raise ValueError(f"rows must be [n, D], got shape {rows.shape}.")
    file = _file(path, create=True)
    save_file({placeholder: np.ascontiguousarray(rows)}, file + ".tmp",
              metadata={"format": "pt"})
    os.replace(file + ".tmp", file)
    return file


def save_sdxl_embeds(path: str, placeholder: str, rows: dict) -> str:
    """Writes SDXL embeddings ``{"clip_l": [n, D1], "clip_g": [n, D2]}`` (``rows``:
    ``{encoder name: [n, D]}``; the refiner's: ``clip_g`` only), read back by
    ``load_embeddings`` and diffusers' SDXL examples with the file name as placeholder.

    Args:
      path: a directory (file ``<path>/<placeholder>.safetensors``, so the file name is
        the placeholder) or a ``.safetensors`` file name.
    Returns:
      The file written (atomically).
    """
    names = {v: k for k, v in SDXL_KEYS.items()}
    state = {names[k]: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in rows.items()}
    file = path if path.endswith(".safetensors") else os.path.join(path, placeholder +
                                                                   ".safetensors")
    os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
    save_file(state, file + ".tmp", metadata={"format": "pt"})
    os.replace(file + ".tmp", file)
    return file


def load_learned_embeds(path: str) -> Tuple[str, jax.Array]:
    """Reads a diffusers Textual Inversion safetensors file.

    Returns:
      ``(placeholder, rows [n, D])``.
    """
    file = _file(path, create=False)
    if not file.endswith(".safetensors"):
        raise ValueError(f"{file}: only safetensors embeddings are read (pickle files can run "
                         "code); convert it to safetensors first.")
    state = load_file(file)
    if len(state) != 1:
        raise ValueError(f"{file}: expected one tensor {{placeholder: [n, D]}}, found keys "
                         f"{sorted(state)}.")
    (name, rows), = state.items()
    rows = rows[None] if rows.ndim == 1 else rows
    return name, jnp.asarray(rows, jnp.float32)


def load_embeddings(path: str) -> Tuple[str, dict]:
    """Reads SD 1.x / 2.x or SDXL Textual Inversion embeddings.

    Returns:
      ``(placeholder, {text encoder scope: rows [n, D]})``: a one-tensor file gives its key
      and ``{"text_encoder": rows}``; an SDXL file (``clip_l`` / ``clip_g``) gives the file
      name without extension and rows for ``text_encoder`` / ``text_encoder_2``.
    """
    file = _file(path, create=False)
    if file.endswith(".safetensors"):
        state = load_file(file)
        if state and set(state) <= set(SDXL_KEYS) and "clip_g" in state:
            rows = {SDXL_KEYS[k]: jnp.asarray(v[None] if v.ndim == 1 else v, jnp.float32)
                    for k, v in state.items()}
            if len({r.shape[0] for r in rows.values()}) != 1:
                raise ValueError(f"{file}: clip_l and clip_g have different vector counts "
                                 f"{[r.shape[0] for r in rows.values()]}.")
            name = os.path.basename(file)[: -len(".safetensors")]
            return name, rows
    name, rows = load_learned_embeds(path)
    return name, {"text_encoder": rows}


def _file(path: str, create: bool) -> str:
    return files.weight_file(path, WEIGHT_NAME, create, "embeddings")
