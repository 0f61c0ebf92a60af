"""Training the noisy-latent classifier of classifier guidance on shapes-world attributes.

``train_classifier`` fits a ``models.noisy_classifier.NoisyClassifier`` to the attributes
of one-object scenes from their VAE latents, noised at uniform random timesteps of the
pipeline's schedule (cross-entropy summed over the heads), with the shared train loop
(jitted donated step, Orbax checkpoints, resume). ``accuracy_by_timestep`` scores it on
held-out scenes. ``run_classifier`` runs ``configs/classifier.py`` for
``train/classifier.py``: the world's TFDS data (``data.tfds_shapes``), the pipeline
(default: the embedded model), training, the export folder and its figures.
"""
from __future__ import annotations

import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff import parallel, schedules
from jaxdiff.data import shapes, tfds_shapes
from jaxdiff.data.images import write_json
from jaxdiff.models.noisy_classifier import (NoisyClassifier, NoisyClassifierConfig,
                                             save_classifier)
from jaxdiff.pipeline import Pipeline
from jaxdiff.training import batching
from jaxdiff.training import state as state_lib
from jaxdiff.training.latents import encode_latents
from jaxdiff.training.loop import train_loop
from jaxdiff.training.optim import adamw_with_warmup
from jaxdiff.training.step import make_train_step
from jaxdiff.weights import load_pipeline


def attribute_heads(spec: shapes.WorldSpec) -> tuple:
    """(heads, labels) of a classifier of the world's colour (named + "unnamed") and shape."""
    colours = tuple(spec.colour_names) + (shapes.UNNAMED,)
    return ((("colour", len(colours)), ("shape", len(spec.shapes))),
            (("colour", colours), ("shape", tuple(spec.shapes))))


def latents_and_labels(pipe: Pipeline, params, source, heads: Sequence[str]):
    """(scaled latents [N,h,w,C], {head: int [N]}) of the one-object examples of a
    random-access source (``tfds_shapes`` features: per-object ids, first object)."""
    examples = [source[i] for i in range(len(source))]
    keep = [e for e in examples if int(e["num_objects"]) == 1]
    if not keep:
        raise ValueError("the data has no one-object scenes; set data.p_two_objects < 1.")
    images = np.stack([np.asarray(e["image"], np.uint8) for e in keep])
    labels = {h: np.asarray([int(np.asarray(e[h])[0]) for e in keep], np.int32) for h in heads}
    return encode_latents(pipe, params, images), labels


def noisy_ce_loss(model: NoisyClassifier, alphas_cumprod):
    """``loss(params, (x0, labels), rng) -> scalar``: cross-entropy of every head on
    ``x0`` noised at a uniform random timestep (the classifier sees what guidance feeds it)."""
    ac = jnp.asarray(alphas_cumprod, jnp.float32)

    def loss(p, batch, rng):
        x0, labels = batch
        k_t, k_n = jax.random.split(rng)
        t = jax.random.randint(k_t, (x0.shape[0],), 0, ac.shape[0])
        x_t = schedules.add_noise(ac, x0, jax.random.normal(k_n, x0.shape), t)
        logits = model.apply({"params": p}, x_t, t)
        return sum(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits[h], y))
                   for h, y in labels.items())

    return loss


def train_classifier(pipe: Pipeline, model: NoisyClassifier, latents, labels, workdir: str, *,
                     steps: int, batch_size: int, lr: float, warmup: int = 100, seed: int = 0,
                     log_every: int = 50, ckpt_every: int = 500, ema_decay: float = 0.999):
    """Trains ``model`` on (latents [N,h,w,C], {head: [N]}); returns its EMA params."""
    os.makedirs(workdir, exist_ok=True)
    x = jnp.zeros((1,) + latents.shape[1:])
    init = jax.jit(model.init)(jax.random.key(seed), x, jnp.zeros((1,)))["params"]
    opt = adamw_with_warmup(lr, warmup, steps)
    loss_fn = noisy_ce_loss(model, schedules.alphas_cumprod(pipe.scheduler))

    def batch_fn(s):
        idx = batching.host_slice(batching.batch_indices(len(latents), batch_size, s, seed))
        return jnp.asarray(latents[idx]), {h: jnp.asarray(y[idx]) for h, y in labels.items()}

    state = train_loop(make_train_step(loss_fn, opt, ema_decay), state_lib.create(init, opt, seed),
                       batch_fn, steps, workdir, log_every=log_every, ckpt_every=ckpt_every,
                       desc="classifier")
    return parallel.gather(state.ema_params)


@functools.partial(jax.jit, static_argnames=("model",))
def _logits_at(model, params, x0, noise, t, alphas_cumprod):
    x_t = schedules.add_noise(alphas_cumprod, x0, noise, t)
    return model.apply({"params": params}, x_t, t)


def accuracy_by_timestep(pipe: Pipeline, model: NoisyClassifier, params, latents, labels,
                         timesteps: Sequence[int] = (0, 250, 500, 750, 999), seed: int = 0):
    """{head: {t: accuracy}} on (latents, labels) noised at each timestep (fixed noise)."""
    ac = jnp.asarray(schedules.alphas_cumprod(pipe.scheduler), jnp.float32)
    noise = jax.random.normal(jax.random.key(seed), latents.shape)
    out = {h: {} for h in labels}
    for t in timesteps:
        logits = _logits_at(model, params, jnp.asarray(latents), noise,
                            jnp.full((len(latents),), t, jnp.int32), ac)
        for h, y in labels.items():
            out[h][str(t)] = float(np.mean(np.asarray(logits[h]).argmax(-1) == y))
    return out


def run_classifier(config, workdir: str) -> str:
    """``configs/classifier.py`` -> an exported classifier folder (with ``metrics.json``)."""
    os.makedirs(workdir, exist_ok=True)
    pipe, params = load_pipeline(config.model or None)
    d = config.data
    builder = tfds_shapes.prepare(d.data_dir or os.path.join(workdir, "tfds"),
                                  tfds_shapes.ShapesConfig(
                                      name=f"px{d.image_size}_n{d.num_train}_one",
                                      image_size=d.image_size, num_train=d.num_train,
                                      num_test=d.num_test, seed=config.seed,
                                      p_two_objects=0.0, world=d.world))
    if d.image_size != pipe.image_size:
        raise ValueError(f"config.data.image_size={d.image_size} but the pipeline makes "
                         f"{pipe.image_size}px images; set them equal.")
    heads, names = attribute_heads(shapes.world(d.world))
    cfg = NoisyClassifierConfig(in_channels=pipe.unet.config.in_channels,
                                block_out_channels=tuple(config.classifier.block_out_channels),
                                layers_per_block=config.classifier.layers_per_block,
                                norm_num_groups=config.classifier.norm_num_groups,
                                heads=heads, labels=names)
    model = NoisyClassifier(cfg)
    splits = builder.as_data_source()
    train_x, train_y = latents_and_labels(pipe, params, splits["train"], dict(heads))
    cp = train_classifier(pipe, model, train_x, train_y, os.path.join(workdir, "train"),
                          steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                          warmup=config.warmup, seed=config.seed, log_every=config.log_every,
                          ckpt_every=config.checkpoint_every)
    test_x, test_y = latents_and_labels(pipe, params, splits["test"], dict(heads))
    export = config.export_dir or os.path.join(workdir, "export")
    save_classifier(export, cfg, cp)
    metrics = {"held_out_accuracy": accuracy_by_timestep(pipe, model, cp, test_x, test_y),
               "num_train": len(train_x), "num_test": len(test_x),
               "model": config.model or "embedded:shapes", "world": d.world}
    write_json(os.path.join(export, "metrics.json"), metrics)
    print({h: v for h, v in metrics["held_out_accuracy"].items()})
    return export
