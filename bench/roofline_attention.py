"""Memory of one attention call, XLA's op vs the TPU Pallas splash kernel, compiled for a TPU
from a machine without one (issue #20, point 3).

    PYTHONPATH=<folder with libtpu> python bench/roofline_attention.py --target tpu_v5e:1x1

libtpu (``pip install --target <folder> libtpu``, kept off the project's environment so that
other jax processes do not probe for a TPU) gives a deviceless TPU topology; each attention
(``models.attention.attend`` with ``impl="xla"`` and ``"splash"``, the real kernel:
``JAXDIFF_PALLAS_INTERPRET=0``), forward and gradient, is compiled for it and its
``memory_analysis()`` temp bytes printed as JSON lines. Shapes: SD 1.5's 64x64 (4096 tokens,
8 heads of 40) and 32x32 (1024 tokens, 8 x 80) self-attention, DiT-XL/2 / PixArt's at 4096
tokens (16 x 72), bf16, batch 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ["JAXDIFF_PALLAS_INTERPRET"] = "0"  # the real kernel, compiled for the TPU target
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from jaxdiff.models import attention  # noqa: E402
from roofline_programs import target_devices  # noqa: E402

SHAPES = ((8, 40, 4096), (8, 80, 1024), (16, 72, 4096))  # (heads, width, tokens)


@jax.jit
def _forward_xla(q, k, v):
    return attention.attend(q, k, v, scale=q.shape[-1] ** -0.5, upcast=False, impl="xla")


@jax.jit
def _forward_splash(q, k, v):
    return attention.attend(q, k, v, scale=q.shape[-1] ** -0.5, upcast=False, impl="splash")


_PROGRAMS = {
    ("xla", "forward"): _forward_xla, ("splash", "forward"): _forward_splash,
    ("xla", "gradient"): jax.jit(jax.grad(lambda q, k, v: _forward_xla(q, k, v).astype(
        jnp.float32).sum(), argnums=(0, 1, 2))),
    ("splash", "gradient"): jax.jit(jax.grad(lambda q, k, v: _forward_splash(q, k, v).astype(
        jnp.float32).sum(), argnums=(0, 1, 2))),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="tpu_v5e:1x1", help="a TPU topology (libtpu)")
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args(argv)
    dev = target_devices(args.target)[0]
    rep = NamedSharding(Mesh(np.array([dev]), ("x",)), P())
    records = []
    for heads, width, tokens in SHAPES:
        s = jax.ShapeDtypeStruct((args.batch, tokens, heads, width), jnp.bfloat16, sharding=rep)
        for (impl, prog), fn in _PROGRAMS.items():
            t0 = time.perf_counter()
            rec = dict(target=args.target, heads=heads, width=width, tokens=tokens,
                       batch=args.batch, impl=impl, program=prog)
            try:
                mem = fn.lower(s, s, s).compile().memory_analysis()
                rec.update(temp_mb=round(mem.temp_size_in_bytes / 1e6, 2),
                           compile_s=round(time.perf_counter() - t0, 1))
            except Exception as e:  # noqa: BLE001  (a kernel the target refuses: recorded)
                rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            records.append(rec)
            print(json.dumps(rec), flush=True)
    return records


if __name__ == "__main__":
    main()
