"""What the web app holds between requests: the loaded pipeline, the server-side adapter
folders, a compile counter, the background warm-up and the atomic result folders.

No user-typed path is ever opened: LoRA and Textual-Inversion files are offered by name
from the folders given to ``jaxdiff serve`` (``--lora-dir``, ``--ti-dir``; safetensors
only, so pickle files are never listed, and the library refuses them anyway), and a name
is resolved only if it is one of the listed ones.

The models a request can pick (``model_choices``): the server's ``--model`` and every
finished personalization job (``jobs.Jobs``) of any kind, loaded on first use without a
restart. A full DreamBooth export of the same architecture runs on the server's own
``Pipeline`` object with its own params, so it reuses every compiled program; a LoRA is
merged into the params (same programs); a Textual-Inversion token grows the token table
(its programs compile once and stay cached).

Compiled programs are the library's own (``lru_cache``'d per pipeline and static
arguments), so the second request of the same shape compiles nothing. ``CompileCounter``
proves it: it counts JAX's lowering events (one per program traced and lowered for XLA),
and every request logs how many it caused.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
import threading
import time
import uuid
from typing import Callable, Dict, List, Optional, Tuple

import jax
import numpy as np

from jaxdiff.adapters.apply import apply_adapters
from jaxdiff.adapters.lora import WEIGHT_NAME as LORA_WEIGHTS
from jaxdiff.adapters.textual_inversion import WEIGHT_NAME as TI_WEIGHTS
from jaxdiff.app.jobs import Jobs
from jaxdiff.app.limits import UploadLimits
from jaxdiff.app.progress import Totals, with_progress
from jaxdiff.data.images import InputError, save_png, write_json
from jaxdiff.weights import load_pipeline

log = logging.getLogger("jaxdiff.app")
LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
NONE = "(none)"


class CompileCounter:
    """Counts programs lowered for XLA in this process (JAX's monitoring events); a
    program found in the in-process caches is not lowered again and does not count."""

    def __init__(self):
        self.count = 0
        self._lock = threading.Lock()
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs):
        if event == LOWERING_EVENT:
            with self._lock:
                self.count += 1


@functools.lru_cache(maxsize=1)
def compile_counter() -> CompileCounter:
    """The process's one counter (a listener cannot be unregistered)."""
    return CompileCounter()


def adapter_names(folder: Optional[str], weight_name: str) -> List[str]:
    """Sorted names of the ``.safetensors`` files directly in ``folder`` and of its
    sub-folders holding ``weight_name`` (as a training run exports them)."""
    if not folder or not os.path.isdir(folder):
        return []
    names = []
    for f in sorted(os.listdir(folder)):
        path = os.path.join(folder, f)
        if f.startswith("."):
            continue
        if os.path.isfile(path) and f.endswith(".safetensors"):
            names.append(f)
        elif os.path.isfile(os.path.join(path, weight_name)):
            names.append(f)
    return names


def resolve_adapter(name: Optional[str], folder: Optional[str], weight_name: str,
                    kind: str) -> Optional[str]:
    """The path of an adapter chosen by ``name`` (``kind``: "lora" or "ti"): only a name
    that ``adapter_names(folder, weight_name)`` lists is opened, so a typed path, a pickle
    file or a file outside the server's folder is refused with one line; None for no
    choice."""
    what = "LoRA" if kind == "lora" else "Textual Inversion"
    if not name or name == NONE:
        return None
    if name not in adapter_names(folder, weight_name):
        raise InputError(f"{what} {name!r} is not in the server's {what} folder; pick "
                         "one from the list (refresh the page if it changed).")
    return os.path.join(folder, name)


def write_result_folder(root: str, images: List[Tuple[str, np.ndarray, dict]],
                        settings: dict) -> List[str]:
    """Writes ``(file name, uint8 image, PNG text)`` and ``settings.json`` into a new folder
    under ``root``, atomically (a temporary folder renamed when complete; removed if any
    write fails, so a failed request leaves nothing); returns the PNG paths in order."""
    os.makedirs(root, exist_ok=True)
    name = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    tmp = os.path.join(root, "." + name + ".tmp")
    os.makedirs(tmp)
    try:
        for fname, image, meta in images:
            save_png(os.path.join(tmp, fname), image, dict(settings, **meta))
        write_json(os.path.join(tmp, "settings.json"), settings)
        final = os.path.join(root, name)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [os.path.join(final, fname) for fname, _, _ in images]


def same_architecture(pipe_a, params_a, pipe_b, params_b) -> bool:
    """True when two pipelines differ only in their parameter values: equal module
    configs and dtypes, scheduler, tokenizer vocabularies and parameter shapes and dtypes
    (so one set of compiled programs serves both)."""
    def modules(p):
        return [(type(getattr(m, "inner", m)).__name__, getattr(m, "config", None),
                 getattr(m, "dtype", None)) if m is not None else None
                for m in (p.unet, p.vae, p.text_encoder, p.text_encoder_2)]

    def vocab(tok):
        return None if tok is None else (tok.get_vocab(), tok.model_max_length)

    shapes = lambda params: jax.tree.map(lambda x: (x.shape, x.dtype), params)
    return (modules(pipe_a) == modules(pipe_b) and pipe_a.scheduler == pipe_b.scheduler
            and pipe_a.scheduler_class == pipe_b.scheduler_class
            and vocab(pipe_a.tokenizer) == vocab(pipe_b.tokenizer)
            and vocab(pipe_a.tokenizer_2) == vocab(pipe_b.tokenizer_2)
            and (pipe_a.force_zeros_for_empty_prompt, pipe_a.requires_aesthetics_score)
            == (pipe_b.force_zeros_for_empty_prompt, pipe_b.requires_aesthetics_score)
            and jax.tree.structure(params_a) == jax.tree.structure(params_b)
            and shapes(params_a) == shapes(params_b))


def _chain(first, second):
    return lambda prompt: second(first(prompt))


@dataclasses.dataclass
class AppState:
    """The server's state. ``model``: what ``--model`` named (None = embedded);
    ``workdir``: result folders and training jobs; ``limits``: upload limits."""
    model: Optional[str]
    workdir: str
    lora_dir: Optional[str] = None
    ti_dir: Optional[str] = None
    limits: UploadLimits = UploadLimits()
    concurrency: int = 1
    pipe: object = None
    params: object = None
    status: str = "loading the model"
    ready: threading.Event = dataclasses.field(default_factory=threading.Event)

    def __post_init__(self):
        self.counter = compile_counter()
        pipe, self.params = load_pipeline(self.model)
        self.pipe = with_progress(pipe)  # every UNet evaluation reports (app.progress)
        self.status = "model loaded; warm-up not started"
        self._adapters: Dict[Tuple, Tuple] = {}
        self._models: Dict[str, Tuple] = {}
        self.jobs = Jobs(self.workdir, self.model)
        self.totals = Totals()
        self._lock = threading.Lock()
        # At most ``concurrency`` device jobs at a time (requests and warm-up together).
        self.device = threading.BoundedSemaphore(self.concurrency)

    @property
    def model_name(self) -> str:
        return self.model or "embedded:shapes"

    @property
    def image_size(self) -> int:
        return self.pipe.image_size

    # ------------------------------------------------------------------ models
    def model_choices(self) -> List[str]:
        """The server's model, then ``job:<id>`` of each finished job, newest first."""
        return [self.model_name] + ["job:" + j.id for j in self.jobs.finished()]

    def resolve_model(self, name: Optional[str]):
        """(pipe, params, expand) of a listed model name (the server's model or a finished
        job's export); loaded once, the last four kept."""
        if not name or name == self.model_name:
            return self.pipe, self.params, (lambda p: p)
        job = self.jobs.jobs.get(name[4:]) if name.startswith("job:") else None
        export = job.export() if job is not None else None
        if export is None:  # only listed names are opened
            raise InputError(f"model {name!r} is not one of the server's models or finished "
                             "jobs; pick one from the list (refresh the page if it changed).")
        with self._lock:
            if name not in self._models:
                if len(self._models) >= 4:
                    self._models.pop(next(iter(self._models)))
                self._models[name] = self._load_job(job.kind, export)
            return self._models[name]

    def _load_job(self, kind: str, export: str):
        if kind == "dreambooth_lora":
            return apply_adapters(self.pipe, self.params, lora=export)
        if kind == "textual_inversion":
            return apply_adapters(self.pipe, self.params, textual_inversion=export)
        pipe, params = load_pipeline(export)
        if same_architecture(self.pipe, self.params, pipe, params):
            log.info("%s: same architecture as %s; its programs are reused", export,
                     self.model_name)
            return self.pipe, params, (lambda p: p)
        log.info("%s: another architecture; its programs compile on first use", export)
        return with_progress(pipe), params, (lambda p: p)

    # ------------------------------------------------------------------ adapters
    def lora_choices(self) -> List[str]:
        return [NONE] + adapter_names(self.lora_dir, LORA_WEIGHTS)

    def ti_choices(self) -> List[str]:
        return [NONE] + adapter_names(self.ti_dir, TI_WEIGHTS)

    def with_adapters(self, lora: Optional[str], lora_scale: float, ti: Optional[str],
                      model: Optional[str] = None):
        """(pipe, params, expand) of ``model`` (``resolve_model``) with the chosen adapter
        files applied; cached per choice, so a Textual-Inversion pipeline (a new tokenizer)
        is built and compiled once."""
        base = self.resolve_model(model)
        lora_path = resolve_adapter(lora, self.lora_dir, LORA_WEIGHTS, "lora")
        ti_path = resolve_adapter(ti, self.ti_dir, TI_WEIGHTS, "ti")
        if lora_path is None and ti_path is None:
            return base
        key = (model or self.model_name, lora_path,
               float(lora_scale) if lora_path else 0.0, ti_path)
        with self._lock:
            if key not in self._adapters:
                if len(self._adapters) >= 4:
                    self._adapters.pop(next(iter(self._adapters)))
                pipe, params, expand = apply_adapters(base[0], base[1], lora_path, lora_scale,
                                                      ti_path)
                self._adapters[key] = (pipe, params, _chain(base[2], expand))
            return self._adapters[key]

    # ------------------------------------------------------------------ requests
    def timed(self, what: str, fn: Callable, *args, **kwargs):
        """``fn(*args, **kwargs)``, logging its seconds and the programs it compiled;
        returns (result, info dict)."""
        before, t0 = self.counter.count, time.perf_counter()
        out = fn(*args, **kwargs)
        jax.block_until_ready(out)
        info = dict(seconds=round(time.perf_counter() - t0, 3),
                    compiled=self.counter.count - before)
        log.info("%s: %.3f s, %d program(s) compiled%s", what, info["seconds"],
                 info["compiled"], "" if info["compiled"] else " (all cached)")
        return out, info

    def write_results(self, kind: str, images: List[Tuple[str, np.ndarray, dict]],
                      settings: dict) -> List[str]:
        """``write_result_folder`` under ``<workdir>/<kind>/``."""
        return write_result_folder(os.path.join(self.workdir, kind), images, settings)

    # ------------------------------------------------------------------ warm-up
    def start_warmup(self, jobs: List[Tuple[str, Callable[[], object]]]):
        """Runs ``jobs`` (name, call) in a daemon thread, updating ``status``; the page
        loads at once and shows the status. ``ready`` is set when all are done."""

        def run():
            for k, (name, call) in enumerate(jobs):
                self.status = f"warming up ({k + 1}/{len(jobs)}: compiling {name})"
                try:
                    with self.device:
                        self.timed(f"warm-up {name}", call)
                except Exception as e:  # noqa: BLE001 -- the server runs on without warm-up
                    log.warning("warm-up %s failed: %s", name, e)
            self.status = (f"ready: {self.model_name}, {self.image_size}x{self.image_size} px, "
                           f"{jax.device_count()} {jax.default_backend()} device(s)")
            self.ready.set()

        threading.Thread(target=run, name="jaxdiff-warmup", daemon=True).start()
