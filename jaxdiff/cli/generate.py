"""``jaxdiff generate``: text-to-image sampling from the command line; writes PNGs + a grid."""
from __future__ import annotations

import os
import time

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxdiff import guidance, parallel, sampling
from jaxdiff.adapters import apply_adapters
from jaxdiff.cli import gligen_args
from jaxdiff.cli import guided_args
from jaxdiff.cli import micro_args, refiner_args
from jaxdiff.control import Control, control_inputs
from jaxdiff.data.images import FITS, load_image, make_grid, save_png, write_json
from jaxdiff.samplers import SAMPLERS
from jaxdiff.samplers.levels import check_apg_sampler
from jaxdiff.weights import load_pipeline
from jaxdiff.weights.control import (SHAPES_ADAPTER, SHAPES_CONTROLNET, load_controlnet,
                                     load_t2i_adapter)
from jaxdiff.weights.hf_cache import is_repo_id
from jaxdiff.weights.loading import is_embedded

SAMPLER_NAMES = tuple(sorted(SAMPLERS))


def add_parser(sub):
    p = sub.add_parser("generate", help="text-to-image sampling; writes PNGs and a grid",
                       description="Generate images with a diffusers-layout pipeline "
                       "(default: the embedded shapes-world model).")
    p.add_argument("--model", default=None,
                   help="diffusers-layout pipeline directory, SD 1.x/2.x/SDXL single "
                   ".safetensors file (A1111/ComfyUI layout), or org/name in the local Hugging "
                   "Face cache, or embedded:shapes (default) / embedded:dit (the text-DiT "
                   "model)")
    p.add_argument("--revision", default=None,
                   help="for --model org/name: a branch or tag under the cache's refs/, or a "
                   "commit hash (default main)")
    p.add_argument("--variant", default=None,
                   help="weight-file variant of a diffusers-layout --model, e.g. fp16 "
                   "(reads *.fp16.safetensors)")
    p.add_argument("--model-config", default=None,
                   help="for a single-file --model: a diffusers folder (or org/name in the "
                   "cache) of the same model giving its configs and tokenizer")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt; repeat the flag for several prompts")
    p.add_argument("--negative-prompt", default=None, help="negative prompt for every image")
    p.add_argument("--sampler", default="dpmpp_2m", choices=SAMPLER_NAMES)
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    p.add_argument("--guidance", type=float, default=5.0, help="CFG scale (default 5.0)")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=(0.0, 1.0),
                   metavar=("START", "END"),
                   help="fractions of the steps where CFG acts, the rest use the conditional "
                        "output alone (default 0 1: every step)")
    p.add_argument("--condition-annealing", type=float, nargs=4, default=None,
                   metavar=("TAU1", "TAU2", "NOISE", "PSI"),
                   help="CADS: Gaussian noise on the prompt embedding at diffusion times above "
                        "TAU1 (only noise above TAU2), rescaled to its statistics and mixed "
                        "by PSI, for more varied images at high guidance (e.g. 0.6 0.9 0.25 "
                        "1; default off)")
    p.add_argument("--apg", type=float, nargs=3, default=None,
                   metavar=("ETA", "THRESHOLD", "MOMENTUM"),
                   help="adaptive projected guidance: CFG on the denoised predictions with "
                        "the update's part along the conditional one weighted by ETA, the "
                        "update averaged over steps with MOMENTUM in (-1, 1) (0: off), then "
                        "clipped to norm THRESHOLD (0: off), for less oversaturation at high "
                        "guidance (1 0 0 is CFG; e.g. 0 0 0; every sampler but heun; default "
                        "off)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="images per compiled program call (default 8)")
    p.add_argument("--height", type=int, default=None, help="pixels (default: model's)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: model's)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute dtype (params stay float32)")
    p.add_argument("--lora", action="append", default=None, metavar="FILE",
                   help="LoRA adapters to merge: a diffusers/peft or kohya/A1111 safetensors "
                   "file (SDXL ones too), or a folder holding pytorch_lora_weights.safetensors;"
                   " repeat for several (their updates add up)")
    p.add_argument("--lora-scale", type=float, action="append", default=None, metavar="S",
                   help="LoRA strength, multiplied by the file's alpha/rank (default 1.0; "
                   "0 = no effect): once for every --lora, or once per --lora")
    p.add_argument("--textual-inversion", default=None,
                   help="learned_embeds.safetensors (file or folder) from Textual Inversion, "
                   "or an SDXL clip_l/clip_g file (placeholder: its file name); the "
                   "placeholder may then be used in --prompt")
    c = p.add_argument_group("spatial control (diffusers ControlNet / T2I-Adapter folders)")
    c.add_argument("--controlnet", action="append", default=[], metavar="DIR",
                   help="ControlNet folder (config.json + diffusion_pytorch_model.safetensors),"
                   " or 'shipped' for the embedded model's segmentation-map ControlNet "
                   "(jaxdiff/assets/shapes_controlnet_seg); repeat for several")
    c.add_argument("--adapter", action="append", default=[], metavar="DIR",
                   help="T2I-Adapter folder, or 'shipped' for the embedded model's edge-map "
                   "adapter (jaxdiff/assets/shapes_adapter_edges); repeat for several")
    c.add_argument("--control-image", action="append", default=[], metavar="PNG",
                   help="condition image: one for every control model, or one per model "
                   "(ControlNets first, then adapters, each in flag order)")
    c.add_argument("--control-scale", type=float, action="append", default=[],
                   help="ControlNet conditioning scale: one for all, or one per --controlnet "
                   "(default 1.0)")
    c.add_argument("--adapter-scale", type=float, action="append", default=[],
                   help="adapter conditioning scale: one for all, or one per --adapter "
                   "(default 1.0)")
    c.add_argument("--control-start", type=float, default=0.0,
                   help="fraction of the steps before ControlNets start acting (default 0)")
    c.add_argument("--control-end", type=float, default=1.0,
                   help="fraction of the steps after which ControlNets stop (default 1)")
    c.add_argument("--guess-mode", action="store_true", help="ControlNet guess mode")
    c.add_argument("--fit", default="resize", choices=FITS,
                   help="condition images of another size: resize (default), centre-crop "
                   "then resize, or reject")
    guided_args.add_arguments(p)
    gligen_args.add_arguments(p)
    refiner_args.add_arguments(p)
    micro_args.add_arguments(p)
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    return p


def _per_model(values, n, flag, default=1.0):
    if not values:
        return [default] * n
    if len(values) not in (1, n):
        raise ValueError(f"{flag} given {len(values)} times for {n} models; give it once, or "
                         "once per model.")
    return values * n if len(values) == 1 else values


def load_controls(args, pipe, height, width):
    """The ``Control`` list of the parsed flags, checked against ``pipe`` (before any compile)."""
    kinds = [(guided_args.shipped_folder(d, SHAPES_CONTROLNET, "--controlnet"),
              load_controlnet, "--controlnet") for d in args.controlnet] + \
        [(guided_args.shipped_folder(d, SHAPES_ADAPTER, "--adapter"), load_t2i_adapter,
          "--adapter") for d in args.adapter]
    if not kinds:
        if args.control_image:
            raise ValueError("--control-image needs a --controlnet or --adapter.")
        return None
    images = args.control_image
    if not images:
        raise ValueError("--controlnet / --adapter need a condition image: pass "
                         "--control-image PNG.")
    if len(images) not in (1, len(kinds)):
        raise ValueError(f"--control-image given {len(images)} times for {len(kinds)} control "
                         "models; give one, or one per model (ControlNets first).")
    scales = (_per_model(args.control_scale, len(args.controlnet), "--control-scale")
              + _per_model(args.adapter_scale, len(args.adapter), "--adapter-scale"))
    controls = []
    for k, (folder, load, flag) in enumerate(kinds):
        model, params = load(folder, pipe.unet.dtype)  # --dtype computes control in it too
        is_cn = flag == "--controlnet"
        model.config.check_matches(pipe.unet.config, pipe.vae_scale_factor,
                                   source=f"{flag} {folder}")
        image = load_image(images[k if len(images) > 1 else 0], (height, width), fit=args.fit)
        if _channels(model) == 1:  # grayscale adapters (sketch): ITU-R 601 luma, as PIL's "L"
            image = np.round(image @ np.array([0.299, 0.587, 0.114]))[..., None].astype(np.uint8)
        controls.append(Control(
            model, params, image, scales[k], args.control_start if is_cn else 0.0,
            args.control_end if is_cn else 1.0, args.guess_mode and is_cn))
    return controls


def _channels(model):
    cfg = model.config
    return getattr(cfg, "conditioning_channels", None) or cfg.in_channels


def run(args) -> int:
    """Runs ``jaxdiff generate`` for parsed ``args``; returns the exit status."""
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}.")
    if args.batch < 1 or args.max_batch < 1:
        raise ValueError("--batch and --max-batch must be >= 1.")
    if args.model is not None and not (os.path.exists(args.model) or is_repo_id(args.model)
                                       or is_embedded(args.model)):
        raise FileNotFoundError(f"--model {args.model}: no such directory or file (nor an "
                                "org/name for the Hugging Face cache, nor embedded:NAME).")
    refiner_args.check_flags(args)
    sampling.check_interval(args.guidance_interval, "--guidance-interval")
    if tuple(args.guidance_interval) != (0.0, 1.0) and (
            args.box or args.refiner or args.classifier or args.clip):
        raise ValueError("--guidance-interval applies to plain and ControlNet/adapter "
                         "sampling; drop it with --box, --refiner, --classifier or --clip.")
    if args.condition_annealing is not None:
        guidance.check_annealing(args.condition_annealing)
        if args.box or args.refiner or args.classifier or args.clip:
            raise ValueError("--condition-annealing applies to plain and ControlNet/adapter "
                             "sampling; drop it with --box, --refiner, --classifier or --clip.")
    if args.apg is not None:
        guidance.check_projection(args.apg)
        check_apg_sampler(args.sampler, "--apg")
        if args.box or args.refiner or args.classifier or args.clip:
            raise ValueError("--apg applies to plain and ControlNet/adapter sampling; drop it "
                             "with --box, --refiner, --classifier or --clip.")
    lora_scales = args.lora_scale or [1.0]
    if args.lora_scale and not args.lora:
        raise ValueError("--lora-scale needs --lora FILE.")
    if args.lora and len(lora_scales) not in (1, len(args.lora)):
        raise ValueError(f"--lora-scale given {len(lora_scales)} times for {len(args.lora)} "
                         "--lora files; give it once, or once per --lora.")
    parallel.maybe_initialize_distributed()
    pipe, params = load_pipeline(args.model, config=args.model_config, revision=args.revision,
                                 variant=args.variant)
    pipe, params, grounding = gligen_args.load_gligen(args, pipe, params)
    if args.dtype == "bfloat16":
        pipe = pipe.with_dtype(jnp.bfloat16)
    pipe, params, expand = apply_adapters(pipe, params, args.lora, lora_scales,
                                          args.textual_inversion)
    jobs = [(p, j) for p in args.prompt for j in range(args.batch)]
    prompts = [p for p, _ in jobs]
    # Check sizes before the progress bar and before anything is written.
    height = pipe.image_size if args.height is None else args.height
    width = pipe.image_size if args.width is None else args.width
    sampling.check_request(pipe, len(prompts), args.steps, height, width, args.sampler)
    refiner = refiner_args.load_refiner(args, pipe, height, width)
    micro = micro_args.load(args, pipe, refiner, height, width)
    guided = guided_args.load_guidance(args, pipe, height, width)
    controls = load_controls(args, pipe, height, width)
    control_inputs(pipe, controls, 1, 1, height, width)
    images, t0 = [], time.perf_counter()
    with tqdm(total=len(jobs), unit="img", desc="generate") as bar:
        for start in range(0, len(jobs), args.max_batch):
            chunk = [expand(p) for p in prompts[start:start + args.max_batch]]
            if guided is not None:  # [S, B, ...]: one row of images per guidance scale
                rows = np.arange(start, start + len(chunk)) // args.batch  # prompt of each
                out = guided_args.generate_chunk(guided, pipe, params, chunk, rows, args, start)
            elif refiner is not None:
                out = refiner_args.generate_chunk(refiner, pipe, params, chunk, args, height,
                                                  width, start, micro)
            elif grounding is not None:
                out = gligen_args.generate_chunk(grounding, pipe, params, chunk, args, height,
                                                 width, start)
            else:
                out = sampling.generate(pipe, params, chunk, args.negative_prompt, args.sampler,
                                       args.steps, args.guidance, args.seed, height=height,
                                       width=width, eta=args.eta, sample_offset=start,
                                       guidance_interval=args.guidance_interval,
                                       condition_annealing=args.condition_annealing,
                                       adaptive_projection=args.apg, control=controls, **micro.base)
            images.append(out)
            bar.update(len(chunk))
            bar.set_postfix(img_per_s=f"{bar.n / (time.perf_counter() - t0):.2f}")
    images = np.concatenate(images, axis=-4)
    per_image = [{}] * len(images)
    if guided is not None:  # scale-major: all images of the first scale, then the next ...
        key = "classifier_scale" if guided.kind == "classifier" else "clip_scale"
        per_image = [{key: s} for s in guided.scales for _ in prompts]
        prompts = [p for _ in guided.scales for p in prompts]
        images = images.reshape((-1,) + images.shape[-3:])
    os.makedirs(args.out, exist_ok=True)
    settings = dict(sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                    seed=args.seed, negative_prompt=args.negative_prompt or "",
                    model=args.model or "embedded:shapes")
    if args.lora:  # one file: its path and scale; several: lists
        one = len(args.lora) == 1 and len(lora_scales) == 1
        settings.update(lora=args.lora[0] if one else args.lora,
                        lora_scale=lora_scales[0] if one else lora_scales)
    if args.textual_inversion:
        settings.update(textual_inversion=args.textual_inversion)
    if tuple(args.guidance_interval) != (0.0, 1.0):
        settings.update(guidance_interval=list(args.guidance_interval))
    if args.condition_annealing is not None:
        settings.update(condition_annealing=list(args.condition_annealing))
    if args.apg is not None:
        settings.update(apg=list(args.apg))
    if guided is not None:
        settings.update(guided.settings(args))
    if controls:
        settings.update(controlnet=args.controlnet, adapter=args.adapter,
                        control_image=args.control_image, control_scale=args.control_scale,
                        adapter_scale=args.adapter_scale, control_start=args.control_start,
                        control_end=args.control_end, guess_mode=args.guess_mode, fit=args.fit)
    if grounding is not None:
        settings.update(grounding.settings(args))
    if refiner is not None:
        settings.update(refiner.settings(args))
    settings.update(micro.settings())
    for i, (img, prompt) in enumerate(zip(images, prompts)):
        save_png(os.path.join(args.out, f"{i:04d}.png"), img,
                  dict(settings, prompt=prompt, index=i, **per_image[i]))
    cols = (len(jobs) if guided is not None and len(guided.scales) > 1 else
            args.batch if len(args.prompt) > 1 else min(len(images), 8))
    save_png(os.path.join(args.out, "grid.png"), make_grid(images, cols), settings)
    write_json(os.path.join(args.out, "settings.json"), dict(settings, prompts=prompts))
    print(f"wrote {len(images)} images and grid.png to {args.out}")
    return 0
