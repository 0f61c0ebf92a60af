"""The Generate tab: prompts -> ``jaxdiff.generate`` -> a gallery of PNGs that keep their
settings as PNG text (the files written by ``AppState.write_results`` are served as they
are, so a download keeps the metadata).

A list of guidance scales ("3, 5, 7.5") runs as the library's vmapped sweep, one compiled
program for all scales; the grid has one row per scale. Batch size, steps, sampler and
size pick the program; prompts, guidance, seed and adapter scale are traced. The model
list holds the server's model and each finished Personalize job (``AppState.resolve_model``);
the progress bar counts the sampler's UNet evaluations (``app.progress``).
"""
from __future__ import annotations

from typing import List

import gradio as gr
import numpy as np

from jaxdiff import sampling
from jaxdiff.app.progress import generate_evals, run_with_progress
from jaxdiff.app.state import NONE, AppState
from jaxdiff.data.images import InputError, make_grid
from jaxdiff.samplers import SAMPLERS

MAX_IMAGES = 16  # prompts x batch x guidance scales in one request
DEFAULTS = dict(prompts="a red circle", negative="", sampler="dpmpp_2m", steps=20,
                guidance="5", seed=0, batch=2)


def parse_scales(text: str) -> List[float]:
    """"5" or "3, 5, 7.5" -> floats; a one-line InputError otherwise."""
    try:
        scales = [float(s) for s in str(text).replace(";", ",").split(",") if s.strip()]
    except ValueError:
        raise InputError(f"guidance {text!r}: give a number or a comma-separated list of "
                         "numbers, e.g. 3, 5, 7.5.") from None
    if not scales:
        raise InputError("guidance is empty; give a number such as 5.")
    return scales


def run_generate(state: AppState, prompts_text, negative, sampler, steps, guidance, seed,
                 batch, lora=NONE, lora_scale=1.0, ti=NONE, model=None, progress=None):
    """One Generate request: returns ([(png path, caption)], status line). ``model``: a
    name from ``state.model_choices()`` (None: the server's); ``progress``: a
    ``gr.Progress`` (or any ``f((done, total), desc=...)``) told the evaluations done."""
    prompts = [p.strip() for p in str(prompts_text or "").splitlines() if p.strip()]
    if not prompts:
        raise InputError("no prompt given; type one prompt per line.")
    scales = parse_scales(guidance)
    steps, seed, batch = int(steps), int(seed), int(batch)
    if len(prompts) * batch * len(scales) > MAX_IMAGES:
        raise InputError(f"{len(prompts)} prompt(s) x batch {batch} x {len(scales)} guidance "
                         f"scale(s) is more than {MAX_IMAGES} images; ask for fewer.")
    if sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}; pick one from the list.")
    pipe, params, expand = state.with_adapters(lora, lora_scale, ti, model)
    jobs = [p for p in prompts for _ in range(batch)]
    call = lambda: state.timed(
        "generate", sampling.generate, pipe, params, [expand(p) for p in jobs],
        negative or None, sampler, steps, scales if len(scales) > 1 else scales[0], seed)
    with state.device:
        if progress is None:
            images, info = call()
        else:
            total = generate_evals(pipe, sampler, steps, len(scales))
            (images, info), _ = run_with_progress(call, progress, total, "denoising steps")
    images = np.asarray(images).reshape((len(scales), len(jobs)) + images.shape[-3:])
    settings = dict(sampler=sampler, steps=steps, seed=seed, negative_prompt=negative or "",
                    model=model or state.model_name, lora=lora, lora_scale=lora_scale,
                    textual_inversion=ti)
    files = [("grid.png", make_grid(images.reshape((-1,) + images.shape[-3:]), len(jobs)),
              dict(guidance=", ".join(map(str, scales)), prompts=" | ".join(prompts)))]
    captions = [f"grid: rows = guidance {', '.join(map(str, scales))}"]
    for s, scale in enumerate(scales):
        for i, prompt in enumerate(jobs):
            files.append((f"{s:02d}_{i:04d}.png", images[s, i],
                          dict(prompt=prompt, guidance=scale, index=i)))
            captions.append(f"{prompt} (g={scale}, #{i})")
    paths = state.write_results("generate", files, dict(settings, guidance=scales))
    status = (f"{images.shape[0] * images.shape[1]} image(s) {images.shape[-2]}x"
              f"{images.shape[-3]} in {info['seconds']:.2f} s; {info['compiled']} program(s) "
              f"compiled{' (cached)' if not info['compiled'] else ''}")
    return list(zip(paths, captions)), status


def build(state: AppState, report_errors):
    """The tab's components and events (inside an open ``gr.Blocks``)."""
    with gr.Tab("Generate", id="generate"):
        with gr.Row():
            with gr.Column(scale=1):
                model = gr.Dropdown(state.model_choices(), value=state.model_name,
                                    label="Model (the server's, or a finished Personalize job)",
                                    elem_id="gen-model")
                prompts = gr.Textbox(DEFAULTS["prompts"], lines=3, label="Prompts (one per line)",
                                     elem_id="gen-prompts")
                negative = gr.Textbox(DEFAULTS["negative"], label="Negative prompt")
                with gr.Row():
                    sampler = gr.Dropdown(sorted(SAMPLERS), value=DEFAULTS["sampler"],
                                          label="Sampler")
                    steps = gr.Slider(1, 100, DEFAULTS["steps"], step=1, label="Steps",
                                      elem_id="gen-steps")
                with gr.Row():
                    guidance = gr.Textbox(DEFAULTS["guidance"], label="Guidance (a list = sweep)",
                                          elem_id="gen-guidance")
                    seed = gr.Number(DEFAULTS["seed"], precision=0, label="Seed")
                    batch = gr.Slider(1, 8, DEFAULTS["batch"], step=1, label="Images per prompt")
                with gr.Row():
                    lora = gr.Dropdown(state.lora_choices(), value=NONE,
                                       label="LoRA (server folder)")
                    lora_scale = gr.Slider(0, 2, 1.0, step=0.05, label="LoRA scale")
                    ti = gr.Dropdown(state.ti_choices(), value=NONE,
                                     label="Textual Inversion (server folder)")
                button = gr.Button("Generate", variant="primary", elem_id="gen-run")
            with gr.Column(scale=1):
                gallery = gr.Gallery(label="Images (PNG with settings)", columns=4,
                                     format="png", elem_id="gen-gallery", object_fit="contain")
                status = gr.Markdown(elem_id="gen-status")
        def generate(prompts, negative, sampler, steps, guidance, seed, batch, lora,
                     lora_scale, ti, model, progress=gr.Progress()):
            return run_generate(state, prompts, negative, sampler, steps, guidance, seed,
                                batch, lora, lora_scale, ti, model, progress)

        button.click(report_errors(generate),
                     [prompts, negative, sampler, steps, guidance, seed, batch, lora, lora_scale,
                      ti, model], [gallery, status], concurrency_id="device",
                     api_name="generate")
    return model
