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
``adaptive_projection`` is APG (adaptive projected guidance): CFG on the denoised (x0)
predictions with the update's component along the conditional prediction down-weighted,
against the oversaturation and eroded objects of strong guidance.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.samplers.base import x0_eps_vp


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


def paired_call(denoise: Callable, x, t, cond, uncond):
    """One UNet call on the concatenated batch ``[x; x]`` with ``[uncond; cond]`` (conditions
    may be pytrees, e.g. SDXL's; concatenated leaf by leaf) -> its raw ``[2B]`` output."""
    both = jax.tree.map(lambda u, c: jnp.concatenate([u, c]), uncond, cond)
    return denoise(jnp.concatenate([x, x]), t, both)


def guided_call(denoise: Callable, x, t, cond, uncond, scale, rescale=None):
    """``paired_call``, guided by ``guide``."""
    return guide(paired_call(denoise, x, t, cond, uncond), scale, rescale)


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


def _option_values(values, name: str, fields: str, ok, rule: str):
    """A sampling option's numbers as float32 [len(fields)] (None stays None), or a one-line
    ValueError naming the option, its fields and the ``rule`` that ``ok(*values)`` checks."""
    if values is None:
        return None
    vals = [float(v) for v in values]
    n = len(fields.split(", "))
    if len(vals) != n:
        raise ValueError(f"{name} needs {n} numbers ({fields}), got {len(vals)}.")
    if not ok(*vals):
        raise ValueError(f"{name} {' '.join(f'{v:g}' for v in vals)}: need {rule}.")
    return jnp.asarray(vals, jnp.float32)


def check_annealing(annealing):
    """``condition_annealing`` as float32 [4] (None stays None), or a one-line ValueError."""
    return _option_values(
        annealing, "condition_annealing", "tau1, tau2, noise_scale, psi",
        lambda tau1, tau2, s, psi: 0.0 <= tau1 < tau2 <= 1.0 and s >= 0.0 and 0.0 <= psi <= 1.0,
        "0 <= tau1 < tau2 <= 1, noise_scale >= 0, 0 <= psi <= 1 (CADS; e.g. 0.6 0.9 0.25 1)")


def apg_combine(x0_uncond, x0_cond, scale, eta, norm_threshold, momentum, average):
    """Adaptive projected guidance of one step on x0 predictions (Sadat et al. 2025, Alg. 1).

    ``diff = c - u`` joins the running average ``average <- diff + momentum * average``
    (momentum 0: the diff itself), which is clipped to norm ``norm_threshold`` per sample
    (0: no clip) and split along the unit conditional prediction ``c / |c|``:
    ``c + (scale - 1) * (orth + eta * par)``. At eta 1, threshold 0 and momentum 0 this is
    CFG, ``u + scale * (c - u)``; eta < 1 takes out the part of the update that only
    scales ``c`` up, the source of oversaturation. Norms are per sample, over all other
    axes.

    Args:
      x0_uncond, x0_cond: [B, ...] denoised predictions.
      scale: guidance weight w, a scalar or per-image [B] (traced).
      eta, norm_threshold, momentum: traced scalars (the paper's eta, r, beta).
      average: [B, ...] the running average of the previous steps (zeros at the start).
    Returns:
      (guided x0 [B, ...], the new running average).
    References: Sadat, Hilliges, Weber, "Eliminating Oversaturation and Artifacts of High
      Guidance Scales in Diffusion Models", ICLR 2025 (arXiv 2410.02416).
    """
    axes = tuple(range(1, x0_cond.ndim))
    norm = lambda v: jnp.sqrt(jnp.sum(v * v, axis=axes, keepdims=True))
    average = x0_cond - x0_uncond + momentum * average
    clip = jnp.minimum(1.0, norm_threshold / jnp.maximum(norm(average), 1e-12))
    diff = jnp.where(norm_threshold > 0, average * clip, average)
    unit = x0_cond / jnp.maximum(norm(x0_cond), 1e-12)
    par = jnp.sum(diff * unit, axis=axes, keepdims=True) * unit
    w = jnp.reshape(scale, jnp.shape(scale) + (1,) * (x0_cond.ndim - jnp.ndim(scale)))
    return x0_cond + (w - 1.0) * (diff - par + eta * par), average


def out_from_x0_vp(prediction_type: str) -> Callable:
    """``(x0, x, alpha, sigma) -> model output``: the inverse of ``samplers.base.x0_eps_vp``
    for ``x = alpha x0 + sigma eps``. Resolved once, outside jit."""
    if prediction_type == "epsilon":
        return lambda x0, x, a, s: (x - a * x0) / s
    if prediction_type == "v_prediction":
        return lambda x0, x, a, s: (a * x - x0) / s
    if prediction_type == "sample":
        return lambda x0, x, a, s: x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}; use epsilon, "
                     "v_prediction or sample.")


def adaptive_projection(denoise: Callable, scale, rescale, projection, prediction_type: str,
                        alpha, sigma) -> Callable:
    """APG as a guided denoiser with state, the counterpart of ``cfg``.

    One UNet call on ``[x; x]``; both outputs go to x0 with the samplers' own
    ``x0_eps_vp``, are combined by ``apg_combine``, and the guided x0 goes back to the
    model's prediction type (then guidance rescale, as diffusers' APG guider does).

    Args:
      denoise: the conditional denoiser ``(x, t, context) -> output`` (x VP-scaled).
      scale: guidance weight (traced; scalar or per-image [B]).
      rescale: guidance-rescale factor (traced; 0 disables it) or None.
      projection: traced float [3]: (eta, norm_threshold, momentum).
      prediction_type: epsilon | v_prediction | sample.
      alpha, sigma: the step's ``x = alpha x0 + sigma eps`` coefficients (traced scalars).
    Returns:
      ``guided(x, t, (cond, uncond), average) -> (output, new average)``.
    """
    to_x0, from_x0 = x0_eps_vp(prediction_type), out_from_x0_vp(prediction_type)

    def guided(x, t, contexts, average):
        cond, uncond = contexts
        out_uncond, out_cond = jnp.split(paired_call(denoise, x, t, cond, uncond), 2)
        x0_u, x0_c = (to_x0(o, x, alpha, sigma)[0] for o in (out_uncond, out_cond))
        x0, average = apg_combine(x0_u, x0_c, scale, *(projection[k] for k in range(3)),
                                  average)
        out = from_x0(x0, x, alpha, sigma).astype(out_cond.dtype)
        if rescale is not None:
            out = jnp.where(rescale > 0, rescale_noise_cfg(out, out_cond, rescale), out)
        return out, average

    return guided


def check_projection(projection):
    """``adaptive_projection`` as float32 [3] (None stays None), or a one-line ValueError."""
    return _option_values(
        projection, "adaptive_projection", "eta, norm_threshold, momentum",
        lambda eta, r, m: np.isfinite(eta) and 0.0 <= r < np.inf and -1.0 < m < 1.0,
        "a finite eta, norm_threshold >= 0 (0: none), -1 < momentum < 1 (APG; e.g. 0 0 0)")


def classifier_grad(log_p: Callable) -> Callable:
    """``grad_log_p(x, t) -> d/dx log p(y | x_t)`` [B, h, w, C] from ``log_p(x, t) -> [B]``.

    ``jax.grad`` of the batch sum: samples are independent, so each row of the gradient is
    that sample's own. Traced into the sampling loop like the model itself.
    """
    return jax.grad(lambda x, t: jnp.sum(log_p(x, t)))


def abar_at(table, t, x):
    """alpha-bar at (possibly fractional, scalar or per-sample) timesteps ``t``, interpolated
    in ``table`` [T], shaped [B, 1, ...] to broadcast against ``x`` [B, ...]."""
    a = jnp.interp(jnp.asarray(t).astype(jnp.float32), jnp.arange(table.shape[0]), table)
    return jnp.broadcast_to(a, (x.shape[0],)).reshape((-1,) + (1,) * (x.ndim - 1))


def with_noise_change(prediction_type: str) -> Callable:
    """``adjust(out, delta, abar) -> out'``: a model output of ``prediction_type`` whose
    predicted noise is ``delta`` more, at the same x_t (v: ``v + delta / sqrt(abar)``,
    x0: ``x0 - sqrt((1 - abar) / abar) * delta``)."""
    if prediction_type == "epsilon":
        return lambda out, delta, a: out + delta
    if prediction_type == "v_prediction":
        return lambda out, delta, a: out + delta / jnp.sqrt(a)
    if prediction_type == "sample":
        return lambda out, delta, a: out - jnp.sqrt((1.0 - a) / a) * delta
    raise ValueError(f"unknown prediction_type {prediction_type!r}; use epsilon, "
                     "v_prediction or sample.")


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
    adjust = with_noise_change(prediction_type)

    def guided(x, t, cond):
        t_b = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
        a = abar_at(table, t_b, x)
        delta = -scale * jnp.sqrt(1.0 - a) * grad_log_p(x, t_b)
        return adjust(denoise(x, t, cond), delta.astype(x.dtype), a)

    return guided
