"""Roofline and memory of the real model sizes, from XLA itself, without any weights.

    python bench/roofline.py --out runs/roofline.json                 # everything (~1 h CPU)
    python bench/roofline.py --models sd15 --programs unet --no-compile   # lowering only
    python bench/roofline.py --models tiny --programs unet generate p2p train --steps 2

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
- ``train``: a DreamBooth full fine-tune step (prior preservation: B instance + B class
  rows, frozen text encoder, AdamW), as ``training.dreambooth`` builds it.

Attention is traced as on an accelerator (``JAXDIFF_ATTENTION=xla``: one fused op; its
memory is the materialised [B, heads, L, L] scores, more than a flash kernel needs).
XLA's cost analysis counts a loop body once (it does not know trip counts), so for
``generate`` the per-image work is the whole program's count plus (steps - 1) UNet calls;
the record keeps the raw count too. XLA:CPU traces the CPU form of the 2x upsampling
convolution (sub-pixel: 4 taps instead of 9); ``flops_accelerator`` adds back the taps an
accelerator computes (by ``unet_flops``, the hand count of convolutions and matmuls,
recorded as ``hand_flops``; like XLA it leaves out taps on zero padding), and the
roofline uses it.

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
import contextlib
import functools
import json
import os
import sys
import time

if "--devices" in sys.argv:  # forced host devices for the FSDP memory plan (before jax)
    _n = sys.argv[sys.argv.index("--devices") + 1]
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={_n}").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxdiff import parallel, sampling  # noqa: E402
from jaxdiff.models.clip_text import (CLIPTextConfig, CLIPTextModel,  # noqa: E402
                                      CLIPTextModelWithProjection, CLIPTextProjectionConfig)
from jaxdiff.models.unet import UNet2DConditionModel, UNetConfig  # noqa: E402
from jaxdiff.models.vae import AutoencoderKL, VAEConfig  # noqa: E402
from jaxdiff.pipeline import Pipeline, dummy_inputs  # noqa: E402
from jaxdiff.schedules import SchedulerConfig  # noqa: E402
from jaxdiff.training import dreambooth  # noqa: E402
from jaxdiff.training import state as state_lib  # noqa: E402
from jaxdiff.training.loop import compile_step  # noqa: E402
from jaxdiff.training.optim import constant_adamw  # noqa: E402
from jaxdiff.training.step import make_train_step  # noqa: E402

HARDWARE = {"h100": (989e12, 3.35e12), "tpu_v5e": (197e12, 819e9)}  # bf16 FLOP/s, B/s
ANCHORS = {  # published seconds per image (issue #20)
    "sd15_generate_h100_pcie_diffusers_sdpa": 1.44,
    "sd15_generate_h100_pcie_diffusers_compiled": 1.11,
    "sd15_generate_h100_pcie_tensorrt": 0.75,
    "sdxl_generate_tpu_v4_flax": 2.7 / 4,
    "sd15_null_text_p2p_a100": 60.0,
}
_VAE_SD = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
               down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4)
_SD_SCHED = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 steps_offset=1, set_alpha_to_one=False)
MODELS = {  # name: (unet, vae, text encoder (None: UNet only), scheduler, image side)
    "sd15": (dict(cross_attention_dim=768), _VAE_SD, {}, _SD_SCHED, 512),
    "sd21v": (dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                   use_linear_projection=True, upcast_attention=True, sample_size=96),
              _VAE_SD, dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                            num_attention_heads=16, hidden_act="gelu"),
              dict(_SD_SCHED, prediction_type="v_prediction"), 768),
    "sdxl": (dict(sample_size=128, block_out_channels=(320, 640, 1280),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                    "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                  use_linear_projection=True, cross_attention_dim=2048,
                  addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816),
             dict(_VAE_SD, scaling_factor=0.13025),
             dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, hidden_act="quick_gelu"), _SD_SCHED, 1024),
    "tiny": (dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=32, attention_head_dim=4, sample_size=16),
             dict(block_out_channels=(32, 64), norm_num_groups=8,
                  down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2),
             dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=16), _SD_SCHED, 32),
}
CTX_LEN = 77
TEXT_2 = {  # SDXL's second encoder (OpenCLIP-bigG with projection)
    "sdxl": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, hidden_act="gelu", projection_dim=1280)}


def build(name: str, dtype="float32", remat: bool = False) -> Pipeline:
    """The pipeline of ``MODELS[name]`` computing in ``dtype`` (no tokenizer, no weights)."""
    unet_kw, vae_kw, text_kw, sched_kw, _ = MODELS[name]
    dt = jnp.dtype(dtype)
    unet = UNet2DConditionModel(UNetConfig(**unet_kw), dtype=dt, remat=remat)
    text = None if text_kw is None else CLIPTextModel(CLIPTextConfig(**text_kw), dtype=dt)
    text_2 = (CLIPTextModelWithProjection(CLIPTextProjectionConfig(**TEXT_2[name]), dtype=dt)
              if name in TEXT_2 else None)
    return Pipeline(unet=unet, vae=AutoencoderKL(VAEConfig(**vae_kw), dtype=dt),
                    text_encoder=text, tokenizer=None, scheduler=SchedulerConfig(**sched_kw),
                    text_encoder_2=text_2)


def abstract_params(pipe: Pipeline) -> dict:
    """``{"text_encoder", "unet", "vae"}`` (SDXL: and ``"text_encoder_2"``) as float32
    ``ShapeDtypeStruct`` trees."""
    out = {}
    for kind in ("text_encoder", "unet", "vae", "text_encoder_2"):
        module = getattr(pipe, kind)
        if module is None:
            continue
        args = dummy_inputs(module, kind)
        out[kind] = jax.eval_shape(lambda k, a=args, m=module: m.init(k, *a)["params"],
                                   jax.random.key(0))
    return out


def _added(cfg, b):
    """SDXL's added conditions (pooled text embeds and 6 time ids) for batch ``b``."""
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return {"text_embeds": jnp.zeros((b, pooled)), "time_ids": jnp.zeros((b, 6))}


def _sds(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


@contextlib.contextmanager
def accelerator_attention():
    """Traces attention as an accelerator runs it (one fused ``jax.nn.dot_product_attention``
    instead of XLA:CPU's blockwise loop, whose body XLA's count would see once)."""
    old = os.environ.get("JAXDIFF_ATTENTION")
    os.environ["JAXDIFF_ATTENTION"] = "xla"
    try:
        yield
    finally:
        if old is None:
            del os.environ["JAXDIFF_ATTENTION"]
        else:
            os.environ["JAXDIFF_ATTENTION"] = old


def analyse(lowered, compile_: bool) -> dict:
    """FLOPs, bytes, intensity (and memory when compiled) of a lowered program."""
    rec = {}
    if compile_:
        t0 = time.perf_counter()
        compiled = lowered.compile()
        rec["compile_s"] = round(time.perf_counter() - t0, 1)
        cost, mem = compiled.cost_analysis(), compiled.memory_analysis()
        rec["source"] = "compiled"
        if mem is not None:
            for k in ("argument", "output", "alias", "temp"):
                rec[f"{k}_gb"] = getattr(mem, f"{k}_size_in_bytes") / 1e9
            rec["peak_gb"] = (rec["argument_gb"] + rec["output_gb"] - rec["alias_gb"]
                              + rec["temp_gb"])
    else:
        cost, rec["source"] = lowered.cost_analysis(), "lowered"
    if isinstance(cost, (list, tuple)):  # older jax returns one dict per device program
        cost = cost[0]
    rec["flops"] = float(cost.get("flops", 0.0))
    rec["bytes"] = float(cost.get("bytes accessed", 0.0))
    rec["intensity"] = rec["flops"] / max(rec["bytes"], 1.0)
    return rec


# --- The hand count (convolutions and matmuls only; elementwise work not counted). ---

def _conv(b, taps, cin, cout):
    """FLOPs of a convolution with ``taps`` (output pixel, kernel tap) pairs per image."""
    return 2 * b * taps * cin * cout


def _taps(n, kind, padded):
    """(output pixel, kernel tap) pairs along one axis of input length ``n``: "same" 3x3,
    "down" (stride 2), "up" (3x3 after nearest 2x) or "subpixel" (XLA:CPU's 2x2 phases);
    ``padded=False`` leaves out taps on zero padding (XLA's cost analysis does)."""
    full, pad = {"same": (3 * n, 2), "down": (3 * (n // 2), 1), "up": (6 * n, 2),
                 "subpixel": (4 * n, 2)}[kind]
    return full if padded else full - pad


def _resnet(b, h, w, cin, cout, temb, padded):
    t = _taps(h, "same", padded) * _taps(w, "same", padded)
    f = _conv(b, t, cin, cout) + _conv(b, t, cout, cout) + 2 * b * temb * cout
    return f + (_conv(b, h * w, cin, cout) if cin != cout else 0)


def _transformer(b, hw, c, heads, dh, layers, ctx_len, ctx_dim):
    inner = heads * dh
    f = _conv(b, hw, c, inner) + _conv(b, hw, inner, c)                 # proj_in / proj_out
    per = (4 * _conv(b, hw, inner, inner) + 4 * b * hw * hw * inner      # self-attention
           + 2 * _conv(b, hw, inner, inner) + 2 * _conv(b, ctx_len, ctx_dim, inner)
           + 4 * b * hw * ctx_len * inner                                # cross-attention
           + _conv(b, hw, inner, 8 * inner) + _conv(b, hw, 4 * inner, inner))  # GEGLU
    return f + layers * per


def unet_flops(cfg: UNetConfig, b: int, h: int, w: int, ctx_len: int,
               subpixel_upsample: bool = False, padded: bool = True) -> int:
    """FLOPs (2 per multiply-add) of the convolutions and matmuls of one UNet call on
    latents [b, h, w, in_channels] and a context of ``ctx_len`` tokens, counted from the
    architecture (diffusers' SD 1.x / 2.x / SDXL UNet). ``subpixel_upsample``: count the 2x
    upsampling convolutions as XLA:CPU runs them (4 taps per output pixel, not 9);
    ``padded=False``: leave out kernel taps that fall on zero padding, as XLA counts."""
    boc, temb = cfg.block_out_channels, 4 * cfg.block_out_channels[0]
    conv3 = lambda kind, y, x: _taps(y, kind, padded) * _taps(x, kind, padded)
    f = 2 * b * (boc[0] * temb + temb * temb)                            # time embedding
    if getattr(cfg, "text_time", False):                                 # SDXL add_embedding
        f += 2 * b * (cfg.projection_class_embeddings_input_dim * temb + temb * temb)
    f += _conv(b, conv3("same", h, w), cfg.in_channels, boc[0])          # conv_in
    c, skips = boc[0], [boc[0]]
    model = UNet2DConditionModel(cfg)
    for st in model.plan():
        out = st["out_channels"]
        tr = lambda ch: _transformer(b, h * w, ch, st["heads"], ch // st["heads"],
                                     st["transformer_layers"], ctx_len, cfg.cross_attention_dim)
        if st["resample"] == "mid":
            f += 2 * _resnet(b, h, w, c, c, temb, padded) + tr(c)
            continue
        for _ in range(st["num_resnets"]):
            cin = c + (skips.pop() if st["name"].startswith("up") else 0)
            f += _resnet(b, h, w, cin, out, temb, padded) + (tr(out) if st["cross"] else 0)
            c = out
            if st["name"].startswith("down"):
                skips.append(c)
        if st["resample"] == "down":
            f += _conv(b, conv3("down", h, w), c, c)
            h, w = h // 2, w // 2
            skips.append(c)
        elif st["resample"] == "up":
            f += _conv(b, conv3("subpixel" if subpixel_upsample else "up", h, w), c, c)
            h, w = 2 * h, 2 * w
    return f + _conv(b, conv3("same", h, w), boc[0], cfg.out_channels)  # conv_out


def upsample_extra_flops(cfg: UNetConfig, b: int, h: int, w: int) -> int:
    """FLOPs an accelerator's 9-tap 2x upsampling convolutions add over XLA:CPU's 4-tap
    sub-pixel form, for one UNet call, counted as XLA does (no padding taps)."""
    return (unet_flops(cfg, b, h, w, 1, padded=False)
            - unet_flops(cfg, b, h, w, 1, subpixel_upsample=True, padded=False))


# --- The programs, jitted once at module level (the pipeline is a static argument). ---

@functools.partial(jax.jit, static_argnames=("pipe",))
def unet_call(pipe, params, x, t, context, added=None):
    extra = {} if added is None else {"added_cond_kwargs": added}   # SDXL only
    return pipe.unet.apply({"params": params["unet"]}, x, t, context, **extra)


@functools.partial(jax.jit, static_argnames=("pipe",))
def unet_context_vjp(pipe, params, x, t, context):
    """Forward and backward of one UNet call with respect to its context (the work of one
    null-text inner Adam step)."""
    out, vjp = jax.vjp(lambda c: pipe.unet.apply({"params": params["unet"]}, x, t, c),
                       context)
    return vjp(out)[0]


@functools.partial(jax.jit, static_argnames=("pipe",))
def encode_images(pipe, params, images):
    return pipe.encode_images(params, images)


@functools.partial(jax.jit, static_argnames=("pipe",))
def decode_latents(pipe, params, latents):
    return pipe.decode_latents(params, latents)


@functools.partial(jax.jit, static_argnames=("pipe",))
def encode_text(pipe, params, ids):
    return pipe.encode_text(params, ids)


class Analyser:
    """Lowers (and compiles) programs of one model, caching each record by name."""

    def __init__(self, name: str, compile_: bool, dtype: str = "float32"):
        self.name, self.compile = name, compile_
        self.pipe = build(name, dtype)
        self.params = abstract_params(self.pipe)
        self.side = MODELS[name][4]
        self.latent = self.pipe.latent_shape(self.side, self.side)
        self.ctx = (self.pipe.text_encoder.config.max_position_embeddings
                    if self.pipe.text_encoder is not None else CTX_LEN)
        self.records = {}

    def ids(self, rows: int):
        """Token ids of ``rows`` prompts: [rows, L], SDXL [rows, 2, L] (both tokenizers)."""
        return _sds((rows, 2, self.ctx) if self.pipe.is_sdxl else (rows, self.ctx), jnp.int32)

    def _run(self, key, lower):
        if key not in self.records:
            t0 = time.perf_counter()
            with accelerator_attention():
                lowered = lower()
            rec = {"lower_s": round(time.perf_counter() - t0, 1)}
            rec.update(analyse(lowered, self.compile))
            self.records[key] = rec
        return self.records[key]

    def unet(self, rows: int) -> dict:
        cfg = self.pipe.unet.config
        added = _sds_tree(_added(cfg, rows)) if getattr(cfg, "text_time", False) else None
        dim = cfg.cross_attention_dim
        rec = dict(self._run(("unet", rows), lambda: unet_call.lower(
            self.pipe, self.params, _sds((rows,) + self.latent), _sds((rows,)),
            _sds((rows, self.ctx, dim)), added)))
        rec["flops_accelerator"] = rec["flops"] + upsample_extra_flops(cfg, rows, *self.latent[:2])
        rec["hand_flops"] = unet_flops(cfg, rows, *self.latent[:2], self.ctx, padded=False)
        return rec

    def unet_vjp(self, rows: int) -> dict:
        dim = self.pipe.unet.config.cross_attention_dim
        rec = dict(self._run(("vjp", rows), lambda: unet_context_vjp.lower(
            self.pipe, self.params, _sds((rows,) + self.latent), _sds((rows,)),
            _sds((rows, self.ctx, dim)))))
        rec["flops_accelerator"] = rec["flops"] + 2 * upsample_extra_flops(
            self.pipe.unet.config, rows, *self.latent[:2])   # forward + input gradient
        return rec

    def vae(self, kind: str, rows: int) -> dict:
        if kind == "encode":
            return self._run(("encode", rows), lambda: encode_images.lower(
                self.pipe, self.params, _sds((rows, self.side, self.side, 3))))
        return self._run(("decode", rows), lambda: decode_latents.lower(
            self.pipe, self.params, _sds((rows,) + self.latent)))

    def text(self, rows: int) -> dict:
        return self._run(("text", rows), lambda: encode_text.lower(
            self.pipe, self.params, self.ids(rows)))

    def generate(self, b: int, steps: int) -> dict:
        """The whole generation program; per-image work adds the (steps - 1) loop
        iterations XLA's count leaves out (module docstring)."""
        prog = sampling.generation_program(self.pipe, "ddim", steps,
                                           mesh=parallel.make_mesh(jax.devices()[:1]))
        keys = jax.eval_shape(lambda: sampling.sample_keys(0, b))
        ids = self.ids(b)
        rec = dict(self._run(("generate", b, steps), lambda: prog.lower(
            self.params, ids, ids, _sds((b,) + self.latent), keys, _sds(()), _sds(()),
            _sds(()), ())))
        unet = self.unet(2 * b)
        rec["flops_raw"], rec["bytes_raw"] = rec["flops"], rec["bytes"]
        rec["flops"] = rec["flops_raw"] + (steps - 1) * unet["flops"]
        rec["bytes"] = rec["bytes_raw"] + (steps - 1) * unet["bytes"]
        rec["flops_accelerator"] = rec["flops"] + steps * (unet["flops_accelerator"]
                                                           - unet["flops"])
        parts = (2 * self.text(b)["flops"] + unet["flops"] + self.vae("decode", b)["flops"])
        rec["raw_over_parts"] = rec["flops_raw"] / parts   # ~1: the loop body counted once
        rec["intensity"] = rec["flops"] / max(rec["bytes"], 1.0)
        return rec

    def p2p(self, b: int, steps: int, inner: int = 10) -> dict:
        """Null-text inversion + P2P of ``b`` images, composed from its parts (module
        docstring): encode, 3 prompts, inversion (steps x UNet(b)), null-text (steps x
        [UNet(b) + inner x VJP(b) + UNet(2b)]), edit (steps x UNet(4b)), 2 decodes."""
        f1, f2, f4, g1 = self.unet(b), self.unet(2 * b), self.unet(4 * b), self.unet_vjp(b)
        enc, dec, txt = self.vae("encode", b), self.vae("decode", b), self.text(b)
        terms = ((enc, 1), (txt, 3), (f1, 2 * steps), (g1, inner * steps), (f2, steps),
                 (f4, steps), (dec, 2))
        rec = {"source": "composed from " + "/".join(sorted({t["source"] for t, _ in terms})),
               "inner_steps": inner}
        for k in ("flops", "bytes"):
            rec[k] = sum(t[k] * n for t, n in terms)
        rec["flops_accelerator"] = sum(t.get("flops_accelerator", t["flops"]) * n
                                       for t, n in terms)
        rec["intensity"] = rec["flops"] / max(rec["bytes"], 1.0)
        if "peak_gb" in g1:
            rec["peak_gb_largest_part"] = max(t.get("peak_gb", 0.0) for t, _ in terms)
        return rec


def _sds_tree(tree):
    return jax.tree.map(lambda x: _sds(x.shape, x.dtype), tree)


def train_step(name: str, b: int, dtype: str, remat: bool, fsdp: int, compile_: bool) -> dict:
    """One DreamBooth full fine-tune step (``training.dreambooth``'s loss, AdamW, donated
    state) with ``b`` instance + ``b`` class rows per device, the state FSDP-sharded over
    ``fsdp`` devices (``parallel.DEFAULT_RULES``). Memory figures are per device."""
    pipe = build(name, dtype, remat)
    params = abstract_params(pipe)
    trainable = dreambooth.make_trainable({"unet": params["unet"]})
    loss = dreambooth.make_dreambooth_loss(pipe, trainable.merge, train_text_encoder=False,
                                           prior_preservation=True)
    opt = constant_adamw(5e-6)
    state = jax.eval_shape(lambda p: state_lib.create(p, opt, 0, ema=False), trainable.params)
    mesh = parallel.make_mesh(jax.devices()[:fsdp], fsdp=fsdp)
    shardings = parallel.tree_shardings(
        jax.tree.map(lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape), state), mesh)
    jstep = compile_step(make_train_step(loss, opt), shardings,
                         parallel.train_batch_sharding(mesh))
    rows = b * fsdp
    side = MODELS[name][4]
    lat = pipe.latent_shape(side, side)
    text = (rows, pipe.text_encoder.config.max_position_embeddings,
            pipe.unet.config.cross_attention_dim)
    batch = {"instance_latents": _sds((rows,) + lat), "class_latents": _sds((rows,) + lat),
             "instance_text": _sds(text), "class_text": _sds(text),
             "prior_weight": _sds((rows,))}
    t0 = time.perf_counter()
    with accelerator_attention():
        lowered = jstep.lower(state, batch)
    rec = {"model": name, "program": "train", "batch_per_device": b, "dtype": dtype,
           "remat": remat, "fsdp": fsdp, "lower_s": round(time.perf_counter() - t0, 1)}
    rec.update(analyse(lowered, compile_))
    for limit in (16, 80):
        if "peak_gb" in rec:
            rec[f"fits_{limit}gb"] = rec["peak_gb"] <= limit
    return rec


def roofline(rec: dict, images: int) -> dict:
    """Seconds per image >= max(FLOPs / peak, bytes / bandwidth), per device of HARDWARE."""
    flops = rec.get("flops_accelerator", rec["flops"])
    out = {}
    for hw, (peak, bw) in HARDWARE.items():
        out[f"{hw}_compute_s"] = flops / peak / images
        out[f"{hw}_memory_s"] = rec["bytes"] / bw / images
        out[f"{hw}_s_per_image"] = max(flops / peak, rec["bytes"] / bw) / images
        out[f"{hw}_bound"] = "compute" if flops / peak >= rec["bytes"] / bw else "memory"
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["sd15", "sd21v", "sdxl"],
                    choices=sorted(MODELS))
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
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="lowered cost analysis only (no memory figures)")
    ap.add_argument("--out", default="", help="also write the records to this JSON file")
    args = ap.parse_args(argv)
    if max(args.fsdp) > len(jax.devices()):
        ap.error(f"--fsdp {max(args.fsdp)} needs --devices {max(args.fsdp)} "
                 f"(this process has {len(jax.devices())}).")
    records = []

    def emit(rec):
        records.append(rec)
        print(json.dumps(rec), flush=True)

    for name in args.models:
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
                                emit(train_step(name, b, dt, remat == "on", n, args.compile))
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


if __name__ == "__main__":
    main()
