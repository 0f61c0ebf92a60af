"""Device mesh, shardings and multi-host start-up (SPMD over ``jax.sharding.Mesh``).

One code path for one CPU, 8 forced host devices, a GPU and a TPU pod: the batch is
sharded on the ``data`` axis, parameters are replicated (or FSDP-sharded by the training
code through logical-axis rules).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def maybe_initialize_distributed() -> bool:
    """Calls ``jax.distributed.initialize()`` when the environment describes a multi-host job.

    Recognised: ``JAX_COORDINATOR_ADDRESS`` (with ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``), or a Cloud TPU pod / SLURM environment that JAX auto-detects
    (``JAXDIFF_DISTRIBUTED=1`` forces the call). Returns True if it initialised.
    """
    explicit = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not (explicit or os.environ.get("JAXDIFF_DISTRIBUTED") == "1"):
        return False
    if explicit:
        jax.distributed.initialize(
            coordinator_address=explicit,
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()
    return True


def make_mesh(devices: Optional[Sequence] = None) -> Mesh:
    """A 1-D data-parallel mesh over ``devices`` (default: all devices of all hosts)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``; the rest replicated."""
    return NamedSharding(mesh, P(DATA))


def padded_batch(n: int, mesh: Mesh) -> int:
    """Smallest batch >= n that the data axis divides."""
    d = mesh.shape[DATA]
    return -(-n // d) * d
