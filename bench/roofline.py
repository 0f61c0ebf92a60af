"""Roofline and memory of the real model sizes, from XLA itself, without any weights.

    python bench/roofline.py --out runs/roofline.json                 # everything (~1 h CPU)
    python bench/roofline.py --models sd15 --programs unet --no-compile   # lowering only
    python bench/roofline.py --models tiny --programs unet generate p2p train --steps 2
    python bench/roofline.py --models dit_xl2_256 dit_xl2_512 pixart_1024 --programs unet generate
    PYTHONPATH=<libtpu dir> python bench/roofline.py --models sd15 --programs train \
        --target tpu_v5e:2x4 --fsdp 1 4 8          # compiled for a TPU, without one

Every program is built from abstract parameters (``jax.eval_shape`` of each module's
init: ``jax.ShapeDtypeStruct`` leaves, no weights allocated) and lowered with
``jit(...).lower(...)``; with ``--compile`` (default) it is also compiled for this
machine's backend (XLA:CPU here) to read ``compiled.cost_analysis()`` and
``compiled.memory_analysis()``. Each record says where its figures come from
(``source``: "compiled" or "lowered"; lowered counts are pre-fusion, so their bytes are
an overestimate). Programs (per model, per batch of images B):

- ``unet``: one UNet call on the classifier-free-guidance batch 2B;
- ``generate``: ``jaxdiff.sampling.generation_program`` (what ``generate`` runs: text
  encoder twice, DDIM ``lax.scan`` of ``--steps`` guided UNet calls, VAE decode);
- ``p2p``: null-text inversion + Prompt-to-Prompt (``editing.p2p_pipeline``): its work is
  composed from compiled parts (VAE encode, UNet calls at B / 2B / 4B and the UNet's VJP
  with respect to the null embedding), with the reference's 10 inner Adam steps per step
  (the upper bound; early stopping takes fewer);
- for the transformer backbones (``roofline_models.TRANSFORMERS``: DiT-XL/2 at 256² and
  512², PixArt-alpha size at 1024² with T5 caption features as inputs), ``unet`` is one
  transformer call on 2B rows and ``generate`` a DDIM scan of guided calls + VAE decode;
- ``train``: a DreamBooth full fine-tune step (prior preservation: B instance + B class
  rows, frozen text encoder, AdamW), as ``training.dreambooth`` builds it; for XLA:CPU it
  is compiled with ``roofline_programs.CPU_KEEP_REMAT``, without which XLA:CPU merges the
  remat recomputation away (bench/README.md "Memory plan").

Attention is traced as on an accelerator (``JAXDIFF_ATTENTION=xla``: one fused op; its
memory is the materialised [B, heads, L, L] scores, more than a flash kernel needs).
XLA's cost analysis counts a loop body once (it does not know trip counts), so for
``generate`` the per-image work is the whole program's count plus (steps - 1) UNet calls;
the record keeps the raw count too. XLA:CPU traces the CPU form of the 2x upsampling
convolution (sub-pixel: 4 taps instead of 9); ``flops_accelerator`` adds back the taps an
accelerator computes (by ``unet_flops``, the hand count of convolutions and matmuls,
recorded as ``hand_flops``; like XLA it leaves out taps on zero padding), and the
roofline uses it.

The code is split by concept: ``roofline_models.py`` (the model table, built without
weights), ``roofline_count.py`` (hand counts), ``roofline_programs.py`` (the U-Net model's jitted
programs, their analysis, the roofline), ``roofline_transformers.py`` (the DiT / PixArt
programs); this file is the command line.

Roofline: seconds per image >= max(FLOPs / peak FLOP/s, bytes / bandwidth) at bf16 peak
(H100 SXM: 989 TFLOP/s dense, 3.35 TB/s; TPU v5e: 197 TFLOP/s, 819 GB/s); both sides
are recorded (``*_compute_s``, ``*_memory_s``). Bytes are XLA:CPU's post-fusion count
in ``--dtype`` (default float32; bf16 halves most of them) with attention scores
materialised: an accelerator's fusion and a flash kernel move far fewer, so the memory
side is a pessimistic estimate and the compute side the firm floor. The bound ignores
launch overhead and assumes peak MXU/tensor-core use.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

if "--devices" in sys.argv:  # forced host devices for the FSDP memory plan (before jax)
    _n = sys.argv[sys.argv.index("--devices") + 1]
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={_n}").strip()
if "--target" in sys.argv and sys.argv[sys.argv.index("--target") + 1] != "host":
    os.environ.setdefault("JAXDIFF_PALLAS_INTERPRET", "0")  # the real splash kernel
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

from jaxdiff.models.unet import UNet2DConditionModel, UNetConfig  # noqa: E402,F401
from jaxdiff.pipeline import Pipeline, dummy_inputs  # noqa: E402,F401
from roofline_count import (transformer_flops, unet_flops,  # noqa: E402,F401
                            upsample_extra_flops)
from roofline_models import (ANCHORS, HARDWARE, MODELS, TRANSFORMERS,  # noqa: E402,F401
                             abstract_params, build, build_transformer)
from roofline_programs import (Analyser, analyse, roofline,  # noqa: E402,F401
                               target_devices, train_step, unet_call)
from roofline_transformers import TransformerAnalyser, transformer_call  # noqa: E402,F401


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["sd15", "sd21v", "sdxl"],
                    choices=sorted(MODELS) + sorted(TRANSFORMERS),
                    help="SD-style pipelines, or transformer backbones (dit_*, pixart_*)")
    ap.add_argument("--programs", nargs="+", default=["unet", "generate", "p2p", "train"],
                    choices=["unet", "generate", "p2p", "train"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 2, 8],
                    help="images per call (CFG doubles the UNet batch)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="compute dtype of the inference programs (params stay float32)")
    ap.add_argument("--train-batches", nargs="+", type=int, default=[1, 2, 4],
                    help="instance rows per device of the DreamBooth step (+ as many class)")
    ap.add_argument("--train-dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--train-remat", nargs="+", default=["off", "on"], choices=["off", "on"])
    ap.add_argument("--fsdp", nargs="+", type=int, default=[1],
                    help="FSDP device counts of the train step (needs --devices >= max)")
    ap.add_argument("--devices", type=int, default=1,
                    help="forced host devices (XLA_FLAGS, set before jax starts)")
    ap.add_argument("--target", default="host",
                    help="train step compiled for: 'host' or a TPU topology such as "
                         "'tpu_v5e:2x4' (libtpu importable, no TPU needed)")
    ap.add_argument("--attention", default="xla", choices=("xla", "splash"),
                    help="attention of the train step ('splash': TPU Pallas, TPU target)")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="lowered cost analysis only (no memory figures)")
    ap.add_argument("--out", default="", help="also write the records to this JSON file")
    args = ap.parse_args(argv)
    devices = target_devices(args.target)
    if max(args.fsdp) > len(devices):
        ap.error(f"--fsdp {max(args.fsdp)} needs {max(args.fsdp)} devices (--devices N, or a "
                 f"larger --target; this one has {len(devices)}).")
    records = []

    def emit(rec):
        records.append(rec)
        print(json.dumps(rec), flush=True)

    for name in args.models:
        if name in TRANSFORMERS:
            _transformer_records(name, args, emit)
            continue
        try:
            an = Analyser(name, args.compile, args.dtype)
        except (TypeError, ValueError) as e:   # e.g. SDXL fields this UNet does not have
            emit({"model": name, "missing": f"cannot build {name}: {e}"})
            continue
        for prog in args.programs:
            if prog in ("train", "p2p") and an.pipe.is_sdxl:
                emit({"model": name, "program": prog,
                      "missing": "not built for SDXL here (its unet and generate are)"})
                continue
            if prog == "train":
                for dt in args.train_dtypes:
                    for remat in args.train_remat:
                        for b in args.train_batches:
                            for n in args.fsdp:
                                emit(train_step(name, b, dt, remat == "on", n, args.compile,
                                                devices, args.attention))
                continue
            if prog != "unet" and an.pipe.text_encoder is None:
                emit({"model": name, "program": prog,
                      "missing": "no text encoders for this model in jaxdiff yet"})
                continue
            for b in args.batches:
                rec = (an.unet(2 * b) if prog == "unet" else an.generate(b, args.steps)
                       if prog == "generate" else an.p2p(b, args.steps))
                rec = dict({"model": name, "program": prog, "images": b, "dtype": args.dtype,
                            "steps": None if prog == "unet" else args.steps}, **rec)
                rec.update(roofline(rec, b))
                emit(rec)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"hardware": HARDWARE, "anchors_s_per_image": ANCHORS,
                       "backend": jax.default_backend(), "records": records}, f, indent=1)
        os.replace(tmp, args.out)
    return records


def _transformer_records(name, args, emit):
    """The ``unet`` (one transformer call) and ``generate`` records of a backbone."""
    an = TransformerAnalyser(name, args.compile, args.dtype)
    for prog in args.programs:
        if prog not in ("unet", "generate"):
            emit({"model": name, "program": prog,
                  "missing": "only the call and generation programs of a transformer"})
            continue
        for b in args.batches:
            rec = an.call(2 * b) if prog == "unet" else an.generate(b, args.steps)
            rec = dict({"model": name, "program": prog, "images": b, "dtype": args.dtype,
                        "steps": None if prog == "unet" else args.steps}, **rec)
            rec.update(roofline(rec, b))
            emit(rec)


if __name__ == "__main__":
    main()
