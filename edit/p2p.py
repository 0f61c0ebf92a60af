"""Edit real images: invert them, then apply Prompt-to-Prompt (optionally with LocalBlend).

    python edit/p2p.py --image cat.png --source-prompt "a red circle" \\
        --target-prompt "a blue circle" --out outputs/p2p
    python edit/p2p.py --manifest jobs.jsonl --inversion direct --blend-words red blue \\
        --out outputs/p2p_batch

Per input it writes ``<out>/<name>/``: input.png, reconstruction.png (the source branch),
edit.png (edit_<k>.png for several targets), mask.png (LocalBlend), panel.png and
settings.json; ``<out>/summary.json`` lists finished jobs and errors. A batch is edited in
one compiled program per ``--max-batch`` chunk (the last chunk padded to the same shape).
Logic: ``jaxdiff.editing.p2p_pipeline``.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from jaxdiff.cli import edit_args, edit_runner
from jaxdiff.data.images import InputError
from jaxdiff.editing import local_blend, p2p_pipeline, prompt_to_prompt
from jaxdiff.editing.p2p_pipeline import INVERSIONS, MODES, P2PSettings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edit/p2p.py", description=__doc__.splitlines()[0],
        epilog="Manifest lines may also carry \"blend_words\" (a list or a space-separated "
        "string) per job.")
    edit_args.add_common_args(p, steps=50, guidance=7.5)
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
            raise InputError(f"--reweight {item!r}: expected WORD=FACTOR, e.g. red=2.") from None
        if not word:
            raise InputError(f"--reweight {item!r}: expected WORD=FACTOR, e.g. red=2.")
    return out


def _blend_words(job, default):
    words = job.options.get("blend_words", default)
    return words.split() if isinstance(words, str) else (list(words) if words else None)


def run(args) -> int:
    edit_args.check_common_args(args)  # first, as every tool: --steps 0 is a flag error
    settings = P2PSettings(
        inversion=args.inversion, mode=args.mode, steps=args.steps, guidance=args.guidance,
        cross_replace_steps=args.cross_replace_steps,
        self_replace_steps=args.self_replace_steps, reweight=_reweight(args.reweight) or None,
        blend_threshold=args.blend_threshold, blend_start=args.blend_start,
        num_inner_steps=args.inner_steps)
    settings.validate()

    def check_job(pipe, job, jobs):
        """Each (source, target) pair must make a controller (and a LocalBlend when any
        job uses one), so that a bad pair is reported before the batch runs."""
        use_blend = bool(args.blend_words) or any("blend_words" in j.options for j in jobs)
        words = _blend_words(job, args.blend_words)
        for t in job.target_prompts or (job.source_prompt,):
            prompt_to_prompt.make_control(pipe, [job.source_prompt], [t], 1, mode=args.mode)
            if use_blend:
                if not words:
                    raise InputError("other jobs use LocalBlend; give this one "
                                     "\"blend_words\" too (or --blend-words).")
                local_blend.make_local_blend(pipe, [job.source_prompt], [t], 1, words)

    def edit(pipe, params, chunk):
        words = [_blend_words(job, args.blend_words) for job in chunk.jobs]
        chunk_settings = settings
        if all(words):  # check_job gave every pair words when any job uses LocalBlend
            chunk_settings = dataclasses.replace(settings, blend_words=words)
        res = p2p_pipeline.p2p_edit(pipe, params, chunk.images, chunk.sources, chunk.targets,
                                    chunk_settings, mesh=chunk.mesh)
        out = dict(edited=res.edited, reconstruction=res.reconstruction,
                   inner_steps=res.inner_steps.T)
        if chunk_settings.blend_words:
            out["latent_mask"] = res.mask
        return out

    def job_record(job, first):
        return dict(blend_words=_blend_words(job, args.blend_words),
                    null_text_mean_inner_steps=float(first["inner_steps"].mean()))

    record = dict(dataclasses.asdict(settings), model=edit_runner.model_name(args),
                  seed=args.seed, fit=args.fit, alpha=args.alpha)
    need = ("source_prompt",) if args.mode == "reweight" else ("source_prompt", "target_prompt")
    return edit_runner.run_edits(args, edit_runner.EditTool(
        "p2p", edit, record, need=need, options=("blend_words",), check_job=check_job,
        job_record=job_record, pad_chunks=True,
        summary=dict(inversion=args.inversion, mode=args.mode, steps=args.steps,
                     guidance=args.guidance)))


def main(argv=None) -> int:
    return edit_args.run_main(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
