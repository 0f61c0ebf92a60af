"""Deterministic batching: which examples each train step reads, and reading them from
random-access sources (``tfds.data_source`` or lists).

The batch of step ``s`` is a pure function of (seed, s), so the data position of a
checkpoint is just its step, and resuming reproduces the exact stream. On multi-host
jobs every process reads only its own slice of each global batch.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np


def batch_indices(num_examples: int, global_batch: int, step: int, seed: int) -> np.ndarray:
    """Global example indices of ``step``: epoch-wise permutations, no example skipped."""
    per_epoch = max(1, num_examples // global_batch)
    epoch, pos = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    return perm[pos * global_batch:(pos + 1) * global_batch]


def stream_indices(num_examples: int, batch: int, step: int, seed: int) -> np.ndarray:
    """Rows ``[step * batch, (step + 1) * batch)`` of an endless stream of seeded
    per-epoch permutations of ``num_examples`` (works for ``batch > num_examples``, as the
    few images of DreamBooth and Textual Inversion need)."""
    out, pos = [], step * batch
    while len(out) < batch:
        epoch, off = divmod(pos, num_examples)
        perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
        take = perm[off:off + batch - len(out)]
        out.extend(take)
        pos += len(take)
    return np.asarray(out)


def host_slice(indices: np.ndarray, process_count: Optional[int] = None,
               process_index: Optional[int] = None) -> np.ndarray:
    """This process's contiguous part of a global batch of indices.

    Process ``p`` takes rows ``[p * per, (p + 1) * per)``, which are the rows its devices
    hold when the batch is sharded over a mesh built from ``jax.devices()`` (devices are
    ordered by process), so ``parallel.put_batch`` assembles exactly the global batch.
    """
    n = jax.process_count() if process_count is None else process_count
    p = jax.process_index() if process_index is None else process_index
    if len(indices) % n:
        raise ValueError(f"global batch of {len(indices)} is not divisible by the {n} "
                         "processes; choose a batch size that is a multiple of it.")
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
