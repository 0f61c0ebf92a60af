"""Zero-shot scores of a CLIP on the shapes world: attribute accuracy and retrieval.

Attribute accuracy uses prompt ensembling over the caption grammar (Radford et al. 2021,
section 3.1.4): a class's text embedding is the renormalised mean of the embeddings of
every caption naming it — colour c: "a {c} {shape}" for every shape and "a {c} object";
shape s: "a {colour} {s}" for every colour and "a {s}". An image gets the class of the
highest cosine similarity. Scored on one-object scenes, whose attribute is unambiguous;
objects of an unnamed colour (world v2) are left out of the colour score.

Retrieval recall@1 over N held-out scenes with their own captions: image -> text is right
when the best caption is the image's caption (or the same string), text -> image when the
best image is one whose caption is that string.

A noise-aware CLIP (``configs/clip.py:noisy``) reads VAE latents noised to a timestep:
``noised_latent_features`` embeds clean latents after one fixed noise draw at timestep
``t``, and both scores take precomputed image ``features``, so they are measured per noise
level.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import schedules
from jaxdiff.data.shapes import ShapeObject, WorldSpec, caption
from jaxdiff.pipeline import from_uint8
from jaxdiff.weights.clip_format import CLIP


@functools.partial(jax.jit, static_argnames=("clip",))
def _text_embeds(clip: CLIP, params, ids):
    return clip.text_embeds(params, ids)


@functools.partial(jax.jit, static_argnames=("clip",))
def _image_embeds(clip: CLIP, params, images):
    return clip.image_embeds(params, from_uint8(images))


def text_features(clip: CLIP, params, texts: Sequence[str], chunk: int = 256) -> np.ndarray:
    """Texts -> L2-normalised embeddings [N, P] (numpy)."""
    ids = clip.tokenize(list(texts))
    return np.concatenate([np.asarray(_text_embeds(clip, params, ids[i:i + chunk]))
                           for i in range(0, len(ids), chunk)])


def image_features(clip: CLIP, params, images, chunk: int = 256) -> np.ndarray:
    """uint8 images [N, H, W, 3] -> L2-normalised embeddings [N, P] (numpy)."""
    images = np.asarray(images, np.uint8)
    return np.concatenate([np.asarray(_image_embeds(clip, params, images[i:i + chunk]))
                           for i in range(0, len(images), chunk)])


@functools.partial(jax.jit, static_argnames=("clip",))
def _noised_embeds(clip: CLIP, params, latents, noise, t, alphas_cumprod):
    t = jnp.full((latents.shape[0],), t, jnp.int32)
    return clip.image_embeds(params, schedules.add_noise(alphas_cumprod, latents, noise, t), t)


def noised_latent_features(clip: CLIP, params, latents, t: int, alphas_cumprod, *,
                           seed: int = 0, chunk: int = 256) -> np.ndarray:
    """Noise-aware CLIP: clean latents [N, h, w, C] noised to timestep ``t`` by the forward
    process of ``alphas_cumprod`` (one draw of ``seed``) -> L2-normalised embeddings [N, P]."""
    if clip.time_token is None:
        raise ValueError("noised_latent_features needs a noise-aware CLIP "
                         "(configs/clip.py:noisy); this one reads clean pixels.")
    latents = np.asarray(latents, np.float32)
    noise = np.asarray(jax.random.normal(jax.random.key(seed), latents.shape), np.float32)
    acp = jnp.asarray(alphas_cumprod, jnp.float32)
    return np.concatenate([
        np.asarray(_noised_embeds(clip, params, latents[i:i + chunk], noise[i:i + chunk],
                                  int(t), acp))
        for i in range(0, len(latents), chunk)])


def _noun(colour, shape) -> str:
    """The world's own caption of one object, size and position unsaid ("a red circle";
    ``colour=None`` -> "a circle"; ``shape=None`` -> "a red object")."""
    obj = ShapeObject(shape or "circle", colour or "red", None, None)
    return caption([obj], None, mention_size=False, mention_position=False,
                   mention_colour=colour is not None, mention_shape=shape is not None)


def class_prompts(spec: WorldSpec) -> dict:
    """{"colour": {name: [captions]}, "shape": {name: [captions]}} of the ensembles."""
    return {
        "colour": {c: [_noun(c, s) for s in spec.shapes] + [_noun(c, None)]
                   for c in spec.colour_names},
        "shape": {s: [_noun(c, s) for c in spec.colour_names] + [_noun(None, s)]
                  for s in spec.shapes},
    }


def ensemble_features(clip: CLIP, params, prompts: dict) -> np.ndarray:
    """{class: [captions]} -> [K, P] renormalised mean embeddings, in ``prompts`` order."""
    out = []
    for captions in prompts.values():
        mean = text_features(clip, params, captions).mean(axis=0)
        out.append(mean / np.linalg.norm(mean))
    return np.stack(out)


def attribute_accuracy(clip: CLIP, params, examples: Sequence[dict], spec: WorldSpec,
                       features=None) -> dict:
    """Zero-shot colour and shape accuracy on one-object ``examples`` (``shapes`` dicts).

    Other examples are left out. ``features``: image embeddings [N, P] of all ``examples``
    if already computed (e.g. ``noised_latent_features``); default: ``image_features``.
    Returns {"colour_accuracy", "shape_accuracy", "num_colour", "num_shape", "chance_*"}.
    """
    one = np.array([int(e["num_objects"]) == 1 for e in examples], bool)
    if not one.any():
        raise ValueError("attribute_accuracy needs one-object examples.")
    if features is None:
        image = image_features(clip, params, np.stack([e["image"] for e in examples if
                                                       int(e["num_objects"]) == 1]))
    elif len(features) != len(examples):
        raise ValueError(f"attribute_accuracy: {len(features)} feature rows for "
                         f"{len(examples)} examples; give one row per example.")
    else:
        image = np.asarray(features)[one]
    examples = [e for e, keep in zip(examples, one) if keep]
    out = {}
    for attr, names in (("colour", spec.colour_names), ("shape", spec.shapes)):
        classes = ensemble_features(clip, params, class_prompts(spec)[attr])
        truth = np.array([int(e[attr][0]) for e in examples])
        keep = truth < len(names)  # an unnamed colour has no class
        pred = np.argmax(image[keep] @ classes.T, axis=-1)
        out[f"{attr}_accuracy"] = float(np.mean(pred == truth[keep]))
        out[f"num_{attr}"] = int(keep.sum())
        out[f"chance_{attr}"] = 1.0 / len(names)
    return out


def retrieval_recall_at_1(clip: CLIP, params, examples: Sequence[dict],
                          features=None) -> dict:
    """Image -> text and text -> image recall@1 among ``examples`` and their captions
    (``features``: their image embeddings if already computed, as in ``attribute_accuracy``)."""
    captions = [str(e["caption"]) for e in examples]
    image = (image_features(clip, params, np.stack([e["image"] for e in examples]))
             if features is None else np.asarray(features))
    text = text_features(clip, params, captions)
    sim = image @ text.T                                  # [images, texts]
    same = np.array([[a == b for b in captions] for a in captions])
    n = len(captions)
    i2t = same[np.arange(n), np.argmax(sim, axis=1)]
    t2i = same[np.argmax(sim, axis=0), np.arange(n)]
    return {"image_to_text_r1": float(i2t.mean()), "text_to_image_r1": float(t2i.mean()),
            "num": n, "chance_r1": float(same.sum(axis=1).mean() / n)}
