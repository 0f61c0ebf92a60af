"""Train step (text-to-image / DreamBooth style): jaxdiff vs PyTorch diffusers, as a ratio.

    python bench/train_step.py                        # CPU: tiny and reduced UNets
    python bench/train_step.py --torch-threads 1      # CPU on a loaded machine
    python bench/train_step.py --sizes sd15 --batches 1 4 --dtype bfloat16 --remat   # GPU

One step = DDPM forward noising of fixed latents, UNet noise prediction conditioned on
text embeddings, MSE, backward, AdamW update (lr 1e-5, weight decay 1e-2) of every UNet
parameter — the DreamBooth / text-to-image fine-tuning step. Both sides start from the
same weights (a diffusers ``UNet2DConditionModel`` converted by ``jaxdiff.weights``) and
get the same batches (latents, noise, timesteps, embeddings drawn once per step on the
host), so in float32 their losses must track each other step by step (``loss_rel_diff``,
a correctness check of the benchmark itself).

jaxdiff: ``make_train_step`` jitted with the state donated; ``--dtype bfloat16`` computes
in bf16 with float32 params and optimizer state, ``--remat`` rematerialises every UNet
block. PyTorch: fp32 params, ``torch.autocast(bfloat16)`` for ``--dtype bfloat16``,
``enable_gradient_checkpointing()`` for ``--remat`` (what diffusers' training scripts do);
on GPU in float32 both sides use TF32 (XLA's default there).

Prints one JSON object per size and batch: median seconds per step for each side,
``speedup`` = torch_s / jaxdiff_s (> 1 means jaxdiff is faster), steps/s, and on GPU the
peak device memory of each side (``jaxdiff_peak_gb`` from XLA's allocator stats,
``torch_peak_gb`` from ``torch.cuda.max_memory_allocated``). The sides are timed
alternately, step by step. JAX's GPU memory pre-allocation is turned off so both fit.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402


from models import SIZES, _torch_setup  # noqa: E402

LR, WEIGHT_DECAY, T = 1e-5, 1e-2, 1000


def alphas_cumprod():
    """SD's scaled-linear schedule (beta 0.00085 .. 0.012, 1000 steps)."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas).astype(np.float32)


def batches(n, batch, side, ctx_len, ctx_dim, seed=0):
    """``n`` host batches (NHWC latents, noise, timesteps, text embeddings)."""
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    return [dict(x0=f(batch, side, side, 4), noise=f(batch, side, side, 4),
                 t=rng.integers(0, T, batch).astype(np.int64), context=f(batch, ctx_len, ctx_dim))
            for _ in range(n)]


def jax_trainer(module, params, dtype_name, remat):
    """(step(host_batch) -> loss, peak_bytes()) for jaxdiff."""
    import jax
    import jax.numpy as jnp
    import optax
    from jaxdiff.training import state as state_lib
    from jaxdiff.training.step import make_train_step

    unet = module.clone(dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype_name],
                        remat=remat)
    a_bar = jnp.asarray(alphas_cumprod())

    def loss_fn(p, batch, rng):
        del rng  # noise and timesteps come with the batch (identical on both sides)
        a = a_bar[batch["t"]][:, None, None, None]
        x_t = jnp.sqrt(a) * batch["x0"] + jnp.sqrt(1.0 - a) * batch["noise"]
        out = unet.apply({"params": p}, x_t, batch["t"], batch["context"])
        return jnp.mean((out.astype(jnp.float32) - batch["noise"]) ** 2)

    opt = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
    box = [state_lib.create(jax.device_put(params), opt, ema=False)]
    step = jax.jit(make_train_step(loss_fn, opt), donate_argnums=(0,))

    def run(host_batch):
        box[0], metrics = step(box[0], {k: jnp.asarray(v.astype(np.int32) if k == "t" else v)
                                        for k, v in host_batch.items()})
        return float(metrics["loss"])  # waits for the step

    def peak_bytes():
        stats = jax.devices()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use")

    return run, peak_bytes


def torch_trainer(tm, torch, device, tdtype, sync, remat):
    """(step(host_batch) -> loss, peak_bytes()) for PyTorch diffusers."""
    tm = tm.to(device).train()
    if remat:
        tm.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(tm.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    a_bar = torch.tensor(alphas_cumprod(), device=device)
    autocast = tdtype != torch.float32

    def run(host_batch):
        b = {k: torch.from_numpy(v).to(device) for k, v in host_batch.items()}
        x0, noise = (b[k].permute(0, 3, 1, 2) for k in ("x0", "noise"))
        a = a_bar[b["t"]].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1.0 - a).sqrt() * noise
        with torch.autocast(device, dtype=tdtype, enabled=autocast):
            out = tm(x_t, b["t"], b["context"]).sample
        loss = torch.nn.functional.mse_loss(out.float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return float(loss.detach())

    def peak_bytes():
        return torch.cuda.max_memory_allocated() if device == "cuda" else None

    return run, peak_bytes


def bench(size, batch, repeats, dtype_name, remat, torch_threads=None):
    import jax
    from diffusers import UNet2DConditionModel
    from jaxdiff.weights import load_component
    from torchref.models import perturb

    torch, device, tdtype, sync = _torch_setup(dtype_name, torch_threads)
    if device == "cuda":  # XLA uses TF32 for float32 GPU matmuls/convs by default; so does this
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats()
    kwargs, default_batch, side, ctx_len = SIZES[size]
    batch = batch or default_batch
    tm = perturb(UNet2DConditionModel(**kwargs), scale=0.02)
    with tempfile.TemporaryDirectory() as d:
        tm.save_pretrained(d, safe_serialization=True)
        module, params = load_component(d, "unet")
    data = batches(repeats + 1, batch, side, ctx_len, tm.config.cross_attention_dim)

    jax_step, jax_peak = jax_trainer(module, params, dtype_name, remat)
    del params
    torch_step, torch_peak = torch_trainer(tm, torch, device, tdtype, sync, remat)
    t0 = time.perf_counter()
    losses = {"jaxdiff": [jax_step(data[0])]}
    compile_s = time.perf_counter() - t0
    losses["torch"] = [torch_step(data[0])]
    times = {"jaxdiff": [], "torch": []}
    for b in data[1:]:
        for name, fn in (("jaxdiff", jax_step), ("torch", torch_step)):
            t0 = time.perf_counter()
            losses[name].append(fn(b))
            times[name].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    lj, lt = np.asarray(losses["jaxdiff"]), np.asarray(losses["torch"])
    gb = lambda x: None if x is None else round(x / 2 ** 30, 2)
    return dict(bench="train_step", size=size, dtype=dtype_name, remat=remat, batch=batch,
                latent=[side, side], device=jax.devices()[0].platform,
                torch_threads=torch.get_num_threads(), jaxdiff_s=round(med["jaxdiff"], 5),
                torch_s=round(med["torch"], 5), speedup=round(med["torch"] / med["jaxdiff"], 3),
                jaxdiff_steps_per_s=round(1 / med["jaxdiff"], 3),
                torch_steps_per_s=round(1 / med["torch"], 3),
                jaxdiff_compile_s=round(compile_s, 2),
                loss_rel_diff=float(np.max(np.abs(lj - lt) / np.abs(lt))),
                jaxdiff_peak_gb=gb(jax_peak()), torch_peak_gb=gb(torch_peak()),
                loadavg_1m=round(os.getloadavg()[0], 2))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "reduced"], choices=list(SIZES))
    ap.add_argument("--batches", nargs="+", type=int, default=[0],
                    help="batch sizes (0 = the size's default: tiny 4, reduced 2, sd15 2)")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per side")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--remat", action="store_true",
                    help="rematerialise UNet blocks (torch: gradient checkpointing)")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch.set_num_threads (see bench/models.py on loaded machines)")
    args = ap.parse_args()
    for size in args.sizes:
        for batch in args.batches:
            print(json.dumps(bench(size, batch, args.repeats, args.dtype, args.remat,
                                   args.torch_threads)), flush=True)


if __name__ == "__main__":
    main()
