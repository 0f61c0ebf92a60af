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


def check_ema_decay(decay: float) -> None:
    """One-line error for an EMA decay outside [0, 1) (0: no average)."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"ema_decay={decay}: use 0 (no average) or a decay in (0, 1).")


def trained_weights(state: TrainState):
    """What a run returns: the EMA weights when ``state`` keeps them, else its params."""
    return state.params if state.ema_params is None else state.ema_params
