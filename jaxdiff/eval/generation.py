"""Scoring a text-to-image pipeline on the shapes world, where every prompt has ground truth.

Pure functions (the driver is ``bench/quality.py``):

* ``prompt_set(spec, num_one, num_two)``: a fixed, deterministic set of held-out prompts
  with full captions (size, colour, shape, position/relation and background all stated)
  and their target objects;
* ``score_images(images, targets, spec)``: per-attribute and "all correct" rates of
  images against their targets, read back by ``shapes_eval.attribute_accuracy``;
* ``vae_psnr(pipe, params, images)``: autoencoder round-trip PSNR;
* ``psnr(a, b)``: per-image PSNR of uint8 (or float) images.

The prompts are *held-out* scenes (``shapes.split_of(...) == "test"``: never in the
training split), so attribute accuracy measures compositional generalisation, not recall.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
from typing import NamedTuple, Sequence

import jax
import numpy as np

from jaxdiff.data.shapes import (PAIRS, ShapeObject, WorldSpec, caption, palette,
                                 scene_key, split_of)
from jaxdiff.eval.shapes_eval import ATTRIBUTES, aggregate, attribute_accuracy
from jaxdiff.pipeline import from_uint8, to_uint8

PROMPT_SEED = 20_231_123


class PromptCase(NamedTuple):
    """One scored prompt: the text, its target objects (caption order) and background."""
    prompt: str
    objects: tuple[ShapeObject, ...]
    background: str


def held_out_scenes(spec: WorldSpec, num_objects: int,
                    seed: int = PROMPT_SEED) -> list[tuple[tuple[ShapeObject, ...], str]]:
    """Every distinct held-out scene with ``num_objects`` objects, in a fixed order.

    The scenes are those of the world's "test" split (the population that
    ``shapes.held_out_examples`` samples from, with jitter-free anchors), enumerated
    rather than sampled so that none repeats, ordered by a seeded SHA-256 of their
    ``scene_key`` (stable across numpy versions and platforms).
    Returns [(objects in caption order, background name), ...].
    """
    if num_objects not in (1, 2):
        raise ValueError(f"num_objects must be 1 or 2, got {num_objects=}")
    out = []
    for bg in spec.background_names:
        looks = list(itertools.product(spec.shapes, palette(spec, bg), spec.size_names))
        if num_objects == 1:
            layouts = [(p,) for p in spec.position_names]
        else:
            layouts = [p for p in PAIRS if set(p) <= set(spec.position_names)]
        for layout in layouts:
            for combo in itertools.product(looks, repeat=num_objects):
                objs = tuple(ShapeObject(shape=s, colour=c, size=z, position=p)
                             for (s, c, z), p in zip(combo, layout))
                if split_of(spec, objs, bg) == "test":
                    out.append((objs, bg))

    def rank(scene):
        key = f"{seed}|{scene_key(*scene)}".encode()
        return hashlib.sha256(key).digest()

    return sorted(out, key=rank)


def prompt_set(spec: WorldSpec, num_one: int = 200, num_two: int = 100,
               seed: int = PROMPT_SEED) -> list[PromptCase]:
    """The fixed evaluation prompts: ``num_one`` one-object cases, then ``num_two`` two-object.

    Captions state everything (size, colour, shape, position or relation, background), so
    the targets have no ``None`` attribute and equal ``parse_caption(prompt)``. There are
    only so many held-out one-object scenes (118 in the default 32 px world); when more
    are asked for, the list cycles through them again (a generator sees each repeat with
    other noise, as ``bench/quality.py`` gives every case its own seed offset).
    """
    cases = []
    for k, num in ((1, num_one), (2, num_two)):
        if num <= 0:
            continue
        scenes = held_out_scenes(spec, k, seed)
        if not scenes:
            raise ValueError(f"this world has no held-out {k}-object scene "
                             f"({spec.held_out_fraction=}).")
        for objs, bg in itertools.islice(itertools.cycle(scenes), num):
            cases.append(PromptCase(caption(objs, bg), objs, bg))
    return cases


def score_images(images, targets: Sequence, spec: WorldSpec,
                 score_background: bool = True, min_fit: float = 0.6) -> dict:
    """Attribute accuracy of images against their targets.

    Args:
      images: uint8 [B, H, W, 3].
      targets: B ``PromptCase``s or ``(objects, background)`` pairs (background may be
        None: not scored).
      score_background: whether "background" counts (and enters "all").
    Returns:
      {"n": B, "count", "shape", "colour", "size", "position", "background", "all": the
      share of images with that right (``shapes_eval.attribute_accuracy`` semantics: for a
      two-object prompt an attribute is right when both objects have it)}.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] != len(targets):
        raise ValueError(f"images {images.shape} must be [B, H, W, 3] with B = "
                         f"{len(targets)} (one per target).")
    results = []
    for image, target in zip(images, targets):
        objects, background = target[-2], target[-1]
        results.append(attribute_accuracy(image, objects, spec,
                                          background if score_background else None, min_fit))
    out = {"n": len(results)}
    out.update(aggregate(results))
    return out


def psnr(a, b, peak: float = 255.0) -> np.ndarray:
    """Per-image PSNR in dB of [..., H, W, C] arrays; identical images give inf."""
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    mse = np.mean(diff * diff, axis=(-3, -2, -1))
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(peak * peak / mse)


@functools.partial(jax.jit, static_argnames=("pipe",))
def vae_roundtrip(pipe, params, images) -> jax.Array:
    """images [B, H, W, 3] in [-1, 1] -> encode (posterior mean) -> decode, in [-1, 1]."""
    return pipe.decode_latents(params, pipe.encode_images(params, images))


def vae_reconstruct(pipe, params, images, batch_size: int = 50) -> np.ndarray:
    """uint8 [N, H, W, 3] -> encode (posterior mean) -> decode -> uint8 [N, H, W, 3].

    Runs in fixed-size jitted batches (the last one padded) so N never recompiles.
    """
    images = np.asarray(images)
    n = len(images)
    step = max(1, min(batch_size, n))
    out = []
    for start in range(0, n, step):
        chunk = images[start:start + step]
        pad = step - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        recon = to_uint8(vae_roundtrip(pipe, params, from_uint8(chunk)))
        out.append(recon[:step - pad])
    return np.concatenate(out)


def vae_psnr(pipe, params, images, batch_size: int = 50) -> dict:
    """Autoencoder round-trip PSNR of uint8 images [N, H, W, 3] (peak 255, on uint8 output).

    Returns {"n", "mean_db", "min_db", "median_db"} over per-image PSNRs.
    """
    images = np.asarray(images)
    values = psnr(images, vae_reconstruct(pipe, params, images, batch_size))
    return {"n": int(len(values)), "mean_db": float(np.mean(values)),
            "min_db": float(np.min(values)), "median_db": float(np.median(values))}


def split_by_objects(cases: Sequence[PromptCase]) -> dict[str, list[int]]:
    """Indices of the one- and two-object cases: {"one_object": [...], "two_object": [...]}."""
    out = {"one_object": [], "two_object": []}
    for i, c in enumerate(cases):
        out["one_object" if len(c.objects) == 1 else "two_object"].append(i)
    return out


__all__ = ["ATTRIBUTES", "PromptCase", "held_out_scenes", "prompt_set", "psnr",
           "score_images", "split_by_objects", "vae_psnr", "vae_reconstruct"]
