"""A fork server for tests that run many Python command lines (tests/test_readme_commands.py).

Each ``python train/x.py ...`` / ``jaxdiff ...`` command started from bash spends about
4.5 CPU-s importing jax, flax, optax, orbax, transformers and jaxdiff before it does
anything. This server imports them once, without starting JAX's backend (no XLA client,
no compile, no device), and then forks a fresh child per command: the child sets the
command's working directory, environment, ``sys.argv`` and ``sys.path[0]`` as the
interpreter does for a script (or for ``python -m module``), redirects stdin / stdout /
stderr, runs the script file itself (``runpy.run_path``: ``train/x.py``, or the venv's
``bin/jaxdiff`` console script) or the module (``runpy.run_module``: ``jaxdiff.cli`` of the
``make demo`` recipe) as ``__main__`` and leaves by ``SystemExit`` through the normal
interpreter shutdown (non-daemon threads joined, ``atexit`` handlers run, streams
flushed), so its exit status is the command's. Nothing of one command reaches another:
each is its own process.

Protocol: one JSON request per line on stdin
``{"script", "argv", "cwd", "env", "stdout", "stderr", "timeout"}`` (a script ``"-m NAME"``
runs module NAME, as ``python -m NAME`` does), one JSON reply per line on stdout
``{"returncode", "cpu_s"}`` (a child past its timeout is killed: -9). The first line the
server writes is ``{"ready": true, "threads": n}``.
"""
import gc
import json
import os
import resource
import runpy
import signal
import sys
import time

# What every command imports; loaded here once (the child inherits it).
import absl.app  # noqa: F401
import flax.linen  # noqa: F401
import jax.numpy  # noqa: F401
import ml_collections  # noqa: F401
import numpy  # noqa: F401
import optax  # noqa: F401
import orbax.checkpoint  # noqa: F401
import PIL.Image  # noqa: F401
import scipy.ndimage  # noqa: F401
import tensorboardX  # noqa: F401  (imports torch)
import tensorflow_datasets  # noqa: F401
from transformers import CLIPTokenizer  # noqa: F401

import jaxdiff  # noqa: F401
import jaxdiff.cli  # noqa: F401
import jaxdiff.data.tfds_shapes  # noqa: F401
import jaxdiff.training.recipes  # noqa: F401
from jax._src import xla_bridge


def _child(req):
    """In the forked child: become the command, run it, exit with its status."""
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.stdout = sys.__stdout__  # the server had pointed it at stderr
    sys.argv = list(req["argv"])
    if req["script"].startswith("-m "):  # python -m NAME: sys.path[0] is the cwd
        sys.path[0] = os.getcwd()
        runpy.run_module(req["script"][3:], run_name="__main__", alter_sys=True)
    else:
        script = os.path.abspath(req["script"])
        sys.path[0] = os.path.dirname(script)
        runpy.run_path(script, run_name="__main__")
    raise SystemExit(0)


def _wait(pid, timeout):
    deadline = time.monotonic() + timeout
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def main():
    reply = sys.stdout
    sys.stdout = sys.stderr  # nothing but replies on the protocol stream
    threads = len(os.listdir("/proc/self/task"))
    assert not xla_bridge.backends_are_initialized(), "JAX backend started before fork"
    reply.write(json.dumps({"ready": True, "threads": threads}) + "\n")
    reply.flush()
    for line in sys.stdin:
        req = json.loads(line)
        reply.flush()
        sys.stderr.flush()
        # The imported libraries' objects (millions) stay out of the child's garbage
        # collections: a child's collections and exit no longer touch, and so copy, the
        # pages they share with the server (a no-op script: 1.7 -> 0.5 CPU-s).
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            _child(req)  # never returns: SystemExit runs the interpreter's shutdown
        code, cpu = _wait(pid, req.get("timeout", 900))
        reply.write(json.dumps({"returncode": code, "cpu_s": cpu}) + "\n")
        reply.flush()


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
