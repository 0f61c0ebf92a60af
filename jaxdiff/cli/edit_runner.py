"""The shared body of the ``edit/`` entrypoints: jobs -> (image, target prompt) pairs ->
chunked compiled calls over the device mesh -> result folders, resumable and multi-host.

An entrypoint describes itself with an ``EditTool``: its ``edit(pipe, params, chunk)``
function and what to record; everything else (inputs, pairing, batching, outputs, errors)
is here and in ``edit_jobs`` / ``edit_results``. Every job becomes one pair per target
prompt (its source prompt when it has none); one ``edit`` call gets at most
``--max-batch`` pairs and returns, per pair, at least "edited" and "reconstruction"
(images: [-1, 1] floats or uint8) and optionally "latent_mask" [N, h, w] (written as
``mask.png`` at the image resolution).

At scale:
  * every call's batch is split over the ``data`` axis of a mesh of this process's
    devices (``Chunk.mesh``; params replicated once);
  * a job whose result folder is complete is skipped (and counted) unless
    ``--overwrite``; each job's folder is written as soon as its pairs are edited, so a
    killed run loses at most the chunk in flight, and re-running the command finishes it;
  * under ``jax.distributed`` (``parallel.maybe_initialize_distributed``) process p of P
    takes the jobs whose manifest index k has ``k % P == p``; process 0 writes the merged
    ``summary.json`` once every process is done;
  * pair noise comes from ``fold_in(key(--seed), pair index in the whole job)``, so an
    edit does not depend on chunking, process count or resumption;
  * ``summary.json`` records ``devices``, ``processes``, ``mesh`` and per-chunk timings;
    a progress bar (on a terminal; else one stdout line per chunk) shows images/s and
    the ETA (the first chunk, which compiles, is left out of the rate once later ones
    ran).
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import jax
import numpy as np
from tqdm import tqdm

import jaxdiff
from jaxdiff import parallel
from jaxdiff.cli import edit_args, edit_jobs, edit_results
from jaxdiff.cli.edit_jobs import Batch, EditJob
from jaxdiff.pipeline import to_uint8


class Chunk(NamedTuple):
    """The pairs of one ``edit`` call: pair j edits ``images[j]`` toward ``targets[j]``.

    jobs: the job of each pair; images: uint8 [N, H, W, 3]; masks: float32 [N, H, W]
    (1 = edit) or None; mask_given: which pairs' jobs came with a mask; sources: the
    jobs' source prompts; seed: ``--seed``; index: each pair's index among all pairs of
    the whole job list (pass as ``sample_index``: it picks the pair's noise); mesh: the
    mesh to split the batch over (pass as ``mesh``).
    """
    jobs: List[EditJob]
    images: np.ndarray
    masks: Optional[np.ndarray]
    mask_given: List[bool]
    sources: List[str]
    targets: List[str]
    seed: int
    index: np.ndarray
    mesh: Any = None


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


def _targets(job: EditJob) -> Tuple[str, ...]:
    return job.target_prompts or (job.source_prompt,)


def run_edits(args, tool: EditTool) -> int:
    """Runs ``tool.edit`` over every job of ``args`` (this process's share of them) and
    writes the results.

    Returns 0, or 1 when some job failed (its error is printed; the others are written).
    """
    edit_args.check_common_args(args)
    jobs, errors = edit_jobs.jobs_from_args(args, options=tool.options, need=tool.need)
    parallel.maybe_initialize_distributed()
    pid, nproc = jax.process_index(), jax.process_count()
    errors = list(errors) if pid == 0 else []  # manifest errors: every process reads them
    first = np.cumsum([0] + [len(_targets(j)) for j in jobs])  # global index of job's pairs
    mine = [k for k in range(len(jobs)) if k % nproc == pid]
    skipped = [] if args.overwrite else [
        k for k in mine if edit_results.is_complete(args.out, jobs[k].name)]
    todo = [k for k in mine if k not in set(skipped)]
    edit_results.remove_partial(args.out, [jobs[k].name for k in todo])
    if skipped:
        print(f"{tool.method}: skipped {len(skipped)} job(s) whose result folder is complete "
              "(--overwrite redoes them)")
    mesh = parallel.local_mesh()
    pipe, params = jaxdiff.load_pipeline(args.model)
    params = parallel.place_params(params, mesh)
    side = pipe.image_size
    batch = edit_jobs.load_jobs([jobs[k] for k in todo], (side, side), fit=args.fit,
                                alpha=args.alpha, mask=tool.mask)
    errors += batch.errors
    loaded = {id(j) for j in batch.jobs}
    index = [k for k in todo if id(jobs[k]) in loaded]  # manifest index of each loaded job
    runnable = _runnable(tool, pipe, batch.jobs, errors)
    pairs = [(r, int(first[index[r]]) + t, tgt) for r in runnable
             for t, tgt in enumerate(_targets(batch.jobs[r]))]
    writer = _Writer(args.out, tool, batch, pairs, side)
    chunks = _edit_pairs(tool, pipe, params, batch, pairs, args.max_batch, args.seed, mesh,
                         writer)
    finished = {jobs[k].name for k in skipped} | set(writer.done)
    done = [job.name for job in jobs if job.name in finished]  # manifest order
    part = dict(done=done, errors=errors, skipped=[jobs[k].name for k in skipped],
                chunks=[dict(c, process=pid) for c in chunks])
    run = dict(devices=jax.device_count(), processes=nproc,
               mesh={str(k): int(v) for k, v in mesh.shape.items()})
    settings = dict(tool.record if tool.summary is None else tool.summary, **run)
    if nproc > 1:
        merged = edit_results.merge_parts(args.out, part, pid, nproc,
                                          order=[job.name for job in jobs])
    else:
        merged = part
    if pid == 0:
        edit_results.write_summary(args.out, merged["done"], merged["errors"], dict(
            settings, skipped=merged["skipped"], chunks=merged["chunks"],
            images_per_s=_rate(merged["chunks"], nproc)))
    edit_args.report_errors(errors)
    print(f"{tool.method}: edited {len(writer.done)} image(s) -> {args.out}"
          + (f" ({len(skipped)} already done)" if skipped else "")
          + (f" [process {pid} of {nproc}]" if nproc > 1 else "")
          + (f"; {len(errors)} error(s)" if errors else ""))
    return 1 if (merged["errors"] if pid == 0 else errors) else 0


def _rate(chunks: Sequence[Mapping[str, Any]], nproc: int) -> Optional[float]:
    """Edited images per second of all processes together, first chunk of each process
    (it compiles) left out when it has later ones."""
    total = 0.0
    for p in range(nproc):
        mine = [c for c in chunks if c["process"] == p]
        steady = mine[1:] or mine
        secs = sum(c["seconds"] for c in steady)
        total += sum(c["images"] for c in steady) / secs if secs > 0 else 0.0
    return round(total, 4) if chunks else None


class _Writer:
    """Writes each job's folder as soon as all its pairs are edited."""

    def __init__(self, out, tool, batch, pairs, side):
        self.out, self.tool, self.batch, self.side = out, tool, batch, side
        self.left = {}
        for r, _, _ in pairs:
            self.left[r] = self.left.get(r, 0) + 1
        self.outputs: Dict[int, List[dict]] = {r: [] for r in self.left}
        self.done: List[str] = []

    def add(self, r: int, out: Dict[str, np.ndarray]):
        self.outputs[r].append(out)
        if len(self.outputs[r]) == self.left[r]:
            self._write(r, self.outputs.pop(r))

    def _write(self, r, outs):
        job, tool = self.batch.jobs[r], self.tool
        first = outs[0]
        extra = {}
        if "latent_mask" in first:
            up = self.side // first["latent_mask"].shape[0]
            extra["mask"] = first["latent_mask"].repeat(up, 0).repeat(up, 1) > 0.5
        record = tool.record
        if tool.job_record is not None:
            record = dict(record, **tool.job_record(job, first))
        edit_results.write_result(self.out, job, source=self.batch.images[r],
                                  reconstruction=_uint8(first["reconstruction"]),
                                  edits=[_uint8(o["edited"]) for o in outs],
                                  extra_images=extra, settings=record)
        self.done.append(job.name)


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
                seed: int, mesh, writer: _Writer) -> List[dict]:
    """``tool.edit`` over the pairs in chunks of ``max_batch``, each job written as soon as
    it is complete; returns the timing of every chunk."""
    size = min(max_batch, len(pairs))
    timings, t_start, finished = [], None, 0
    bar = tqdm(total=len(pairs), unit="img", desc=tool.method, file=sys.stderr,
               disable=None if len(pairs) else True)
    with bar:
        for lo in range(0, len(pairs), max_batch):
            chunk = pairs[lo:lo + max_batch]
            n = len(chunk)
            if tool.pad_chunks:
                chunk = chunk + [chunk[-1]] * (size - n)
            idx = [r for r, _, _ in chunk]
            jobs = [batch.jobs[r] for r in idx]
            masks = None if batch.masks is None else batch.masks[idx].astype(np.float32)
            t0 = time.perf_counter()
            out = tool.edit(pipe, params, Chunk(
                jobs=jobs, images=batch.images[idx], masks=masks,
                mask_given=[job.mask is not None for job in jobs],
                sources=[job.source_prompt for job in jobs], targets=[t for _, _, t in chunk],
                seed=seed, index=np.asarray([g for _, g, _ in chunk]), mesh=mesh))
            out = {name: np.asarray(v) for name, v in out.items()}
            secs = time.perf_counter() - t0
            timings.append(dict(images=n, seconds=secs))
            for j in range(n):
                writer.add(chunk[j][0], {name: v[j] for name, v in out.items()})
            bar.update(n)
            finished += n  # (a disabled tqdm does not count)
            if t_start is None:  # the first chunk compiles: the rate counts from its end
                t_start, base = time.perf_counter(), finished
                rate = n / secs if secs > 0 else float("inf")
            elif finished > base:
                rate = (finished - base) / (time.perf_counter() - t_start)
            left = (len(pairs) - finished) / rate if rate > 0 else float("nan")
            bar.set_postfix(img_per_s=f"{rate:.2f}", eta=f"{left:.0f}s")
            if bar.disable:  # not a terminal (a batch job's log): one line per chunk
                print(f"{tool.method}: {finished}/{len(pairs)} images, {rate:.2f} images/s, "
                      f"ETA {left:.0f} s", flush=True)
    return timings


def _uint8(image) -> np.ndarray:
    image = np.asarray(image)
    return image if image.dtype == np.uint8 else to_uint8(image)
