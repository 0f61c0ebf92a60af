"""The shared body of the ``edit/`` entrypoints: jobs -> (image, target prompt) pairs ->
chunked compiled calls -> result folders.

An entrypoint describes itself with an ``EditTool``: its ``edit(pipe, params, chunk)``
function and what to record; everything else (inputs, pairing, batching, outputs, errors)
is here and in ``edit_jobs`` / ``edit_results``. Every job becomes one pair per target
prompt (its source prompt when it has none); one ``edit`` call gets at most
``--max-batch`` pairs and returns, per pair, at least "edited" and "reconstruction"
(images: [-1, 1] floats or uint8) and optionally "latent_mask" [N, h, w] (written as
``mask.png`` at the image resolution).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

import jaxdiff
from jaxdiff.cli import edit_args, edit_jobs, edit_results
from jaxdiff.cli.edit_jobs import Batch, EditJob
from jaxdiff.pipeline import to_uint8


class Chunk(NamedTuple):
    """The pairs of one ``edit`` call: pair j edits ``images[j]`` toward ``targets[j]``.

    jobs: the job of each pair; images: uint8 [N, H, W, 3]; masks: float32 [N, H, W]
    (1 = edit) or None; mask_given: which pairs' jobs came with a mask; sources: the
    jobs' source prompts; seed: ``--seed`` plus the index of the chunk's first pair.
    """
    jobs: List[EditJob]
    images: np.ndarray
    masks: Optional[np.ndarray]
    mask_given: List[bool]
    sources: List[str]
    targets: List[str]
    seed: int


@dataclasses.dataclass(frozen=True)
class EditTool:
    """What an entrypoint hands the runner.

    Attributes:
      method: the name that starts the closing line.
      edit: ``(pipe, params, Chunk) -> {name: array [N, ...]}`` (see the module doc).
      record: the settings written in every job's ``settings.json``.
      summary: the settings written in ``summary.json`` (default: ``record``).
      mask: "none" | "optional" | "required": whether jobs have masks.
      need: the prompts every job must have; options: extra manifest keys the tool reads.
      check_job: ``(pipe, job, jobs) -> None`` raising ValueError for a job that cannot
        run (``jobs``: every job that loaded); the job is reported and skipped.
      job_record: ``(job, outputs of its first pair) -> settings`` added to its record.
      pad_chunks: fill the last chunk by repeating its last pair, so that every call has
        the same shapes (one compiled program).
    """
    method: str
    edit: Callable[..., Mapping[str, Any]]
    record: Mapping[str, Any]
    summary: Optional[Mapping[str, Any]] = None
    mask: str = "none"
    need: Tuple[str, ...] = ("target_prompt",)
    options: Tuple[str, ...] = ()
    check_job: Optional[Callable[..., None]] = None
    job_record: Optional[Callable[..., Mapping[str, Any]]] = None
    pad_chunks: bool = False


def model_name(args) -> str:
    """The ``--model`` folder, or the embedded model's name."""
    return args.model or "embedded:shapes"


def method_record(args, method: str, settings: Mapping[str, Any]) -> dict:
    """A method's own settings followed by the shared flags (the mask/strength tools)."""
    return dict(settings, method=method, model=model_name(args), steps=args.steps,
                guidance=args.guidance, seed=args.seed, fit=args.fit, alpha=args.alpha,
                max_batch=args.max_batch)


def run_edits(args, tool: EditTool) -> int:
    """Runs ``tool.edit`` over every job of ``args`` and writes the results.

    Returns 0, or 1 when some job failed (its error is printed; the others are written).
    """
    edit_args.check_common_args(args)
    jobs, errors = edit_jobs.jobs_from_args(args, options=tool.options, need=tool.need)
    pipe, params = jaxdiff.load_pipeline(args.model)
    side = pipe.image_size
    batch = edit_jobs.load_jobs(jobs, (side, side), fit=args.fit, alpha=args.alpha,
                                mask=tool.mask)
    errors = list(errors) + batch.errors
    runnable = _runnable(tool, pipe, batch.jobs, errors)
    pairs = [(k, t) for k in runnable
             for t in (batch.jobs[k].target_prompts or (batch.jobs[k].source_prompt,))]
    outputs = _edit_pairs(tool, pipe, params, batch, pairs, args.max_batch, args.seed)
    done = []
    for k in runnable:
        job = batch.jobs[k]
        rows = [i for i, (kk, _) in enumerate(pairs) if kk == k]
        first = outputs[rows[0]]
        extra = {}
        if "latent_mask" in first:
            up = side // first["latent_mask"].shape[0]
            extra["mask"] = first["latent_mask"].repeat(up, 0).repeat(up, 1) > 0.5
        record = tool.record
        if tool.job_record is not None:
            record = dict(record, **tool.job_record(job, first))
        edit_results.write_result(args.out, job, source=batch.images[k],
                                  reconstruction=_uint8(first["reconstruction"]),
                                  edits=[_uint8(outputs[i]["edited"]) for i in rows],
                                  extra_images=extra, settings=record)
        done.append(job.name)
    edit_results.write_summary(args.out, done, errors,
                               tool.record if tool.summary is None else tool.summary)
    edit_args.report_errors(errors)
    print(f"{tool.method}: edited {len(done)} image(s) -> {args.out}"
          + (f"; {len(errors)} error(s)" if errors else ""))
    return 1 if errors else 0


def _runnable(tool: EditTool, pipe, jobs: Sequence[EditJob], errors: List[str]) -> List[int]:
    """Indices of the jobs that pass ``tool.check_job``; one error line per other job."""
    if tool.check_job is None:
        return list(range(len(jobs)))
    ok = []
    for k, job in enumerate(jobs):
        try:
            tool.check_job(pipe, job, jobs)
            ok.append(k)
        except ValueError as e:
            errors.append(f"{job.image}: {e}")
    return ok


def _edit_pairs(tool: EditTool, pipe, params, batch: Batch, pairs, max_batch: int,
                seed: int) -> List[Dict[str, np.ndarray]]:
    """``tool.edit`` over the pairs in chunks of ``max_batch``; outputs per pair."""
    outputs = []
    size = min(max_batch, len(pairs))
    for lo in range(0, len(pairs), max_batch):
        chunk = pairs[lo:lo + max_batch]
        n = len(chunk)
        if tool.pad_chunks:
            chunk = chunk + [chunk[-1]] * (size - n)
        idx = [k for k, _ in chunk]
        jobs = [batch.jobs[k] for k in idx]
        masks = None if batch.masks is None else batch.masks[idx].astype(np.float32)
        out = tool.edit(pipe, params, Chunk(
            jobs=jobs, images=batch.images[idx], masks=masks,
            mask_given=[job.mask is not None for job in jobs],
            sources=[job.source_prompt for job in jobs], targets=[t for _, t in chunk],
            seed=seed + lo))
        outputs += [{name: np.asarray(v[j]) for name, v in out.items()} for j in range(n)]
    return outputs


def _uint8(image) -> np.ndarray:
    image = np.asarray(image)
    return image if image.dtype == np.uint8 else to_uint8(image)
