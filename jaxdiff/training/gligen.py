"""Training GLIGEN layers (Li et al. 2023) on a frozen base pipeline.

The base UNet becomes diffusers' ``attention_type="gated"`` UNet: a ``position_net``
(boxes' Fourier features + phrase embeddings -> grounding tokens) and, in every transformer
block, a gated self-attention ``fuser`` over [visual; grounding] tokens. Only these GLIGEN
layers (``models.gligen.split_params``) are trained; the base params (text encoder, UNet,
VAE) are constants of the loss and come back untouched. Every fuser adds its attention and
MLP through ``tanh(alpha)`` gates that start at zero, so before training the GLIGEN UNet
computes exactly the base UNet (``new_gligen_layers``).

Grounding comes from the shapes world's truth, written by the TFDS builder
(``data.grounding``: per object the noun phrase its caption says, e.g. "big blue square",
and the tight box of its mask). Each phrase is embedded once, as diffusers'
``StableDiffusionGLIGENPipeline`` does (pooled text-encoder output,
``gligen_sampling.phrase_embeddings``); latents are cached once (posterior means).
Per step, each image's objects fill the first of ``max_objs`` slots (mask 1; empty slots
mask 0, which the position net replaces by its learned null features), 30 by default as
the pipeline pads at sampling, so training sees the token count sampling does.

Dropout, as diffusers' GLIGEN training example: with probability ``grounding_dropout``
(0.1) all of an image's objects are dropped (every mask 0: the input the unconditional
half of guidance gives), and with probability ``caption_dropout`` (0.5) the caption is the
empty prompt, so the boxes alone must carry the layout; the two are drawn independently.
``gligen_scheduled_sampling_beta`` is a sampling option only (``gligen_sampling``);
training always runs the fusers.

``run_gligen`` is the recipe behind ``train/gligen.py``: Orbax checkpoints and exact resume
through ``loop.train_loop`` (``control.train_frozen``: the mesh and FSDP rules of the
config), and the export, a diffusers ``StableDiffusionGLIGENPipeline`` folder (the base
pipeline with the GLIGEN UNet) that ``jaxdiff generate --gligen DIR`` also reads.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxdiff.data.shapes import MAX_OBJECTS
from jaxdiff.gligen_sampling import MAX_OBJS, phrase_embeddings
from jaxdiff.models.attention import GatedSelfAttentionDense
from jaxdiff.models.gligen import dummy_gligen, merge_params, position_net, split_params
from jaxdiff.pipeline import Pipeline
from jaxdiff.training import control
from jaxdiff.training.text_to_image import encode_dataset
from jaxdiff.weights import load_pipeline, save_pipeline
from jaxdiff.weights.gligen import save_gligen_layers


def gligen_pipeline(pipe: Pipeline) -> Pipeline:
    """``pipe`` with its UNet made a text-box GLIGEN UNet (``attention_type="gated"``:
    the same blocks plus ``position_net`` and the fusers)."""
    if pipe.is_sdxl or pipe.is_transformer:
        raise ValueError(f"GLIGEN training needs an SD 1.x / 2.x UNet base pipeline; this "
                         f"one's denoiser is a {type(pipe.unet).__name__}"
                         f"{' (SDXL)' if pipe.is_sdxl else ''}.")
    cfg = pipe.unet.config
    if cfg.attention_type not in ("default", "gated"):
        raise ValueError(f"the base UNet has attention_type={cfg.attention_type!r}; GLIGEN "
                         "training makes the text-box variant ('gated') from a plain UNet.")
    return dataclasses.replace(pipe, unet=pipe.unet.clone(
        config=dataclasses.replace(cfg, attention_type="gated")))


@functools.lru_cache(maxsize=8)
def _fuser_shapes(width: int, context_dim: int):
    # A fuser's parameter shapes depend only on its width and the grounding tokens' width
    # (heads x head size = width, as diffusers builds it).
    fuser = GatedSelfAttentionDense(heads=1, dim_head=width)
    return jax.eval_shape(lambda: fuser.init(jax.random.key(0), jnp.zeros((1, 1, width)),
                                             jnp.zeros((1, 1, context_dim)))["params"])


@functools.lru_cache(maxsize=4)
def _position_net_shapes(dim: int):
    net = position_net("gated", dim)
    return jax.eval_shape(lambda: net.init(jax.random.key(0),
                                           **dummy_gligen("gated", dim))["params"])


def torch_like_init(shapes, rng: np.random.Generator) -> dict:
    """Values for a tree of Dense / LayerNorm parameter shapes as PyTorch initialises
    diffusers' GLIGEN layers: ``nn.Linear`` weights and biases uniform in
    +-1/sqrt(fan_in), LayerNorm scales 1 and biases 0, every other leaf (the fusers' gates
    ``alpha_attn`` / ``alpha_dense``, the null features) 0. Numpy, no compile."""
    flat = traverse_util.flatten_dict(shapes)
    out = {}
    for path, leaf in sorted(flat.items()):
        dense = flat.get(path[:-1] + ("kernel",))
        if path[-1] in ("kernel", "bias") and dense is not None:
            bound = 1.0 / np.sqrt(dense.shape[0])
            value = rng.uniform(-bound, bound, leaf.shape)
        else:
            value = np.full(leaf.shape, 1.0 if path[-1] == "scale" else 0.0)
        out[path] = jnp.asarray(value, jnp.float32)
    return traverse_util.unflatten_dict(out)


def open_attention_gates(layers, alpha: float):
    """``layers`` with every fuser's attention gate ``alpha_attn`` set to ``alpha`` and its
    attention's output projection (``attn.to_out_0``) zeroed: the GLIGEN UNet still starts
    exactly as the base UNet, but the gate is already open: the output projection gets
    gradients from the first step (and through it the attention's other weights), where
    diffusers' init makes everything wait on a gate near tanh(0) = 0."""
    flat = traverse_util.flatten_dict(layers)
    for k, v in flat.items():
        if "fuser" in k and (k[-1] == "alpha_attn" or k[-2:-1] == ("to_out_0",)):
            flat[k] = jnp.full_like(v, alpha if k[-1] == "alpha_attn" else 0.0)
    return traverse_util.unflatten_dict(flat)


def new_gligen_layers(pipe: Pipeline, params, seed: int = 0, attn_gate: float = 0.0):
    """(GLIGEN pipeline, base UNet params, GLIGEN layers) for ``pipe``: fresh layers (a
    ``position_net`` and one ``fuser`` beside every transformer block's ``attn1``),
    initialised as diffusers' ``UNet2DConditionModel(attention_type="gated")`` is
    (``torch_like_init``): every fuser's gates at zero, so the GLIGEN UNet starts as the
    base UNet. ``attn_gate`` != 0 starts the attention gates open instead
    (``open_attention_gates``; still exactly the base UNet). A base whose UNet already has
    text-box GLIGEN layers continues from them."""
    gpipe = gligen_pipeline(pipe)
    if pipe.unet.config.attention_type == "gated":
        base, layers = split_params(params["unet"])
        return gpipe, base, jax.tree.map(jnp.array, layers)
    dim = pipe.unet.config.cross_attention_dim
    shapes = {("position_net",): _position_net_shapes(dim)}
    for k, v in traverse_util.flatten_dict(params["unet"]).items():
        if k[-3:] == ("attn1", "to_q", "kernel"):
            shapes[k[:-3] + ("fuser",)] = _fuser_shapes(v.shape[0], dim)
    layers = torch_like_init(traverse_util.unflatten_dict(shapes),
                             np.random.default_rng(seed))
    if attn_gate:
        layers = open_attention_gates(layers, attn_gate)
    return gpipe, params["unet"], layers


def gligen_output(module, base_unet, layers, x, t, context, grounding):
    """The GLIGEN UNet's output: ``grounding`` = (boxes [B,N,4], phrase embeddings
    [B,N,D], masks [B,N]) as diffusers' ``cross_attention_kwargs["gligen"]``."""
    boxes, emb, masks = grounding
    return module.apply({"params": merge_params(base_unet, layers)}, x, t, context,
                        gligen=dict(boxes=boxes, masks=masks, positive_embeddings=emb))


def pad_slots(grounding, max_objs: int):
    """(boxes, embeddings, masks) with the object axis zero-padded to ``max_objs``."""
    pad = lambda a: jnp.pad(a, [(0, 0), (0, max_objs - a.shape[1])] + [(0, 0)] * (a.ndim - 2))
    return tuple(pad(jnp.asarray(a, jnp.float32)) for a in grounding)


def drop_grounding(masks, key, p):
    """masks [B,N] with every object of an image dropped (mask 0) with probability ``p``,
    independently per image."""
    keep = jax.random.uniform(key, (masks.shape[0],)) >= p
    return masks * keep[:, None].astype(masks.dtype)


def make_gligen_loss(pipe: Pipeline, frozen_params, module, base_unet, *,
                     max_objs: int = MAX_OBJS, caption_dropout: float = 0.5,
                     grounding_dropout: float = 0.1, min_timestep: int = 0):
    """``loss(layers, (latents, ids, boxes, embeddings, masks), rng) -> scalar``: the
    denoising loss of the frozen base with GLIGEN ``layers`` (dropout: module docstring;
    timesteps from [``min_timestep``, T)). Gradients flow only to ``layers``."""
    def denoiser(layers, extra, key):
        boxes, emb, masks = extra
        grounding = pad_slots((boxes, emb, drop_grounding(masks, key, grounding_dropout)),
                              max_objs)
        return lambda x, t, c: gligen_output(module, base_unet, layers, x, t, c, grounding)

    return control.frozen_denoising_loss(pipe, frozen_params, denoiser, caption_dropout,
                                         min_timestep)


def train_gligen(pipe: Pipeline, params, gpipe: Pipeline, base_unet, layers, latents, ids,
                 grounding, workdir: str, *, max_objs: int = MAX_OBJS,
                 caption_dropout: float = 0.5, grounding_dropout: float = 0.1,
                 min_timestep: int = 0, **kwargs):
    """Trains GLIGEN ``layers`` on cached latents [N,h,w,C], ids [N,L] and ``grounding``
    (boxes [N,K,4], phrase embeddings [N,K,D], masks [N,K]); ``params`` stay frozen.
    Resumes from ``workdir``'s checkpoints. ``kwargs``: ``control.train_frozen``'s.
    Returns the trained layers, gathered to the host."""
    check_options(max_objs=max_objs, caption_dropout=caption_dropout,
                  grounding_dropout=grounding_dropout, objects=grounding[0].shape[1],
                  min_timestep=min_timestep,
                  timesteps=pipe.scheduler.num_train_timesteps)
    loss = make_gligen_loss(pipe, params, gpipe.unet, base_unet, max_objs=max_objs,
                            caption_dropout=caption_dropout,
                            grounding_dropout=grounding_dropout, min_timestep=min_timestep)
    return control.train_frozen(loss, layers, (latents, ids) + tuple(grounding), workdir,
                                desc="GLIGEN", **kwargs)


def check_options(*, max_objs: int, caption_dropout: float, grounding_dropout: float,
                  objects: int = MAX_OBJECTS, min_timestep: int = 0,
                  timesteps: int = 1000) -> None:
    """One-line ValueError (naming the config field) for a slot count below the objects
    per scene, a dropout outside [0, 1] or a ``min_timestep`` outside [0, timesteps)."""
    if not 0 <= min_timestep < timesteps:
        raise ValueError(f"config.train.min_timestep={min_timestep}: use a timestep in "
                         f"[0, {timesteps}) (0 = train on every timestep).")
    if not objects <= max_objs <= 1024:
        raise ValueError(f"config.gligen.max_objs={max_objs}: needs at least the {objects} "
                         f"objects of a scene (and at most 1024); diffusers' pipeline uses "
                         f"{MAX_OBJS}.")
    for name, value in (("caption_dropout", caption_dropout),
                        ("grounding_dropout", grounding_dropout)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"config.train.{name}={value}: a probability, use a value in "
                             "[0, 1].")


@functools.partial(jax.jit, static_argnames=("pipe",))
def _embed_phrases(pipe: Pipeline, text_params, ids):
    return phrase_embeddings(pipe, {"text_encoder": text_params}, ids)


def grounding_arrays(pipe: Pipeline, params, source, batch_size: int = 256):
    """Records' ``phrases`` / ``boxes`` -> (boxes float32 [N,K,4], pooled phrase
    embeddings float32 [N,K,D] (zero for empty slots), masks float32 [N,K]: 1 for an
    object with a phrase and a box)."""
    boxes, embs, masks = [], [], []
    for start in range(0, len(source), batch_size):
        recs = [source[i] for i in range(start, min(len(source), start + batch_size))]
        phrases = [[p.decode("utf-8") if isinstance(p, bytes) else str(p)
                    for p in r["phrases"]] for r in recs]
        b, k = len(recs), len(phrases[0])
        ids = pipe.tokenize([p for ps in phrases for p in ps], warn=False).reshape(b, k, -1)
        xyxy = np.stack([np.asarray(r["boxes"], np.float32) for r in recs])
        # An object counts when it has a phrase and a box (a fully hidden one has none).
        mask = (np.array([[bool(p) for p in ps] for ps in phrases])
                & (xyxy[..., 2] > xyxy[..., 0])).astype(np.float32)
        emb = np.asarray(_embed_phrases(pipe, params["text_encoder"], ids))
        embs.append(emb * mask[..., None])
        boxes.append(xyxy)
        masks.append(mask)
    return np.concatenate(boxes), np.concatenate(embs), np.concatenate(masks)


def prepare_data(config, pipe: Pipeline, params, workdir: str):
    """The TFDS shapes world of ``config.data`` -> cached (latents, ids, (boxes, phrase
    embeddings, masks)) of its train split."""
    source = control.shapes_train_source(config, pipe, workdir)
    latents, ids = encode_dataset(pipe, params, source)
    return latents, ids, grounding_arrays(pipe, params, source)


def export_gligen(gpipe: Pipeline, params, base_unet, layers, out_dir: str) -> str:
    """Writes the base pipeline with the trained GLIGEN UNet as a diffusers pipeline folder
    (``StableDiffusionGLIGENPipeline.from_pretrained`` and ``--gligen`` read it)."""
    save_pipeline(gpipe, dict(params, unet=merge_params(base_unet, layers)), out_dir)
    return out_dir


def load_base(init_from: str):
    """``config.init_from`` -> (pipe, params): "" or "embedded" is the embedded model."""
    return load_pipeline(None if init_from in ("", "embedded") else init_from)


def run_gligen(config, workdir: str) -> str:
    """``configs/gligen.py`` -> GLIGEN layers for the base pipeline, exported as a
    diffusers GLIGEN pipeline folder; returns the folder."""
    train = config.train.to_dict()
    check_options(max_objs=config.gligen.max_objs, caption_dropout=train["caption_dropout"],
                  grounding_dropout=train["grounding_dropout"],
                  min_timestep=train.get("min_timestep", 0))
    os.makedirs(workdir, exist_ok=True)
    pipe, params = load_base(config.init_from)
    gpipe, base_unet, layers = new_gligen_layers(
        pipe, params, config.seed, attn_gate=config.gligen.get("attn_gate_init", 0.0))
    latents, ids, grounding = prepare_data(config, pipe, params, workdir)
    trained = train_gligen(pipe, params, gpipe, base_unet, layers, latents, ids, grounding,
                           os.path.join(workdir, "gligen"), max_objs=config.gligen.max_objs,
                           **control.loop_options(config), **train)
    out = config.export_dir or os.path.join(workdir, "export")
    if config.export_layers:
        return save_gligen_layers(gpipe.unet, trained, out, dtype=np.dtype(config.export_dtype))
    return export_gligen(gpipe, params, base_unet, trained, out)
