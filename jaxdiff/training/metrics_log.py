"""Training metrics on disk: JSON lines (always) and TensorBoard scalars (when
``tensorboardX`` is installed; ``pip install tensorboardX``)."""
from __future__ import annotations

import json
import os
from typing import Mapping, Optional


class MetricsLog:
    """Appends ``{"stage", "step", **metrics}`` to ``<workdir>/log.jsonl`` and, with
    ``tensorboardX`` importable, writes each metric as the scalar ``<stage>/<name>`` to
    ``<workdir>/tensorboard/`` (``tensorboard --logdir <workdir>/tensorboard``).
    ``enabled=False`` (every process but the first) makes it a no-op."""

    def __init__(self, workdir: str, stage: str, *, enabled: bool = True,
                 tensorboard: bool = True):
        self.stage = stage
        self._jsonl = (open(os.path.join(workdir, "log.jsonl"), "a", encoding="utf-8")
                       if enabled else None)
        self._tb = None
        if enabled and tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    @property
    def tensorboard_dir(self) -> Optional[str]:
        return self._tb.logdir if self._tb is not None else None

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(dict(stage=self.stage, step=step, **metrics)) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for name, value in metrics.items():
                self._tb.add_scalar(f"{self.stage}/{name}", value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
