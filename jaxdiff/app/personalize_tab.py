"""The Personalize tab: instance uploads -> a DreamBooth (LoRA or full) or Textual-Inversion
job in the background (``jobs.Jobs``), polled every two seconds for its progress bar and
sample grids; cancel at any time. A finished job of any kind (DreamBooth full or LoRA,
Textual Inversion) is added to the Model lists of the Generate and Edit tabs as
``job:<id>``, usable at once (``AppState.resolve_model``; no restart).
"""
from __future__ import annotations

import os

import gradio as gr

from jaxdiff.app.jobs import KINDS, Jobs
from jaxdiff.app.limits import decode_uploads
from jaxdiff.app.state import AppState


def _bar(done: int, total: int) -> str:
    frac = min(1.0, done / max(total, 1))
    return (f"<progress value='{done}' max='{total}' style='width:100%'></progress> "
            f"step {done} / {total} ({100 * frac:.0f} %)")


def job_view(state: AppState, jobs: Jobs):
    """(status html, sample grid paths) of the newest job."""
    if not jobs.jobs:
        return "no job yet", []
    job = max(jobs.jobs.values(), key=lambda j: j.started)
    text = f"**{job.id}** ({job.kind}): {job.state}<br>{_bar(job.step(), job.steps)}"
    export = job.export()
    if export:
        text += (f"<br>result: `{export}`, offered as **job:{job.id}** in the Model list of "
                 "the Generate and Edit tabs")
        if job.kind == "textual_inversion":
            text += " (write the placeholder token in the prompts)"
    return text, [(p, os.path.basename(p)) for p in job.samples()]


def start_job(state: AppState, jobs: Jobs, files, kind, steps, prompt, class_prompt, token,
              init_token, sample_every, prior):
    paths = [f if isinstance(f, str) else getattr(f, "name", None) for f in (files or [])]
    side = state.image_size
    images = decode_uploads(paths, (side, side), state.limits)
    jobs.start(kind, images, int(steps), prompt, class_prompt, token, init_token,
               int(sample_every), bool(prior))
    return job_view(state, jobs)


def build(state: AppState, report_errors, models):
    """The tab's components and events (inside an open ``gr.Blocks``); ``models``: the
    Generate and Edit tabs' model dropdowns, refreshed when a job finishes."""
    jobs = state.jobs
    with gr.Tab("Personalize", id="personalize"):
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(file_count="multiple", label="Instance images (3-10)",
                                elem_id="pers-files")
                kind = gr.Radio([("DreamBooth LoRA", KINDS[0]), ("DreamBooth (full UNet)",
                                 KINDS[1]), ("Textual Inversion", KINDS[2])], value=KINDS[0],
                                label="Method", elem_id="pers-kind")
                with gr.Row():
                    prompt = gr.Textbox("a sks circle", label="Instance prompt (DreamBooth)")
                    class_prompt = gr.Textbox("a circle", label="Class prompt (DreamBooth)")
                with gr.Row():
                    token = gr.Textbox("<my-concept>", label="Placeholder token (TI)")
                    init_token = gr.Textbox("circle", label="Initializer token (TI)")
                with gr.Row():
                    steps = gr.Slider(1, 2000, 200, step=1, label="Training steps",
                                      elem_id="pers-steps")
                    sample_every = gr.Slider(0, 500, 50, step=1,
                                             label="Sample grid every N steps (0 = off)",
                                             elem_id="pers-sample-every")
                prior = gr.Checkbox(False, label="Prior preservation (DreamBooth; generates "
                                    "class images first)")
                with gr.Row():
                    start = gr.Button("Start training", variant="primary", elem_id="pers-start")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="pers-cancel")
            with gr.Column(scale=1):
                status = gr.Markdown("no job yet", elem_id="pers-status")
                samples = gr.Gallery(label="Sample grids", columns=2, elem_id="pers-samples",
                                     format="png", object_fit="contain")  # whole grids
        start.click(report_errors(lambda *a: start_job(state, jobs, *a)),
                    [files, kind, steps, prompt, class_prompt, token, init_token, sample_every,
                     prior], [status, samples], concurrency_id="jobs")

        def on_cancel():
            job = jobs.cancel()
            view = job_view(state, jobs)
            return (view[0] if job else "no running job") , view[1]

        cancel.click(on_cancel, None, [status, samples], concurrency_id="jobs")
        timer = gr.Timer(2.0)
        timer.tick(lambda: job_view(state, jobs), None, [status, samples],
                   concurrency_limit=None, show_progress="hidden")
        known = gr.State(state.model_choices())  # this page's lists

        def refresh(shown):  # only when a job has finished (a selection is never reset)
            now = state.model_choices()
            if now == shown:
                return [gr.skip() for _ in models] + [shown]
            return [gr.update(choices=now) for _ in models] + [now]

        timer.tick(refresh, [known], list(models) + [known], concurrency_limit=None,
                   show_progress="hidden")
    return jobs
