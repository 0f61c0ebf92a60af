"""Prompt-to-Prompt controller data built from the prompts, as google/prompt-to-prompt does.

A port of the reference's own builders, independent of jaxdiff:
``seq_aligner.get_replacement_mapper`` / ``get_refinement_mapper`` (global alignment of
the token sequences), ``ptp_utils.get_word_inds``, ``get_time_words_attention_alpha``,
``null_text_w_ptp.ipynb``'s ``get_equalizer`` and the word masks of its ``LocalBlend``.
Only ``max_len`` is a parameter (the reference fixes 77: CLIP's length), so tiny test
tokenizers work. Everything returns numpy float32 / int64 arrays.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple, Union

import numpy as np

Bounds = Union[float, Tuple[float, float]]


# ----------------------------------------------------------------- seq_aligner.py
def _global_align(x, y, gap=0, match=1, mismatch=-1):
    """Needleman-Wunsch score and traceback (1 = left, 2 = up, 3 = diagonal, 4 = origin)."""
    matrix = np.zeros((len(x) + 1, len(y) + 1), np.int32)
    matrix[0, 1:] = (np.arange(len(y)) + 1) * gap
    matrix[1:, 0] = (np.arange(len(x)) + 1) * gap
    trace = np.zeros((len(x) + 1, len(y) + 1), np.int32)
    trace[0, 1:], trace[1:, 0], trace[0, 0] = 1, 2, 4
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            left = matrix[i, j - 1] + gap
            up = matrix[i - 1, j] + gap
            diag = matrix[i - 1, j - 1] + (match if x[i - 1] == y[j - 1] else mismatch)
            matrix[i, j] = max(left, up, diag)
            trace[i, j] = 1 if matrix[i, j] == left else 2 if matrix[i, j] == up else 3
    return trace


def _mapper_y_to_x(x, y, trace):
    i, j, out = len(x), len(y), []
    while i > 0 or j > 0:
        if trace[i, j] == 3:
            i, j = i - 1, j - 1
            out.append((j, i))
        elif trace[i, j] == 1:
            j -= 1
            out.append((j, -1))
        elif trace[i, j] == 2:
            i -= 1
        else:
            break
    return np.array(out[::-1], np.int64)


def refinement_mapper(source: str, target: str, tokenizer, max_len: int):
    """``get_mapper``: (mapper int64 [max_len], alphas float32 [max_len])."""
    x, y = tokenizer.encode(source), tokenizer.encode(target)
    base = _mapper_y_to_x(x, y, _global_align(x, y))
    alphas = np.ones(max_len, np.float32)
    alphas[:base.shape[0]] = (base[:, 1] != -1).astype(np.float32)
    mapper = np.zeros(max_len, np.int64)
    mapper[:base.shape[0]] = base[:, 1]
    mapper[base.shape[0]:] = len(y) + np.arange(max_len - len(y))
    return mapper, alphas


def word_inds(text: str, word: Union[int, str], tokenizer) -> np.ndarray:
    """``get_word_inds``: token positions (BOS = 0) of a word given by index or text."""
    split = text.split(" ")
    places = [i for i, w in enumerate(split) if w == word] if isinstance(word, str) else [word]
    out = []
    if places:
        pieces = [tokenizer.decode([t]).strip("#") for t in tokenizer.encode(text)][1:-1]
        cur, ptr = 0, 0
        for i, piece in enumerate(pieces):
            cur += len(piece)
            if ptr in places:
                out.append(i + 1)
            if cur >= len(split[ptr]):
                ptr, cur = ptr + 1, 0
    return np.array(out, np.int64)


def replacement_mapper(source: str, target: str, tokenizer, max_len: int,
                       tail: str = "reference") -> np.ndarray:
    """``get_replacement_mapper_``: float32 [max_len, max_len] source -> target tokens.

    After the last swapped word the reference writes ``mapper[j, j]`` (target position on
    both sides). When a swap changes the token count that maps every later source token
    to the wrong target token (off by the difference); ``tail="aligned"`` writes
    ``mapper[i, j]`` there instead, which is what jaxdiff does. Both agree whenever the
    swapped words have equal token counts.
    """
    wx, wy = source.split(" "), target.split(" ")
    if len(wx) != len(wy):
        raise ValueError("attention replacement needs prompts with the same number of words")
    replaced = [i for i in range(len(wy)) if wy[i] != wx[i]]
    src = [word_inds(source, i, tokenizer) for i in replaced]
    tgt = [word_inds(target, i, tokenizer) for i in replaced]
    mapper = np.zeros((max_len, max_len), np.float32)
    i = j = cur = 0
    while i < max_len and j < max_len:
        if cur < len(src) and src[cur][0] == i:
            s, t = src[cur], tgt[cur]
            if len(s) == len(t):
                mapper[s, t] = 1
            else:
                for t_k in t:
                    mapper[s, t_k] = 1 / len(t)
            cur += 1
            i += len(s)
            j += len(t)
        elif cur < len(src):
            mapper[i, j] = 1
            i, j = i + 1, j + 1
        else:
            mapper[(j if tail == "reference" else i), j] = 1
            i, j = i + 1, j + 1
    return mapper


# ------------------------------------------------------------------- ptp_utils.py
def _update_alpha(alpha, bounds: Bounds, inds=None):
    if isinstance(bounds, (int, float)):
        bounds = (0.0, bounds)
    start, end = int(bounds[0] * alpha.shape[0]), int(bounds[1] * alpha.shape[0])
    inds = np.arange(alpha.shape[1]) if inds is None else inds
    alpha[:start, inds] = 0
    alpha[start:end, inds] = 1
    alpha[end:, inds] = 0
    return alpha


def time_words_alpha(target: str, num_steps: int,
                     cross_replace_steps: Union[Bounds, Dict[str, Bounds]], tokenizer,
                     max_len: int) -> np.ndarray:
    """``get_time_words_attention_alpha`` for one edited prompt: float32 [steps + 1, L]."""
    steps = dict(cross_replace_steps) if isinstance(cross_replace_steps, dict) else {
        "default_": cross_replace_steps}
    steps.setdefault("default_", (0.0, 1.0))
    alpha = _update_alpha(np.zeros((num_steps + 1, max_len), np.float32), steps["default_"])
    for word, bounds in steps.items():
        if word != "default_":
            inds = word_inds(target, word, tokenizer)
            if len(inds):
                alpha = _update_alpha(alpha, bounds, inds)
    return alpha


def equalizer(text: str, words: Sequence[str], values: Sequence[float], tokenizer,
              max_len: int) -> np.ndarray:
    """``get_equalizer`` of null_text_w_ptp.ipynb: float32 [max_len], 1 except the words."""
    eq = np.ones(max_len, np.float32)
    for word, value in zip(words, values):
        eq[word_inds(text, word, tokenizer)] = value
    return eq


def self_replace_range(num_steps: int, self_replace_steps: Bounds) -> Tuple[int, int]:
    """``AttentionControlEdit.num_self_replace``: steps [start, end) with self replacement."""
    if isinstance(self_replace_steps, (int, float)):
        self_replace_steps = (0.0, self_replace_steps)
    return int(num_steps * self_replace_steps[0]), int(num_steps * self_replace_steps[1])


def blend_word_mask(prompt: str, words: Sequence[str], tokenizer, max_len: int) -> np.ndarray:
    """``LocalBlend.alpha_layers`` of one prompt: float32 [max_len], 1 at the words' tokens."""
    mask = np.zeros(max_len, np.float32)
    for word in words:
        mask[word_inds(prompt, word, tokenizer)] = 1
    return mask
