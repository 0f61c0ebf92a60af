"""A jitted, donated train step built from a loss function (optax + EMA)."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jaxdiff.training.state import TrainState, ema_update


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation,
                    ema_decay: float = 0.999, accum_steps: int = 1):
    """Returns ``step(state, batch) -> (state, metrics)``, pure and jittable.

    Args:
      loss_fn: ``loss_fn(params, batch, rng) -> scalar``.
      accum_steps: gradient accumulation: ``batch`` leaves have a leading axis of this
        size and gradients are averaged over it with a ``lax.scan``.
    """

    def grads_of(params, batch, rng):
        if accum_steps == 1:
            return jax.value_and_grad(loss_fn)(params, batch, rng)

        def body(carry, xs):
            micro, i = xs
            l, g = jax.value_and_grad(loss_fn)(params, micro, jax.random.fold_in(rng, i))
            return jax.tree.map(jnp.add, carry, (l, g)), None

        zero = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
        (l, g), _ = jax.lax.scan(body, zero, (batch, jnp.arange(accum_steps)))
        return jax.tree.map(lambda x: x / accum_steps, (l, g))

    def step(state: TrainState, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        loss, grads = grads_of(state.params, batch, rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = None if state.ema_params is None else ema_update(state.ema_params, params,
                                                               ema_decay)
        new = TrainState(state.step + 1, params, opt_state, ema, state.rng)
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return step
