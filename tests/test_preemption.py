"""Preemption: SIGKILL a real training process mid-run, plant a half-written and a broken
checkpoint, resume, and reach the parameters of an uninterrupted run."""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

JOB = os.path.join(os.path.dirname(__file__), "preempt_job.py")
STEPS = 16


def _start(workdir, delay):
    return subprocess.Popen([sys.executable, JOB, str(workdir), str(STEPS), str(delay)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))


def _finished(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


def _saved_steps(ckpt_dir):
    return sorted(int(os.path.basename(d)) for d in glob.glob(os.path.join(ckpt_dir, "*"))
                  if os.path.basename(d).isdigit()
                  and os.path.exists(os.path.join(d, "commit_success.txt")))


def _final(workdir):
    with np.load(os.path.join(workdir, "final.npz")) as z:
        return [z[f"arr_{i}"] for i in range(len(z.files))]


def test_sigkill_resume_matches_uninterrupted_run(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    # The uninterrupted run first: it also fills the persistent compilation cache, so the
    # killed and the resumed process do not compile again.
    _finished(_start(full, 0.0))
    proc = _start(killed, 0.3)
    ckpt_dir = str(killed / "checkpoints")
    deadline = time.time() + 240
    while not [s for s in _saved_steps(ckpt_dir) if s >= 4] and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    good = _saved_steps(ckpt_dir)
    assert 4 <= good[-1] < STEPS, good
    assert not os.path.exists(killed / "final.npz")

    # A save cut short (Orbax's temp dir) and a finalised-looking step whose files are
    # truncated, both newer than the last good step: neither may shadow it.
    last = os.path.join(ckpt_dir, str(good[-1]))
    shutil.copytree(last, os.path.join(ckpt_dir, f"{STEPS - 1}.orbax-checkpoint-tmp-1"))
    broken = os.path.join(ckpt_dir, str(good[-1] + 2))
    shutil.rmtree(broken, ignore_errors=True)  # the kill may have caught it mid-rename
    shutil.copytree(last, broken)
    for f in glob.glob(os.path.join(broken, "state", "**", "*"), recursive=True):
        if os.path.isfile(f):
            open(f, "w").close()

    _finished(_start(killed, 0.0))
    for a, b in zip(_final(full), _final(killed)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

    # Both processes append to one log: steps up to the last good checkpoint were run
    # once (resumed there, not from scratch), every step was run, the last one last.
    steps = [json.loads(x)["step"] for x in open(killed / "log.jsonl")]
    assert steps.count(1) == steps.count(good[-1]) == 1, steps
    assert sorted(set(steps)) == list(range(1, STEPS + 1)) and steps[-1] == STEPS
    assert glob.glob(broken + ".unreadable-*")  # the broken step was moved aside
    assert STEPS in _saved_steps(ckpt_dir)


def test_preemption_notice_saves_and_stops(tmp_path, monkeypatch):
    """On Orbax's preemption notice the loop saves at once and raises ``Preempted``; a
    re-run resumes from that step (a quadratic loss keeps this test cheap)."""
    import jax.numpy as jnp
    import optax
    import pytest

    from jaxdiff.training import state as state_lib
    from jaxdiff.training.checkpoint import Checkpointer
    from jaxdiff.training.loop import Preempted, train_loop
    from jaxdiff.training.step import make_train_step

    opt = optax.sgd(0.1)
    step = make_train_step(lambda p, b, r: jnp.sum((p["w"] - b) ** 2), opt)
    state = state_lib.create({"w": jnp.zeros(4)}, opt, ema=False)
    batch_fn = lambda s: np.full((4,), float(s), np.float32)
    kw = dict(log_every=1, ckpt_every=100, desc="notice", async_save=False)
    monkeypatch.setattr(Checkpointer, "reached_preemption", lambda self, s: s == 3)
    with pytest.raises(Preempted, match="step 3"):
        train_loop(step, state, batch_fn, 10, str(tmp_path), **kw)
    assert _saved_steps(str(tmp_path / "checkpoints")) == [3]
    monkeypatch.setattr(Checkpointer, "reached_preemption", lambda self, s: False)
    out = train_loop(step, state, batch_fn, 10, str(tmp_path), **kw)
    steps = [json.loads(x)["step"] for x in open(tmp_path / "log.jsonl")]
    assert steps == [1, 2, 3] + list(range(4, 11)) and int(out.step) == 10
