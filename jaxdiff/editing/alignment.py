"""Token alignment between a source and a target prompt (Prompt-to-Prompt's seq_aligner).

Host-side (numpy) preprocessing: the results are arrays handed to the jitted controller.
They equal google/prompt-to-prompt's ``seq_aligner`` matrices (checked against a port of
it in tests/test_p2p_control_reference.py) with one deliberate difference: after a word
swap that changes the token count, the reference maps every later source token to the
wrong target token (``mapper[j, j]``, off by the difference); ``replacement_mapper``
keeps them aligned.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np


def word_token_indices(tokenizer, prompt: str) -> List[List[int]]:
    """For each whitespace word of ``prompt``, its token positions in the encoded ids
    (position 0 is the start token)."""
    out, pos = [], 1
    for word in prompt.split():
        n = len(tokenizer.encode(word, add_special_tokens=False))
        out.append(list(range(pos, pos + n)))
        pos += n
    return out


def replacement_mapper(tokenizer, source: str, target: str, max_len: int) -> np.ndarray:
    """[max_len, max_len] matrix M with ``target_map = source_map @ M`` (word swap).

    Both prompts must have the same number of words; words that differ may have
    different token counts (the source tokens then spread evenly over the target's).
    """
    src_words, tgt_words = source.split(), target.split()
    if len(src_words) != len(tgt_words):
        raise ValueError(f"replace edit needs the same number of words: {source!r} has "
                         f"{len(src_words)}, {target!r} has {len(tgt_words)}; use refine.")
    src_idx = word_token_indices(tokenizer, source)
    tgt_idx = word_token_indices(tokenizer, target)
    mapper = np.zeros((max_len, max_len), np.float32)
    mapper[0, 0] = 1.0
    for s, t in zip(src_idx, tgt_idx):
        for i in s:
            for j in t:
                mapper[i, j] = 1.0 / len(t) if len(s) != len(t) else float(s.index(i) == t.index(j))
    last_s = src_idx[-1][-1] + 1 if src_idx else 1
    last_t = tgt_idx[-1][-1] + 1 if tgt_idx else 1
    for k in range(max_len - max(last_s, last_t)):  # end token and padding
        if last_s + k < max_len and last_t + k < max_len:
            mapper[last_s + k, last_t + k] = 1.0
    return mapper


def global_alignment(x: Sequence[int], y: Sequence[int], gap: int = 0, match: int = 1,
                     mismatch: int = -1) -> List[Tuple[int, int]]:
    """Needleman-Wunsch alignment of token lists; returns aligned (i, j) index pairs.

    Ties are broken as prompt-to-prompt's ``seq_aligner.global_align`` does (a gap in
    the source first, then a gap in the target, then the diagonal), so among equally good
    alignments the same one is chosen ("a cat" -> "a cat on a mat" aligns "cat" to
    "cat", not to the "at" of "mat")."""
    n, m = len(x), len(y)
    score = np.zeros((n + 1, m + 1), np.int64)
    score[:, 0] = np.arange(n + 1) * gap
    score[0, :] = np.arange(m + 1) * gap
    move = np.zeros((n + 1, m + 1), np.int8)  # 1 left, 2 up, 3 diagonal
    move[0, 1:], move[1:, 0] = 1, 2
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            left, up = score[i, j - 1] + gap, score[i - 1, j] + gap
            diag = score[i - 1, j - 1] + (match if x[i - 1] == y[j - 1] else mismatch)
            score[i, j] = max(left, up, diag)
            move[i, j] = 1 if score[i, j] == left else 2 if score[i, j] == up else 3
    pairs, i, j = [], n, m
    while i > 0 or j > 0:
        if move[i, j] == 3:
            i, j = i - 1, j - 1
            pairs.append((i, j))
        elif move[i, j] == 1:
            j -= 1
        else:
            i -= 1
    return pairs[::-1]


def refinement_mapper(tokenizer, source: str, target: str, max_len: int):
    """(mapper [max_len] int32, alphas [max_len] float32) for a refine edit.

    ``mapper[j]`` is the source position whose map target position j takes; ``alphas[j]``
    is 1 where j is aligned to a source token and 0 for tokens the target adds. The
    encoded prompts (start and end tokens included, no padding) are aligned; positions
    after the target's end token map to themselves, as prompt-to-prompt's ``get_mapper``.
    """
    x, y = tokenizer.encode(source), tokenizer.encode(target)
    mapper = np.arange(max_len, dtype=np.int32)
    alphas = np.ones(max_len, np.float32)
    alphas[:min(len(y), max_len)] = 0.0
    for i, j in global_alignment(x, y):
        if j < max_len:
            mapper[j], alphas[j] = i, 1.0
    return mapper, alphas
