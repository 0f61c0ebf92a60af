"""The Gradio app: a status line, the three tabs, the request queue and the launch.

Requests go through Gradio's queue; generate and edit share one concurrency group whose
limit (``--concurrency``, default 1) bounds the jobs on the device, and ``AppState.device``
also holds them back while the warm-up compiles. Bad input (``ValueError``, which
includes ``InputError``) becomes a visible ``gr.Error`` with its one-line message; any
other exception is logged with its traceback and shown as one line too, and the server
keeps serving.
"""
from __future__ import annotations

import functools
import logging
import os

import gradio as gr
import numpy as np

import jax

from jaxdiff import sampling
from jaxdiff.app import edit_tab, generate_tab, personalize_tab
from jaxdiff.app.progress import TICKS
from jaxdiff.app.state import AppState

log = logging.getLogger("jaxdiff.app")


def report_errors(fn, outputs=None):
    """``fn`` with its errors turned into ``gr.Error`` (shown in the page)."""

    @functools.wraps(fn)
    def wrapped(*args):
        try:
            return fn(*args)
        except gr.Error:
            raise
        except (ValueError, FileNotFoundError) as e:
            log.info("bad request: %s", e)
            raise gr.Error(str(e), print_exception=False) from None
        except Exception as e:  # noqa: BLE001 -- one failed request must not stop the server
            log.exception("request failed")
            raise gr.Error(f"internal error ({type(e).__name__}: {e}); the server is still "
                           "running.", print_exception=False) from None

    return wrapped


def warmup_jobs(state: AppState, which=("generate", "edit")):
    """The requests compiled in the background at start: the tabs' default settings."""
    g, d = generate_tab.DEFAULTS, edit_tab.EditRequest("p2p", "a red circle", "a blue circle")
    side = state.image_size
    jobs = []
    if "generate" in which:
        jobs.append(("generate", lambda: sampling.generate(
            state.pipe, state.params, [g["prompts"]] * g["batch"], None, g["sampler"],
            g["steps"], float(g["guidance"]), g["seed"])))
    if "edit" in which:
        blank = np.full((1, side, side, 3), 255, np.uint8)

        def edit():  # also the progress bar's total for the default edit
            before = TICKS.count
            out = jax.block_until_ready(edit_tab.run_method(state, blank, None, d))
            state.totals.put(edit_tab.evals_key(d, 1, state.model_name), TICKS.count - before)
            return out
        jobs.append(("edit p2p", edit))
    return jobs


def build_app(state: AppState) -> gr.Blocks:
    """The Blocks of the app (not launched)."""
    with gr.Blocks(title="jaxdiff", analytics_enabled=False) as demo:  # nothing leaves
        gr.Markdown(f"## jaxdiff: {state.model_name}")
        status = gr.Markdown(state.status, elem_id="server-status")
        gr.Timer(1.0).tick(lambda: state.status, None, status, concurrency_limit=None,
                           show_progress="hidden")
        demo.load(lambda: state.status, None, status, concurrency_limit=None,
                  show_progress="hidden")
        with gr.Tabs():
            models = (generate_tab.build(state, report_errors),
                      edit_tab.build(state, report_errors))
            demo.jobs = personalize_tab.build(state, report_errors, models)
    return demo


def launch(state: AppState, host: str, port: int, auth=None, concurrency: int = 1,
           max_file_mb: int = 20, block: bool = True):
    """Queues and serves the app; returns the Blocks (``block=False``: without waiting)."""
    demo = build_app(state)
    demo.queue(default_concurrency_limit=concurrency)
    os.makedirs(state.workdir, exist_ok=True)
    demo.launch(server_name=host, server_port=port, auth=auth, prevent_thread_lock=not block,
                max_file_size=f"{max_file_mb}mb", allowed_paths=[os.path.abspath(state.workdir)],
                show_error=True, quiet=False)
    return demo
