"""The train state: one plain pytree, stepped by a pure function."""
from __future__ import annotations

import functools
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
    opt_state, ema_params = _init(params, optimizer=optimizer, ema=ema)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                      ema_params=ema_params, rng=jax.random.key_data(jax.random.key(seed)))


@functools.partial(jax.jit, static_argnames=("optimizer", "ema"))
def _init(params, *, optimizer, ema):
    """Optimizer state and the EMA copy as one program (eagerly, every leaf's zeros and
    copy would be a small program compiled for its shape: ~70 for the embedded UNet)."""
    return optimizer.init(params), (jax.tree.map(jnp.copy, params) if ema else None)


def ema_update(ema_params, params, decay):
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def averaged(state: TrainState):
    """The EMA weights of ``state`` (created with ``ema=True``)."""
    if state.ema_params is None:
        raise ValueError("this train state keeps no EMA (create(..., ema=True)).")
    return state.ema_params
