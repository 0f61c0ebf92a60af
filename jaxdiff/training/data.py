"""Deterministic batching from random-access sources (``tfds.data_source`` or lists).

The batch of step ``s`` is a pure function of (seed, s), so the data position of a
checkpoint is just its step, and resuming reproduces the exact stream. On multi-host
jobs every process reads only its own slice of each global batch.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np


def batch_indices(num_examples: int, global_batch: int, step: int, seed: int) -> np.ndarray:
    """Global example indices of ``step``: epoch-wise permutations, no example skipped."""
    per_epoch = max(1, num_examples // global_batch)
    epoch, pos = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    return perm[pos * global_batch:(pos + 1) * global_batch]


def host_slice(indices: np.ndarray) -> np.ndarray:
    """This process's part of a global batch of indices."""
    n, p = jax.process_count(), jax.process_index()
    per = len(indices) // n
    return indices[p * per:(p + 1) * per]


def _text(x) -> str:
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if isinstance(x, np.ndarray):
        return _text(x.item())
    return str(x)


def read_batch(source, indices: Sequence[int], image_key="image", caption_key="caption"):
    """Reads examples -> (uint8 images [B,H,W,3], list of captions)."""
    examples = [source[int(i)] for i in indices]
    images = np.stack([np.asarray(e[image_key], np.uint8) for e in examples])
    return images, [_text(e[caption_key]) for e in examples]
