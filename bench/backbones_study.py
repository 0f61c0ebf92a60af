"""U-Net vs text DiT vs text U-ViT trained on the shapes world (issue #18, point 3): the
same data, steps and batch through the text-to-image recipe's diffusion stage, each scored
by the shapes evaluator at several training-compute budgets.

    python bench/backbones_study.py                      # the first study (450 steps, model v1)
    python bench/backbones_study.py --base embedded --world v2_brief --snr-gamma 5 \\
        --num-train 40000 --steps 4000 --evals 4 --num-one 200 --num-two 100 --warmup 200 \\
        --ema-decay 0.999 --workdir runs/backbones_v2 --out bench/backbones_study_v2.json \\
        --png bench/backbones_study_v2.png                # the second (model v2's encoders)
    python bench/backbones_study.py ... --backbones dit --sizes L --init reference  # + a row
    python bench/backbones_study.py --backbones dit --sizes S --steps 30 --evals 1 \\
        --num-one 8 --num-two 8 --num-train 256 --workdir /tmp/bbs --out /tmp/bbs.json

Every model starts from the VAE, tokenizer and text encoder of ``--base`` (frozen; model v1,
``candidates/shapes_v1``, by default, as the first study) with a randomly initialised
denoiser (``recipes.fresh_denoiser``: ``config.model.backbone`` "unet" / "dit" / "uvit") and
is trained by ``text_to_image.train_diffusion`` on the same cached latents of ``--world``
scenes, in the same batch order. Sizes S / M / L have about the same parameter count across
backbones (the U-Net's L is model v1's architecture); transformers use 2x2 latent patches
(16 patch tokens at 8x8 latents).

Per model: parameters, GFLOPs per denoiser call (one image, no guidance; XLA's
``jax.jit(...).lower(...).compile().cost_analysis()``), training steps/s (wall time between
evaluations, compile excluded) and, after every ``steps / evals`` steps, the EMA weights'
one-object and two-object accuracy (every attribute right: ``all``; each attribute; their
mean: ``attributes``) on world v1's held-out prompts (``jaxdiff.eval.generation.prompt_set``;
the same in every study: fully specified captions, which every world's grammar includes)
(DPM-Solver++ 20 steps, guidance 5). Training compute = 3 x GFLOPs per call x batch x steps (forward + backward, as
the DiT paper counts). Writes the JSON (``--out``; updated after every evaluation, and
re-running resumes: finished evaluations are kept, training continues from its last
checkpoint) and a PNG (``--png``): accuracy vs training GFLOPs, one colour per backbone.
Text-DiT runs also export a pipeline (``<workdir>/<name>/export``) that
``jaxdiff.load_pipeline`` reads.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import numpy as np

# size -> config.model dict of each backbone (widths, depths, heads; the rest is filled in
# from the latent and the text encoder by recipes.build_denoiser).
_UNET = dict(layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",) * 2,
             up_block_types=("CrossAttnUpBlock2D",) * 2, attention_head_dim=4,
             norm_num_groups=8)
SIZES = {
    "unet": {"S": dict(_UNET, block_out_channels=(16, 32)),
             "M": dict(_UNET, block_out_channels=(24, 48)),
             "L": dict(_UNET, block_out_channels=(32, 64))},
    "dit": {"S": dict(num_attention_heads=4, attention_head_dim=16, num_layers=4, patch_size=2),
            "M": dict(num_attention_heads=5, attention_head_dim=16, num_layers=5, patch_size=2),
            "L": dict(num_attention_heads=6, attention_head_dim=16, num_layers=6, patch_size=2)},
    "uvit": {"S": dict(embed_dim=64, depth=5, num_heads=4, patch_size=2),
             "M": dict(embed_dim=80, depth=7, num_heads=5, patch_size=2),
             "L": dict(embed_dim=112, depth=7, num_heads=7, patch_size=2)},
}
# "attributes": the mean of these accuracies (the plot's y axis; "all" is the share of
# images with every one of them right, near 0 at these budgets).
ATTRIBUTES = ("count", "shape", "colour", "size", "position", "background")
COLOURS = {"unet": "tab:blue", "dit": "tab:orange", "uvit": "tab:green"}
MARKERS = {"S": "o", "M": "s", "L": "^"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--sizes", nargs="+", default=["S", "L", "M"], choices=["S", "M", "L"],
                   help="in this order (default S L M: M last)")
    p.add_argument("--steps", type=int, default=450, help="training steps per model")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema-decay", type=float, default=0.99,
                   help="EMA of the weights that are scored (0.99: a ~100-step window)")
    p.add_argument("--evals", type=int, default=3, help="evaluations per run (budgets)")
    p.add_argument("--num-one", type=int, default=48, help="one-object prompts per evaluation")
    p.add_argument("--num-two", type=int, default=48, help="two-object prompts per evaluation")
    p.add_argument("--num-train", type=int, default=10_000, help="training scenes")
    p.add_argument("--base", default="candidates/shapes_v1",
                   help="pipeline whose VAE, tokenizer and text encoder every model uses "
                        "(frozen): a folder or 'embedded' (model v2)")
    p.add_argument("--world", default="v1",
                   help="shapes world of the training scenes (jaxdiff.data.shapes.WORLDS); "
                        "the held-out prompts are world v1's in every study")
    p.add_argument("--snr-gamma", type=float, default=0.0,
                   help="Min-SNR-gamma loss weight (0: plain; the v2 recipes use 5)")
    p.add_argument("--init", default="flax", choices=["flax", "reference"],
                   help="denoiser initialisation: flax's defaults, or 'reference' (the "
                        "transformers' papers: PixArt-α's scheme with zero output projections "
                        "for dit, N(0, 0.02) Dense kernels for uvit); a non-default init names "
                        "the rows '<backbone>-<size>+<init>'")
    p.add_argument("--cpu-devices", type=int, default=0,
                   help="split the CPU into this many XLA devices, data parallel (0: one)")
    p.add_argument("--workdir", default="runs/backbones_study")
    p.add_argument("--out", default="bench/backbones_study.json")
    p.add_argument("--png", default="bench/backbones_study.png")
    return p.parse_args(argv)


@functools.partial(jax.jit, static_argnums=0)
def _denoise(pipe, params, x, t, cond):
    from jaxdiff.denoiser import denoise
    return denoise(pipe, params, x, t, cond)


def denoiser_gflops(pipe, params) -> float:
    """XLA's flop count of one denoiser call on one latent (compiled program)."""
    import jax.numpy as jnp
    s = pipe.unet.config.sample_size
    x = jnp.zeros((1, s, s, pipe.vae.config.latent_channels))
    cond = jnp.zeros((1, pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size))
    cost = _denoise.lower(pipe, params["unet"], x, jnp.zeros((1,)), cond).compile()
    cost = cost.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) / 1e9


def encoded_data(pipe, params, args):
    """(latents, ids) of the training scenes, cached in the workdir (one VAE for all)."""
    from jaxdiff.data import tfds_shapes
    from jaxdiff.training.text_to_image import encode_dataset

    path = os.path.join(args.workdir, f"encoded_{args.world}_n{args.num_train}.npz")
    if os.path.exists(path):
        with np.load(path) as z:
            return z["latents"], z["ids"]
    builder = tfds_shapes.prepare(os.path.join(args.workdir, "tfds"), tfds_shapes.ShapesConfig(
        name=f"px32_n{args.num_train}", num_train=args.num_train, num_test=16, seed=0,
        world=args.world))
    latents, ids = encode_dataset(pipe, params, builder.as_data_source()["train"])
    np.savez(path + ".tmp.npz", latents=latents, ids=ids)
    os.replace(path + ".tmp.npz", path)
    return latents, ids


def evaluate(pipe, params, cases, spec) -> dict:
    """Accuracy of one generation per held-out prompt (one program per pipeline)."""
    import jaxdiff
    from jaxdiff.eval import generation as gen

    images = jaxdiff.generate(pipe, params, [c.prompt for c in cases], sampler="dpmpp_2m",
                              steps=20, guidance_scale=5.0, seed=0)
    out = {}
    for name, idx in gen.split_by_objects(cases).items():
        s = gen.score_images(np.asarray(images)[idx], [cases[i] for i in idx], spec)
        out[name] = {k: round(float(v), 4) for k, v in s.items()}
        out[name]["attributes"] = round(float(np.mean([s[k] for k in ATTRIBUTES])), 4)
    return out


def run_model(backbone, size, base, data, cases, spec, args, results, save, settings):
    """Trains one model, evaluating every ``steps / evals`` steps into ``results``."""
    from jaxdiff.training import recipes, text_to_image
    from jaxdiff.weights import save_pipeline

    name = f"{backbone}-{size}" + ("" if args.init == "flax" else f"+{args.init}")
    row = results.setdefault(name, {"backbone": backbone, "size": size, "init": args.init,
                                    "evals": []})
    row["settings"] = settings        # the command's settings (several commands, one JSON)
    done = {e["step"] for e in row["evals"]}
    pipe, params = recipes.fresh_denoiser(*base, {backbone: SIZES[backbone][size]}, backbone,
                                          init=args.init)
    row["params_m"] = round(sum(int(np.size(a)) for a in
                                jax.tree.leaves(params["unet"])) / 1e6, 4)
    row["gflops_per_call"] = round(denoiser_gflops(pipe, params), 5)
    row["config"] = dict(SIZES[backbone][size])
    every = max(1, args.steps // args.evals)
    clock = {"t": time.perf_counter(), "train_s": 0.0, "steps": 0, "last": None}

    def on_eval(p, step):
        now = time.perf_counter()
        if clock["last"] is not None:  # the first segment holds the train-step compile
            clock["train_s"] += now - clock["t"]
            clock["steps"] += step - clock["last"]
        if step not in done:
            t0 = time.perf_counter()
            acc = evaluate(pipe, p, cases, spec)
            row["evals"].append({"step": step, "train_gflops": round(
                3 * row["gflops_per_call"] * args.batch * step, 1), **acc,
                "eval_s": round(time.perf_counter() - t0, 1)})
            row["evals"].sort(key=lambda e: e["step"])
            print(json.dumps({"model": name, **row["evals"][-1]}), flush=True)
        if clock["steps"]:
            row["steps_per_s"] = round(clock["steps"] / clock["train_s"], 3)
        save()
        clock["t"], clock["last"] = time.perf_counter(), step

    workdir = os.path.join(args.workdir, name)
    params = text_to_image.train_diffusion(
        pipe, params, None, workdir, steps=args.steps, batch_size=args.batch, lr=args.lr,
        warmup=args.warmup, ema_decay=args.ema_decay, caption_dropout=0.1,
        snr_gamma=args.snr_gamma,
        train_text_encoder=False, log_every=50, ckpt_every=every, on_sample=on_eval,
        sample_every=every, encoded=data)
    if backbone != "uvit":  # a U-ViT pipeline has no diffusers layout
        save_pipeline(pipe, params, os.path.join(workdir, "export"))
    return row


def plot(results, path):
    """The PNG of accuracy vs training GFLOPs (needs matplotlib: pip install matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib)", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, title in ((axes[0], "one_object", "one object"),
                           (axes[1], "two_object", "two objects")):
        for name, row in results.items():
            ev = [e for e in row["evals"] if key in e]
            if not ev:
                continue
            ax.plot([e["train_gflops"] for e in ev], [e[key]["attributes"] for e in ev],
                    color=COLOURS[row["backbone"]], marker=MARKERS[row["size"]], label=name,
                    linestyle="-" if row.get("init", "flax") == "flax" else "--")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("training GFLOPs (3 x per-call x batch x steps)")
        ax.set_title(f"{title}: mean attribute accuracy")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (shapes evaluator)")
    axes[1].legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    os.replace(path + ".tmp.png", path)


def main(argv=None):
    args = parse_args(argv)
    import jaxdiff
    from jaxdiff import parallel
    from jaxdiff.data.shapes import world
    from jaxdiff.eval import generation as gen

    parallel.set_cpu_devices(args.cpu_devices)
    base = jaxdiff.load_pipeline(None if args.base == "embedded" else args.base)
    spec = world("v1", image_size=base[0].image_size)  # the held-out prompts of every study
    cases = gen.prompt_set(spec, args.num_one, args.num_two)
    data = encoded_data(*base, args)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "png", "workdir")}
    results, first = {}, settings      # "settings": the first command's; each row has its own
    if os.path.exists(args.out):
        with open(args.out) as f:
            old = json.load(f)
        results, first = old.get("models", {}), old.get("settings", settings)

    def save():
        with open(args.out + ".tmp", "w") as f:
            json.dump({"settings": first, "sizes": SIZES, "models": results}, f, indent=1)
        os.replace(args.out + ".tmp", args.out)
        plot(results, args.png)

    for size in args.sizes:          # all backbones of a size before the next size
        for backbone in args.backbones:
            run_model(backbone, size, base, data, cases, spec, args, results, save, settings)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
