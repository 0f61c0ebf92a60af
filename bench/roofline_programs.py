"""bench/roofline.py's programs and their analysis: each lowered from abstract shapes and
(optionally) compiled, for this host's backend or a deviceless TPU target.

``analyse`` reads ``cost_analysis()`` / ``memory_analysis()``; ``Analyser`` lowers the
programs of one SD-style model (UNet call, generation, null-text + P2P composed from
parts; the DiT / PixArt ones are ``roofline_transformers.TransformerAnalyser``'s),
``train_step`` a DreamBooth step
over an FSDP mesh, ``roofline`` the seconds-per-image floor. ``target_devices``: the host's
devices, or with ``"tpu_v5e:2x4"``-style targets a TPU topology from libtpu without any TPU
attached (programs are then compiled for that TPU: its memory-aware scheduler and buffer
assignment, and its cost model's ``optimal_seconds``).
"""
from __future__ import annotations

import contextlib
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import parallel, sampling
from jaxdiff.training import dreambooth
from jaxdiff.training import state as state_lib
from jaxdiff.training.loop import compile_step
from jaxdiff.training.optim import constant_adamw
from jaxdiff.training.step import make_train_step

from roofline_count import unet_flops, upsample_extra_flops  # noqa: E402  (bench/)
from roofline_models import (CTX_LEN, HARDWARE, MODELS, abstract_params,  # noqa: E402
                             build)


def target_devices(target: str = "host") -> list:
    """The devices programs are compiled for: ``"host"`` (``jax.devices()``) or a TPU
    topology such as ``"tpu_v5e:2x4"`` (needs libtpu importable; no TPU needed)."""
    if target == "host":
        return jax.devices()
    kind, _, shape = target.partition(":")
    if not kind.startswith("tpu_") or not shape:
        raise ValueError(f"--target {target!r}: use 'host' or a TPU topology such as "
                         "'tpu_v5e:2x4'.")
    from jax.experimental import topologies
    try:
        topo = topologies.get_topology_desc(platform="tpu",
                                            topology_name=f"{kind[4:]}:{shape}")
    except Exception as e:  # noqa: BLE001  (libtpu missing or the name unknown)
        raise SystemExit(f"--target {target}: no TPU topology ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}); install libtpu "
                         "(pip install libtpu) to compile for a TPU without one.") from None
    return list(topo.devices)


def _added(cfg, b):
    """SDXL's added conditions (pooled text embeds and 6 time ids) for batch ``b``."""
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return {"text_embeds": jnp.zeros((b, pooled)), "time_ids": jnp.zeros((b, 6))}


def _sds(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


@contextlib.contextmanager
def accelerator_attention(impl: str = "xla"):
    """Traces attention as an accelerator runs it (``JAXDIFF_ATTENTION=impl``; "xla": one
    fused ``jax.nn.dot_product_attention`` instead of XLA:CPU's blockwise loop, whose body
    XLA's count would see once; "splash": the TPU Pallas kernel, for a TPU target)."""
    old = os.environ.get("JAXDIFF_ATTENTION")
    os.environ["JAXDIFF_ATTENTION"] = impl
    try:
        yield
    finally:
        if old is None:
            del os.environ["JAXDIFF_ATTENTION"]
        else:
            os.environ["JAXDIFF_ATTENTION"] = old


# XLA:CPU expands the optimization barriers jax.checkpoint puts on a recomputation before
# layout assignment; CSE then merges the recomputed forward into the saved one and remat
# saves no memory. XLA:GPU and TPU expand them after scheduling. Compiling for the CPU with
# that pass off keeps remat (the program runs the same; bench/README.md "Memory plan").
CPU_KEEP_REMAT = {"xla_disable_hlo_passes": "cse_barrier_expander"}


def analyse(lowered, compile_: bool, platform: str = "") -> dict:
    """FLOPs, bytes, intensity (and memory when compiled, for ``platform``'s compiler,
    default this host's; ``CPU_KEEP_REMAT`` on "cpu") of a lowered program."""
    rec = {}
    if compile_:
        t0 = time.perf_counter()
        cpu = (platform or jax.default_backend()) == "cpu"
        compiled = lowered.compile(CPU_KEEP_REMAT if cpu else None)
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
    if "optimal_seconds" in cost:  # a TPU target's cost model
        rec["tpu_cost_model_s"] = float(cost["optimal_seconds"])
    return rec


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


def cached_analysis(records: dict, key, lower, compile_: bool) -> dict:
    """``records[key]``, made on first use: ``lower()`` timed (under the accelerator
    attention setting) and its ``analyse`` record."""
    if key not in records:
        t0 = time.perf_counter()
        with accelerator_attention():
            lowered = lower()
        rec = {"lower_s": round(time.perf_counter() - t0, 1)}
        rec.update(analyse(lowered, compile_))
        records[key] = rec
    return records[key]


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
        return cached_analysis(self.records, key, lower, self.compile)

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
            _sds(()), _sds((2,)), (), None, None, None)))
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


def train_step(name: str, b: int, dtype: str, remat: bool, fsdp: int, compile_: bool,
               devices=None, attention: str = "xla") -> dict:
    """One DreamBooth full fine-tune step (``training.dreambooth``'s loss, AdamW, donated
    state) with ``b`` instance + ``b`` class rows per device, the state FSDP-sharded over
    ``fsdp`` of ``devices`` (default: this host's; ``target_devices``) by
    ``parallel.DEFAULT_RULES``. Memory figures are per device."""
    devices = jax.devices() if devices is None else devices
    pipe = dreambooth.compute_pipe(build(name), dtype, remat)   # as the recipe builds it
    params = abstract_params(pipe)
    trainable = dreambooth.make_trainable({"unet": params["unet"]})
    loss = dreambooth.make_dreambooth_loss(pipe, trainable.merge, train_text_encoder=False,
                                           prior_preservation=True)
    opt = constant_adamw(5e-6)
    state = jax.eval_shape(lambda p: state_lib.create(p, opt, 0, ema=False), trainable.params)
    mesh = parallel.make_mesh(devices[:fsdp], fsdp=fsdp)
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
    with accelerator_attention(attention):
        lowered = jstep.lower(state, batch)
    rec = {"model": name, "program": "train", "batch_per_device": b, "dtype": dtype,
           "remat": remat, "fsdp": fsdp, "device_kind": devices[0].device_kind,
           "attention": attention, "lower_s": round(time.perf_counter() - t0, 1)}
    rec.update(analyse(lowered, compile_, devices[0].platform))
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
