"""Checkpoint loading: peak host memory and time, jaxdiff vs diffusers, on the same files.

    python bench/load.py                                # sd15 and sdxl-reduced, CPU
    python bench/load.py --sizes sdxl                   # SDXL 1.0 size: ~20 GB peak RSS
    python bench/load.py --checkpoints /tmp/ckpt        # keep / reuse the written files

For each size (bench/sample.py's SIZES: random, perturbed diffusers weights) the script
writes the pipeline once as a diffusers folder (float32 safetensors, diffusers'
``save_pretrained``) and once as one original-layout (A1111 / ComfyUI) ``.safetensors``
file in float16 (``jaxdiff.save_pipeline(format="single_file", dtype=float16)``, the
format and precision of released checkpoints). Then each of four loads runs in a fresh
Python process: jaxdiff ``load_pipeline(file, config=folder)`` / ``load_pipeline(folder)``
and diffusers ``from_single_file(file, config=folder)`` / ``from_pretrained(folder)``
(float32 weights on both sides, as each library loads by default). Prints one JSON object
per (size, library, source):

* ``peak_rss_gb``: the process's peak resident memory during the load (``VmHWM``, reset
  after the imports and, for jaxdiff, after starting JAX's CPU client), ``base_rss_gb``
  its RSS before, ``load_gb`` = peak - base: what the
  load itself needed at its worst moment (file pages mapped by safetensors included).
* ``weights_gb``: the pipeline's float32 parameter bytes; ``copies`` = load_gb /
  weights_gb: 1.0 is the loaded weights alone, 2.0 one extra full copy on the way.
* ``seconds``: wall time of the load call (both libraries' imports excluded). diffusers'
  ``from_pretrained`` maps the safetensors files and reads a tensor's pages only when it is
  first used; the peak is taken after every parameter was read once (as a first forward
  pass does), the time before.
* ``file_gb``: the size of what was read.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# Runs in a fresh process: imports, reset the peak-RSS mark, load, report.
CHILD = r"""
import json, sys, time
lib, source, folder, file, xl = sys.argv[1:6]
xl = xl == "1"

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
if lib == "jaxdiff":
    import jax, numpy as np
    import jaxdiff
    jax.numpy.zeros(1).block_until_ready()  # the XLA client itself is not the load's
    def load():
        pipe, params = (jaxdiff.load_pipeline(file, config=folder) if source == "single_file"
                        else jaxdiff.load_pipeline(folder))
        jax.block_until_ready(params)
        return sum(np.dtype(x.dtype).itemsize * x.size for x in jax.tree.leaves(params)), None

    def touch(params):  # already device arrays
        pass
else:
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    def load():
        pipe = (cls.from_single_file(file, config=folder, local_files_only=True)
                if source == "single_file" else cls.from_pretrained(folder))
        params = [p for name in ("unet", "vae", "text_encoder", "text_encoder_2")
                  if getattr(pipe, name, None) is not None
                  for p in getattr(pipe, name).parameters()]
        return sum(p.numel() * p.element_size() for p in params), params

    def touch(params):  # memory-mapped weights are read when first used, as by a forward
        with torch.no_grad():
            for p in params:
                p.sum()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS
base = status("VmRSS")
t0 = time.perf_counter()
nbytes, params = load()
seconds = time.perf_counter() - t0
touch(params)
print(json.dumps(dict(base=base, peak=status("VmHWM"), seconds=seconds, weights=nbytes)))
"""


WRITER = r"""
import functools, os, numpy as np
from flax import traverse_util
from jaxdiff.models.config import read_json
from jaxdiff.weights import convert, diffusers_format as df, files, single_file_write as sfw

def half(module, kind, path, prefixes):  # jaxdiff's diffusers keys -> float16 file tensors
    tensors, out = files.open_tensors(path), {{}}
    for leaf in traverse_util.flatten_dict(df.init_shapes(module, kind)):
        name = convert.torch_key(leaf)
        key = next(k for k in convert._candidates(name, ("",) + prefixes) if k in tensors)
        out[name] = np.asarray(tensors[key], np.float16)
    return out

folder = {folder!r}
index = read_json(os.path.join(folder, "model_index.json"))
modules, states = {{}}, {{}}
for kind in ("unet", "vae", "text_encoder", "text_encoder_2"):
    modules[kind] = None
    if (index.get(kind) or [None])[0]:  # listed (the SDXL refiner has no text_encoder)
        modules[kind], stem, prefixes = df.component_module(os.path.join(folder, kind), kind)
        path = files.find_weights(os.path.join(folder, kind), stem)
        states[kind] = functools.partial(half, modules[kind], kind, path, prefixes)
pipe = type("Configs", (), dict(modules, is_sdxl=modules["text_encoder_2"] is not None))
state = sfw.original_from_diffusers(pipe, states)
tmp = {file!r} + ".tmp"
files.write_tensors(tmp, state)
os.replace(tmp, {file!r})
"""


def _build(size, folder, file):
    """Writes the diffusers folder (torch) and the float16 single file (jaxdiff), each in
    its own process so neither library's copy of the weights inflates the other's."""
    if not os.path.exists(os.path.join(folder, "model_index.json")):
        code = ("import sys; sys.path.insert(0, {here!r}); import sample; "
                "sample.build_pipeline({size!r}, {folder!r})").format(here=HERE, size=size,
                                                                   folder=folder)
        subprocess.run([sys.executable, "-c", code], check=True)
    # Straight from the diffusers folder's own tensors, read one at a time and cast to
    # float16 (jaxdiff.weights.single_file_write.original_from_diffusers), so the writer
    # holds about one float16 copy (SDXL size: 14 GB of float32 weights, a 7 GB file).
    code = WRITER.format(folder=folder, file=file)
    subprocess.run([sys.executable, "-c", code], check=True)


def _folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(folder) for name in names
               if name.endswith(".safetensors"))


def bench_size(size, libraries, sources, checkpoints=None):
    sys.path.insert(0, HERE)
    import sample
    xl = size in sample.XL_SIZES
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(checkpoints, size) if checkpoints else tmp
        folder, file = os.path.join(root, "pipe"), os.path.join(root, "model.safetensors")
        t0 = time.perf_counter()
        if not (os.path.exists(file) and os.path.isdir(folder)):
            os.makedirs(root, exist_ok=True)
            _build(size, folder, file)
        build_s = time.perf_counter() - t0
        for source in sources:
            for lib in libraries:
                out = subprocess.run([sys.executable, "-c", CHILD, lib, source, folder, file,
                                      "1" if xl else "0"], check=True, capture_output=True,
                                     text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                gb = lambda b: round(b / 2 ** 30, 3)
                read = os.path.getsize(file) if source == "single_file" else \
                    _folder_bytes(folder)
                rows.append(dict(
                    bench="load", size=size, library=lib, source=source,
                    peak_rss_gb=gb(r["peak"]), base_rss_gb=gb(r["base"]),
                    load_gb=gb(r["peak"] - r["base"]), weights_gb=gb(r["weights"]),
                    copies=round((r["peak"] - r["base"]) / r["weights"], 2),
                    seconds=round(r["seconds"], 2), file_gb=gb(read),
                    build_s=round(build_s, 1), loadavg_1m=round(os.getloadavg()[0], 2)))
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None):
    sys.path.insert(0, HERE)
    import sample
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["sd15", "sdxl-reduced"],
                    choices=[s for s in sample.SIZES if s != "tiny"])
    ap.add_argument("--libraries", nargs="+", default=["jaxdiff", "diffusers"],
                    choices=["jaxdiff", "diffusers"])
    ap.add_argument("--sources", nargs="+", default=["single_file", "folder"],
                    choices=["single_file", "folder"])
    ap.add_argument("--checkpoints", default=None, metavar="DIR",
                    help="keep the written checkpoints in DIR/<size>/ and reuse them when "
                    "there (default: a temporary folder, deleted; SD 1.5 size writes 5.8 GB, "
                    "SDXL size ~19 GB)")
    args = ap.parse_args(argv)
    for size in args.sizes:
        bench_size(size, args.libraries, args.sources, args.checkpoints)


if __name__ == "__main__":
    main()
