"""Results of the ``edit/`` entrypoints, written atomically.

    write_result(out_dir, job, source=, reconstruction=, edits=, settings=) -> folder
    write_summary(out_dir, done, errors, settings)
    is_complete(out_dir, name) -> bool;  remove_partial(out_dir, names)
    merge_parts(out_dir, part, process, processes, order) -> merged part (process 0)

Each job's folder is assembled under a temporary name and renamed into place (an existing
folder of the same name is replaced only once the new one is complete); single files are
written to a temporary name and renamed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from jaxdiff import parallel
from jaxdiff.cli.edit_jobs import EditJob
from jaxdiff.data.images import make_panel, save_png, write_json


def write_result(out_dir: str, job: EditJob, *, source: np.ndarray,
                 edits: Sequence[np.ndarray], reconstruction: Optional[np.ndarray] = None,
                 settings: Optional[Mapping[str, Any]] = None,
                 extra_images: Optional[Mapping[str, np.ndarray]] = None) -> str:
    """Writes ``<out_dir>/<job.name>/``: ``input.png``, ``reconstruction.png`` (if given),
    ``edit.png`` (or ``edit_<k>.png`` for several targets), any ``extra_images``
    (name -> uint8 HxWx3 or bool HxW mask), ``panel.png`` (input | reconstruction |
    edits) and ``settings.json``. The folder appears complete or not at all; an existing
    folder of the same name is replaced. Returns the folder path.
    """
    os.makedirs(out_dir, exist_ok=True)
    final = os.path.join(out_dir, job.name)
    tmp = tempfile.mkdtemp(prefix=f".{job.name}.", dir=out_dir)
    try:
        save_png(os.path.join(tmp, "input.png"), source)
        panel = [source]
        if reconstruction is not None:
            save_png(os.path.join(tmp, "reconstruction.png"), reconstruction)
            panel.append(reconstruction)
        names = ["edit.png"] if len(edits) == 1 else [f"edit_{k}.png" for k in range(len(edits))]
        for name, img, prompt in zip(names, edits, list(job.target_prompts) + [""] * len(edits)):
            save_png(os.path.join(tmp, name), img, {"prompt": prompt} if prompt else None)
            panel.append(img)
        for name, img in (extra_images or {}).items():
            img = np.asarray(img)
            if img.dtype == bool:
                img = np.repeat((img * 255).astype(np.uint8)[..., None], 3, axis=-1)
            save_png(os.path.join(tmp, f"{name}.png"), img)
        save_png(os.path.join(tmp, "panel.png"), make_panel(panel))
        record = dict(name=job.name, image=job.image, source_prompt=job.source_prompt,
                      target_prompts=list(job.target_prompts), mask=job.mask,
                      options=dict(job.options), edits=names, **dict(settings or {}))
        write_json(os.path.join(tmp, "settings.json"), record)
        os.chmod(tmp, 0o755)
        if os.path.exists(final):
            old = tempfile.mkdtemp(prefix=f".{job.name}.old.", dir=out_dir)
            os.replace(final, os.path.join(old, "x"))
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def write_summary(out_dir: str, done: Sequence[str], errors: Sequence[str],
                  settings: Mapping[str, Any]):
    """``<out_dir>/summary.json``: finished job names, error lines and the settings."""
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "summary.json"),
               dict(done=list(done), errors=list(errors), **dict(settings)))


def is_complete(out_dir: str, name: str) -> bool:
    """Whether ``<out_dir>/<name>/`` holds a finished result (folders appear complete or
    not at all: a folder with its ``settings.json`` is done)."""
    return os.path.isfile(os.path.join(out_dir, name, "settings.json"))


def remove_partial(out_dir: str, names) -> None:
    """Deletes what a killed run left of these jobs' results: the temporary folders of
    ``write_result`` (``.<name>.<8 chars>`` and ``.<name>.old.<8 chars>``)."""
    if not os.path.isdir(out_dir):
        return
    pattern = re.compile("^\\.(%s)\\.(old\\.)?[A-Za-z0-9_]{8}$"
                         % "|".join(re.escape(n) for n in names)) if names else None
    for entry in os.listdir(out_dir) if pattern else ():
        path = os.path.join(out_dir, entry)
        if pattern.match(entry) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)


def merge_parts(out_dir: str, part: Mapping[str, Any], process: int, processes: int,
                order: Sequence[str]) -> dict:
    """Multi-host: every process writes its ``part`` (lists: done, errors, skipped,
    chunks) as ``<out_dir>/.summary.part<p>.json``; after all have (a barrier), process 0
    reads them, concatenates the lists (done and skipped in ``order``) and deletes the
    parts. Returns the merged dict on process 0, ``part`` elsewhere."""
    own = os.path.join(out_dir, f".summary.part{process}.json")
    os.makedirs(out_dir, exist_ok=True)
    write_json(own, dict(part))
    parallel.barrier("jaxdiff-edit-summary")
    if process != 0:
        return dict(part)
    merged = {k: [] for k in part}
    for p in range(processes):
        path = os.path.join(out_dir, f".summary.part{p}.json")
        with open(path, encoding="utf-8") as f:
            got = json.load(f)
        for k in merged:
            merged[k] += got[k]
        os.remove(path)
    rank = {n: i for i, n in enumerate(order)}
    for k in ("done", "skipped"):
        merged[k].sort(key=lambda n: rank.get(n, len(rank)))
    return merged
