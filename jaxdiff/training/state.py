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

