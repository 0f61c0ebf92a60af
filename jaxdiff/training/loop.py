"""The generic resumable train loop: one jitted, donated, mesh-sharded step; Orbax saves.

Used by every recipe (text-to-image, DreamBooth, Textual Inversion). The state may be
replicated (data parallel) or FSDP-sharded over the mesh's ``fsdp`` axis by a rule table
(``parallel.tree_shardings``); each process feeds only its own slice of every global
batch, and the data position is the step (batches are a pure function of it), so a
resumed run continues the exact stream.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from orbax.checkpoint import multihost
from tqdm import tqdm

from jaxdiff import parallel
from jaxdiff.training.checkpoint import Checkpointer, restore_or
from jaxdiff.training.metrics_log import MetricsLog


class Preempted(RuntimeError):
    """Raised after the loop saved a checkpoint because the job is being preempted."""


def split_micro_batches(tree, accum_steps: int):
    """``[b, ...]`` leaves -> ``[accum_steps, b // accum_steps, ...]`` (for ``make_train_step``)."""
    def one(x):
        x = np.asarray(x)
        if x.shape[0] % accum_steps:
            raise ValueError(f"batch of {x.shape[0]} rows per process is not divisible by "
                             f"accum_steps={accum_steps}.")
        return x.reshape((accum_steps, x.shape[0] // accum_steps) + x.shape[1:])
    return jax.tree.map(one, tree)


def shard_state(state, mesh, rules: Sequence = parallel.DEFAULT_RULES, min_size: int = 0):
    """(state placed on ``mesh`` as fresh global arrays, its shardings)."""
    shardings = parallel.tree_shardings(state, mesh, rules, min_size)
    return parallel.put_global(state, shardings), shardings


def compile_step(step_fn, state_shardings, batch_sharding):
    """``jax.jit`` of ``step(state, batch) -> (state, metrics)`` with the state donated and
    kept in its shardings, metrics replicated."""
    rep = parallel.replicated(batch_sharding.mesh)
    return jax.jit(step_fn, donate_argnums=(0,), in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, rep))


def compile_synced(jstep, state, batch):
    """AOT-compiles ``jstep`` for these arguments, then waits for every process.

    Multi-host CPU jobs run collectives over gloo, whose set-up gives up after 30 s; a
    process that starts its first step while a peer is still compiling would fail.
    """
    compiled = jstep.lower(state, batch).compile()
    if jax.process_count() > 1:
        multihost.sync_global_processes("jaxdiff_train_step_compiled")
    return compiled


def train_loop(step_fn, state, batch_fn: Callable, num_steps: int, workdir: str, *,
               log_every: int, ckpt_every: int, desc: str,
               on_sample: Optional[Callable] = None, sample_every: int = 0, mesh=None,
               rules: Sequence = parallel.DEFAULT_RULES, fsdp_min_size: int = 0,
               accum_steps: int = 1, max_to_keep: int = 3, async_save: bool = True):
    """Runs ``step_fn`` from the latest checkpoint in ``workdir`` to ``num_steps``.

    Args:
      step_fn: ``step(state, batch) -> (state, metrics)`` (``make_train_step``); built with
        the same ``accum_steps`` as given here.
      state: the initial ``TrainState`` (used when ``workdir`` has no checkpoint; its
        arrays are copied, never donated).
      batch_fn: ``step -> this process's part of the global batch`` (pytree of arrays).
      mesh: a mesh from ``parallel.make_mesh`` (default: all devices, data parallel); with
        an ``fsdp`` axis the state is sharded by ``rules`` (leaves below
        ``fsdp_min_size`` elements stay replicated).
      accum_steps: each process batch is split into this many micro-batches.
      Every ``log_every`` steps the metrics go to ``<workdir>/log.jsonl`` and, when
      tensorboardX is installed, to ``<workdir>/tensorboard/`` (``MetricsLog``).
    Returns:
      the final state (sharded on ``mesh``).
    Raises:
      Preempted: after saving, when Orbax reports a preemption notice (multi-host jobs on
        Cloud TPU / with ``jax.distributed``); re-running resumes.
    """
    mesh = mesh or parallel.make_mesh()
    lead = jax.process_index() == 0
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=max_to_keep,
                        async_save=async_save)
    state, shardings = shard_state(state, mesh, rules, fsdp_min_size)
    state, _ = restore_or(state, ckpt)  # restores straight into the shardings
    batch_sharding = parallel.train_batch_sharding(mesh, 1 if accum_steps > 1 else 0)
    jstep = compile_step(step_fn, shardings, batch_sharding)
    start = int(jax.device_get(state.step))
    log = MetricsLog(workdir, desc, enabled=lead)
    bar = tqdm(total=num_steps, initial=start, desc=desc, unit="step", disable=not lead)
    t0, done, compiled = time.perf_counter(), 0, None
    for s in range(start, num_steps):
        batch = batch_fn(s)
        if accum_steps > 1:
            batch = split_micro_batches(batch, accum_steps)
        batch = parallel.put_batch(batch, batch_sharding)
        if compiled is None:
            compiled = compile_synced(jstep, state, batch)
        state, metrics = compiled(state, batch)
        done += 1
        bar.update(1)
        if (s + 1) % log_every == 0 or s + 1 == num_steps:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            rate = done / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{m['loss']:.4f}", steps_per_s=f"{rate:.2f}")
            log.write(s + 1, dict(steps_per_s=rate, **m))
        preempted = ckpt.reached_preemption(s + 1)
        if (s + 1) % ckpt_every == 0 or s + 1 == num_steps or preempted:
            ckpt.save(state, {"data_position": s + 1}, force=preempted)
        if preempted:
            ckpt.wait()
            raise Preempted(f"preempted at step {s + 1}; checkpoint saved, re-run to resume.")
        if on_sample and sample_every and (s + 1) % sample_every == 0:
            on_sample(state, s + 1)
    bar.close()
    log.close()
    ckpt.wait()
    ckpt.close()
    return state
