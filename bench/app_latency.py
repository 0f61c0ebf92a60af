"""Latency of the web app (``jaxdiff serve``) against the same library call: the overhead of
the web layer (HTTP, Gradio's queue, PNG writing, file serving) for a Generate and an Edit
(P2P) request, first request (compiles) and later ones, and the throughput of 4 concurrent
clients. Prints JSON (and writes it with --out).

    python bench/app_latency.py --steps 10 --repeats 5 --out bench/app_latency.json

The server runs as a subprocess (``--warmup none``, so its first request compiles); the
requests go through Gradio's HTTP API with ``gradio_client`` (as a browser's would, less
the rendering). The library figures are the same calls in this process (``jaxdiff.generate``,
``p2p_pipeline.p2p_edit``), first call and median of the later ones, with the plain
pipeline and with the app's progress-reporting one (``app.progress.with_progress``: one
host callback per UNet evaluation), whose difference is the cost of the progress bar.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np
from PIL import Image

import jaxdiff
from jaxdiff.app.progress import with_progress
from jaxdiff.data.images import write_json
from jaxdiff.data.shapes import WorldSpec, held_out_examples
from jaxdiff.editing import p2p_pipeline


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(workdir, timeout=600):
    port = _free_port()
    log = open(os.path.join(workdir, "server.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "jaxdiff.cli", "serve", "--port", str(port),
                             "--workdir", os.path.join(workdir, "work"), "--warmup", "none"],
                            stdout=log, stderr=subprocess.STDOUT)
    url, t0 = f"http://127.0.0.1:{port}/", time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"jaxdiff serve exited; see {log.name}")
        try:
            with urllib.request.urlopen(url, timeout=10):
                return proc, url
        except OSError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError("jaxdiff serve did not start")


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _series(fn, repeats):
    first = _timed(fn)
    later = [_timed(fn) for _ in range(repeats)]
    return dict(first_s=round(first, 4), later_median_s=round(statistics.median(later), 4),
                later_s=[round(x, 4) for x in later])


def _concurrent(make_call, clients, per_client):
    """``clients`` threads, each with its own client (``make_call()``), ``per_client``
    requests each, all started together."""
    errors, calls = [], [make_call() for _ in range(clients)]

    def worker(call):
        for _ in range(per_client):
            try:
                call()
            except Exception as e:  # noqa: BLE001 -- counted and reported
                errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(c,)) for c in calls]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    secs = time.perf_counter() - t0
    n = clients * per_client
    return dict(clients=clients, requests=n, seconds=round(secs, 3),
                requests_per_s=round(n / secs, 3), errors=errors[:3])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="denoising / edit steps (default 10)")
    p.add_argument("--repeats", type=int, default=5, help="later requests timed (default 5)")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    from gradio_client import Client, handle_file

    tmp = tempfile.mkdtemp(prefix="app_latency_")
    example = held_out_examples(WorldSpec(), 1, num_objects=1)[0]
    photo = os.path.join(tmp, "photo.png")
    Image.fromarray(example["image"]).save(photo)
    src = example["caption"]
    colour = example["objects"][0].colour
    tgt = src.replace(colour, "blue" if colour != "blue" else "red")
    gen_args = ["a red circle", "", "ddim", args.steps, "5", 0, 1]
    edit_args = ["p2p", src, tgt, "", args.steps, 7.5, 0, "ddim", "replace", 0.8, 0.4, "",
                 0.8, 0.25, 5, 2, 2]

    proc, url = _serve(tmp)
    try:
        client = Client(url, verbose=False)
        model = "embedded:shapes"
        app_gen = lambda: client.predict(*gen_args, "(none)", 1.0, "(none)", model,
                                         api_name="/generate")
        app_edit = lambda: client.predict([handle_file(photo)], None, model, *edit_args,
                                          api_name="/edit")
        result = dict(url=url, steps=args.steps, app=dict(generate=_series(app_gen, args.repeats),
                                                          edit=_series(app_edit, args.repeats)))
        per = max(1, args.repeats // 2)
        def make_call():
            c = Client(url, verbose=False)
            return lambda: c.predict(*gen_args, "(none)", 1.0, "(none)", model,
                                     api_name="/generate")

        result["app"]["generate_concurrent"] = _concurrent(make_call, args.clients, per)
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    pipe, params = jaxdiff.load_pipeline(None)
    image = np.asarray(Image.open(photo).convert("RGB"))[None]
    settings = p2p_pipeline.P2PSettings(inversion="ddim", steps=args.steps, guidance=7.5)
    lib_gen = lambda: jaxdiff.generate(pipe, params, ["a red circle"], None, "ddim", args.steps,
                                       5.0, 0)
    lib_edit = lambda: p2p_pipeline.p2p_edit(pipe, params, image, [src], [tgt], settings)
    result["library"] = dict(generate=_series(lib_gen, args.repeats),
                             edit=_series(lib_edit, args.repeats))
    pipe = with_progress(pipe)  # what the app runs
    result["library_progress"] = dict(generate=_series(lib_gen, args.repeats),
                                      edit=_series(lib_edit, args.repeats))
    result["overhead_ms"] = {
        k: round(1000 * (result["app"][k]["later_median_s"]
                         - result["library"][k]["later_median_s"]), 1)
        for k in ("generate", "edit")}
    result["progress_callback_ms"] = {
        k: round(1000 * (result["library_progress"][k]["later_median_s"]
                         - result["library"][k]["later_median_s"]), 1)
        for k in ("generate", "edit")}
    result["load_average"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
