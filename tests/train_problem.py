"""A tiny text-conditioned UNet noise-prediction problem for the training-infrastructure
tests (mesh / FSDP / accumulation / remat / preemption). Imported by the tests and by the
subprocesses they start; the noise and timesteps travel with the batch, so any split of a
batch (devices, hosts, micro-batches) computes the same loss.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# One level (resnets + cross-attention transformers, mid block): tracing and compiling a
# UNet backward pass dominates these tests' time on a loaded 2-core CPU.
UNET = dict(block_out_channels=(8,), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
            cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4, sample_size=4)
SIDE, CTX_LEN, T = 4, 4, 1000


def make_unet(**kwargs):
    from jaxdiff.models import UNet2DConditionModel, UNetConfig
    return UNet2DConditionModel(UNetConfig.from_dict(dict(UNET)), **kwargs)


def init_params(unet, seed=0):
    """Random params from numpy (compiling flax's init costs more than the whole test)."""
    from jaxdiff.pipeline import dummy_inputs
    shapes = jax.eval_shape(unet.init, jax.random.key(0), *dummy_inputs(unet, "unet"))["params"]
    rng = np.random.default_rng(seed)

    def one(path, s):
        base = 1.0 if path[-1].key == "scale" else 0.0
        return jnp.asarray(base + rng.normal(0, 0.1, s.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(one, shapes)


def global_batch(step, batch_size, seed=0):
    """The whole batch of ``step`` (a pure function of it): numpy arrays."""
    rng = np.random.default_rng([seed, step])
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    return dict(x0=f(batch_size, SIDE, SIDE, 4), noise=f(batch_size, SIDE, SIDE, 4),
                t=rng.integers(0, T, batch_size).astype(np.int32),
                context=f(batch_size, CTX_LEN, UNET["cross_attention_dim"]))


def host_batch_fn(batch_size, seed=0, process_count=None, process_index=None):
    """``step -> this process's rows`` of ``global_batch`` (via ``batching.host_slice``)."""
    from jaxdiff.training import batching

    def batch_fn(step):
        rows = batching.host_slice(np.arange(batch_size), process_count, process_index)
        return {k: v[rows] for k, v in global_batch(step, batch_size, seed).items()}

    return batch_fn


def make_loss(unet):
    """``loss(params, batch, rng)``: epsilon-prediction MSE, rng unused (noise in batch)."""
    a_bar = jnp.cumprod(1.0 - jnp.linspace(1e-4, 2e-2, T))

    def loss(params, batch, rng):
        del rng
        a = a_bar[batch["t"]][:, None, None, None]
        x_t = jnp.sqrt(a) * batch["x0"] + jnp.sqrt(1.0 - a) * batch["noise"]
        out = unet.apply({"params": params}, x_t, batch["t"], batch["context"])
        return jnp.mean((out.astype(jnp.float32) - batch["noise"]) ** 2)

    return loss


def setup(accum_steps=1, lr=1e-3, **unet_kwargs):
    """(initial TrainState, step function) for ``train_loop`` / direct calls."""
    from jaxdiff.training import state as state_lib
    from jaxdiff.training.optim import adamw_with_warmup
    from jaxdiff.training.step import make_train_step
    unet = make_unet(**unet_kwargs)
    opt = adamw_with_warmup(lr, 1, 100)
    step = make_train_step(make_loss(unet), opt, ema_decay=0.9, accum_steps=accum_steps)
    return state_lib.create(init_params(unet), opt, seed=0), step
