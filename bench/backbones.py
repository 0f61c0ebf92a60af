"""Denoiser backbones side by side: U-Net, DiT, PixArt and U-ViT of comparable size —
parameters, GFLOPs per call (XLA's cost analysis) and seconds per sampling step, jaxdiff vs
PyTorch on the same weights, as a ratio (issue #18, performance).

    python bench/backbones.py                        # CPU: tiny and reduced sizes
    python bench/backbones.py --sizes reduced --backbones dit unet --repeats 5
    python bench/backbones.py --sizes reduced --dtype bfloat16      # on a GPU

One sampling step is one classifier-free-guided call: the denoiser on 2B rows (B images,
``--batch``) at a 32x32x4 latent (256² images) for "reduced", 8x8 for "tiny". The PyTorch
side is diffusers' ``UNet2DConditionModel`` / ``DiTTransformer2DModel`` /
``PixArtTransformer2DModel`` and, for U-ViT (no diffusers class), ``torchref/uvit.py``
(the re-implementation of the paper's code that tests/test_uvit.py checks jaxdiff
against). Weights are made on the PyTorch side (perturbed random init) and converted, so
both run the same network; ``max_abs_diff`` is the outputs' difference. The two sides are
timed alternately, call by call (bench/models.py's fairness notes apply: flush-to-zero on
both sides, load average printed). ``speedup`` = torch_s / jaxdiff_s (> 1: jaxdiff faster).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import models as model_bench  # noqa: E402  (bench/models.py: its UNet sizes)

# size: {backbone: config}; "reduced": about DiT-S/2's width and depth at 256² images.
SIZES = {
    "tiny": dict(side=8, ctx=(16, 32), unet=model_bench.SIZES["tiny"][0],
                 dit=dict(num_attention_heads=2, attention_head_dim=16, num_layers=2),
                 uvit=dict(embed_dim=32, depth=3, num_heads=2)),
    "reduced": dict(side=32, ctx=(77, 256), unet=model_bench.SIZES["reduced"][0],
                    dit=dict(num_attention_heads=6, attention_head_dim=64, num_layers=12),
                    uvit=dict(embed_dim=384, depth=13, num_heads=6)),
}
BACKBONES = ("unet", "dit", "pixart", "uvit")


def interleaved_medians(fns, repeats):
    """Median seconds per call of each zero-argument function, calling them in turn."""
    times = {name: [] for name in fns}
    for _ in range(max(repeats, 1)):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def torch_setup(dtype_name, threads=None):
    """torch, device, dtype and a synchronise function (flush-to-zero, as XLA:CPU)."""
    import torch
    torch.manual_seed(0)
    if threads:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return torch, device, tdtype, sync


def _build(torch, name, size):
    """(torch module, jaxdiff module, jaxdiff params, torch call, jax call, cond maker)."""
    from jaxdiff.models.uvit import UViT, UViTConfig, uvit_dummy_inputs
    from jaxdiff.weights import convert, load_component
    from jaxdiff.weights.backbones import load_transformer
    from torchref import uvit as uvit_ref
    from torchref.models import perturb

    s = SIZES[size]
    ctx_len, ctx_dim = s["ctx"]
    common = dict(in_channels=4, out_channels=8, sample_size=s["side"], patch_size=2)
    if name == "uvit":
        cfg = dict(img_size=s["side"], patch_size=2, in_chans=4, mlp_time_embed=True,
                   clip_dim=ctx_dim, num_clip_token=ctx_len, **s["uvit"])
        tm = perturb(uvit_ref.build(torch, **cfg), scale=0.02)
        module = UViT(UViTConfig(**cfg))
        import jax
        shapes = jax.eval_shape(lambda: module.init(jax.random.key(0),
                                                    *uvit_dummy_inputs(module)))["params"]
        params = convert.torch_to_flax({k: v.numpy() for k, v in tm.state_dict().items()},
                                       shapes, source="uvit")
        return tm, module, params
    from diffusers import (DiTTransformer2DModel, PixArtTransformer2DModel,
                           UNet2DConditionModel)
    tm = {"unet": lambda: UNet2DConditionModel(**s["unet"]),
          "dit": lambda: DiTTransformer2DModel(num_embeds_ada_norm=1000, **common,
                                               **s["dit"]),
          "pixart": lambda: PixArtTransformer2DModel(
              cross_attention_dim=s["dit"]["num_attention_heads"]
              * s["dit"]["attention_head_dim"], caption_channels=ctx_dim,
              use_additional_conditions=False, **common, **s["dit"])}[name]()
    tm = perturb(tm, scale=0.02)
    with tempfile.TemporaryDirectory() as d:
        tm.save_pretrained(d, safe_serialization=True)
        module, params = (load_component(d, "unet") if name == "unet"
                          else load_transformer(d))
    return tm, module, params


def bench_backbone(name, size, batch, repeats, dtype_name, torch_threads=None):
    import jax
    import jax.numpy as jnp

    torch, device, tdtype, sync = torch_setup(dtype_name, torch_threads)
    tm, module, params = _build(torch, name, size)
    s = SIZES[size]
    rows, side = 2 * batch, s["side"]
    ctx_len, ctx_dim = s["ctx"]
    if name == "unet":
        ctx_dim = tm.config.cross_attention_dim
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, 4, side, side)).astype(np.float32)
    t = np.array([500] * rows)
    cond = (np.arange(rows) % 1000 if name == "dit"
            else rng.standard_normal((rows, ctx_len, ctx_dim)).astype(np.float32))
    tm = tm.to(device=device, dtype=tdtype).eval()
    module = module.clone(dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype_name])

    if name == "pixart":
        fwd = jax.jit(lambda p, a, b, c: module.apply({"params": p}, a, b, c, None))
    else:
        fwd = jax.jit(lambda p, a, b, c: module.apply({"params": p}, a, b, c))
    params = jax.device_put(params)
    args = (jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(cond))
    t0 = time.perf_counter()
    compiled = fwd.lower(params, *args).compile()
    out = compiled(params, *args).block_until_ready()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost

    tx, tt = (torch.tensor(a, device=device) for a in (x, t))
    tc = torch.tensor(cond, device=device)
    tx = tx.to(tdtype)
    tc = tc if name == "dit" else tc.to(tdtype)

    def torch_call():
        with torch.no_grad():
            if name == "unet":
                r = tm(tx, tt, tc).sample
            elif name == "dit":
                r = tm(tx, timestep=tt, class_labels=tc).sample
            elif name == "pixart":
                r = tm(tx, encoder_hidden_states=tc, timestep=tt,
                       added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
            else:
                r = tm(tx, tt, tc)
        sync()
        return r

    want = torch_call().float().cpu().numpy()
    got = np.asarray(out, np.float32).transpose(0, 3, 1, 2)
    med = interleaved_medians(
        {"jaxdiff": lambda: compiled(params, *args).block_until_ready(), "torch": torch_call},
        repeats)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    return dict(bench="backbone_step", backbone=name, size=size, dtype=dtype_name,
                images=batch, rows=rows, latent=[side, side], params_m=round(n_params / 1e6, 3),
                gflops_per_step=round(float(cost.get("flops", 0.0)) / 1e9, 3),
                device=jax.devices()[0].platform, torch_threads=torch.get_num_threads(),
                jaxdiff_s=round(med["jaxdiff"], 5), torch_s=round(med["torch"], 5),
                speedup=round(med["torch"] / med["jaxdiff"], 3),
                jaxdiff_compile_s=round(compile_s, 2),
                max_abs_diff=float(np.abs(got[:, :want.shape[1]] - want).max()),
                loadavg_1m=round(os.getloadavg()[0], 2))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "reduced"], choices=sorted(SIZES))
    ap.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    ap.add_argument("--batch", type=int, default=1, help="images per step (CFG: 2x rows)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--out", default="", help="also write the records to this JSON file")
    args = ap.parse_args(argv)
    records = []
    for size in args.sizes:
        for name in args.backbones:
            rec = bench_backbone(name, size, args.batch, args.repeats, args.dtype,
                                 args.torch_threads)
            records.append(rec)
            print(json.dumps(rec), flush=True)
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            json.dump(records, f, indent=1)
        os.replace(args.out + ".tmp", args.out)
    return records


if __name__ == "__main__":
    main()
