"""Conv gradients inside a loop: ``lax.conv_general_dilated``'s own VJP vs jaxdiff's, as JSON.

    python bench/conv_grad.py [--opt default|0|1|2] [--iters 10]

A jitted ``fori_loop`` of ``--iters`` gradient steps through a stack of three 3x3 convs
([2, 32, 32, 64], tanh between), once differentiating w.r.t. the input (as null-text
inversion and CLIP / classifier guidance do) and once w.r.t. the kernels (as fine-tuning
loops do), with each conv function. ``--opt`` sets ``--xla_backend_optimization_level``
(the test suite runs at 0; the library at XLA's default). Reported: run seconds (second
call; compile excluded), ``speedup`` = lax s / jaxdiff s, and the max difference of the
results. See jaxdiff/models/conv.py for why the two differ on XLA:CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--opt", default="default")
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    if args.opt != "default":
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_backend_optimization_level={int(args.opt)}")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    import jax
    import jax.numpy as jnp
    from jax import lax

    from jaxdiff.models.conv import conv_general_dilated

    key = jax.random.PRNGKey(0)
    ws = [jax.random.normal(jax.random.fold_in(key, i), (3, 3, 64, 64)) * 0.05
          for i in range(3)]
    x0 = jax.random.normal(key, (2, 32, 32, 64))
    spec = dict(window_strides=(1, 1), padding=((1, 1), (1, 1)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def loss(conv, x, ws):
        for w in ws:
            x = jnp.tanh(conv(x, w, **spec))
        return jnp.sum(x ** 2)

    def program(conv, wrt):
        def step(_, carry):
            x, ws = carry
            if wrt == "input":
                return x - 1e-3 * jax.grad(lambda x_: loss(conv, x_, ws))(x), ws
            g = jax.grad(lambda ws_: loss(conv, x, ws_))(ws)
            return x, [w - 1e-3 * d for w, d in zip(ws, g)]
        return jax.jit(lambda x, ws: lax.fori_loop(0, args.iters, step, (x, ws)))

    result = {"bench": "conv_grad_in_loop", "xla_opt": args.opt, "iters": args.iters,
              "shape": list(x0.shape)}
    for wrt in ("input", "kernel"):
        times, outs = {}, {}
        for name, conv in (("lax", lax.conv_general_dilated), ("jaxdiff", conv_general_dilated)):
            run = program(conv, wrt)
            jax.block_until_ready(run(x0, ws))
            t = time.perf_counter()
            outs[name] = jax.block_until_ready(run(x0, ws))
            times[name] = time.perf_counter() - t
        diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                   zip(jax.tree_util.tree_leaves(outs["lax"]),
                       jax.tree_util.tree_leaves(outs["jaxdiff"])))
        result[wrt] = {"lax_s": round(times["lax"], 3), "jaxdiff_s": round(times["jaxdiff"], 3),
                       "speedup": round(times["lax"] / times["jaxdiff"], 2),
                       "max_abs_diff": diff}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
