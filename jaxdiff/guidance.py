"""Classifier-free guidance, the one implementation (docs/design.md, "Traced vs static").

A *denoiser* is ``denoise(x [B,h,w,C], t [] or [B], context [B,L,D]) -> model output``.
``cfg`` turns it into a guided denoiser over a ``(cond, uncond)`` context pair, evaluated
as one UNet call on the concatenated batch (as diffusers does). ``scale`` and ``rescale``
are traced values, so a sweep over scales is a ``jax.vmap`` sharing one parameter pytree.
Loops that call the UNet themselves (editing: attention control, per-step null
embeddings) combine its raw ``[2B]`` output with ``guide``, or call ``guided_call``.
``classifier`` is gradient guidance as a wrapper of the same kind (a classifier's
``jax.grad`` inside the loop, traced scale); it composes with ``cfg``.
``anneal_condition`` is CADS (condition-annealed sampling): noise on the condition at high
noise levels, against the diversity collapse of strong guidance.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def rescale_noise_cfg(guided, cond, rescale):
    """Guidance rescale (Lin et al. 2023, sec. 3.4), as diffusers' ``rescale_noise_cfg``.

    Matches the per-sample std of the guided output to the conditional one, then mixes.
    """
    axes = tuple(range(1, guided.ndim))
    std_cond = jnp.std(cond, axis=axes, keepdims=True, ddof=1)
    std_cfg = jnp.std(guided, axis=axes, keepdims=True, ddof=1)
    rescaled = guided * (std_cond / std_cfg)
    return rescale * rescaled + (1.0 - rescale) * guided


def combine(out_uncond, out_cond, scale):
    """``u + scale * (c - u)`` for outputs computed apart (null-text's inner loop, where
    only the unconditional branch is differentiated)."""
    return out_uncond + scale * (out_cond - out_uncond)


def guide(out, scale, rescale=None):
    """Guided output from a raw ``[2B]`` model output ``[uncond; cond]``: ``u + s (c - u)``.

    Args:
      out: the denoiser's output on the concatenated batch, unconditional half first.
      scale: guidance weight, scalar or per-image [B] (broadcast against the latents).
      rescale: guidance-rescale factor (traced; 0 disables it) or None (no rescale code
        in the program at all).
    """
    out_uncond, out_cond = jnp.split(out, 2)
    g = combine(out_uncond, out_cond, scale)
    if rescale is None:
        return g
    return jnp.where(rescale > 0, rescale_noise_cfg(g, out_cond, rescale), g)


def guided_call(denoise: Callable, x, t, cond, uncond, scale, rescale=None):
    """One UNet call on the concatenated batch ``[x; x]`` with ``[uncond; cond]``, guided
    (conditions may be pytrees, e.g. SDXL's; concatenated leaf by leaf)."""
    both = jax.tree.map(lambda u, c: jnp.concatenate([u, c]), uncond, cond)
    return guide(denoise(jnp.concatenate([x, x]), t, both), scale, rescale)


def cfg(denoise: Callable, scale, rescale=0.0) -> Callable:
    """Classifier-free guidance: ``u + scale * (c - u)`` (optionally rescaled).

    Args:
      denoise: the conditional denoiser ``(x, t, context) -> output``.
      scale: guidance weight (traced; 1.0 means the conditional output only).
      rescale: guidance-rescale factor phi in [0, 1] (traced; 0 disables it).
    Returns:
      ``guided(x, t, (cond, uncond)) -> output``.
    """

    def guided(x, t, contexts):
        cond, uncond = contexts
        return guided_call(denoise, x, t, cond, uncond, scale, rescale)

    return guided


# Leaves of an SDXL condition pytree that carry the prompt (``time_ids`` are sizes, kept).
_ANNEALED_KEYS = ("context", "text_embeds")


def annealing_weight(t, tau1, tau2):
    """CADS' schedule gamma(t): 1 for t <= tau1, 0 for t >= tau2, linear between
    (t: diffusion time in [0, 1], 1 = pure noise)."""
    return jnp.clip((tau2 - t) / jnp.maximum(tau2 - tau1, 1e-6), 0.0, 1.0)


def anneal_condition(cond, keys, t, annealing):
    """Condition-annealed sampling (CADS, Sadat et al. 2024, eqs. 2-4) of one step.

    ``y' = sqrt(gamma) y + s sqrt(1 - gamma) n``, then rescaled to ``y``'s own mean and
    std and mixed, ``psi * rescaled + (1 - psi) * y'``. Per sample (each row has its own
    key and its own statistics), so a batch equals its rows run alone. Only the
    conditional branch is annealed; the unconditional one stays as it is.

    Args:
      cond: [B, L, D] text embeddings, or SDXL's dict (its ``context`` and ``text_embeds``
        are annealed).
      keys: [B] per-sample keys for this step (distinct per step).
      t: diffusion time of the step in [0, 1] (1 = pure noise).
      annealing: traced float [4]: (tau1, tau2, noise_scale s, psi).
    References: Sadat et al., "CADS: Unleashing the Diversity of Diffusion Models through
      Condition-Annealed Sampling", ICLR 2024.
    """
    tau1, tau2, s, psi = (annealing[k] for k in range(4))
    gamma = annealing_weight(t, tau1, tau2)

    def one(y, key):
        y32 = y.astype(jnp.float32)
        noisy = jnp.sqrt(gamma) * y32 + s * jnp.sqrt(1.0 - gamma) * jax.random.normal(
            key, y.shape, jnp.float32)
        rescaled = ((noisy - noisy.mean()) / jnp.maximum(noisy.std(), 1e-12) * y32.std()
                    + y32.mean())
        mixed = psi * rescaled + (1.0 - psi) * noisy
        return jnp.where(gamma >= 1.0, y32, mixed).astype(y.dtype)

    if isinstance(cond, dict):
        out = dict(cond)
        for n, name in enumerate(_ANNEALED_KEYS):
            if name in cond:
                out[name] = jax.vmap(one)(cond[name], jax.vmap(
                    lambda k: jax.random.fold_in(k, n))(keys))
        return out
    return jax.vmap(one)(cond, keys)


def check_annealing(annealing):
    """``condition_annealing`` as float32 [4] (None stays None), or a one-line ValueError."""
    if annealing is None:
        return None
    vals = [float(v) for v in annealing]
    if len(vals) != 4:
        raise ValueError(f"condition_annealing needs 4 numbers (tau1, tau2, noise_scale, psi), "
                         f"got {len(vals)}.")
    tau1, tau2, s, psi = vals
    if not (0.0 <= tau1 < tau2 <= 1.0 and s >= 0.0 and 0.0 <= psi <= 1.0):
        raise ValueError(f"condition_annealing {tau1:g} {tau2:g} {s:g} {psi:g}: need "
                         "0 <= tau1 < tau2 <= 1, noise_scale >= 0, 0 <= psi <= 1 (CADS; "
                         "e.g. 0.6 0.9 0.25 1).")
    return jnp.asarray(vals, jnp.float32)


def classifier_grad(log_p: Callable) -> Callable:
    """``grad_log_p(x, t) -> d/dx log p(y | x_t)`` [B, h, w, C] from ``log_p(x, t) -> [B]``.

    ``jax.grad`` of the batch sum: samples are independent, so each row of the gradient is
    that sample's own. Traced into the sampling loop like the model itself.
    """
    return jax.grad(lambda x, t: jnp.sum(log_p(x, t)))


def classifier(denoise: Callable, grad_log_p: Callable, scale, alphas_cumprod,
               prediction_type: str = "epsilon") -> Callable:
    """Classifier guidance (Dhariwal & Nichol 2021, sec. 4.2, for DDIM-style samplers).

    The score of ``p(x_t) p(y | x_t)^scale``: the predicted noise moves against the
    classifier's gradient, ``eps' = eps - scale * sqrt(1 - abar_t) * grad log p(y | x_t)``;
    the output is converted back to the model's prediction type (v: ``v + delta /
    sqrt(abar_t)``, x0: ``x0 - sqrt((1 - abar_t) / abar_t) * delta`` for the noise change
    ``delta``), so any sampler takes it. Wraps any denoiser, e.g. ``cfg(...)``'s (then the
    condition is its ``(cond, uncond)`` pair): CFG and classifier guidance combine.

    Args:
      denoise: ``(x [B,h,w,C], t, cond) -> model output`` at the VP-scaled x_t.
      grad_log_p: ``(x, t) -> d/dx log p(y | x_t)`` like x (``classifier_grad``).
      scale: guidance weight (traced; 0 gives ``denoise`` unchanged; a vmap over scales is
        a sweep).
      alphas_cumprod: [T] alpha-bar table; fractional t (Euler, Heun) interpolates it.
      prediction_type: epsilon | v_prediction | sample (resolved here, outside jit).
    References: Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis",
      NeurIPS 2021 (Algorithm 2 and eq. 14).
    """
    table = jnp.asarray(alphas_cumprod, jnp.float32)
    if prediction_type == "epsilon":
        adjust = lambda out, delta, a: out + delta
    elif prediction_type == "v_prediction":
        adjust = lambda out, delta, a: out + delta / jnp.sqrt(a)
    elif prediction_type == "sample":
        adjust = lambda out, delta, a: out - jnp.sqrt((1.0 - a) / a) * delta
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; use epsilon, "
                         "v_prediction or sample.")

    def guided(x, t, cond):
        t_b = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
        a = jnp.interp(t_b.astype(jnp.float32), jnp.arange(table.shape[0]), table)
        a = a.reshape((-1,) + (1,) * (x.ndim - 1))
        delta = -scale * jnp.sqrt(1.0 - a) * grad_log_p(x, t_b)
        return adjust(denoise(x, t, cond), delta.astype(x.dtype), a)

    return guided
