"""The shared body of the mask/strength edit entrypoints (SDEdit, DiffEdit, blended,
RePaint, ILVR): jobs -> (image, target prompt) pairs -> chunked compiled calls -> files.

An entrypoint supplies ``edit_fn(pipe, params, images, masks, mask_given, sources,
targets, seed) -> dict`` (``images`` float [N, H, W, 3] in [-1, 1], ``masks`` float
[N, H, W] or None) returning at least "edited" and "reconstruction" ([-1, 1] floats) and
optionally "latent_mask" [N, h, w]; everything else (inputs, batching, outputs, errors)
is here and in ``editing.io`` / ``editing.results``.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from jaxdiff.editing import io, results
from jaxdiff.pipeline import from_uint8, to_uint8


def run_edits(args, edit_fn: Callable, *, method: str, settings: Mapping, mask: str = "none",
              need=("target_prompt",)) -> int:
    """Runs ``edit_fn`` over every job of ``args`` and writes the results (see module doc).

    Returns 0, or 1 when some job failed (its error is printed; the others are written).
    """
    import jaxdiff
    io.check_common_args(args)
    jobs, errors = io.jobs_from_args(args, need=need)
    pipe, params = jaxdiff.load_pipeline(args.model)
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    batch = io.load_jobs(jobs, (side, side), fit=args.fit, alpha=args.alpha, mask=mask)
    errors = list(errors) + batch.errors
    pairs = [(k, t) for k, job in enumerate(batch.jobs)
             for t in (job.target_prompts or (job.source_prompt,))]
    outputs = {}
    for lo in range(0, len(pairs), args.max_batch):
        chunk = pairs[lo:lo + args.max_batch]
        idx = [k for k, _ in chunk]
        masks = None if batch.masks is None else batch.masks[idx].astype(np.float32)
        given = [batch.jobs[k].mask is not None for k in idx]
        out = edit_fn(pipe, params, from_uint8(batch.images[idx]), masks, given,
                      [batch.jobs[k].source_prompt for k in idx], [t for _, t in chunk],
                      args.seed + lo)
        for j, pair in enumerate(chunk):
            outputs[lo + j] = {name: np.asarray(v[j]) for name, v in out.items()}
    record = dict(settings, method=method, model=args.model or "embedded:shapes",
                  steps=args.steps, guidance=args.guidance, seed=args.seed, fit=args.fit,
                  alpha=args.alpha, max_batch=args.max_batch)
    done = []
    for k, job in enumerate(batch.jobs):
        rows = [i for i, (kk, _) in enumerate(pairs) if kk == k]
        first = outputs[rows[0]]
        extra = {}
        if "latent_mask" in first:
            up = side // first["latent_mask"].shape[0]
            extra["mask"] = first["latent_mask"].repeat(up, 0).repeat(up, 1) > 0.5
        results.write_result(args.out, job, source=batch.images[k],
                             reconstruction=to_uint8(first["reconstruction"]),
                             edits=[to_uint8(outputs[i]["edited"]) for i in rows],
                             extra_images=extra, settings=record)
        done.append(job.name)
    results.write_summary(args.out, done, errors, record)
    io.report_errors(errors)
    print(f"{method}: edited {len(done)} image(s) -> {args.out}"
          + (f"; {len(errors)} error(s)" if errors else ""))
    return 1 if errors else 0
