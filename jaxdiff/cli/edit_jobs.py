"""The jobs of the ``edit/`` entrypoints: one image, its prompts, mask and options each.

    jobs_from_args(args, options=(), need=(...)) -> (jobs [EditJob], errors [str])
    read_manifest(path, options=(), need=(...)) -> (jobs, errors)
    load_jobs(jobs, size, fit=, alpha=, mask=) -> Batch(jobs, images, masks, errors)

Jobs come from ``--image`` (files and/or folders; ``--mask`` one file or a folder of masks
named like the images) or from a JSONL ``--manifest``. Images and masks are read by
``jaxdiff.data.images`` (any mode and size, brought to the model resolution). Every
problem is an ``InputError`` with one line naming the file, what is wrong and what to do;
in batch mode a bad job is reported and skipped, and the rest are processed.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from jaxdiff.data.images import (IMAGE_EXTENSIONS, InputError, image_size, list_image_files,
                                 load_image, load_mask)


@dataclasses.dataclass(frozen=True)
class EditJob:
    """One edit: an image, its prompts, an optional mask and method-specific options.

    ``name`` is the job's output folder name (unique within a batch).
    """
    name: str
    image: str
    source_prompt: str = ""
    target_prompts: Tuple[str, ...] = ()
    mask: Optional[str] = None
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


_MANIFEST_KEYS = ("image", "name", "source_prompt", "target_prompt", "target_prompts", "mask")


def _check_prompts(job: EditJob, need: Sequence[str], where: str):
    if "source_prompt" in need and not job.source_prompt:
        raise InputError(f"{where}: no source prompt; give source_prompt / --source-prompt.")
    if "target_prompt" in need and not job.target_prompts:
        raise InputError(f"{where}: no target prompt; give target_prompt / --target-prompt.")


def read_manifest(path: str, options: Sequence[str] = (),
                  need: Sequence[str] = ("target_prompt",)):
    """JSONL manifest -> (jobs, errors). One JSON object per line:

    ``{"image": "a.png", "source_prompt": "...", "target_prompt": "..." | "target_prompts":
    [...], "mask": "m.png", "name": "out-folder", <option>: ...}``. Relative paths are
    relative to the manifest's folder; ``options`` names the extra keys a method accepts
    (anything else is an error for that line). Bad lines become one-line errors.
    """
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such manifest file.")
    base = os.path.dirname(os.path.abspath(path))
    jobs, errors = [], []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise InputError(f"{where}: expected a JSON object, got {type(rec).__name__}.")
            unknown = sorted(set(rec) - set(_MANIFEST_KEYS) - set(options))
            if unknown:
                raise InputError(f"{where}: unknown key(s) {unknown}; allowed: "
                                 f"{sorted(set(_MANIFEST_KEYS) | set(options))}.")
            if "image" not in rec:
                raise InputError(f"{where}: no \"image\" key.")
            targets = rec.get("target_prompts", rec.get("target_prompt", ()))
            targets = (targets,) if isinstance(targets, str) else tuple(targets)
            rel = lambda p: p if p is None or os.path.isabs(p) else os.path.join(base, p)
            job = EditJob(name=str(rec.get("name") or _stem(rec["image"])),
                          image=rel(rec["image"]), source_prompt=rec.get("source_prompt", ""),
                          target_prompts=targets, mask=rel(rec.get("mask")),
                          options={k: rec[k] for k in options if k in rec})
            _check_prompts(job, need, where)
            jobs.append(job)
        except json.JSONDecodeError as e:
            errors.append(f"{where}: not valid JSON ({e.msg} at column {e.colno}).")
        except InputError as e:
            errors.append(str(e))
    return _unique_names(jobs), errors


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0] or "image"


def _unique_names(jobs: List[EditJob]) -> List[EditJob]:
    seen, out = {}, []
    for job in jobs:
        k = seen.get(job.name, 0)
        seen[job.name] = k + 1
        out.append(job if k == 0 else dataclasses.replace(job, name=f"{job.name}_{k}"))
    return out


def jobs_from_args(args, options: Sequence[str] = (),
                   need: Sequence[str] = ("target_prompt",)):
    """(jobs, errors) from ``--manifest`` or ``--image`` (files and/or folders).

    With ``--image`` every job shares ``--source-prompt`` / ``--target-prompt``; ``--mask``
    is one mask file for all images, or a folder holding a mask with each image's stem.
    Raises InputError when no job can be formed at all.
    """
    if args.manifest:
        jobs, errors = read_manifest(args.manifest, options, need)
    else:
        paths, errors = [], []
        for p in args.image:
            if os.path.isdir(p):
                found = list_image_files(p)
                if not found:
                    errors.append(f"{p}: folder holds no image files ({', '.join(IMAGE_EXTENSIONS)}).")
                paths += found
            else:
                paths.append(p)
        masks = getattr(args, "mask", None)
        jobs = []
        for p in paths:
            m = masks
            if masks and os.path.isdir(masks):
                cand = [f for f in list_image_files(masks) if _stem(f) == _stem(p)]
                m = cand[0] if cand else os.path.join(masks, _stem(p) + ".png")
            jobs.append(EditJob(name=_stem(p), image=p, source_prompt=args.source_prompt or "",
                                target_prompts=tuple(args.target_prompt or ()), mask=m))
        if jobs:
            _check_prompts(jobs[0], need, "command line")
        jobs = _unique_names(jobs)
    if not jobs:
        raise InputError("no job to run: " + ("; ".join(errors) or "no image given."))
    return jobs, errors


class Batch(NamedTuple):
    """Jobs that loaded, their images uint8 [N, H, W, 3], masks bool [N, H, W] or None,
    and one error line per job that did not load."""
    jobs: List[EditJob]
    images: np.ndarray
    masks: Optional[np.ndarray]
    errors: List[str]


def load_jobs(jobs: Sequence[EditJob], size: Tuple[int, int], *, fit: str = "crop",
              alpha: str = "white", mask: str = "none") -> Batch:
    """Loads every job's image (and mask: ``mask`` = "none" | "optional" | "required").

    A job whose files fail is reported in ``errors`` and left out; the rest load.
    With ``mask="optional"`` a job without a mask gets an all-True mask.
    """
    ok, images, masks, errors = [], [], [], []
    for job in jobs:
        try:
            img = load_image(job.image, size, fit=fit, alpha=alpha)
            if mask == "required" and not job.mask:
                raise InputError(f"{job.image}: no mask given; pass --mask or a \"mask\" key.")
            if mask != "none":
                masks.append(load_mask(job.mask, size, fit=fit, image_size=image_size(job.image))
                             if job.mask else np.ones(size, bool))
            ok.append(job)
            images.append(img)
        except InputError as e:
            errors.append(str(e))
    H, W = size
    return Batch(ok, np.stack(images) if images else np.zeros((0, H, W, 3), np.uint8),
                 np.stack(masks) if masks else (None if mask == "none" else
                                                np.zeros((0, H, W), bool)), errors)

