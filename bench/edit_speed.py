"""Null-text inversion + Prompt-to-Prompt edit: seconds per image, jaxdiff vs PyTorch.

    python bench/edit_speed.py [--steps 50] [--batch 4] [--torch-threads 1]

Both sides run on the same random diffusers weights (bench/sample.py's "tiny" pipeline):
VAE encode -> DDIM inversion (conditional) -> null-text optimisation (guidance 7.5, Adam
lr 1e-2 (1 - i/100), up to 10 inner steps, early stop at 1e-5 + i 2e-5) -> P2P replace
edit (cross 0.8 / self 0.4 replace steps) sampling source and target together -> VAE
decode. The PyTorch side is torchref/p2p.py: a re-implementation of
google/prompt-to-prompt's ``NullInversion`` (``null_text_w_ptp.ipynb``: ``ddim_loop``,
``null_optimization``) and of its ``AttentionReplace`` controller as a diffusers attention
processor, one image at a time as the reference runs (tests/test_p2p_reference.py checks
jaxdiff's latents against it). jaxdiff edits ``--batch`` images in one program
(``p2p_pipeline.p2p_edit``) and also one at a time. Reported: seconds per image (median of
``--repeats`` after a warm-up; jaxdiff compile time separately), ``speedup`` = torch s/img
/ jaxdiff s/img, the mean null-text inner steps of both sides (the early stop makes the
work data dependent), and the max uint8 difference of the edited images (a sanity check).
GPU (SD 1.5, 512 px): not measured here (no GPU was lent to this task).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np


SOURCE, TARGET = "a red ball", "a blue ball"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch intra-op threads (0 = torch's default)")
    args = ap.parse_args()

    import torch
    import sample  # bench/sample.py
    import jax
    from diffusers import StableDiffusionPipeline

    import jaxdiff
    from jaxdiff.editing import p2p_pipeline as pp
    from torchref.p2p import TorchP2P

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    folder = tempfile.mkdtemp(prefix="edit_speed_")
    sample.build_pipeline("tiny", folder)
    tpipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe, params = jaxdiff.load_pipeline(folder)
    side = pipe.image_size
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch, side, side, 3), dtype=np.uint8)
    settings = pp.P2PSettings(inversion="null_text", steps=args.steps, guidance=args.guidance)
    ref = TorchP2P(torch, tpipe, args.steps, args.guidance)

    def torch_edit(image):
        src, edit, taken = ref(image, SOURCE, TARGET, "null_text",
                               control=dict(mode="replace", tail="aligned"))
        return ref.decode(edit)[0], ref.decode(src)[0], float(np.mean(taken))

    def jx(n):
        out = pp.p2p_edit(pipe, params, images[:n], [SOURCE] * n, [TARGET] * n, settings)
        jax.block_until_ready(out.edited)
        return out

    result = {"bench": "null_text_p2p_edit_speed", "size": "tiny", "side": side,
              "steps": args.steps, "batch": args.batch, "torch_threads": args.torch_threads,
              "jax_devices": str(jax.devices()[0])}
    for n, key in [(1, "single"), (args.batch, "batched")]:
        t0 = time.perf_counter()
        jx(n)
        first = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = jx(n)
            times.append(time.perf_counter() - t0)
        result[f"jaxdiff_{key}_s_per_image"] = round(float(np.median(times)) / n, 3)
        result[f"jaxdiff_{key}_compile_s"] = round(first - float(np.median(times)), 1)
        result[f"jaxdiff_{key}_inner_steps_mean"] = round(float(out.inner_steps.mean()), 2)
    ttimes, diffs, inner = [], [], []
    for r in range(args.repeats):
        for i in range(args.batch):
            t0 = time.perf_counter()
            edit, rec, taken = torch_edit(images[i])
            ttimes.append(time.perf_counter() - t0)
            inner.append(taken)
            if r == 0:
                diffs.append(int(np.abs(edit.astype(int) - out.edited[i]).max()))
    torch_s = float(np.median(ttimes))
    result.update(torch_s_per_image=round(torch_s, 3),
                  torch_inner_steps_mean=round(float(np.mean(inner)), 2),
                  speedup_single=round(torch_s / result["jaxdiff_single_s_per_image"], 2),
                  speedup_batched=round(torch_s / result["jaxdiff_batched_s_per_image"], 2),
                  edited_max_abs_diff_uint8=max(diffs))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
