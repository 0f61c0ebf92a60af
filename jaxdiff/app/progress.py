"""Per-step progress of the app's requests: every UNet evaluation inside a compiled program
reports itself to the host, and the request's handler turns the count into Gradio's
progress bar.

``with_progress(pipe)`` wraps the pipeline's UNet so that its ``apply`` ends with a
``jax.debug.callback`` that only reads one element of the UNet's output (so it fires when
that evaluation is done and changes no value: the images are bit-equal to the plain
pipeline's, tests/test_app.py checks it). Every library function (``generate``, each edit
method, P2P's inversions) then reports its UNet evaluations without a change of its own:
one program per request as before, cached as before (the wrapped pipeline is the app's one
``Pipeline`` object, the key of the library's ``lru_cache``'d programs). Under ``vmap``
(a guidance sweep) each scale's evaluation reports once.

Chosen over running the sampler in chunks of steps (one compiled chunk program, progress
between chunks) because the edit methods' loops (inversion, null-text optimisation,
RePaint's jumps) live in the library as single programs, and a chunked multistep sampler
(DPM++ 2M) would have to hand its history across programs. The price: a program holding
a host callback is not written to JAX's persistent compilation cache (a server start
compiles its programs again; the in-process cache is unchanged) and each evaluation costs
one host call (measured in bench/README.md, app_latency).

The counter is per process: with ``--concurrency`` above 1, two requests running at once
both count each other's evaluations (their bars run fast; results are unaffected).
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Callable, Dict, Hashable, Optional

import jax

from jaxdiff.samplers import make_sampler


class _Ticks:
    """UNet evaluations finished in this process (written by XLA's callback thread)."""

    def __init__(self):
        self.count = 0
        self._lock = threading.Lock()

    def tick(self, _value):
        with self._lock:
            self.count += 1


TICKS = _Ticks()


class ProgressUNet:
    """A UNet module whose ``apply`` reports each evaluation to ``TICKS``; everything else
    (``config``, ``dtype``, ``init`` ...) is the wrapped module's."""

    def __init__(self, inner):
        self.inner = inner

    def apply(self, variables, *args, **kwargs):
        out = self.inner.apply(variables, *args, **kwargs)
        leaf = jax.tree.leaves(out)[0]
        jax.debug.callback(TICKS.tick, leaf.reshape(-1)[0])
        return out

    def clone(self, **kwargs):
        return ProgressUNet(self.inner.clone(**kwargs))

    def __getattr__(self, name):
        return getattr(self.inner, name)


def with_progress(pipe):
    """``pipe`` with a progress-reporting UNet (the same pipeline when it has one)."""
    if isinstance(pipe.unet, ProgressUNet):
        return pipe
    return dataclasses.replace(pipe, unet=ProgressUNet(pipe.unet))


def generate_evals(pipe, sampler: str, steps: int, scales: int) -> int:
    """UNet evaluations of a ``generate`` request (the sampler's evaluations per scale)."""
    return make_sampler(sampler, pipe.scheduler, int(steps)).num_evals * int(scales)


class Totals:
    """The evaluation count of the last finished request of each kind (edit methods whose
    count is not known in advance: inversion, null-text optimisation with its early stop);
    the first request of a kind shows a count without a total."""

    def __init__(self):
        self._seen: Dict[Hashable, int] = {}

    def get(self, key: Hashable) -> Optional[int]:
        return self._seen.get(key)

    def put(self, key: Hashable, count: int):
        if count > 0:
            self._seen[key] = count


def run_with_progress(fn: Callable, report: Callable, total: Optional[int],
                      desc: str = "UNet evaluations", poll_s: float = 0.25):
    """``fn()`` in a worker thread while this thread calls ``report((done, total), desc)``
    every ``poll_s`` seconds with the evaluations counted since the start; returns
    ``(fn's result, evaluations counted)``. Exceptions of ``fn`` are raised here."""
    result, error = [], []
    start = TICKS.count

    def work():
        try:
            result.append(fn())
        except BaseException as e:  # noqa: BLE001 -- re-raised in the caller's thread
            error.append(e)

    worker = threading.Thread(target=work, name="jaxdiff-request", daemon=True)
    worker.start()
    last = -1
    while worker.is_alive():
        worker.join(poll_s)
        done = TICKS.count - start
        if done != last:
            last = done
            shown = done if total is None else min(done, total)
            report((shown, total), desc=desc if done else "compiling / starting")
    if error:
        raise error[0]
    return result[0], TICKS.count - start

