"""The train state: one plain pytree, stepped by a pure function."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class TrainState(NamedTuple):
    step: jax.Array          # int32 scalar
    params: Any              # trainable params
    opt_state: Any
    ema_params: Any          # exponential moving average of params (or None)
    rng: jax.Array           # uint32 [2] raw key data (checkpointable)


def create(params, optimizer: optax.GradientTransformation, seed: int = 0,
           ema: bool = True) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params),
                      ema_params=jax.tree.map(jnp.array, params) if ema else None,
                      rng=jax.random.key_data(jax.random.key(seed)))


def ema_update(ema_params, params, decay):
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def adamw_with_warmup(lr: float, warmup_steps: int, total_steps: int, weight_decay=1e-2,
                      clip_norm: float = 1.0) -> optax.GradientTransformation:
    """AdamW with linear warm-up (none when ``warmup_steps`` is 0: ``lr`` from the first
    step) then cosine decay to ``lr / 10`` at ``total_steps``, and global-norm clipping."""
    if warmup_steps > 0:
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, lr, warmup_steps, max(total_steps, warmup_steps + 1), lr * 0.1)
    else:
        schedule = optax.cosine_decay_schedule(lr, max(1, total_steps), alpha=0.1)
    return optax.chain(optax.clip_by_global_norm(clip_norm),
                       optax.adamw(schedule, weight_decay=weight_decay))
