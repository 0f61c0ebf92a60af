"""A real training process for the preemption test (tests/test_preemption.py).

    python tests/preempt_job.py WORKDIR STEPS STEP_DELAY_S

Trains the tiny UNet problem (tests/train_problem.py) with ``jaxdiff.training.loop.
train_loop``: AdamW + EMA, async Orbax checkpoints every 2 steps, resuming from WORKDIR
if it holds any. Writes WORKDIR/final.npz at the end.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import train_problem as tp  # noqa: E402
from jaxdiff.training.loop import train_loop  # noqa: E402


def main():
    workdir, steps, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    os.makedirs(workdir, exist_ok=True)
    state, step = tp.setup()
    host_batch = tp.host_batch_fn(8)

    def batch_fn(s):
        time.sleep(delay)  # leaves time to be killed mid-run
        return host_batch(s)

    final = train_loop(step, state, batch_fn, steps, workdir, log_every=1, ckpt_every=2,
                       desc="preempt")
    leaves = jax.device_get(jax.tree.leaves((final.params, final.opt_state, final.ema_params)))
    tmp = os.path.join(workdir, "final.tmp.npz")
    np.savez(tmp, *leaves)
    os.replace(tmp, os.path.join(workdir, "final.npz"))
    print("done", int(final.step), flush=True)


if __name__ == "__main__":
    main()
