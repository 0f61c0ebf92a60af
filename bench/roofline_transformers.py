"""bench/roofline.py's transformer-backbone programs (DiT, PixArt): one transformer call,
and generation (a DDIM scan of classifier-free-guided calls + the VAE decode), lowered from
abstract shapes by ``TransformerAnalyser`` and analysed by ``roofline_programs.analyse``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxdiff.dit_sampling import guided_dit_output
from jaxdiff.samplers import make_sampler
from jaxdiff.weights.backbones import DiTPipeline

from roofline_count import transformer_flops  # noqa: E402  (bench/)
from roofline_models import (TRANSFORMERS, build_transformer,  # noqa: E402
                             transformer_params)
from roofline_programs import _sds, cached_analysis  # noqa: E402


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
        return cached_analysis(self.records, key, lower, self.compile)

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
