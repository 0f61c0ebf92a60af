"""UNet / VAE forward: jaxdiff (jitted) vs diffusers PyTorch on the same weights, as a ratio.

    python bench/models.py                 # CPU: tiny and SD-like reduced UNets
    python bench/models.py --components unet vae   # also the VAE decoder (latents -> image)
    python bench/models.py --sizes sd15 --dtype bfloat16   # GPU: full SD 1.5 UNet

Prints one JSON object per component and size: median seconds per forward for each side
and ``speedup`` = torch_s / jaxdiff_s (> 1 means jaxdiff is faster). The two sides are
timed alternately, call by call, so load from other processes hits both alike; the
machine's load average is printed with each result.

Fairness notes (CPU):
- XLA:CPU runs with flush-to-zero / denormals-are-zero (in a jitted function
  ``1e-30 * 1e-10`` is 0, and a 1e-40 input times 1 is 0); PyTorch does not by default,
  so the bench sets ``torch.set_flush_denormal(True)`` and both sides compute in the same
  FP mode. So denormals cannot slow the jaxdiff side, and the earlier reading "diffusers'
  default init is 3x slower on XLA" did not reproduce: default-init and perturbed weights
  timed the same, in one process, interleaved (reduced UNet: 1.10 vs 1.08 s before
  blockwise attention, 0.39 vs 0.37 s after; same page-fault counts). Load noise on this
  shared machine is the likely cause. What did cost jaxdiff ~2/3 of its time was page
  faults: XLA:CPU gets large buffers afresh from the OS on every call, and before
  blockwise attention one reduced-UNet forward took ~309k minor faults (1.2 GB touched);
  it now takes ~1-5k (see ``attention._CPU_SCORE_BLOCK_BYTES``).
- Weights are still perturbed (``torchref.models.perturb``): it exercises diffusers'
  zero-initialised layers, as the parity tests do, and costs nothing on either side.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np


SIZES = {  # UNet
    # name: (diffusers UNet kwargs, batch, latent side, context length)
    "tiny": (dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=32, attention_head_dim=4), 4, 16, 16),
    "reduced": (dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2,
                     cross_attention_dim=256, attention_head_dim=8), 2, 32, 77),
    "sd15": (dict(), 2, 64, 77),  # diffusers' default config is the SD 1.x UNet
}

_VAE_BLOCKS = dict(down_block_types=("DownEncoderBlock2D",) * 4,
                   up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
                   latent_channels=4, norm_num_groups=32)
VAE_SIZES = {
    # name: (diffusers AutoencoderKL kwargs, batch, image side)
    "tiny": (dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                  norm_num_groups=8), 1, 64),
    "reduced": (dict(block_out_channels=(64, 128, 256, 256), **_VAE_BLOCKS), 1, 256),
    "sd15": (dict(block_out_channels=(128, 256, 512, 512), **_VAE_BLOCKS), 1, 512),
}


def _interleaved_medians(fns, repeats):
    """Median seconds per call of each zero-argument function, calling them in turn."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def _torch_setup(dtype_name, threads=None):
    import torch
    torch.manual_seed(0)
    if threads:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # XLA:CPU flushes denormals too (see module docstring)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return torch, device, tdtype, sync


def _result(bench, size, dtype_name, batch, shape, jax_s, torch_s, compile_s, threads):
    import jax
    return dict(bench=bench, size=size, dtype=dtype_name, batch=batch,
                **shape, device=jax.devices()[0].platform, torch_threads=threads,
                jaxdiff_s=round(jax_s, 5), torch_s=round(torch_s, 5),
                speedup=round(torch_s / jax_s, 3), jaxdiff_compile_s=round(compile_s, 2),
                loadavg_1m=round(os.getloadavg()[0], 2))


def bench_unet(size, repeats, dtype_name, torch_threads=None):
    import jax
    import jax.numpy as jnp
    from diffusers import UNet2DConditionModel
    from jaxdiff.weights import load_component
    from torchref.models import perturb

    torch, device, tdtype, sync = _torch_setup(dtype_name, torch_threads)
    kwargs, batch, side, ctx_len = SIZES[size]
    tm = perturb(UNet2DConditionModel(**kwargs), scale=0.02)
    with tempfile.TemporaryDirectory() as d:
        tm.save_pretrained(d, safe_serialization=True)
        module, params = load_component(d, "unet")
    tm = tm.to(device=device, dtype=tdtype)
    jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype_name]
    module = module.clone(dtype=jdtype)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 4, side, side)).astype(np.float32)
    ctx = rng.standard_normal((batch, ctx_len, tm.config.cross_attention_dim)).astype(np.float32)
    t = np.array([500] * batch)

    fwd = jax.jit(lambda p, a, b, c: module.apply({"params": p}, a, b, c))
    params = jax.device_put(params)
    args = (jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(ctx))
    t0 = time.perf_counter()
    fwd(params, *args).block_until_ready()
    compile_s = time.perf_counter() - t0

    tx, tt, tc = (torch.tensor(a, device=device) for a in (x, t, ctx))
    tx, tc = tx.to(tdtype), tc.to(tdtype)

    def torch_fwd():
        with torch.no_grad():
            tm(tx, tt, tc)
        sync()

    torch_fwd()
    med = _interleaved_medians({"jaxdiff": lambda: fwd(params, *args).block_until_ready(),
                                "torch": torch_fwd}, repeats)
    return _result("unet_forward", size, dtype_name, batch, dict(latent=[side, side]),
                   med["jaxdiff"], med["torch"], compile_s, torch.get_num_threads())


def bench_vae(size, repeats, dtype_name, torch_threads=None):
    """VAE decoder, unscaled latents -> image (the per-image cost after sampling)."""
    import jax
    import jax.numpy as jnp
    from diffusers import AutoencoderKL as TorchVAE
    from jaxdiff.models import AutoencoderKL
    from jaxdiff.weights import load_component
    from torchref.models import perturb

    torch, device, tdtype, sync = _torch_setup(dtype_name, torch_threads)
    kwargs, batch, side = VAE_SIZES[size]
    tm = perturb(TorchVAE(**kwargs), scale=0.02)
    with tempfile.TemporaryDirectory() as d:
        tm.save_pretrained(d, safe_serialization=True)
        module, params = load_component(d, "vae")
    tm = tm.to(device=device, dtype=tdtype)
    module = module.clone(dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype_name])
    f = module.config.downscale
    z = np.random.default_rng(0).standard_normal(
        (batch, module.config.latent_channels, side // f, side // f)).astype(np.float32)

    dec = jax.jit(lambda p, z: module.apply({"params": p}, z, method=AutoencoderKL.decode))
    params = jax.device_put(params)
    jz = jnp.asarray(z.transpose(0, 2, 3, 1))
    t0 = time.perf_counter()
    dec(params, jz).block_until_ready()
    compile_s = time.perf_counter() - t0
    tz = torch.tensor(z, device=device).to(tdtype)

    def torch_dec():
        with torch.no_grad():
            tm.decode(tz)
        sync()

    torch_dec()
    med = _interleaved_medians({"jaxdiff": lambda: dec(params, jz).block_until_ready(),
                                "torch": torch_dec}, repeats)
    return _result("vae_decode", size, dtype_name, batch, dict(image=[side, side]),
                   med["jaxdiff"], med["torch"], compile_s, torch.get_num_threads())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--components", nargs="+", default=["unet"], choices=("unet", "vae"))
    ap.add_argument("--sizes", nargs="+", default=["tiny", "reduced"], choices=list(SIZES))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch.set_num_threads; torch's OpenMP pool degrades badly when other "
                         "processes hold the cores (loadavg_1m above the core count)")
    args = ap.parse_args()
    benches = {"unet": bench_unet, "vae": bench_vae}
    for component in args.components:
        for size in args.sizes:
            print(json.dumps(benches[component](size, args.repeats, args.dtype,
                                                  args.torch_threads)), flush=True)


if __name__ == "__main__":
    main()
