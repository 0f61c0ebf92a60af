"""Personalization as background jobs: DreamBooth (full or LoRA) and Textual Inversion run
as the project's own ``train/*.py`` commands in a child process, so a job can be
cancelled at any moment (its process group is terminated) and the server keeps serving.

A job lives in ``<workdir>/jobs/<id>/``: ``instances/`` (the checked uploads, as PNG),
``log.jsonl`` (progress, written by the training loop every step), ``samples/`` (sample
grids as they appear), ``export/`` (the result, written atomically by the recipe) and
``job.log`` (the process's output). A finished job of any kind is offered as a model in
the Generate and Edit tabs (``finished``, ``AppState.model_choices``). One job runs at a
time.

The commands and configs are read from the source checkout beside the package
(``train/``, ``configs/``); without one, ``start`` says so.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import List, Optional

import numpy as np

from jaxdiff.data.images import InputError, list_image_files, save_png

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
KINDS = ("dreambooth_lora", "dreambooth", "textual_inversion")


@dataclasses.dataclass
class Job:
    id: str
    kind: str
    folder: str
    steps: int
    process: subprocess.Popen
    started: float
    cancelled: bool = False

    @property
    def state(self) -> str:
        code = self.process.poll()
        if code is None:
            return "running"
        if self.cancelled:
            return "cancelled"
        return "finished" if code == 0 else f"failed (exit status {code}; see job.log)"

    def step(self) -> int:
        """The last training step logged."""
        path = os.path.join(self.folder, "log.jsonl")
        if not os.path.isfile(path):
            return 0
        with open(path) as f:
            lines = [ln for ln in f.read().splitlines() if ln.strip()]
        try:
            return int(json.loads(lines[-1])["step"]) if lines else 0
        except (ValueError, KeyError):
            return 0

    def samples(self) -> List[str]:
        """Sample grids written so far, oldest first."""
        folder = os.path.join(self.folder, "samples")
        return list_image_files(folder) if os.path.isdir(folder) else []

    def export(self) -> Optional[str]:
        path = os.path.join(self.folder, "export")
        return path if self.state == "finished" and os.path.exists(path) else None


def command(kind: str, folder: str, model: Optional[str], steps: int, prompt: str,
            class_prompt: str, token: str, init_token: str, sample_every: int,
            prior: bool = False) -> List[str]:
    """The ``train/*.py`` command line of a job."""
    common = [f"--workdir={folder}", f"--config.instance_dir={os.path.join(folder, 'instances')}",
              f"--config.model={model or ''}", f"--config.steps={steps}", "--config.log_every=1",
              f"--config.sample_every={sample_every}",
              f"--config.checkpoint_every={max(steps, 1)}"]
    if kind == "textual_inversion":
        return [sys.executable, os.path.join(ROOT, "train", "textual_inversion.py"),
                f"--config={os.path.join(ROOT, 'configs', 'textual_inversion.py')}", *common,
                f"--config.placeholder_token={token}", f"--config.initializer_token={init_token}"]
    variant = ":lora" if kind == "dreambooth_lora" else ""
    return [sys.executable, os.path.join(ROOT, "train", "dreambooth.py"),
            f"--config={os.path.join(ROOT, 'configs', 'dreambooth.py')}{variant}", *common,
            f"--config.instance_prompt={prompt}", f"--config.class_prompt={class_prompt}",
            f"--config.prior_preservation={prior}", "--config.num_class_images=8",
            f"--config.class_cache_dir={os.path.join(folder, '..', 'class_cache')}"]


class Jobs:
    """The server's training jobs (one running at a time)."""

    def __init__(self, workdir: str, model: Optional[str]):
        self.root = os.path.join(workdir, "jobs")
        self.model = model
        self.jobs: dict = {}
        self._lock = threading.Lock()

    def running(self) -> Optional[Job]:
        return next((j for j in self.jobs.values() if j.state == "running"), None)

    def start(self, kind: str, images: np.ndarray, steps: int, prompt: str = "a sks circle",
              class_prompt: str = "a circle", token: str = "<my-concept>",
              init_token: str = "circle", sample_every: int = 0, prior: bool = False) -> Job:
        """Starts a job on uint8 [N, H, W, 3] instance images; a one-line InputError when
        it cannot start."""
        if kind not in KINDS:
            raise InputError(f"unknown personalization {kind!r}; use one of {KINDS}.")
        if not os.path.isfile(os.path.join(ROOT, "train", "dreambooth.py")):
            raise InputError("personalization needs the jaxdiff source checkout (train/, "
                             "configs/) beside the package; run the server from a checkout.")
        if not 1 <= int(steps) <= 5000:
            raise InputError(f"steps must be in [1, 5000], got {steps}.")
        with self._lock:
            if self.running() is not None:
                raise InputError(f"job {self.running().id} is still running; wait for it or "
                                 "cancel it first.")
            job_id = time.strftime("%Y%m%d-%H%M%S-") + kind + "-" + uuid.uuid4().hex[:4]
            folder = os.path.join(self.root, job_id)
            os.makedirs(os.path.join(folder, "instances"))
            for i, image in enumerate(images):
                save_png(os.path.join(folder, "instances", f"{i:02d}.png"), image)
            cmd = command(kind, folder, self.model, int(steps), prompt, class_prompt, token,
                          init_token, int(sample_every), bool(prior))
            with open(os.path.join(folder, "job.log"), "w") as log:
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                        cwd=ROOT, start_new_session=True)
            job = Job(job_id, kind, folder, int(steps), proc, time.time())
            self.jobs[job_id] = job
            return job

    def cancel(self, job_id: Optional[str] = None) -> Optional[Job]:
        """Terminates the running job (its whole process group); its checkpoints stay, its
        export was never started or is complete (the recipe writes it atomically)."""
        job = self.jobs.get(job_id) if job_id else self.running()
        if job is None or job.state != "running":
            return None
        job.cancelled = True
        try:
            os.killpg(job.process.pid, signal.SIGTERM)
            job.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(job.process.pid, signal.SIGKILL)
            job.process.wait()
        except ProcessLookupError:
            pass
        return job

    def finished(self) -> List[Job]:
        """Finished jobs with an export, newest first (any kind)."""
        return [j for j in sorted(self.jobs.values(), key=lambda j: -j.started) if j.export()]

    def finished_adapters(self, kind: str) -> List[str]:
        """Export paths of finished jobs whose result is a LoRA (``kind="lora"``) or a
        Textual-Inversion file (``kind="ti"``), newest first."""
        want = "dreambooth_lora" if kind == "lora" else "textual_inversion"
        return [j.export() for j in sorted(self.jobs.values(), key=lambda j: -j.started)
                if j.kind == want and j.export()]

    def close(self):
        for job in list(self.jobs.values()):
            self.cancel(job.id)
