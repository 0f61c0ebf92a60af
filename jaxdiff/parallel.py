"""Device mesh, shardings and multi-host start-up (SPMD over ``jax.sharding.Mesh``).

One code path for one CPU, 8 forced host devices, a GPU and a TPU pod: the batch is
sharded on the ``data`` axis (and, in training, also on ``fsdp``); parameters are
replicated, or FSDP-sharded over the ``fsdp`` axis by a rule table (``tree_shardings``).
The transformer backbones (DiT, PixArt, U-ViT) add tensor parallelism over a ``model``
axis (``TRANSFORMER_TP_RULES``: attention heads and MLP hidden units split Megatron-style,
the rest FSDP), with ``make_mesh(..., model=m)``.

Why a shape rule instead of flax logical-axis annotations: the networks load upstream
checkpoints and keep upstream parameter names, and every parameter of a UNet, VAE or
text encoder is a plain conv/dense/norm tensor. Sharding the largest dimension that the
``fsdp`` size divides (big_vision's ``fsdp`` rule) covers all of them without touching
the modules; a table of ``(regex over the state path, strategy)`` pairs, kept as data in
the config, overrides it per parameter group (maxdiffusion keeps its table in the config
the same way).
"""
from __future__ import annotations

import math
import os
import re
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"
FSDP = "fsdp"
MODEL = "model"

# (regex searched in the "/"-joined path of a state leaf, strategy); the first match wins,
# leaves that match nothing are replicated. Strategies: "fsdp" | "replicate" |
# "model_out" / "model_in" (tensor parallel: a Dense kernel [in, out] split over ``model``
# along out / in, its other dimension FSDP-sharded when ``fsdp`` divides it; a bias [out]
# is split with "model_out" and replicated with "model_in").
DEFAULT_RULES = (("^(step|rng)$", "replicate"), (".*", "fsdp"))
STRATEGIES = ("fsdp", "replicate", "model_out", "model_in")
# Megatron-style tensor parallelism of the latent transformers (DiT, PixArt: diffusers'
# names): q, k, v and the MLP's first layer split their output units over ``model``
# (whole heads per device when ``model`` divides the heads), the attention output and the
# MLP's second layer their input units, so each block needs one all-reduce after attention
# and one after the MLP. U-ViT: its MLP (``fc1`` / ``fc2``) the same way; its fused ``qkv``
# kernel [D, 3D] is not split (contiguous halves would not hold whole heads). Everything
# else (patch embedding, adaLN, norms, caption projection) is FSDP-sharded.
TRANSFORMER_TP_RULES = (
    ("^(step|rng)$", "replicate"),
    (r"attn[12]/to_[qkv]/(kernel|bias)$", "model_out"),
    (r"attn[12]/to_out_0/kernel$", "model_in"),
    (r"ff/net_0/proj/(kernel|bias)$", "model_out"),
    (r"ff/net_2/kernel$", "model_in"),
    (r"mlp/fc1/(kernel|bias)$", "model_out"),
    (r"mlp/fc2/kernel$", "model_in"),
    (".*", "fsdp"),
)


def set_cpu_devices(count: int) -> None:
    """Splits the host CPU into ``count`` XLA devices (``jax_num_cpu_devices``; 0 leaves
    JAX's default of one). Data parallelism over them trains faster on a multi-core CPU
    than one device does (2 cores: ~1.2x the steps/s; bench/README.md). Must run before
    JAX initialises its backends; a one-line ValueError otherwise."""
    if count < 0:
        raise ValueError(f"cpu_devices must be >= 0, got {count}.")
    if count:
        try:
            jax.config.update("jax_num_cpu_devices", count)
        except RuntimeError as e:
            raise ValueError(f"cpu_devices={count} must be set before JAX starts its "
                             f"backends ({e}).") from None


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


def make_mesh(devices: Optional[Sequence] = None, fsdp: int = 1, model: int = 1) -> Mesh:
    """A data-parallel mesh over ``devices`` (default: all devices of all hosts).

    ``fsdp > 1`` gives a 2-D ``(data, fsdp)`` mesh: groups of ``fsdp`` consecutive devices
    (in ``jax.devices()`` order, so a group stays inside a host where possible) share
    one copy of the FSDP-sharded parameters. ``model > 1`` adds a ``model`` axis (the
    fastest-varying: neighbouring devices) for tensor parallelism, ``(data, fsdp, model)``.
    """
    devices = jax.devices() if devices is None else list(devices)
    if fsdp < 1 or model < 1 or len(devices) % (fsdp * model):
        raise ValueError(f"fsdp={fsdp} x model={model} must be >= 1 and divide the "
                         f"{len(devices)} devices.")
    if model > 1:
        return Mesh(np.asarray(devices).reshape(-1, fsdp, model), (DATA, FSDP, MODEL))
    if fsdp == 1:
        return Mesh(np.asarray(devices), (DATA,))
    return Mesh(np.asarray(devices).reshape(-1, fsdp), (DATA, FSDP))


def batch_axes(mesh: Mesh) -> tuple:
    """Mesh axes a training batch is split over: every data-like axis of the mesh."""
    return tuple(a for a in (DATA, FSDP) if a in mesh.shape)


def train_batch_sharding(mesh: Mesh, leading: int = 0) -> NamedSharding:
    """Batch axis (after ``leading`` unsharded axes, e.g. micro-batches) over all of
    ``batch_axes``: with FSDP every device still reads a different slice of the batch."""
    return NamedSharding(mesh, P(*([None] * leading), batch_axes(mesh)))


def fsdp_spec(shape: Sequence[int], size: int, min_size: int = 0) -> P:
    """big_vision's rule: shard the largest dimension that ``size`` divides over ``fsdp``.

    Leaves with fewer than ``min_size`` elements, or with no divisible dimension, are
    replicated (the all-gather would cost more than the memory saved).
    """
    if size <= 1 or math.prod(shape) < max(min_size, 1):
        return P()
    for d in sorted(range(len(shape)), key=lambda d: (-shape[d], d)):
        if shape[d] % size == 0:
            return P(*[FSDP if i == d else None for i in range(len(shape))])
    return P()


def model_spec(shape: Sequence[int], strategy: str, model: int, fsdp: int) -> P:
    """Tensor-parallel spec of one leaf: "model_out" splits the last dimension over
    ``model``, "model_in" the first (a 1-D leaf: replicated); the other dimension of a
    2-D kernel goes over ``fsdp`` when it divides. A dimension ``model`` does not divide
    stays whole (then the leaf is only FSDP-sharded)."""
    if len(shape) == 1 and strategy == "model_in":
        return P()
    d = len(shape) - 1 if strategy == "model_out" else 0
    if model <= 1 or shape[d] % model:
        return fsdp_spec(shape, fsdp)
    spec = [None] * len(shape)
    spec[d] = MODEL
    if len(shape) == 2 and fsdp > 1 and shape[1 - d] % fsdp == 0:
        spec[1 - d] = FSDP
    return P(*spec)


def _path_str(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return "/".join(parts)


def tree_shardings(tree, mesh: Mesh, rules: Sequence = DEFAULT_RULES, min_size: int = 0):
    """A ``NamedSharding`` for every leaf of ``tree`` (params, optimizer state, or a whole
    ``TrainState``) from a rule table of ``(regex, strategy)`` pairs.

    The regex is searched in the leaf's path (e.g. ``params/unet/conv_in/kernel``,
    ``opt_state/1/0/mu/unet/conv_in/kernel``); the first matching rule decides. Without an
    ``fsdp`` axis in ``mesh`` FSDP leaves are replicated; without a ``model`` axis the
    tensor-parallel ones fall back to FSDP.
    """
    compiled = []
    for rule in rules:
        if len(rule) != 2 or rule[1] not in STRATEGIES:
            raise ValueError(f"sharding rule {tuple(rule)!r}: expected (regex, strategy) with "
                             f"strategy one of {STRATEGIES}.")
        compiled.append((re.compile(rule[0]), rule[1]))
    size, model = mesh.shape.get(FSDP, 1), mesh.shape.get(MODEL, 1)

    def one(path, leaf):
        name = _path_str(path)
        strategy = next((s for r, s in compiled if r.search(name)), "replicate")
        shape = np.shape(leaf)
        if strategy.startswith("model_"):
            spec = model_spec(shape, strategy, model, size)
        else:
            spec = fsdp_spec(shape, size, min_size) if strategy == "fsdp" else P()
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, tree)


def put_global(tree, shardings):
    """Places host values (identical on every process) as global arrays with ``shardings``.

    Works on one host and on many (each process fills only its addressable shards).
    """
    def one(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
    return jax.tree.map(one, jax.device_get(tree), shardings)


def gather(tree):
    """Host (numpy) copies of the arrays of a possibly FSDP-sharded, possibly multi-host
    ``tree`` (e.g. to sample or export from a train state), on every process."""
    def one(x):
        if isinstance(getattr(x, "sharding", None), NamedSharding):
            x = jax.device_put(x, NamedSharding(x.sharding.mesh, P()))
        return jax.device_get(x)
    return jax.tree.map(one, tree)


def put_batch(tree, sharding):
    """This process's part of a batch -> global arrays sharded with ``sharding``."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``; the rest replicated."""
    return NamedSharding(mesh, P(DATA))


def padded_batch(n: int, mesh: Mesh) -> int:
    """Smallest batch >= n that the data axis divides."""
    d = mesh.shape[DATA]
    return -(-n // d) * d


# --- Batches of independent rows (the edit programs): pad, shard, place, trim. ---

def local_mesh(fsdp: int = 1) -> Mesh:
    """A mesh over this process's devices only: under ``jax.distributed`` every process
    runs its own jobs with its own programs (no collective spans two hosts), e.g. the
    slice of a manifest each process of a multi-host edit takes."""
    return make_mesh(jax.local_devices(), fsdp)


def rows_multiple(mesh: Mesh) -> int:
    """The number of devices a batch is split over (``batch_axes``): batches are padded to
    a multiple of it."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def pad_rows(tree, n: int):
    """Each leaf's leading axis (``b`` rows) extended to ``n`` by repeating its last row
    (as ``generate`` pads an odd batch); works for numpy, jax and PRNG-key arrays."""
    def one(x):
        b = x.shape[0]
        return x if b == n else x[np.minimum(np.arange(n), b - 1)]
    return jax.tree.map(one, tree)


def shard_rows(tree, mesh: Mesh, n: Optional[int] = None):
    """Leaves padded to ``n`` rows (default: the next multiple of ``rows_multiple``) and
    placed with their leading axis split over the mesh's batch axes."""
    leaves = jax.tree.leaves(tree)
    if n is None:
        k = rows_multiple(mesh)
        n = -(-leaves[0].shape[0] // k) * k
    return jax.device_put(pad_rows(tree, n), train_batch_sharding(mesh))


def place_params(params, mesh: Mesh, rules: Sequence = DEFAULT_RULES):
    """``params`` on ``mesh``: replicated, or FSDP-sharded by ``rules`` when the mesh has an
    ``fsdp`` axis. Arrays already placed so are returned as they are (no copy)."""
    return jax.device_put(params, tree_shardings(params, mesh, rules))


def rows_spec(mesh: Mesh, axis: int = 0) -> P:
    """A ``PartitionSpec`` splitting axis ``axis`` (the rows) over the mesh's batch axes."""
    return P(*([None] * axis), batch_axes(mesh))


def per_device(fn, mesh: Mesh, in_specs, out_specs):
    """``fn`` run by every device on its own rows (``jax.shard_map``): arguments with
    ``rows_spec`` arrive as this device's shard, ``P()`` ones whole (params, shared
    scalars; an FSDP-sharded tree is gathered once when the program starts).

    For programs over independent rows (the edit programs): each device's shard holds
    whole images with every branch of them (CFG halves, P2P's source/target rows, mask
    draws), so the compiled step loops hold no cross-device collective, and data-dependent
    control flow (early stops, skipped steps) is decided per device.
    """
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)


def trim_rows(tree, b: int, axis: int = 0):
    """The first ``b`` rows (along ``axis``) of every leaf: drops the padding again."""
    def one(x):
        return x if x.shape[axis] == b else jax.lax.slice_in_dim(x, 0, b, axis=axis)
    return jax.tree.map(one, tree)


def barrier(name: str, timeout_s: float = 24 * 3600) -> None:
    """Waits until every process of a ``jax.distributed`` job reaches ``barrier(name)``
    (no-op in a single process); ``name`` must be new for each barrier of a job.

    A barrier of JAX's coordination service, as Orbax's multi-host sync uses: no device
    collective, so processes may arrive hours apart (a device collective such as
    ``multihost_utils.sync_global_devices`` times out after the collective library's
    limit, e.g. when one host had more images to edit).
    """
    if jax.process_count() > 1:
        from jax._src import distributed  # the coordination client (no public accessor)
        distributed.global_state.client.wait_at_barrier(name, int(timeout_s * 1000))
