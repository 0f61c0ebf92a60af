"""The Diffusion Classifier: a text-to-image model as a zero-shot classifier.

For an image x0 and K candidate prompts c_k, the class is the prompt with the smallest
expected denoising error ``E_{t, eps} ||eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t)
eps, t, c_k)||^2``, estimated on one shared set of (t, eps) samples, so that differences
between candidates are not drowned in the variance of the samples (Li et al. 2023).

As in the authors' ``eval_prob_adaptive.py``:

* x0 is the VAE posterior mean (scaled), the error is the mean over latent elements of the
  squared ("l2"), absolute ("l1") or Huber (delta 1) difference to the model's target (the
  noise for epsilon models; the velocity or x0 for the other prediction types);
* the timesteps are evenly spaced: with M = max(samples), ``t_j = T // M // 2 + j * (T //
  M)`` for j < M; a stage of n samples takes every (M // n)-th of them starting at
  (M // n) // 2, skipping the ones an earlier stage evaluated; each timestep gets
  ``trials`` noise draws, numbered in evaluation order, the same for every candidate;
* adaptive elimination: after stage s (``samples[s]`` timesteps in all) only the
  ``keep[s]`` candidates with the lowest mean error over every sample seen so far go on;
  the last stage keeps one, the prediction.

jaxdiff evaluates a batch of images at once: each stage is one compiled program over the
images x their remaining candidates x the stage's samples, chunked ``chunk`` samples at a
time (one UNet call on B x K x chunk inputs per chunk). The sample count is traced (a
``while_loop`` over chunks of a buffer padded to a power of two), so stages with
different counts share a program. The noise is drawn from ``seed`` once and shared by
all images (the authors' ``--noise_path``), so an image's result does not depend on the
rest of the batch.

References: Li, Prabhudesai, Duggal, Brown & Pathak, "Your Diffusion Model is Secretly a
Zero-Shot Classifier", ICCV 2023.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import schedules
from jaxdiff.denoiser import denoise
from jaxdiff.pipeline import Pipeline
from jaxdiff.training.latents import encode_uint8
from jaxdiff.training.losses import diffusion_target

LOSSES = {
    "l2": lambda d: d * d,
    "l1": jnp.abs,
    "huber": lambda d: jnp.where(jnp.abs(d) < 1.0, 0.5 * d * d, jnp.abs(d) - 0.5),
}


@dataclasses.dataclass(frozen=True)
class Stage:
    """One elimination stage: the (timestep, noise index) samples it adds, and how many
    candidates survive it. ``timesteps`` / ``noise_index``: int32 [S] (S may be 0)."""
    timesteps: np.ndarray
    noise_index: np.ndarray
    keep: int


def stage_plan(num_train_timesteps: int, samples: Sequence[int], keep: Sequence[int],
               trials: int = 1) -> list[Stage]:
    """The authors' timestep schedule (module docstring) as a list of ``Stage``s.

    Args:
      samples: cumulative timesteps per stage, e.g. (16, 64): 16 timesteps, then 48 more.
      keep: candidates kept after each stage; the last must be 1.
      trials: noise draws per timestep.
    """
    check_plan(num_train_timesteps, samples, keep, trials)
    t_all = num_train_timesteps
    m = max(samples)
    grid = list(range(t_all // m // 2, t_all, t_all // m))[:m]
    done: list[int] = []
    stages = []
    for n, k in zip(samples, keep):
        stride = len(grid) // n
        new = [t for t in grid[stride // 2::stride][:n] if t not in done]
        ts, idx = [], []
        for j, t in enumerate(new, start=len(done)):
            ts += [t] * trials
            idx += range(trials * j, trials * (j + 1))
        done += new
        stages.append(Stage(np.asarray(ts, np.int32), np.asarray(idx, np.int32), int(k)))
    return stages


def default_keep(num_candidates: int, num_stages: int) -> list[int]:
    """Halve the candidates at every stage but the last, which keeps one."""
    return [max(1, -(-num_candidates // 2 ** (i + 1))) for i in range(num_stages - 1)] + [1]


def check_plan(num_train_timesteps: int, samples: Sequence[int], keep: Sequence[int],
               trials: int = 1) -> None:
    """One-line ValueError for a schedule ``stage_plan`` cannot build."""
    samples, keep = list(samples), list(keep)
    if not samples or len(samples) != len(keep):
        raise ValueError(f"samples {samples} and keep {keep} must be non-empty and of the "
                         "same length (one entry per elimination stage).")
    if min(samples) < 1 or max(samples) > num_train_timesteps:
        raise ValueError(f"samples {samples} must lie in [1, {num_train_timesteps}].")
    if min(keep) < 1 or keep[-1] != 1 or any(b > a for a, b in zip(keep, keep[1:])):
        raise ValueError(f"keep {keep} must be non-increasing, >= 1 and end with 1 (the "
                         "last stage picks the answer).")
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials=}.")


def _bucket(n: int, chunk: int) -> int:
    """Padded sample count: ``chunk`` times the next power of two of ceil(n / chunk)."""
    c = max(1, -(-n // chunk))
    return chunk * (1 << (c - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("pipe", "loss", "chunk"))
def denoising_errors(pipe: Pipeline, unet_params, latents, contexts, timesteps, noise, count,
                     *, loss: str = "l2", chunk: int = 16):
    """Per-sample denoising errors of every (image, candidate, sample), one program.

    Args:
      latents: scaled clean latents x0 [B, h, w, C].
      contexts: text embeddings of each image's candidates [B, K, L, D] (or a pytree of
        [B, K, ...] leaves: a text DiT's ``{"context", "mask", "resolution",
        "aspect_ratio"}``, ``encode_prompts``).
      timesteps: int32 [N] (N a multiple of ``chunk``); noise: [N, h, w, C].
      count: how many of the N samples to evaluate (traced: no recompile per count).
    Returns:
      float32 [B, K, N]: mean ``loss`` between the UNet output and its target over the
      latent elements; 0 past ``count``.
    """
    b, k = jax.tree.leaves(contexts)[0].shape[:2]
    n = timesteps.shape[0]
    ac = jnp.asarray(schedules.alphas_cumprod(pipe.scheduler), jnp.float32)
    target_fn, loss_fn = diffusion_target(pipe.scheduler.prediction_type), LOSSES[loss]
    shape = latents.shape[1:]

    def body(carry):
        c, errors = carry
        t = jax.lax.dynamic_slice_in_dim(timesteps, c * chunk, chunk)
        eps = jax.lax.dynamic_slice_in_dim(noise, c * chunk, chunk)
        a = ac[t][None, :, None, None, None]
        x0 = latents[:, None]                                       # [B, 1, h, w, C]
        x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * eps[None]      # [B, S, h, w, C]
        target = target_fn(x0, eps[None], a)
        # All candidates x samples in one UNet call: [B, K, S] flattened.
        x_in = jnp.broadcast_to(x_t[:, None], (b, k, chunk) + shape).reshape((-1,) + shape)
        t_in = jnp.broadcast_to(t, (b, k, chunk)).reshape(-1)
        ctx = jax.tree.map(lambda c: jnp.broadcast_to(c[:, :, None], (b, k, chunk) + c.shape[2:])
                           .reshape((-1,) + c.shape[2:]), contexts)
        out = denoise(pipe, unet_params, x_in, t_in, ctx)
        out = out.astype(jnp.float32).reshape((b, k, chunk) + shape)
        err = jnp.mean(loss_fn(out - target[:, None]), axis=(3, 4, 5))
        valid = c * chunk + jnp.arange(chunk) < count
        errors = jax.lax.dynamic_update_slice_in_dim(errors, jnp.where(valid, err, 0.0),
                                                     c * chunk, axis=2)
        return c + 1, errors

    zeros = jnp.zeros((b, k, n), jnp.float32)
    _, errors = jax.lax.while_loop(lambda cr: cr[0] * chunk < count, body, (0, zeros))
    return errors


@functools.partial(jax.jit, static_argnames=("pipe", "height", "width"))
def encode_prompts(pipe: Pipeline, params, ids, height: Optional[int] = None,
                   width: Optional[int] = None):
    """Token ids [K, L] -> the denoiser's conditions of a height x width image (default the
    model's resolution), one compiled program: text embeddings [K, L, D]; a text DiT's
    pytree with its caption mask and micro-conditions (``Pipeline.condition``)."""
    return pipe.condition(params, ids, height or pipe.image_size, width or pipe.image_size)


def candidate_table(prompts: Sequence) -> tuple[list[str], np.ndarray]:
    """(distinct prompts, int [1 or B, K] index of each candidate in them) for a list of
    K prompts or B lists of K prompts; one-line ValueError for an empty or ragged list."""
    rows = [list(prompts)] if not prompts or isinstance(prompts[0], str) else \
        [list(p) for p in prompts]
    if not rows[0] or len({len(r) for r in rows}) != 1:
        raise ValueError("candidate prompts: give at least one, and the same number for "
                         "every image.")
    table = sorted({p for r in rows for p in r})
    where = {p: i for i, p in enumerate(table)}
    return table, np.asarray([[where[p] for p in r] for r in rows], np.int64)


@dataclasses.dataclass(frozen=True)
class Result:
    """What ``classify`` found for a batch of B images and K candidates.

    Attributes:
      prediction: int [B], the index of the chosen candidate.
      errors: float [B, K], each candidate's mean error over the samples it got (NaN for
        none).
      samples: int [B, K], how many (t, eps) samples each candidate was scored on
        (eliminated candidates stop early).
      ranking: int [B, K], candidates best first (survivors of later stages first, then
        by mean error).
    """
    prediction: np.ndarray
    errors: np.ndarray
    samples: np.ndarray
    ranking: np.ndarray


def classify(pipe: Pipeline, params, images, prompts: Sequence,
             samples: Sequence[int] = (16, 64), keep: Optional[Sequence[int]] = None,
             trials: int = 1, seed: int = 0, loss: str = "l2", chunk: int = 16,
             latents=None) -> Result:
    """Zero-shot classification of ``images`` among candidate ``prompts``.

    Args:
      images: uint8 [B, H, W, 3] at the model's resolution (ignored when ``latents`` given).
      prompts: the K candidate prompts (strings), or one list of K per image.
      samples, keep, trials: the elimination schedule (``stage_plan``); ``keep`` defaults
        to halving the candidates at every stage but the last, which keeps one.
        A ``keep`` larger than the candidates left keeps them all.
      seed: seeds the shared noise.
      loss: "l2" (the paper's default), "l1" or "huber".
      chunk: samples per UNet call (memory: B x K x chunk latents at a time).
      latents: optional scaled clean latents [B, h, w, C] in place of ``images``.
    """
    table, cand = candidate_table(prompts)
    k_all = cand.shape[1]
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {sorted(LOSSES)}.")
    if pipe.is_sdxl:
        raise ValueError("the diffusion classifier supports SD 1.x/2.x pipelines (not SDXL) "
                         "so far.")
    keep = default_keep(k_all, len(samples)) if keep is None else keep
    stages = stage_plan(pipe.scheduler.num_train_timesteps, samples, keep, trials)
    if latents is None:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (pipe.image_size, pipe.image_size, 3):
            raise ValueError(f"images of shape {images.shape}; expected [B, {pipe.image_size}"
                             f", {pipe.image_size}, 3] uint8 (the model's resolution).")
        latents = encode_uint8(pipe, params, images)
    latents = jnp.asarray(latents, jnp.float32)
    b = latents.shape[0]
    if cand.shape[0] not in (1, b):
        raise ValueError(f"{cand.shape[0]} candidate lists for {b} images; give one list "
                         "for all images or one per image.")
    cand = np.broadcast_to(cand, (b, k_all))
    f = pipe.vae_scale_factor
    contexts = encode_prompts(pipe, params, pipe.tokenize(table), latents.shape[1] * f,
                              latents.shape[2] * f)
    noise = jax.random.normal(jax.random.key(seed),
                              (max(samples) * trials,) + latents.shape[1:], jnp.float32)
    sums = np.zeros((b, k_all), np.float64)
    counts = np.zeros((b, k_all), np.int64)
    alive = np.broadcast_to(np.arange(k_all), (b, k_all)).copy()  # [B, K_s] candidate ids
    survived = np.zeros((b, k_all), np.int64)  # stages each candidate survived
    rows = np.arange(b)[:, None]
    for stage in stages:
        s = len(stage.timesteps)
        if s:
            n = _bucket(s, chunk)
            ts = np.zeros(n, np.int32)
            ts[:s] = stage.timesteps
            idx = np.zeros(n, np.int32)
            idx[:s] = stage.noise_index
            pick = np.take_along_axis(cand, alive, axis=1)
            err = denoising_errors(pipe, params["unet"], latents,
                                   jax.tree.map(lambda c: c[pick], contexts),
                                   jnp.asarray(ts), noise[idx], jnp.int32(s), loss=loss,
                                   chunk=chunk)
            sums[rows, alive] += np.asarray(err, np.float64)[:, :, :s].sum(-1)
            counts[rows, alive] += s
        mean = sums[rows, alive] / np.maximum(counts[rows, alive], 1)
        order = np.argsort(mean, axis=1, kind="stable")[:, :min(stage.keep, alive.shape[1])]
        alive = np.take_along_axis(alive, order, axis=1)
        survived[rows, alive] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        errors = np.where(counts > 0, sums / counts, np.nan)
    ranking = np.lexsort((np.nan_to_num(errors, nan=np.inf), -survived), axis=-1)
    return Result(prediction=alive[:, 0], errors=errors, samples=counts, ranking=ranking)
