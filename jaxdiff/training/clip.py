"""Contrastive training of a CLIP on the shapes world (symmetric InfoNCE, learned temperature).

``clip_loss`` is CLIP's objective (Radford et al. 2021): cross-entropy of the image->text
and text->image similarity logits, averaged. The shapes world repeats captions within a
batch ("a red object"), so rows with the same caption are all positives (soft targets
spread evenly over them) instead of false negatives. ``logit_scale`` (the log inverse
temperature) is a parameter, clipped at log(100) as CLIP does.

``noisy=True`` trains a noise-aware CLIP for guidance on x_t: its images are the
embedded model's VAE latents (``[8, 8, 4]``), noised by the embedded model's schedule at a
uniform random timestep, and the timestep goes in through a ``TimeToken`` added to the
class token. The clean CLIP reads pixels ([-1, 1]); SDG on the predicted x0 decodes x0 and
uses it.

``run_clip(config, workdir)`` is the recipe behind ``train/clip.py`` (``configs/clip.py``):
TFDS data of the chosen world, the embedded model's tokenizer, Orbax checkpoints and
resume through ``loop.train_loop``, and a transformers-layout export (``save_clip``).
``config.init_from`` (an exported CLIP folder, e.g. the shipped one) starts from those
weights instead of a random init (``initial_params``); a checkpoint in the workdir still wins.
"""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff import parallel, schedules
from jaxdiff.data import tfds_shapes
from jaxdiff.data.tokenizer import load_tokenizer
from jaxdiff.models.clip import CLIPConfig, CLIPModel, CLIPVisionConfig, TimeToken
from jaxdiff.models.clip_text import CLIPTextProjectionConfig
from jaxdiff.pipeline import from_uint8
from jaxdiff.training import batching
from jaxdiff.training import state as state_lib
from jaxdiff.training.latents import encode_latents
from jaxdiff.training.loop import train_loop
from jaxdiff.training.optim import adamw_with_warmup
from jaxdiff.training.step import make_train_step
from jaxdiff.weights import DEFAULT_MODEL, load_pipeline
from jaxdiff.weights.clip_format import CLIP, load_clip, save_clip

MAX_LOGIT_SCALE = math.log(100.0)


def clip_loss(logits_per_text, same_caption=None):
    """Symmetric InfoNCE. logits_per_text: [B, B] (text i vs image j); ``same_caption``
    [B, B] bool marks extra positives (None: the diagonal only). Returns a scalar."""
    n = logits_per_text.shape[0]
    pos = jnp.eye(n, dtype=bool) if same_caption is None else same_caption
    targets = pos / jnp.sum(pos, axis=-1, keepdims=True)
    text = optax.softmax_cross_entropy(logits_per_text, targets)
    image = optax.softmax_cross_entropy(logits_per_text.T, targets.T)
    return 0.5 * (jnp.mean(text) + jnp.mean(image))


def make_loss_fn(clip: CLIP, alphas_cumprod=None):
    """``loss_fn(params, (inputs [B,H,W,C], ids [B,L]), rng) -> scalar``; with
    ``alphas_cumprod`` (noise-aware CLIP) the inputs are noised at random timesteps."""
    def loss_fn(params, batch, rng):
        x, ids = batch
        t = None
        if alphas_cumprod is not None:
            k_t, k_eps = jax.random.split(rng)
            t = jax.random.randint(k_t, (x.shape[0],), 0, alphas_cumprod.shape[0])
            x = schedules.add_noise(alphas_cumprod, x, jax.random.normal(k_eps, x.shape), t)
        text = clip.text_embeds(params, ids)
        image = clip.image_embeds(params, x, t)
        scale = jnp.exp(jnp.minimum(params["model"]["logit_scale"], MAX_LOGIT_SCALE))
        same = jnp.all(ids[:, None] == ids[None], axis=-1)
        return clip_loss(scale * text @ image.T, same)
    return loss_fn


def build_clip(tokenizer, text: dict, vision: dict, projection_dim: int,
               noisy: bool = False, noise_schedule=None) -> CLIP:
    """A CLIP bundle from upstream-named text / vision config dicts (the text tower's
    vocabulary, eos id and context length come from ``tokenizer``)."""
    text_cfg = CLIPTextProjectionConfig.from_dict(dict(
        text, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
        max_position_embeddings=tokenizer.model_max_length, projection_dim=projection_dim),
        "config.text")
    vision_cfg = CLIPVisionConfig.from_dict(dict(vision, projection_dim=projection_dim),
                                            "config.vision")
    model = CLIPModel(CLIPConfig(text_cfg, vision_cfg, projection_dim))
    time_token = TimeToken(vision_cfg.hidden_size) if noisy else None
    half = (0.5,) * vision_cfg.num_channels   # [-1, 1] images (or latents) as they are
    return CLIP(model, tokenizer, half, half, time_token=time_token,
                noise_schedule=noise_schedule if noisy else None)


def init_params(clip: CLIP, seed: int = 0) -> dict:
    vis = clip.model.config.vision_config
    ids = jnp.zeros((1, clip.model.config.text_config.max_position_embeddings), jnp.int32)
    pix = jnp.zeros((1, vis.image_size, vis.image_size, vis.num_channels))
    k_model, k_time = jax.random.split(jax.random.key(seed))
    params = {"model": clip.model.init(k_model, ids, pix)["params"]}
    if clip.time_token is not None:
        params["time_embedding"] = clip.time_token.init(k_time, jnp.zeros((1,)))["params"]
    return params


def initial_params(clip: CLIP, seed: int = 0, init_from: str = "") -> dict:
    """Random init (``init_from=""``) or the weights of an exported CLIP folder, which must
    have exactly the shapes of ``clip`` (same config); raises ValueError otherwise."""
    if not init_from:
        return init_params(clip, seed)
    _, loaded = load_clip(init_from)
    def sizes(tree):
        return jax.tree.map(lambda a: f"{tuple(a.shape)} {a.dtype}", tree)
    # The config's shapes without drawing (and discarding) a random init.
    if sizes(jax.eval_shape(lambda: init_params(clip, seed))) != sizes(loaded):
        raise ValueError(f"config.init_from={init_from!r}: its weights do not fit the "
                         "config's model (sizes, layers or noisy flag differ); use the "
                         "config it was trained with.")
    return jax.tree.map(jnp.asarray, loaded)


def train_clip(clip: CLIP, params, inputs: np.ndarray, ids: np.ndarray, workdir: str, *,
               steps: int, batch_size: int, lr: float, warmup: int = 100,
               weight_decay: float = 0.1, alphas_cumprod=None, seed: int = 0,
               log_every: int = 50, ckpt_every: int = 500, mesh=None):
    """Trains ``params`` on (inputs [N,H,W,C] float, ids [N,L]) held in memory; returns
    the raw (not EMA) params. Resumes from ``workdir``'s checkpoints."""
    os.makedirs(workdir, exist_ok=True)
    opt = adamw_with_warmup(lr, warmup, steps, weight_decay=weight_decay)
    acp = None if alphas_cumprod is None else jnp.asarray(alphas_cumprod, jnp.float32)

    def batch_fn(s):
        idx = batching.host_slice(batching.batch_indices(len(inputs), batch_size, s, seed))
        return jnp.asarray(inputs[idx]), jnp.asarray(ids[idx])

    state = state_lib.create(params, opt, seed, ema=False)
    state = train_loop(make_train_step(make_loss_fn(clip, acp), opt), state, batch_fn, steps,
                       workdir, log_every=log_every, ckpt_every=ckpt_every, desc="clip",
                       mesh=mesh)
    return parallel.gather(state.params)


def run_clip(config, workdir: str) -> str:
    """``configs/clip.py`` -> a trained CLIP exported in transformers' layout; returns
    the export folder."""
    os.makedirs(workdir, exist_ok=True)
    d = config.data
    builder = tfds_shapes.prepare(d.data_dir or os.path.join(workdir, "tfds"),
                                  tfds_shapes.ShapesConfig(
        name=f"px{d.image_size}_n{d.num_train}", image_size=d.image_size,
        num_train=d.num_train, num_test=d.num_test, seed=config.seed,
        p_two_objects=d.p_two_objects, world=d.world))
    source = builder.as_data_source()["train"]
    images, captions = batching.read_batch(source, range(len(source)))
    tokenizer = load_tokenizer(os.path.join(DEFAULT_MODEL, "tokenizer"))
    vision = dict(config.model.vision)
    schedule = acp = None
    if config.noisy:
        pipe, pipe_params = load_pipeline(None)
        inputs = encode_latents(pipe, pipe_params, images)
        vision.update(image_size=inputs.shape[1], num_channels=inputs.shape[3])
        schedule = pipe.scheduler.to_dict()
        acp = np.asarray(schedules.alphas_cumprod(pipe.scheduler))
    else:
        if vision.get("image_size", d.image_size) != d.image_size:
            raise ValueError(f"config.model.vision.image_size={vision['image_size']} differs "
                             f"from config.data.image_size={d.image_size}; make them equal.")
        inputs = np.asarray(from_uint8(images))
    clip = build_clip(tokenizer, dict(config.model.text), vision,
                      config.model.projection_dim, config.noisy, schedule)
    ids = clip.tokenize(captions)
    init = initial_params(clip, config.seed, config.get("init_from", ""))
    params = train_clip(clip, init, inputs, ids,
                        os.path.join(workdir, "clip"), alphas_cumprod=acp, seed=config.seed,
                        log_every=config.log_every, ckpt_every=config.checkpoint_every,
                        mesh=parallel.make_mesh(), **config.train.to_dict())
    return save_clip(clip, params, config.export_dir or os.path.join(workdir, "export"))
