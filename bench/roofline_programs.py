"""bench/roofline.py's programs and their analysis: each lowered from abstract shapes and
(optionally) compiled, for this host's backend or a deviceless TPU target.

``analyse`` reads ``cost_analysis()`` / ``memory_analysis()``; ``Analyser`` lowers the
programs of one SD-style model (UNet call, generation, null-text + P2P composed from
parts), ``TransformerAnalyser`` those of a DiT / PixArt backbone (transformer call,
generation: a DDIM scan of guided calls + VAE decode), ``train_step`` a DreamBooth step
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
from jaxdiff.dit_sampling import guided_dit_output
from jaxdiff.samplers import make_sampler
from jaxdiff.training import dreambooth
from jaxdiff.training import state as state_lib
from jaxdiff.training.loop import compile_step
from jaxdiff.training.optim import constant_adamw
from jaxdiff.training.step import make_train_step
from jaxdiff.weights.backbones import DiTPipeline

from roofline_count import (transformer_flops, unet_flops,  # noqa: E402  (bench/)
                            upsample_extra_flops)
from roofline_models import (CTX_LEN, HARDWARE, MODELS, TRANSFORMERS,  # noqa: E402
                             abstract_params, build, build_transformer, transformer_params)


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
            _sds(()), _sds((2,)), (), None, None)))
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


# --- Transformer backbones (DiT, PixArt): call and generation. ---

def _transformer_apply(model, params, x, t, cond, added):
    if TRANSFORMERS_KIND[type(model).__name__] == "dit":
        return model.apply({"params": params["transformer"]}, x, t, cond)
    return model.apply({"params": params["transformer"]}, x, t, cond, added)


TRANSFORMERS_KIND = {"DiTTransformer2DModel": "dit", "PixArtTransformer2DModel": "pixart"}


@functools.partial(jax.jit, static_argnames=("model",))
def transformer_call(model, params, x, t, cond, added=None):
    """One transformer call; ``cond``: class labels [B] (DiT) or caption features
    [B, L, caption_channels] (PixArt, with ``added`` micro-conditions)."""
    return _transformer_apply(model, params, x, t, cond, added)


@functools.partial(jax.jit, static_argnames=("pipe", "steps"))
def transformer_generation(pipe, steps, params, x, cond, null, added, scale):
    """``steps`` DDIM steps of classifier-free-guided transformer calls on [x, x] (DiT:
    ``dit_sampling.guided_dit_output`` against the null class; PixArt: the caption features
    against ``null`` ones, the learned variance dropped), then the VAE decode."""
    model = pipe.transformer
    sampler = make_sampler("ddim", pipe.scheduler, steps)
    ch = model.config.in_channels

    def guided(x_, t):
        if TRANSFORMERS_KIND[type(model).__name__] == "dit":
            return guided_dit_output(pipe, params, x_, t, cond, scale, True)
        both = None if added is None else jax.tree.map(lambda a: jnp.concatenate([a, a]), added)
        out = _transformer_apply(model, params, jnp.concatenate([x_, x_]),
                                 jnp.full((2 * x_.shape[0],), t), jnp.concatenate([cond, null]),
                                 both)[..., :ch]
        c, u = jnp.split(out, 2)
        return u + scale * (c - u)

    def body(state, i):
        out = guided(sampler.model_input(state, i), sampler.timesteps[i])
        return sampler.step(state, i, out, jnp.zeros_like(x)), None

    state, _ = jax.lax.scan(body, sampler.init(x), jnp.arange(sampler.num_evals))
    z = sampler.latents(state) / pipe.vae.config.scaling_factor
    return pipe.vae.apply({"params": params["vae"]}, z, method=type(pipe.vae).decode)


@functools.partial(jax.jit, static_argnames=("vae",))
def vae_decode(vae, params, z):
    return vae.apply({"params": params["vae"]}, z, method=type(vae).decode)


class TransformerAnalyser:
    """Lowers (and compiles) the call and generation programs of ``TRANSFORMERS[name]``."""

    def __init__(self, name: str, compile_: bool, dtype: str = "float32"):
        self.name, self.compile = name, compile_
        model, vae, sched = build_transformer(name, dtype)
        self.pipe = DiTPipeline(transformer=model, vae=vae, scheduler=sched)
        self.params = transformer_params(model, vae)
        self.kind, _, self.side, self.ctx = TRANSFORMERS[name]
        c = model.config
        self.latent = (c.sample_size, c.sample_size, c.in_channels)
        self.records = {}

    def _run(self, key, lower):
        if key not in self.records:
            t0 = time.perf_counter()
            with accelerator_attention():
                lowered = lower()
            rec = {"lower_s": round(time.perf_counter() - t0, 1)}
            rec.update(analyse(lowered, self.compile))
            self.records[key] = rec
        return self.records[key]

    def cond(self, rows: int):
        """(conditioning, micro-conditions) of ``rows`` images."""
        c = self.pipe.transformer.config
        if self.kind == "dit":
            return _sds((rows,), jnp.int32), None
        added = ({"resolution": _sds((rows, 2)), "aspect_ratio": _sds((rows, 1))}
                 if c.micro_conditions else None)
        return _sds((rows, self.ctx, c.caption_channels)), added

    def call(self, rows: int) -> dict:
        cond, added = self.cond(rows)
        rec = dict(self._run(("call", rows), lambda: transformer_call.lower(
            self.pipe.transformer, self.params, _sds((rows,) + self.latent), _sds((rows,)),
            cond, added)))
        rec["hand_flops"] = transformer_flops(self.pipe.transformer.config, rows,
                                              *self.latent[:2], self.ctx or 0)
        return rec

    def decode(self, rows: int) -> dict:
        return self._run(("decode", rows), lambda: vae_decode.lower(
            self.pipe.vae, self.params, _sds((rows,) + self.latent)))

    def generate(self, b: int, steps: int) -> dict:
        """The guided DDIM program; per-image work adds the (steps - 1) loop iterations
        XLA's count leaves out (module docstring of bench/roofline.py)."""
        cond, added = self.cond(b)
        null = None if self.kind == "dit" else cond
        rec = dict(self._run(("generate", b, steps), lambda: transformer_generation.lower(
            self.pipe, steps, self.params, _sds((b,) + self.latent), cond, null, added,
            _sds(()))))
        call = self.call(2 * b)
        rec["flops_raw"], rec["bytes_raw"] = rec["flops"], rec["bytes"]
        rec["flops"] = rec["flops_raw"] + (steps - 1) * call["flops"]
        rec["bytes"] = rec["bytes_raw"] + (steps - 1) * call["bytes"]
        rec["raw_over_parts"] = rec["flops_raw"] / (call["flops"] + self.decode(b)["flops"])
        rec["intensity"] = rec["flops"] / max(rec["bytes"], 1.0)
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


