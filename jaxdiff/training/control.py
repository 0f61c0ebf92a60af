"""Training a ControlNet or a T2I-Adapter on a frozen base pipeline.

Only the new module is trained; the base pipeline's params (text encoder, UNet, VAE) are
constants of the loss and come back untouched. The loss is the standard denoising loss
(``losses.denoising_loss``) of the base UNet with the module's residuals added, exactly as
sampling applies them (``jaxdiff.control.controlled_unet``):

* ControlNet (Zhang et al. 2023): ``controlnet_from_unet`` builds it as diffusers'
  ``ControlNetModel.from_unet`` does: ``conv_in``, the time embedding, the down blocks
  and the mid block are copies of the base UNet's weights; the condition embedding is
  freshly initialised with its last convolution at zero, and every zero convolution
  (``controlnet_down_blocks_*``, ``controlnet_mid_block``) is zero, so before training the
  controlled UNet computes exactly the base UNet.
* T2I-Adapter (Mou et al. 2023): ``new_t2i_adapter`` builds one from scratch whose
  features fit the base UNet's down blocks.

Condition images are uint8 maps read from the shapes-world TFDS records (``segmentation``
or ``edges``, written by the builder, ``jaxdiff.data.conditions``), given to the module in
[0, 1] as diffusers' pipelines prepare them. Latents are cached once (posterior means, as
the text-to-image recipe does). ``run_controlnet`` / ``run_t2i_adapter`` are the recipes
behind ``train/controlnet.py`` / ``train/t2i_adapter.py``: Orbax checkpoints and exact
resume through ``loop.train_loop`` (the mesh and FSDP rules of ``configs/shapes.py``), and
a diffusers-format export (``weights.control.save_control_model``). The frozen-base loss,
loop and data pieces (``frozen_denoising_loss``, ``train_frozen``, ``shapes_train_source``,
``loop_options``) also serve GLIGEN training (``training.gligen``).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import parallel, schedules
from jaxdiff.data import tfds_shapes
from jaxdiff.models.controlnet import ControlNetConfig, ControlNetModel, controlnet_dummy_inputs
from jaxdiff.models.t2i_adapter import T2IAdapter, T2IAdapterConfig, adapter_dummy_inputs
from jaxdiff.models.unet import UNetConfig
from jaxdiff.pipeline import Pipeline
from jaxdiff.training import batching, losses
from jaxdiff.training import state as state_lib
from jaxdiff.training.loop import train_loop
from jaxdiff.training.optim import adamw_with_warmup
from jaxdiff.training.step import make_train_step
from jaxdiff.training.text_to_image import encode_dataset
from jaxdiff.weights import load_pipeline
from jaxdiff.weights.control import save_control_model

CONDITIONS = ("segmentation", "edges")
# diffusers' default conditioning embedding widths; the first log2(VAE factor) + 1 are used.
EMBEDDING_CHANNELS = (16, 32, 96, 256)
ZERO_CONVS = ("controlnet_down_blocks_", "controlnet_mid_block")
# The config fields a ControlNet copies from its UNet (same names in both configs).
SHARED_FIELDS = tuple(sorted({f.name for f in dataclasses.fields(ControlNetConfig)}
                             & {f.name for f in dataclasses.fields(UNetConfig)}))


def _check_base(pipe: Pipeline, what: str):
    if pipe.is_sdxl:
        raise ValueError(f"{what} training needs an SD 1.x / 2.x base pipeline; SDXL control "
                         "models are not supported yet.")


def controlnet_from_unet(pipe: Pipeline, params, embedding_channels: Sequence[int] = (),
                         seed: int = 0):
    """A ControlNet for ``pipe`` initialised from its UNet (diffusers'
    ``ControlNetModel.from_unet``). ``embedding_channels``: the condition embedding's
    widths (empty: diffusers' defaults, as many as the VAE factor needs).

    Returns (module, params): encoder weights copied, zero convolutions and the condition
    embedding's ``conv_out`` at zero, the rest of the embedding freshly initialised.
    """
    _check_base(pipe, "ControlNet")
    factor = pipe.vae_scale_factor
    n = int(np.log2(factor)) + 1
    emb = tuple(embedding_channels) or EMBEDDING_CHANNELS[:n]
    ucfg = pipe.unet.config
    cfg = ControlNetConfig(**{k: getattr(ucfg, k) for k in SHARED_FIELDS},
                           conditioning_embedding_out_channels=tuple(emb))
    cfg.check_matches(ucfg, factor, source="config.controlnet")
    module = ControlNetModel(cfg)
    fresh = module.init(jax.random.key(seed), *controlnet_dummy_inputs(module))["params"]
    unet = params["unet"]
    out = {}
    for name, sub in fresh.items():
        if name.startswith(ZERO_CONVS):
            out[name] = jax.tree.map(jnp.zeros_like, sub)
        elif name == "controlnet_cond_embedding":
            out[name] = dict(sub, conv_out=jax.tree.map(jnp.zeros_like, sub["conv_out"]))
        else:  # conv_in, time_embedding, down_blocks_*, mid_block: the UNet's own
            if jax.tree.structure(sub) != jax.tree.structure(unet[name]):
                raise ValueError(f"ControlNet part {name} does not match the UNet's.")
            out[name] = jax.tree.map(jnp.array, unet[name])
    return module, out


def new_t2i_adapter(pipe: Pipeline, num_res_blocks: int = 2,
                    adapter_type: str = "full_adapter", seed: int = 0):
    """A randomly initialised T2I-Adapter whose features fit ``pipe``'s UNet (channels =
    the UNet's ``block_out_channels``, ``downscale_factor`` = the VAE factor).
    Returns (module, params)."""
    _check_base(pipe, "T2I-Adapter")
    boc = tuple(pipe.unet.config.block_out_channels)
    cfg = T2IAdapterConfig(channels=boc if adapter_type != "light_adapter" else boc[:-1],
                           num_res_blocks=num_res_blocks,
                           downscale_factor=pipe.vae_scale_factor, adapter_type=adapter_type)
    cfg.validate("config.adapter")
    cfg.check_matches(pipe.unet.config, pipe.vae_scale_factor, source="config.adapter")
    module = T2IAdapter(cfg)
    return module, module.init(jax.random.key(seed), *adapter_dummy_inputs(module))["params"]


def controlled_output(pipe: Pipeline, unet_params, module, module_params, x, t, context,
                      cond):
    """The base UNet's output with ``module``'s residuals at scale 1 (``cond``: condition
    images [B, H, W, C] in [0, 1])."""
    if isinstance(module, ControlNetModel):
        down, mid = module.apply({"params": module_params}, x, t, context, cond)
        return pipe.unet.apply({"params": unet_params}, x, t, context,
                               down_block_additional_residuals=down,
                               mid_block_additional_residual=mid)
    feats = module.apply({"params": module_params}, cond)
    return pipe.unet.apply({"params": unet_params}, x, t, context,
                           down_intrablock_additional_residuals=feats)


def frozen_denoising_loss(pipe: Pipeline, frozen_params, denoiser,
                          caption_dropout: float = 0.0, min_timestep: int = 0):
    """``loss(trained, (latents, ids, *extra), rng) -> scalar``: the denoising loss of the
    frozen base pipeline's denoiser ``denoiser(trained, extra, key)`` (-> a ``(x, t,
    context) -> output`` function; ``key``: randomness of its own, e.g. grounding
    dropout). Captions are replaced by the empty prompt with probability
    ``caption_dropout``; timesteps from [``min_timestep``, T) (``losses.denoising_loss``).
    Gradients flow only to ``trained``; the base params are
    constants (ControlNet / T2I-Adapter here, GLIGEN layers in ``training.gligen``)."""
    empty = jnp.asarray(pipe.tokenize([""], warn=False)[0])
    alphas = schedules.alphas_cumprod(pipe.scheduler)

    def loss(p, batch, rng):
        latents, ids, *extra = batch
        k_drop, k_loss = jax.random.split(rng)
        drop = jax.random.uniform(k_drop, (ids.shape[0],)) < caption_dropout
        ids = jnp.where(drop[:, None], empty[None], ids)
        context = jax.lax.stop_gradient(pipe.encode_text(frozen_params, ids))
        denoise = denoiser(p, extra, jax.random.fold_in(k_drop, 1))
        per = losses.denoising_loss(denoise, alphas, pipe.scheduler.prediction_type,
                                    min_timestep=min_timestep)(latents, context, k_loss)
        return jnp.mean(per)

    return loss


def make_control_loss(pipe: Pipeline, frozen_params, module, caption_dropout: float = 0.0):
    """``loss(module_params, (latents, ids, cond uint8), rng) -> scalar``: the denoising
    loss of the frozen base pipeline with ``module`` applied. Captions are replaced by the
    empty prompt with probability ``caption_dropout`` (the condition alone must then
    carry the layout). Gradients flow only to ``module_params``."""
    unet_params = frozen_params["unet"]

    def denoiser(p, extra, key):
        del key
        images = extra[0].astype(jnp.float32) / 255.0
        return lambda x, t, c: controlled_output(pipe, unet_params, module, p, x, t, c,
                                                 images)

    return frozen_denoising_loss(pipe, frozen_params, denoiser, caption_dropout)


@functools.lru_cache(maxsize=4)
def _train_step(loss_fn, lr: float, warmup: int, steps: int, weight_decay: float):
    """(optimizer, step function) of one loss and schedule: the same objects for a run
    and its resumption in one process, so its program is compiled once."""
    opt = adamw_with_warmup(lr, warmup, steps, weight_decay=weight_decay)
    return opt, make_train_step(loss_fn, opt)


def train_frozen(loss_fn, trained_params, arrays: Sequence[np.ndarray], workdir: str, *,
                 steps: int, batch_size: int, lr: float, warmup: int = 100,
                 weight_decay: float = 1e-2, seed: int = 0, log_every: int = 50,
                 ckpt_every: int = 500, mesh=None, rules: Sequence = parallel.DEFAULT_RULES,
                 fsdp_min_size: int = 0, desc: str = "train"):
    """Trains ``trained_params`` with ``loss_fn(params, batch, rng)`` on cached ``arrays``
    (equal first dimension; a batch is the same rows of each) through ``loop.train_loop``:
    AdamW with warmup, Orbax checkpoints in ``workdir`` and exact resume from them, the
    mesh and FSDP ``rules``. Returns the raw (not EMA) params, gathered to the host."""
    os.makedirs(workdir, exist_ok=True)
    opt, step = _train_step(loss_fn, lr, warmup, steps, weight_decay)

    def batch_fn(s):
        idx = batching.host_slice(batching.batch_indices(len(arrays[0]), batch_size, s, seed))
        return tuple(jnp.asarray(a[idx]) for a in arrays)

    state = state_lib.create(trained_params, opt, seed, ema=False)
    state = train_loop(step, state, batch_fn, steps, workdir,
                       log_every=log_every, ckpt_every=ckpt_every, desc=desc, mesh=mesh,
                       rules=rules, fsdp_min_size=fsdp_min_size)
    return parallel.gather(state.params)


def train_control(pipe: Pipeline, params, module, module_params, latents, ids, conds,
                  workdir: str, *, caption_dropout: float = 0.0, **kwargs):
    """Trains ``module_params`` on cached (latents [N,h,w,C], ids [N,L], conds uint8
    [N,H,W,C]); the pipeline's ``params`` stay frozen. Resumes from ``workdir``'s
    checkpoints. ``kwargs``: ``train_frozen``'s (steps, batch_size, lr, ...). Returns the
    raw (not EMA) trained params, gathered to the host."""
    return train_frozen(make_control_loss(pipe, params, module, caption_dropout),
                        module_params, (latents, ids, conds), workdir,
                        desc=type(module).__name__, **kwargs)


def shapes_train_source(config, pipe: Pipeline, workdir: str):
    """The train split of the TFDS shapes world of ``config.data`` (prepared once under
    ``config.data.data_dir``, default ``<workdir>/tfds``), checked against the base."""
    d = config.data
    if d.image_size != pipe.image_size:
        raise ValueError(f"config.data.image_size={d.image_size} but the base model makes "
                         f"{pipe.image_size}x{pipe.image_size} images; make them equal.")
    jitter = float(d.get("jitter", 0.0))
    name = f"px{d.image_size}_n{d.num_train}" + (f"_j{jitter:g}" if jitter else "")
    builder = tfds_shapes.prepare(d.data_dir or os.path.join(workdir, "tfds"),
                                  tfds_shapes.ShapesConfig(
        name=name, image_size=d.image_size, num_train=d.num_train, num_test=d.num_test,
        seed=config.seed, p_two_objects=d.p_two_objects, jitter=jitter, world=d.world))
    return builder.as_data_source()["train"]


def loop_options(config) -> dict:
    """``train_frozen``'s keywords from a recipe config (``train``, ``seed``, logging,
    checkpoints and ``mesh``), without the recipe's own ``extra`` train fields."""
    return dict(seed=config.seed, log_every=config.log_every,
                ckpt_every=config.checkpoint_every,
                mesh=parallel.make_mesh(fsdp=config.mesh.fsdp),
                rules=[tuple(r) for r in config.mesh.rules],
                fsdp_min_size=config.mesh.fsdp_min_size)


def prepare_data(config, pipe: Pipeline, params, workdir: str):
    """The TFDS shapes world of ``config.data`` -> cached (latents, ids, condition maps)
    of its train split; ``config.condition`` names the map."""
    if config.condition not in CONDITIONS:
        raise ValueError(f"config.condition={config.condition!r}; use one of "
                         f"{list(CONDITIONS)}.")
    source = shapes_train_source(config, pipe, workdir)
    latents, ids = encode_dataset(pipe, params, source)
    conds = np.stack([np.asarray(source[i][config.condition], np.uint8)
                      for i in range(len(source))])
    return latents, ids, conds


def _run(config, workdir: str, build) -> str:
    os.makedirs(workdir, exist_ok=True)
    pipe, params = load_pipeline(config.model or None)
    module, module_params = build(pipe, params)
    latents, ids, conds = prepare_data(config, pipe, params, workdir)
    trained = train_control(
        pipe, params, module, module_params, latents, ids, conds,
        os.path.join(workdir, type(module).__name__.lower()), **loop_options(config),
        **config.train.to_dict())
    return save_control_model(module, trained,
                              config.export_dir or os.path.join(workdir, "export"),
                              dtype=np.dtype(config.export_dtype))


def run_controlnet(config, workdir: str) -> str:
    """``configs/controlnet.py`` -> a ControlNet for the base pipeline, exported as a
    diffusers ``ControlNetModel`` folder; returns the folder."""
    return _run(config, workdir, lambda pipe, params: controlnet_from_unet(
        pipe, params, tuple(config.controlnet.conditioning_embedding_out_channels),
        config.seed))


def run_t2i_adapter(config, workdir: str) -> str:
    """``configs/t2i_adapter.py`` -> a T2I-Adapter for the base pipeline, exported as a
    diffusers ``T2IAdapter`` folder; returns the folder."""
    return _run(config, workdir, lambda pipe, params: new_t2i_adapter(
        pipe, config.adapter.num_res_blocks, config.adapter.adapter_type, config.seed))
