"""Imagic and UniTune, the whole fine-tuning edit job: seconds per image, jaxdiff vs the
PyTorch reference on diffusers (``torchref/imagic.py``), same weights, draws and step counts.

    python bench/finetune_edit_speed.py --torch-threads 1          # CPU: embedded + tiny
    python bench/finetune_edit_speed.py --full --models embedded   # configs/imagic.py's sizes

Models: ``embedded`` (``jaxdiff/assets/shapes``, read by diffusers' ``StableDiffusionPipeline``
from the same files) and ``tiny`` (bench/sample.py's random SD-architecture pipeline, 32 px
images, 16x16 latents). Per image, both sides do the whole job:

* Imagic: VAE encode (posterior mean) -> text encode -> (a) ``--embedding-steps`` AdamW
  steps on the target embedding (model frozen) -> (b) ``--finetune-steps`` AdamW steps on
  rank ``--lora-rank`` LoRA adapters (0: the whole UNet) with e_opt frozen, each step's loss
  over ``--draws`` (t, noise) draws, global-norm clipping at 1 -> (c) DDIM ``--steps`` with
  CFG 7.5 from pure noise for every eta of ``--etas`` -> VAE decode of every variant;
* UniTune: the same without stage (a) (fine-tuned under the rare token "sks"), then
  img2img DDIM from the image noised to every strength of ``--strengths``.

jaxdiff runs ``editing.imagic.imagic`` / ``editing.unitune.unitune`` on the whole batch as
one compiled program (images vmapped, each with its own e_opt and adapters; the variants a
traced vector). The reference loops over the images, one ``TorchTunedEdit.imagic`` /
``.unitune`` call each (torch AdamW + ``clip_grad_norm_``, LoRA by ``functional_call``,
diffusers' DDIMScheduler), then decodes the variants with diffusers' VAE. Its random draws
(per-step timesteps and noise, the start noise, the LoRA ``down`` start) are jaxdiff's own,
derived from each image's key as ``tuned_edit`` derives them (as tests/test_imagic_reference.py
does), made before timing; so the two compute the same thing, and the first torch call is
checked against jaxdiff's output: ``latents_max_abs_diff`` (next to ``latents_max_abs``) and
``edited_max_abs_diff_uint8`` over every image and variant. jaxdiff's time also includes
one VAE decode per image the reference does not do (the reconstruction it returns) and
its own random draws.

Timing: a first jaxdiff call compiles (``jaxdiff_compile_s`` = that call minus the steady
median; persistent compilation cache off, so cold) and the first torch call is the
parity check and warm-up; then ``--repeats`` jaxdiff calls and torch calls alternate (the torch call edits the batch one
image after another); medians. One JSON line per (model, method, batch) with
``jaxdiff_s_per_image``, ``torch_s_per_image``, ``speedup`` = torch / jaxdiff seconds,
thread counts and the 1-minute load average.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

PROMPT, TOKEN, UNI_PROMPT = "a big red circle on a black background", "sks", "a blue circle"
GUIDANCE = 7.5


def stage_settings(args):
    """(imagic.Stages for Imagic, for UniTune, DDIM steps, embedding lr, fine-tuning lr)."""
    from jaxdiff.editing import imagic
    if args.full:
        import importlib.util
        spec = importlib.util.spec_from_file_location(
            "imagic_config", os.path.join(os.path.dirname(__file__), "..", "configs",
                                          "imagic.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        c = mod.get_config("")
        sizes = dict(embedding_steps=c.embedding_steps, finetune_steps=c.finetune_steps,
                     lora_rank=c.lora_rank, draws=c.draws)
        steps, lrs = 50, (c.embedding_lr, c.finetune_lr)
    else:
        sizes = dict(embedding_steps=20, finetune_steps=40, lora_rank=4, draws=2)
        steps, lrs = 10, (1e-3, 1e-3)
    for k in sizes:  # explicit flags win
        if getattr(args, k) is not None:
            sizes[k] = getattr(args, k)
    steps = args.steps or steps
    stages = imagic.Stages(**sizes)
    return stages, stages._replace(embedding_steps=0), steps, lrs


def draws(key, steps: int, n: int, shape, timesteps: int):
    """(timesteps [steps, n], noise [steps, n, C, h, w]) of ``imagic.fit``'s loss: step s
    uses fold_in(key, s), split into the timestep and noise keys (``losses.denoising_loss``)."""
    import jax
    import jax.numpy as jnp

    def one(s):
        k_t, k_n = jax.random.split(jax.random.fold_in(key, s))
        return (jax.random.randint(k_t, (n,), 0, timesteps),
                jax.random.normal(k_n, (n,) + shape))

    t, noise = jax.vmap(one)(jnp.arange(steps))
    return np.asarray(t), np.asarray(noise).transpose(0, 1, 4, 2, 3)


def torch_lora(adapters):
    """jaxdiff adapters -> {torch module: (lora_A [r, in], lora_B [out, r])} (numpy)."""
    import jax

    from jaxdiff.adapters import lora as lora_lib
    sd = lora_lib.to_state_dict(jax.tree.map(np.asarray, adapters))
    names = sorted(k[len("unet."):-len(".lora_A.weight")] for k in sd if "lora_A" in k)
    return {m: (sd[f"unet.{m}.lora_A.weight"], sd[f"unet.{m}.lora_B.weight"]) for m in names}


def load_model(name, folder):
    """(jaxdiff pipe, params, diffusers StableDiffusionPipeline) of ``name``."""
    import torch
    from diffusers import StableDiffusionPipeline

    import jaxdiff
    from jaxdiff.weights.diffusers_format import DEFAULT_MODEL
    if name == "tiny":
        import sample as sample_bench  # bench/sample.py
        sample_bench.build_pipeline("tiny", folder)
    else:
        folder = DEFAULT_MODEL
    pipe, params = jaxdiff.load_pipeline(folder)
    tpipe = StableDiffusionPipeline.from_pretrained(  # the embedded folder is float16
        folder, safety_checker=None, torch_dtype=torch.float32)
    return pipe, params, tpipe


def bench_model(name, args, torch):
    import jax

    from jaxdiff import schedules
    from jaxdiff.data import WorldSpec, held_out_examples
    from jaxdiff.editing import batch_inputs, imagic, unitune
    from jaxdiff.pipeline import to_uint8
    from jaxdiff.training import dreambooth
    from torchref.imagic import TorchTunedEdit

    st_imagic, st_unitune, steps, (emb_lr, ft_lr) = stage_settings(args)
    with tempfile.TemporaryDirectory() as folder:
        pipe, params, tpipe = load_model(name, folder)
    params = jax.device_put(params)
    ref = TorchTunedEdit(torch, tpipe, steps, GUIDANCE)
    n_max = max(args.batch)
    examples = held_out_examples(WorldSpec(), n_max, num_objects=1)
    images = np.stack([ex["image"] for ex in examples]).astype(np.float32) / 127.5 - 1.0
    side = images.shape[1]  # 32 px world images (the tiny model's native side is 16)
    timesteps = len(schedules.alphas_cumprod(pipe.scheduler))
    sf = tpipe.vae.config.scaling_factor

    def decode(lat):
        with torch.no_grad():
            return tpipe.vae.decode(lat / sf).sample.permute(0, 2, 3, 1).numpy()

    rows = []
    for method, stages in (("imagic", st_imagic), ("unitune", st_unitune)):
        if method not in args.methods:
            continue
        lora = (torch_lora(dreambooth.make_trainable(params, lora_rank=stages.lora_rank).params)
                if stages.lora_rank else None)
        keys = batch_inputs.image_keys(0, n_max)
        z_shape = None
        per_image = []
        for i in range(n_max):  # each image's draws, as tuned_edit derives them
            if z_shape is None:
                z = ref.encode(images[i])
                z_shape = tuple(z.shape[2:]) + (z.shape[1],)
            k_emb, k_ft, k_noise = jax.random.split(keys[i], 3)
            per_image.append(dict(
                a=draws(k_emb, stages.embedding_steps, stages.draws, z_shape, timesteps),
                b=draws(k_ft, stages.finetune_steps, stages.draws, z_shape, timesteps),
                noise=np.asarray(jax.random.normal(k_noise, z_shape)).transpose(2, 0, 1)[None]))

        def torch_job(n):
            outs = []
            for i in range(n):
                d = per_image[i]
                if method == "imagic":
                    r = ref.imagic(images[i], PROMPT, d["a"], d["b"], d["noise"], args.etas,
                                   embedding_lr=emb_lr, finetune_lr=ft_lr, lora=lora)
                else:
                    r = ref.unitune(images[i], TOKEN, unitune.edit_prompt(TOKEN, UNI_PROMPT),
                                    d["b"], d["noise"], args.strengths,
                                    [0.0] * len(args.strengths), finetune_lr=ft_lr, lora=lora)
                outs.append((r["latents"], decode(torch.tensor(r["latents"]))))
            return outs

        def jax_job(n):
            if method == "imagic":
                out = imagic.imagic(pipe, params, images[:n], PROMPT, etas=args.etas,
                                    embedding_lr=emb_lr, finetune_lr=ft_lr, stages=stages,
                                    steps=steps, guidance_scale=GUIDANCE, seed=0)
            else:
                out = unitune.unitune(pipe, params, images[:n], UNI_PROMPT, token=TOKEN,
                                      strengths=args.strengths, finetune_lr=ft_lr,
                                      stages=stages, steps=steps, guidance_scale=GUIDANCE,
                                      seed=0)
            return jax.block_until_ready(out)

        for n in args.batch:
            t0 = time.perf_counter()
            got = jax_job(n)
            first = time.perf_counter() - t0
            want = torch_job(n)  # also torch's warm-up
            lat_t = np.stack([w[0] for w in want]).transpose(0, 1, 3, 4, 2)
            img_t = np.stack([w[1] for w in want])
            lat_j = np.asarray(got["latents"])
            times = {"jaxdiff": [], "torch": []}
            for _ in range(max(args.repeats, 1)):  # alternately: outside load hits both
                for side_name, fn in (("jaxdiff", jax_job), ("torch", torch_job)):
                    t0 = time.perf_counter()
                    fn(n)
                    times[side_name].append(time.perf_counter() - t0)
            jax_s, torch_s = (float(np.median(times[k])) for k in ("jaxdiff", "torch"))
            rows.append(dict(
                bench="finetune_edit_speed", model=name, method=method, batch=n,
                side=side, ddim_steps=steps, embedding_steps=stages.embedding_steps,
                finetune_steps=stages.finetune_steps, lora_rank=stages.lora_rank,
                draws=stages.draws, embedding_lr=emb_lr if method == "imagic" else 0.0,
                finetune_lr=ft_lr, guidance=GUIDANCE,
                variants=list(args.etas if method == "imagic" else args.strengths),
                jaxdiff_s_per_image=round(jax_s / n, 4),
                torch_s_per_image=round(torch_s / n, 4),
                speedup=round(torch_s / jax_s, 3),
                jaxdiff_compile_s=round(first - jax_s, 2),
                latents_max_abs_diff=float(f"{np.abs(lat_j - lat_t).max():.3g}"),
                latents_max_abs=round(float(np.abs(lat_t).max()), 3),
                edited_max_abs_diff_uint8=int(np.abs(
                    to_uint8(got["edited"]).astype(int) - to_uint8(img_t).astype(int)).max()),
                repeats=max(args.repeats, 1), jax_device=str(jax.devices()[0]),
                xla_cpu_threads=os.cpu_count(), torch_threads=torch.get_num_threads(),
                loadavg_1m=round(os.getloadavg()[0], 2)))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["embedded", "tiny"],
                    choices=["embedded", "tiny"])
    ap.add_argument("--methods", nargs="+", default=["imagic", "unitune"],
                    choices=["imagic", "unitune"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4],
                    help="images per call (jaxdiff: one program; torch: a loop)")
    ap.add_argument("--full", action="store_true",
                    help="configs/imagic.py's stage sizes and DDIM 50 (default: embedding 20, "
                         "fine-tuning 40 steps, 2 draws, LoRA rank 4, DDIM 10)")
    ap.add_argument("--embedding-steps", type=int)
    ap.add_argument("--finetune-steps", type=int)
    ap.add_argument("--lora-rank", type=int, help="0 = the whole UNet is fine-tuned")
    ap.add_argument("--draws", type=int)
    ap.add_argument("--steps", type=int, help="DDIM steps of the edit sampling")
    ap.add_argument("--etas", type=float, nargs="+", default=[0.7, 1.0], help="Imagic")
    ap.add_argument("--strengths", type=float, nargs="+", default=[0.6, 0.8], help="UniTune")
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per side (median)")
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="torch.set_num_threads (default: torch's own)")
    args = ap.parse_args(argv)
    if min(args.batch) < 1:
        raise SystemExit(f"--batch {args.batch}: every batch must be >= 1.")
    import jax
    import torch
    jax.config.update("jax_enable_compilation_cache", False)  # measure cold compiles
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    torch.set_flush_denormal(True)  # as XLA:CPU
    for name in args.models:
        bench_model(name, args, torch)


if __name__ == "__main__":
    main()
