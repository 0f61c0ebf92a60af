"""Edit throughput over the device mesh: images/s of null-text + P2P and of DiffEdit on
1, 2, 4, 8 devices (issue 13).

    python bench/edit_scale.py [--devices 1 2 4 8] [--batch 8] [--steps 10] [--repeats 2]

On CPU the script forces 8 host devices (``--xla_force_host_platform_device_count``)
before JAX starts; each run splits the same batch of ``--batch`` random images over the
``data`` axis of a mesh of the first d devices (``p2p_pipeline.p2p_edit(..., mesh=)``,
``diffedit.diffedit(..., mesh=)``), on bench/sample.py's "tiny" random pipeline. Forced
host devices share the machine's cores, so on CPU this measures the program's scaling
(sharding overhead, per-device batch), not hardware; on an accelerator host the devices
are real. Reported per (method, devices): compile seconds (first call minus a timed
call), seconds per batch (median of ``--repeats``), images/s, speed-up over 1 device,
the largest uint8 difference of the edited images from the 1-device run (a sanity
check: the edit does not depend on the mesh) and, for null-text + P2P, the number of
cross-device collective ops in the compiled program's HLO (0: every device edits its own
images, ``parallel.per_device``). There is no PyTorch side: diffusers has no
multi-device edit to compare with (bench/edit_speed.py compares the 1-device program
with the PyTorch reference).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute",
               "reduce-scatter")

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--batch", type=int, default=8, help="images per call (default 8)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["p2p_null_text", "diffedit"],
                    choices=["p2p_null_text", "diffedit"])
    args = ap.parse_args()
    if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                                   f"--xla_force_host_platform_device_count={max(args.devices)}")

    import jax
    import numpy as np

    import sample  # bench/sample.py
    import jaxdiff
    from jaxdiff import parallel
    from jaxdiff.editing import diffedit, p2p_pipeline as pp
    from jaxdiff.pipeline import from_uint8, to_uint8

    folder = tempfile.mkdtemp(prefix="edit_scale_")
    sample.build_pipeline("tiny", folder)
    pipe, params = jaxdiff.load_pipeline(folder)
    side = pipe.image_size
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch, side, side, 3), dtype=np.uint8)
    src, tgt = ["a red ball"] * args.batch, ["a blue ball"] * args.batch
    settings = pp.P2PSettings(inversion="null_text", steps=args.steps)
    calls = {
        "p2p_null_text": lambda mesh: pp.p2p_edit(pipe, params, images, src, tgt, settings,
                                                  mesh=mesh).edited,
        "diffedit": lambda mesh: to_uint8(diffedit.diffedit(
            pipe, params, from_uint8(images), src, tgt, steps=args.steps, mesh=mesh)["edited"]),
    }
    counts = [d for d in args.devices if d <= jax.device_count()]
    rows = []
    for method in args.methods:
        base = None
        for d in counts:
            mesh = parallel.make_mesh(jax.devices()[:d])
            t0 = time.perf_counter()
            first = np.asarray(calls[method](mesh))
            first_s = time.perf_counter() - t0
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out = np.asarray(calls[method](mesh))
                times.append(time.perf_counter() - t0)
            secs = float(np.median(times))
            collectives = None
            if method == "p2p_null_text":  # the compiled program's cross-device ops
                run, call_args, _ = pp._program_and_args(pipe, params, images, src, tgt,
                                                         settings, None, mesh)
                hlo = run.lower(*call_args).compile().as_text()
                collectives = sum(hlo.count(op) for op in COLLECTIVES)
            base = (secs, first) if base is None else base
            rows.append(dict(method=method, devices=d, seconds=round(secs, 3),
                             compile_s=round(first_s - secs, 1),
                             images_per_s=round(args.batch / secs, 3),
                             speedup_vs_1=round(base[0] / secs, 2), collectives=collectives,
                             max_abs_diff_vs_1_uint8=int(np.abs(out.astype(int)
                                                                - base[1].astype(int)).max())))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps(dict(bench="edit_scale", size="tiny", side=side, batch=args.batch,
                          steps=args.steps, repeats=args.repeats,
                          platform=jax.devices()[0].platform,
                          device_kind=jax.devices()[0].device_kind,
                          host_cpus=os.cpu_count(), rows=rows)))


if __name__ == "__main__":
    main()
