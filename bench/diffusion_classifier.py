"""Diffusion Classifier on held-out world-v2 images: zero-shot accuracy vs samples, and speed.

    python bench/diffusion_classifier.py --out bench/results/diffusion_classifier.json

The embedded model classifies held-out scenes of world v2 (``shapes.held_out_examples``;
shades, anti-aliased edges, captions that may drop colour or shape) among candidate
prompts, with ``jaxdiff.eval.diffusion_classifier.classify``:

* ``colour``: one-object scenes of a named colour; candidates "a {colour} {shape}" for the
  8 colour names with the true shape (chance 1/8);
* ``shape``: the same scenes; candidates "a {colour} {shape}" for the 5 shapes with the
  true colour (chance 1/5);
* ``caption``: any held-out scene (one or two objects); candidates its own caption and 9
  captions of other held-out scenes (chance 1/10).

Accuracy for a single stage of 8, 16, 32 and 64 (t, eps) samples (no elimination) and for
the adaptive schedule ``--adaptive`` (e.g. 16 then 64 samples keeping 3). ``speed``: images/s
for K = 10 candidates x 64 samples, jaxdiff's batched program (``classify`` on
``--speed-batch`` images) vs a PyTorch loop over the candidates (diffusers'
``UNet2DConditionModel`` loaded from the embedded model's folder, one call of 64 noisy
latents per candidate, the paper's ``eval_error``), both on the same latents, text
embeddings, timesteps and noise; ``errors_max_abs_diff`` checks the two agree.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

import jaxdiff
from jaxdiff import schedules
from jaxdiff.data import shapes
from jaxdiff.data.images import write_json
from jaxdiff.eval import diffusion_classifier as dc
from jaxdiff.training.latents import encode_uint8
from jaxdiff.weights.diffusers_format import DEFAULT_MODEL


def tasks(num: int, seed: int = 0):
    """{task: (images uint8 [N, H, W, 3], candidates [N][K], true index [N])}."""
    spec = shapes.world("v2")
    one = [e for e in shapes.held_out_examples(spec, 2 * num, num_objects=1)
           if e["objects"][0].colour != shapes.UNNAMED][:num]
    colours, kinds = spec.colour_names, spec.shapes
    out = {}
    for task in ("colour", "shape"):
        cands, truth = [], []
        for e in one:
            o = e["objects"][0]
            names = colours if task == "colour" else kinds
            cands.append([f"a {c} {o.shape}" if task == "colour" else f"a {o.colour} {c}"
                          for c in names])
            truth.append(names.index(o.colour if task == "colour" else o.shape))
        out[task] = (np.stack([e["image"] for e in one]), cands, np.asarray(truth))
    scenes = shapes.held_out_examples(spec, num + 200)
    rng = np.random.default_rng(seed)
    cands, truth = [], []
    for e in scenes[:num]:
        others = [s["caption"] for s in scenes if s["caption"] != e["caption"]]
        pick = list(rng.choice(len(others), 9, replace=False))
        row = [others[i] for i in pick]
        k = int(rng.integers(10))
        cands.append(row[:k] + [e["caption"]] + row[k:])
        truth.append(k)
    out["caption"] = (np.stack([e["image"] for e in scenes[:num]]), cands, np.asarray(truth))
    return out


def accuracy(pipe, params, images, cands, truth, samples, keep, batch):
    correct, t0 = [], time.perf_counter()
    for s in range(0, len(images), batch):
        r = dc.classify(pipe, params, images[s:s + batch], cands[s:s + batch],
                        samples=samples, keep=keep)
        correct += list(r.prediction == truth[s:s + batch])
    return float(np.mean(correct)), time.perf_counter() - t0


def torch_errors(unet, torch, latents, contexts, ts, noise, alphas_cumprod):
    """The paper's eval_error as a loop over candidates: [B, K, S] l2 errors."""
    out = np.zeros((latents.shape[0], contexts.shape[0], len(ts)), np.float32)
    a = torch.tensor(alphas_cumprod[ts], dtype=torch.float32).view(-1, 1, 1, 1)
    eps = torch.tensor(np.asarray(noise)).permute(0, 3, 1, 2)
    t = torch.tensor(ts)
    with torch.inference_mode():
        for b in range(latents.shape[0]):
            x0 = torch.tensor(np.asarray(latents[b])).permute(2, 0, 1)[None]
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
            for k in range(contexts.shape[0]):
                ctx = torch.tensor(np.asarray(contexts[k]))[None].expand(len(ts), -1, -1)
                pred = unet(x_t, t, encoder_hidden_states=ctx).sample
                out[b, k] = ((pred - eps) ** 2).mean(dim=(1, 2, 3)).numpy()
    return out


def speed(pipe, params, images, cands, repeats):
    import torch
    from diffusers import UNet2DConditionModel
    torch.set_num_threads(os.cpu_count() or 1)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(DEFAULT_MODEL, "unet")).eval()
    latents = encode_uint8(pipe, params, images)
    stage = dc.stage_plan(pipe.scheduler.num_train_timesteps, (64,), (1,))[0]
    noise = jax.random.normal(jax.random.key(0), (64,) + latents.shape[1:])
    contexts = dc.encode_prompts(pipe, params, pipe.tokenize(cands))
    kw = dict(samples=(64,), keep=(1,), chunk=64)
    dc.classify(pipe, params, None, cands, latents=latents, **kw)  # compile
    ac = schedules.alphas_cumprod(pipe.scheduler)
    ours, theirs = [], []
    for _ in range(repeats):  # alternate, so other load hits both alike
        t0 = time.perf_counter()
        r = dc.classify(pipe, params, None, cands, latents=latents, **kw)
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref = torch_errors(unet, torch, latents, contexts, stage.timesteps, noise, ac)
        theirs.append(time.perf_counter() - t0)
    ours_err = np.asarray(r.errors)  # [B, K] in the order of cands, as ref
    n = len(images)
    return {"images": n, "candidates": len(cands), "samples": 64,
            "jaxdiff_img_per_s": n / float(np.median(ours)),
            "torch_img_per_s": n / float(np.median(theirs)),
            "speedup": float(np.median(theirs) / np.median(ours)),
            "torch_threads": torch.get_num_threads(),
            "errors_max_abs_diff": float(np.max(np.abs(ours_err - ref.mean(-1)))),
            "errors_mean": float(ref.mean())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, default=100, help="images per task (default 100)")
    p.add_argument("--samples", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--adaptive", type=int, nargs="+", default=[16, 64],
                   help="adaptive schedule's cumulative samples (keep: 3, then 1)")
    p.add_argument("--tasks", nargs="*", default=["colour", "shape", "caption"],
                   help="accuracy tasks (none: only the speed comparison)")
    p.add_argument("--batch", type=int, default=20, help="images per classify call")
    p.add_argument("--speed-batch", type=int, default=4, help="images timed for speed")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="JSON file (written atomically)")
    args = p.parse_args(argv)
    pipe, params = jaxdiff.load_pipeline(None)
    data = tasks(args.num)
    result = {"model": "embedded:shapes", "world": "v2", "num_images": args.num,
              "loss": "l2", "accuracy": {}, "seconds": {}}
    for task in args.tasks:
        images, cands, truth = data[task]
        k = len(cands[0])
        res = {"chance": 1.0 / k, "candidates": k}
        for n in args.samples:
            res[str(n)], sec = accuracy(pipe, params, images, cands, truth, (n,), (1,),
                                        args.batch)
            result["seconds"][f"{task}_{n}"] = sec
            print(task, n, res[str(n)], f"{sec:.0f}s", flush=True)
        name = "adaptive_" + "_".join(map(str, args.adaptive))
        keep = [3] * (len(args.adaptive) - 1) + [1]
        res[name], sec = accuracy(pipe, params, images, cands, truth, args.adaptive, keep,
                                  args.batch)
        result["seconds"][f"{task}_{name}"] = sec
        print(task, name, res[name], f"{sec:.0f}s", flush=True)
        result["accuracy"][task] = res
    images, cands, _ = data["caption"]
    if args.speed_batch:
        result["speed"] = speed(pipe, params, images[:args.speed_batch], cands[0],
                                args.repeats)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        write_json(args.out, result)


if __name__ == "__main__":
    main()
