"""Edit real images: invert them, then apply Prompt-to-Prompt (optionally with LocalBlend).

    python edit/p2p.py --image cat.png --source-prompt "a red circle" \\
        --target-prompt "a blue circle" --out outputs/p2p
    python edit/p2p.py --manifest jobs.jsonl --inversion direct --blend-words red blue \\
        --out outputs/p2p_batch

Per input it writes ``<out>/<name>/``: input.png, reconstruction.png (the source branch),
edit.png (edit_<k>.png for several targets), mask.png (LocalBlend), panel.png and
settings.json; ``<out>/summary.json`` lists finished jobs and errors. A batch is edited in
one compiled program per ``--max-batch`` chunk. The logic is in
``jaxdiff.editing.p2p_pipeline``; this file only reads flags and writes files.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from jaxdiff.editing import io, results
from jaxdiff.editing.p2p_pipeline import INVERSIONS, MODES, P2PSettings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edit/p2p.py", description=__doc__.splitlines()[0],
        epilog="Manifest lines may also carry \"blend_words\" (a list or a space-separated "
        "string) per job.")
    io.add_common_args(p, steps=50, guidance=7.5)
    p.add_argument("--inversion", default="null_text", choices=INVERSIONS,
                   help="how the image is inverted (default null_text)")
    p.add_argument("--mode", default="replace", choices=MODES,
                   help="replace: word swap (same word count); refine: added words; "
                   "reweight: scale attention on --reweight words (default replace)")
    p.add_argument("--cross-replace-steps", type=float, default=0.8,
                   help="fraction of steps with injected cross-attention (default 0.8)")
    p.add_argument("--self-replace-steps", type=float, default=0.4,
                   help="fraction of steps with injected self-attention (default 0.4)")
    p.add_argument("--blend-words", nargs="+", default=None, metavar="WORD",
                   help="LocalBlend: edit only where these words (looked up in both "
                   "prompts, e.g. 'red blue') attend; off by default")
    p.add_argument("--blend-threshold", type=float, default=0.3,
                   help="LocalBlend mask threshold (default 0.3)")
    p.add_argument("--blend-start", type=float, default=0.2,
                   help="LocalBlend starts after this fraction of steps (default 0.2)")
    p.add_argument("--reweight", action="append", default=None, metavar="WORD=FACTOR",
                   help="scale the target's attention on WORD (repeatable), e.g. red=2")
    p.add_argument("--inner-steps", type=int, default=10,
                   help="null-text inversion: max Adam steps per timestep (default 10)")
    return p


def _reweight(items):
    out = {}
    for item in items or ():
        word, _, factor = item.partition("=")
        try:
            out[word] = float(factor)
        except ValueError:
            raise io.InputError(f"--reweight {item!r}: expected WORD=FACTOR, e.g. red=2.") from None
        if not word:
            raise io.InputError(f"--reweight {item!r}: expected WORD=FACTOR, e.g. red=2.")
    return out


def _blend_words(job, default):
    words = job.options.get("blend_words", default)
    return words.split() if isinstance(words, str) else (list(words) if words else None)


def run(args) -> int:
    import jaxdiff
    from jaxdiff.editing import local_blend, p2p_pipeline, prompt_to_prompt

    io.check_common_args(args)
    settings = P2PSettings(
        inversion=args.inversion, mode=args.mode, steps=args.steps, guidance=args.guidance,
        cross_replace_steps=args.cross_replace_steps,
        self_replace_steps=args.self_replace_steps, reweight=_reweight(args.reweight) or None,
        blend_threshold=args.blend_threshold, blend_start=args.blend_start,
        num_inner_steps=args.inner_steps)
    settings.validate()
    need = ("source_prompt",) if args.mode == "reweight" else ("source_prompt", "target_prompt")
    jobs, errors = io.jobs_from_args(args, options=("blend_words",), need=need)
    pipe, params = jaxdiff.load_pipeline(args.model)
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    batch = io.load_jobs(jobs, (side, side), fit=args.fit, alpha=args.alpha)
    errors += batch.errors
    use_blend = bool(args.blend_words) or any("blend_words" in j.options for j in batch.jobs)
    # Expand jobs to (image, target) pairs; check each pair alone so a bad one is skipped.
    pairs = []
    for k, job in enumerate(batch.jobs):
        targets = job.target_prompts or (job.source_prompt,)
        words = _blend_words(job, args.blend_words)
        try:
            for t in targets:
                prompt_to_prompt.make_control(pipe, [job.source_prompt], [t], 1, mode=args.mode)
                if use_blend:
                    if not words:
                        raise io.InputError("other jobs use LocalBlend; give this one "
                                            "\"blend_words\" too (or --blend-words).")
                    local_blend.make_local_blend(pipe, [job.source_prompt], [t], 1, words)
            pairs += [(k, t, words) for t in targets]
        except ValueError as e:
            errors.append(f"{job.image}: {e}")
    done = []
    if pairs:
        if use_blend:
            settings = dataclasses.replace(settings, blend_words=[w for _, _, w in pairs])
        idx = [k for k, _, _ in pairs]
        res = p2p_pipeline.p2p_edit_chunked(
            pipe, params, batch.images[idx], [batch.jobs[k].source_prompt for k in idx],
            [t for _, t, _ in pairs], settings, max_batch=args.max_batch)
        record = dict(dataclasses.asdict(settings), blend_words=None, model=args.model or "embedded:shapes",
                      seed=args.seed, fit=args.fit, alpha=args.alpha)
        for k, job in enumerate(batch.jobs):
            rows = [i for i, (kk, _, _) in enumerate(pairs) if kk == k]
            if not rows:
                continue
            up = side // res.mask.shape[1]
            extra = {"mask": res.mask[rows[0]].repeat(up, 0).repeat(up, 1)} if use_blend else None
            results.write_result(args.out, job, source=batch.images[k],
                                 reconstruction=res.reconstruction[rows[0]],
                                 edits=[res.edited[i] for i in rows], extra_images=extra,
                                 settings=dict(record, blend_words=pairs[rows[0]][2],
                                               null_text_mean_inner_steps=float(
                                                   res.inner_steps[:, rows[0]].mean())))
            done.append(job.name)
    results.write_summary(args.out, done, errors,
                          dict(inversion=args.inversion, mode=args.mode, steps=args.steps,
                               guidance=args.guidance))
    io.report_errors(errors)
    print(f"edited {len(done)} image(s) -> {args.out}" + (f"; {len(errors)} error(s)"
                                                         if errors else ""))
    return 1 if errors else 0


def main(argv=None) -> int:
    return io.run_main(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
