"""Orbax checkpoints of the full train state: async, atomic, keep-N, resumable.

Orbax writes each step into a temporary directory and renames it when complete, so a
process killed mid-save never shadows the last good checkpoint.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Optional, Tuple

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import multihost

from jaxdiff.training.state import TrainState


class Checkpointer:
    """Saves ``TrainState`` plus JSON metadata (e.g. the data position) every N steps."""

    def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    @staticmethod
    def _tree(state: TrainState) -> dict:
        return {k: v for k, v in state._asdict().items() if v is not None}

    def save(self, state: TrainState, meta: Optional[dict] = None, force: bool = False):
        step = int(jax.device_get(state.step))
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(self._tree(state)),
            meta=ocp.args.JsonSave(dict(meta or {}, step=step))), force=force)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def restore(self, template: TrainState) -> Tuple[Optional[TrainState], Optional[dict]]:
        """Restores the newest readable checkpoint into ``template``'s structure and
        shardings (None if there is none).

        Unfinished saves (Orbax's ``*.orbax-checkpoint-tmp-*`` directories) are never
        listed; a finalised step that still fails to read (e.g. files lost afterwards) is
        skipped with a warning in favour of the next older one.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, self._tree(template))
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 -- any unreadable step: fall back
                logging.warning("checkpoint step %d in %s is unreadable (%s: %s); moved aside, "
                                "trying an older one.", step, self.directory,
                                type(e).__name__, e)
                self._move_aside(step)
                continue
            tree = dict(out["state"])
            fields = {k: tree.get(k) for k in TrainState._fields}
            return TrainState(**fields), dict(out["meta"])
        return None, None

    def _move_aside(self, step: int):
        """Renames an unreadable step dir so Orbax neither lists it nor skips saves at
        steps <= it (it only saves steps newer than the latest one it sees)."""
        if jax.process_index() == 0:
            path = os.path.join(self.directory, str(step))
            os.rename(path, f"{path}.unreadable-{int(time.time())}")
        multihost.sync_global_processes(f"jaxdiff_move_aside_{step}")
        self.manager.reload()

    def reached_preemption(self, step: int) -> bool:
        """True when the job received a preemption notice (synchronised over hosts)."""
        return bool(self.manager.reached_preemption(step))

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def restore_or(template: TrainState, ckpt: Checkpointer) -> Tuple[TrainState, dict]:
    """The latest saved state, or ``template`` at step 0 with empty metadata."""
    state, meta = ckpt.restore(template)
    return (template, {}) if state is None else (state, meta)


