"""``jaxdiff serve``: the web app (Gradio) for generation, editing and personalization."""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
import warnings

from jaxdiff.app.limits import MB, UploadLimits
from jaxdiff.app.state import AppState
from jaxdiff.weights.hf_cache import is_repo_id
from jaxdiff.weights.loading import is_embedded

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def add_parser(sub):
    p = sub.add_parser("serve", help="the web app: generate, edit, personalize (Gradio)",
                       description="Serve the Gradio web app (needs the 'app' extra: "
                       "pip install -e '.[app]').")
    p.add_argument("--model", default=None,
                   help="diffusers-layout pipeline directory or org/name in the local Hugging "
                   "Face cache, or embedded:shapes (default) / embedded:dit (the text-DiT "
                   "model)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; any other prints a warning)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                   help="require this login (Gradio's auth)")
    p.add_argument("--lora-dir", default=None,
                   help="folder of LoRA .safetensors files offered in the Generate tab")
    p.add_argument("--ti-dir", default=None,
                   help="folder of Textual-Inversion learned_embeds files offered in the "
                   "Generate tab")
    p.add_argument("--workdir", default="outputs/app",
                   help="result folders and training jobs (default outputs/app)")
    p.add_argument("--concurrency", type=int, default=1,
                   help="requests run on the device at once (default 1)")
    p.add_argument("--max-upload-mb", type=int, default=20, help="upload file limit (MB)")
    p.add_argument("--max-megapixels", type=float, default=16.0,
                   help="largest upload in megapixels, checked before decoding (default 16)")
    p.add_argument("--warmup", default="generate,edit",
                   help="what to compile in the background at start: a comma list of "
                   "'generate', 'edit', or 'none' (default generate,edit)")
    p.add_argument("--check", action="store_true",
                   help="load the model, build the app and exit without serving")
    return p


def parse_auth(text):
    """``--auth USER:PASSWORD`` -> (user, password) for Gradio's auth; None without it."""
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError(f"--auth {text!r}: expected USER:PASSWORD.")
    return user, password


def host_warning(host: str, auth) -> str:
    """The warning printed for a ``--host`` other than the local one ("" for a local one)."""
    if host in LOCAL_HOSTS:
        return ""
    return (f"warning: --host {host} makes the app reachable from other machines"
            + ("" if auth else "; consider --auth USER:PASSWORD"))


def _check_args(args):
    if args.model is not None and not (os.path.isdir(args.model) or is_repo_id(args.model)
                                       or is_embedded(args.model)):
        raise FileNotFoundError(f"--model {args.model}: no such directory (nor an org/name "
                                "for the Hugging Face cache, nor embedded:NAME).")
    for flag, folder in (("--lora-dir", args.lora_dir), ("--ti-dir", args.ti_dir)):
        if folder is not None and not os.path.isdir(folder):
            raise FileNotFoundError(f"{flag} {folder}: no such directory.")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}.")
    if args.concurrency < 1 or args.max_upload_mb < 1 or args.max_megapixels <= 0:
        raise ValueError("--concurrency, --max-upload-mb and --max-megapixels must be positive.")
    warm = tuple(w.strip() for w in args.warmup.split(",") if w.strip() and w.strip() != "none")
    if set(warm) - {"generate", "edit"}:
        raise ValueError(f"--warmup {args.warmup!r}: use a comma list of 'generate', 'edit', "
                         "or 'none'.")
    if importlib.util.find_spec("gradio") is None:
        raise ValueError("jaxdiff serve needs gradio: pip install -e '.[app]'.")
    return warm


def run(args) -> int:
    """Runs ``jaxdiff serve`` for parsed ``args``; returns the exit status."""
    auth, warm = parse_auth(args.auth), _check_args(args)
    if host_warning(args.host, auth):
        print(host_warning(args.host, auth), file=sys.stderr)
    warnings.filterwarnings("ignore", module="gradio")  # its own deprecation noise
    warnings.filterwarnings("ignore", category=ResourceWarning)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s jaxdiff serve: %(message)s"))
    log = logging.getLogger("jaxdiff.app")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    # gradio (the optional 'app' extra) is imported only by this command: other commands
    # do not pay for it (docs/design.md, Layers).
    from jaxdiff.app import ui
    state = AppState(
        args.model, os.path.abspath(args.workdir), args.lora_dir, args.ti_dir,
        UploadLimits(max_bytes=args.max_upload_mb * MB,
                     max_pixels=int(args.max_megapixels * 1e6)), args.concurrency)
    if args.check:
        demo = ui.build_app(state)
        print(f"app built for {state.model_name} ({state.image_size} px): "
              f"{len(demo.fns)} event handlers; LoRA choices {state.lora_choices()[1:]}, "
              f"Textual Inversion choices {state.ti_choices()[1:]}")
        return 0
    state.start_warmup(ui.warmup_jobs(state, warm))
    demo = ui.launch(state, args.host, args.port, auth, args.concurrency, args.max_upload_mb,
                     block=False)
    try:
        demo.block_thread()
    finally:
        demo.jobs.close()
    return 0
