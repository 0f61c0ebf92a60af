"""Imagic (Kawar et al. 2023): text-based real-image editing by fine-tuning, three stages.

For an image x (latent z0) and a target text embedding e_tgt:

  (a) ``optimize_embedding``: e_opt = argmin_e E_{t, eps} ||eps_theta(z_t, t, e) - eps||^2,
      starting at e_tgt, the model frozen (Adam; paper: 100 steps, lr 1e-3 on SD);
  (b) ``finetune``: the model (full UNet or LoRA adapters, ``dreambooth.make_trainable``)
      trained with the same denoising loss on z0 with e_opt frozen (DreamBooth's loss
      without prior preservation; paper: 1500 steps, lr 5e-7, full UNet on SD);
  (c) ``sample_variants``: plain text-to-image sampling (DDIM from pure noise, CFG
      against the negative prompt) from e(eta) = eta * e_tgt + (1 - eta) * e_opt with the
      fine-tuned model. eta = 0 reconstructs the input; larger eta moves toward the text.

Both optimisations are ``lax.scan`` loops of the training step ``training.step
.make_train_step`` (AdamW with global-norm clipping, ``training.optim.constant_adamw``),
and stage (c) is ``sdedit.sdedit_latents`` (at strength 1 from pure noise for Imagic), so
``tuned_edit`` is one compiled program: encode -> (a) -> (b) -> (c) for every variant ->
decode. UniTune (``unitune.py``) is the same program with stage (a) off, SDEdit from the
noised image and a blend toward the input. Images are independent rows: each has its own
e_opt and its own trained pytree (``vmap`` over images; with LoRA only the adapted
attention kernels exist once per image, with full fine-tuning the whole UNet does, so
LoRA is the default). The variants (eta, strength, blend) are traced vectors (a sweep is
one program, ``vmap`` over them sharing the image's model); learning rates and the
guidance scale are traced too; step counts, the LoRA rank and the number of variants are
static. A learning rate of 0 leaves that stage's start point unchanged (the base model,
or e_tgt) in the same compiled program.

References: Kawar et al., "Imagic: Text-Based Real Image Editing with Diffusion
Models", CVPR 2023.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import schedules
from jaxdiff.editing import batch_inputs, partial_trajectory, sdedit
from jaxdiff.sampling import prompt_list
from jaxdiff.samplers import make_sampler
from jaxdiff.training import dreambooth, losses
from jaxdiff.training.optim import constant_adamw
from jaxdiff.training.state import TrainState
from jaxdiff.training.step import make_train_step


class Stages(NamedTuple):
    """Static sizes of the two optimisation stages (``configs/imagic.py`` states the
    embedded model's values and the paper's Stable Diffusion ones)."""
    embedding_steps: int = 100     # (a) Adam steps on the text embedding
    finetune_steps: int = 200      # (b) steps on the model (LoRA or full UNet)
    lora_rank: int = 4             # 0 = full UNet fine-tuning (one UNet copy per image)
    draws: int = 4                 # (t, noise) draws of z0 per step (the step's batch)


def fit(loss_fn, params, lr, steps: int, batch, key, weight_decay: float = 1e-2):
    """``steps`` AdamW steps (``make_train_step``) of ``loss_fn(params, batch, rng)`` from
    ``params`` in one ``lax.scan``; ``lr`` traced (0 returns ``params`` unchanged).

    Returns:
      (trained params, losses [steps]).
    """
    opt = constant_adamw(lr, weight_decay=weight_decay)
    step = make_train_step(loss_fn, opt)
    state = TrainState(jnp.zeros((), jnp.int32), params, opt.init(params), None,
                       jax.random.key_data(key))

    def body(st, _):
        st, metrics = step(st, batch)
        return st, metrics["loss"]

    state, curve = jax.lax.scan(body, state, None, length=steps)
    return state.params, curve


def _repeat(x, n: int):
    return jnp.repeat(x[None], n, axis=0)


def optimize_embedding(pipe, params, z0, e_tgt, key, *, lr, steps: int, draws: int = 4):
    """Stage (a): the text embedding that best reconstructs one image, model frozen.

    Args:
      z0: [h, w, C] scaled image latent; e_tgt: [L, D] target text embedding (the start;
        a micro-conditioned text DiT gets z0's resolution / aspect ratio added per call).
      lr: Adam learning rate (traced); steps, draws: static (``Stages``).
    Returns:
      (e_opt [L, D], losses [steps]).
    """
    denoise = batch_inputs.unet_denoiser(pipe, params)  # closed over: no gradient to it
    per_row = losses.denoising_loss(denoise, schedules.alphas_cumprod(pipe.scheduler),
                                    pipe.scheduler.prediction_type)

    def loss(e, batch, rng):
        x0, f = batch["latents"], pipe.vae_scale_factor
        cond = pipe.add_time_ids(jnp.broadcast_to(e, (x0.shape[0],) + e.shape),
                                 x0.shape[1] * f, x0.shape[2] * f)  # a text DiT's micro-conditions
        return jnp.mean(per_row(x0, cond, rng))

    return fit(loss, e_tgt, lr, steps, {"latents": _repeat(z0, draws)}, key, weight_decay=0.0)


def finetune(pipe, trainable: dreambooth.Trainable, z0, context, key, *, lr, steps: int,
             draws: int = 4):
    """Stage (b) (and UniTune's fine-tuning): the trainable pytree of ``trainable``
    (``dreambooth.make_trainable``: LoRA adapters or the UNet) trained to denoise one image
    under a frozen context, with DreamBooth's loss (no prior preservation).

    Args:
      z0: [h, w, C] scaled image latent; context: [L, D] frozen text embedding.
      lr: AdamW learning rate (traced; 0 keeps the start, i.e. the base model).
    Returns:
      (trained pytree, losses [steps]); ``trainable.merge(trained)`` are full params.
    """
    loss = dreambooth.make_dreambooth_loss(pipe, trainable.merge, train_text_encoder=False,
                                           prior_preservation=False)
    batch = {"instance_latents": _repeat(z0, draws), "instance_text": _repeat(context, draws)}
    return fit(loss, trainable.params, lr, steps, batch, key)


def refuse_caption_mask(pipe, method: str) -> None:
    """One-line ValueError, before any compile, for a caption-masked text DiT: the
    embedding optimisation and interpolation here work on a plain [L, D] array."""
    if pipe.uses_caption_mask:
        raise ValueError(f"{method} works on plain text-embedding arrays; this text DiT's "
                         "condition carries a caption mask: use dataclasses.replace(pipe, "
                         "caption_mask=False) or a U-Net pipeline.")


def interpolate(e_tgt, e_opt, eta):
    """e(eta) = eta * e_tgt + (1 - eta) * e_opt (paper eq. 3)."""
    return eta * e_tgt + (1.0 - eta) * e_opt


def sample_variants(denoise, sampler, alphas_cumprod, z0, noise, e_tgt, e_opt, uncond, key,
                    etas, strengths, from_noise, blends, guidance):
    """Stage (c), one image: a sample per variant (eta, strength, blend), same start noise.

    Each variant runs SDEdit (``sdedit.sdedit_latents``) from strength ``s`` toward
    e(eta) with CFG against ``uncond``. With ``from_noise`` = 1 the start is pure noise
    (the image's latent is not mixed in: Imagic's plain sampling, exactly diffusers'
    text-to-image start at strength 1); 0 is SDEdit's noised image (UniTune). The result
    is then ``blend * z0 + (1 - blend) * sample`` (UniTune's interpolation toward the
    input, in latent space; 0 keeps the sample).

    Args:
      denoise: ``(x, t, context) -> output`` of the fine-tuned model.
      z0, noise: [h, w, C]; e_tgt, e_opt, uncond: [L, D]; key: this image's key.
      etas, strengths, blends: [E] (traced); from_noise: scalar 0 or 1 (traced).
    Returns:
      [E, h, w, C] latents.
    """
    steps = sampler.num_evals

    def one(eta, strength, blend):
        start = partial_trajectory.start_index(strength, steps)
        a = jnp.asarray(alphas_cumprod)[jnp.asarray(sampler.timesteps)[jnp.minimum(start,
                                                                                  steps - 1)]]
        # From noise: z0 -> 0 and noise / sqrt(1 - abar), so add_noise gives the noise itself.
        n = noise * jnp.where(from_noise > 0, jax.lax.rsqrt(1.0 - a), 1.0)
        cond = interpolate(e_tgt, e_opt, eta)[None]
        lat = sdedit.sdedit_latents(denoise, sampler, alphas_cumprod,
                                    ((1.0 - from_noise) * z0)[None], n[None], cond,
                                    uncond[None], strength[None], guidance, key[None])[0]
        return blend * z0 + (1.0 - blend) * lat

    return jax.vmap(one)(etas, strengths, blends)


@functools.lru_cache(maxsize=16)
def _compiled(pipe, steps: int, stages: Stages, mesh=None):
    ac = jnp.asarray(schedules.alphas_cumprod(pipe.scheduler), jnp.float32)

    def run(params, images, ids_start, ids_target, neg_ids, keys, etas, strengths, blends,
            from_noise, embedding_lr, finetune_lr, guidance):
        sampler = make_sampler("ddim", pipe.scheduler, steps)
        z0 = pipe.encode_images(params, images)
        e_start, e_tgt = pipe.encode_text(params, ids_start), pipe.encode_text(params, ids_target)
        uncond = pipe.encode_text(params, neg_ids)
        trainable = dreambooth.make_trainable(params, lora_rank=stages.lora_rank)

        def one(z, e0, e, u, key, emb_lr, ft_lr):
            k_emb, k_ft, k_noise = jax.random.split(key, 3)
            e_opt, emb_curve = optimize_embedding(pipe, params, z, e0, k_emb, lr=emb_lr,
                                                  steps=stages.embedding_steps,
                                                  draws=stages.draws)
            trained, ft_curve = finetune(pipe, trainable, z, e_opt, k_ft, lr=ft_lr,
                                         steps=stages.finetune_steps, draws=stages.draws)
            tuned = batch_inputs.unet_denoiser(pipe, trainable.merge(trained))
            denoise = lambda x, t, c: tuned(x, t, pipe.add_time_ids(c, *images.shape[1:3]))
            lat = sample_variants(denoise, sampler, ac, z, jax.random.normal(k_noise, z.shape),
                                  e, e_opt, u, key, etas, strengths, from_noise, blends,
                                  guidance)
            return lat, e_opt, emb_curve, ft_curve

        lat, e_opt, emb_curve, ft_curve = jax.vmap(one)(z0, e_start, e_tgt, uncond, keys,
                                                           embedding_lr, finetune_lr)
        flat = pipe.decode_latents(params, lat.reshape((-1,) + lat.shape[2:]))
        return {"edited": flat.reshape(lat.shape[:2] + flat.shape[1:]),
                "reconstruction": pipe.decode_latents(params, z0), "latents": lat,
                "optimized_embedding": e_opt, "embedding_loss": emb_curve,
                "finetune_loss": ft_curve}

    return batch_inputs.rows_program(run, mesh or batch_inputs.one_device_mesh(), shared=(
        "etas", "strengths", "blends", "from_noise", "guidance"))


def _variants(b: int, **values):
    """The per-variant vectors [E], each given as a number or a sequence (one length)."""
    vs = {k: np.asarray(v, np.float32).reshape(-1) for k, v in values.items()}
    e = max(v.shape[0] for v in vs.values())
    for k, v in vs.items():
        if v.shape[0] not in (1, e):
            raise ValueError(f"{k} has {v.shape[0]} values; give 1 or {e} (one per variant).")
    return {k: jnp.asarray(np.broadcast_to(v, (e,))) for k, v in vs.items()}


def tuned_edit(pipe, params, images, start_prompts, target_prompts, negative_prompts=None, *,
               etas=1.0, strengths=1.0, blends=0.0, from_noise: bool = True,
               embedding_lr=1e-3, finetune_lr=1e-3, stages: Stages = Stages(),
               steps: int = 50, guidance_scale=7.5, seed=0, mesh=None, sample_index=None):
    """The single-image fine-tuning edit program Imagic and UniTune share: per image,
    (a) optimise the embedding of ``start_prompts``, (b) fine-tune on it, (c) sample every
    variant (``sample_variants``) toward ``target_prompts``. One compiled program per
    (pipeline, shapes, steps, stages, number of variants); every number is traced.

    Args:
      images: float [B, H, W, 3] in [-1, 1].
      start_prompts / target_prompts / negative_prompts: one string or one per image.
      etas, strengths, blends: a number or a sequence per variant (E variants).
      from_noise: sample from pure noise (Imagic) instead of the noised image.
      embedding_lr, finetune_lr: learning rates of stages (a) and (b), a number or one per
        image (0 = that stage changes nothing: e_tgt / the base model).
      seed, sample_index: per-image keys ``fold_in(key(seed), sample_index[i])`` drive the
        loss draws of both stages and the start noise (``batch_inputs.image_keys``).
      mesh: images split over its ``data`` axis (default: all devices).
    Returns:
      {"edited": [B, E, H, W, 3] in [-1, 1], "reconstruction" (VAE round trip)
       [B, H, W, 3], "latents" [B, E, h, w, C], "optimized_embedding" [B, L, D],
       "embedding_loss" [B, embedding_steps], "finetune_loss" [B, finetune_steps]}.
    """
    if min(stages) < 0 or stages.draws < 1:
        raise ValueError(f"stage sizes must be >= 0 (draws >= 1), got {stages}.")
    images = batch_inputs.check_images(images, pipe)
    b = images.shape[0]
    ids_start, neg = batch_inputs.tokenize_pair(pipe, start_prompts, negative_prompts, b)
    ids_target = pipe.tokenize(prompt_list(target_prompts, b, "target prompts", per="image"))
    shared = _variants(b, etas=etas, strengths=strengths, blends=blends)
    mesh = batch_inputs.edit_mesh(mesh)
    run = _compiled(pipe, int(steps), Stages(*map(int, stages)), mesh)
    keys = batch_inputs.image_keys(seed, b, sample_index)
    rows = dict(images=images, ids_start=ids_start, ids_target=ids_target, neg_ids=neg,
                keys=keys, embedding_lr=batch_inputs.per_image(embedding_lr, b, "embedding_lr"),
                finetune_lr=batch_inputs.per_image(finetune_lr, b, "finetune_lr"))
    return batch_inputs.run_rows(run, mesh, b, params, rows, dict(
        shared, from_noise=jnp.float32(bool(from_noise)), guidance=jnp.float32(guidance_scale)))


def imagic(pipe, params, images, target_prompts, negative_prompts=None, *, etas=(0.7,),
           embedding_lr=1e-3, finetune_lr=1e-3, stages: Stages = Stages(), steps: int = 50,
           guidance_scale=7.5, seed=0, mesh=None, sample_index=None):
    """Imagic on a batch of images: e_opt from the target text, the model fine-tuned on
    it, then plain DDIM sampling from e(eta) for every eta (``tuned_edit``).

    Args:
      images: float [B, H, W, 3] in [-1, 1].
      target_prompts: one string or one per image (the edit's text).
      negative_prompts: CFG's unconditional prompt(s) (None = "").
      etas: interpolation weights to sample (a number or a sequence; traced).
      embedding_lr, finetune_lr: stage (a) / (b) learning rates (traced; a number or one
        per image).
      stages: static stage sizes (``Stages``); steps, guidance_scale: stage (c)'s DDIM.
    Returns:
      ``tuned_edit``'s dict; "edited" [B, E, H, W, 3] holds one image per eta.
    """
    batch_inputs.refuse_sdxl(pipe, "Imagic")
    refuse_caption_mask(pipe, "Imagic")
    return tuned_edit(pipe, params, images, target_prompts, target_prompts, negative_prompts,
                      etas=etas, strengths=1.0, blends=0.0, from_noise=True,
                      embedding_lr=embedding_lr, finetune_lr=finetune_lr, stages=stages,
                      steps=steps, guidance_scale=guidance_scale, seed=seed, mesh=mesh,
                      sample_index=sample_index)
