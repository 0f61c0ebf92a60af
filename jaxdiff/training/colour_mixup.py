"""Colour-mixup conditioning: teach text encoder + UNet a continuous map from a colour
word's token embedding to the colour drawn (the embedded model's last training stage).

The shapes world names eight colours; a model trained on it answers each colour word with
one colour mode, and mixing two words' embeddings jumps from one mode to the other. Then
Textual Inversion, which can only move a token embedding, cannot select a colour between
the named ones. This stage fine-tunes on ordinary scenes of a world (``v2_brief`` for the
shipped model) plus a share ``mix`` of one-object scenes whose RGB is a convex mix of 2 (or,
with probability ``p_three``, 3) named anchors allowed on the scene's background
(Dirichlet(1) weights) plus a shade uniform in a ball of radius ``spread``, captioned by the
world's grammar with the heaviest anchor's word (always said). In the loss that word's token
embedding is replaced by the same convex mix of the anchors' rows of the text encoder being
trained, so no caption names the mix and only the conditioning carries it. Dropped captions
(``caption_dropout``) get no mix. The loss is the diffusion loss with Min-SNR weighting and
each latent pixel's error weighted by ``1 + object_weight x`` its object coverage.

``train/colour_mixup.py`` runs it from ``configs/colour_mixup.py``; ``bench/colour_mixup.py
interp`` shows the effect (the colour along the segment between two words' embeddings).

The idea is mixup (Zhang et al., 2018, "mixup: Beyond Empirical Risk Minimization")
applied to the conditioning embedding and the rendered colour together.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import parallel, schedules
from jaxdiff.adapters.textual_inversion import token_table
from jaxdiff.data.shapes import SHAPES, WORLDS, ShapeObject, palette
from jaxdiff.data.shapes.scenes import iterate, make_example
from jaxdiff.denoiser import denoise
from jaxdiff.pipeline import Pipeline
from jaxdiff.training import batching, losses
from jaxdiff.training import state as state_lib
from jaxdiff.training.latents import encode_uint8, mask_coverage
from jaxdiff.training.loop import train_loop
from jaxdiff.training.optim import adamw_with_warmup
from jaxdiff.training.step import make_train_step
from jaxdiff.weights import load_pipeline, save_pipeline


def word_ids(pipe: Pipeline, words) -> dict:
    """Each word's single token id (ValueError if one is several tokens)."""
    tok = pipe.tokenizer
    out = {}
    for w in words:
        pieces = tok.tokenize(w)
        if len(pieces) != 1:
            raise ValueError(f"colour word {w!r} is {len(pieces)} tokens; mixup needs one.")
        out[w] = tok.convert_tokens_to_ids(pieces)[0]
    return out


def mixup_data(pipe: Pipeline, num: int, mix: float, seed: int, *, world: str = "v2_brief",
               spread: float = 15.0, p_three: float = 0.3):
    """``num`` examples as the module docstring says: (images [N,H,W,3] uint8, captions,
    object masks [N,H,W], mix ids [N,3], mix weights [N,3]). A mix row's ids are its anchors'
    token ids, heaviest first (the caption's word), padded with the first; its weights sum
    to 1. Rows that are ordinary world scenes have zero weights."""
    if world not in WORLDS:
        raise ValueError(f"world {world!r} is not one of {sorted(WORLDS)}.")
    spec = WORLDS[world]
    ids_of = word_ids(pipe, spec.colour_names)
    rng = np.random.default_rng(seed)
    stream = iterate(seed, spec, split="train")
    images, captions, masks, mix_ids, mix_w = [], [], [], [], []
    for _ in range(num):
        if rng.random() < mix:
            bg = spec.background_names[rng.integers(len(spec.backgrounds))]
            pal = palette(spec, bg)
            names = list(pal)
            k = 2 if rng.random() < 1.0 - p_three else 3
            pick = rng.choice(len(names), k, replace=False)
            w = rng.dirichlet(np.ones(k))
            order = np.argsort(-w)
            pick, w = pick[order], w[order]
            rgb = sum(wi * np.asarray(pal[names[j]], float) for wi, j in zip(w, pick))
            d = rng.normal(size=3)
            rgb = rgb + spread * rng.random() ** (1 / 3) * d / np.linalg.norm(d)
            obj = ShapeObject(
                shape=SHAPES[rng.integers(len(SHAPES))], colour=names[pick[0]],
                size=spec.size_names[rng.integers(len(spec.sizes))],
                position=spec.position_names[rng.integers(len(spec.positions))],
                offset=tuple(float(x) for x in rng.uniform(-spec.jitter, spec.jitter, 2)),
                rgb=tuple(int(c) for c in np.clip(np.round(rgb), 0, 255)))
            flags = rng.random(3) < (spec.p_mention_size, spec.p_mention_position,
                                     spec.p_mention_background)
            ex = make_example(spec, [obj], bg, *map(bool, flags), mention_colour=True,
                              mention_shape=bool(rng.random() < spec.p_mention_shape))
            mix_ids.append([ids_of[names[j]] for j in pick] + [ids_of[names[pick[0]]]] * (3 - k))
            mix_w.append(list(w) + [0.0] * (3 - k))
        else:
            ex = next(stream)
            mix_ids.append([0, 0, 0])
            mix_w.append([0.0, 0.0, 0.0])
        images.append(ex["image"])
        captions.append(ex["caption"])
        masks.append(ex["masks"].any(0))
    return (np.stack(images), captions, np.stack(masks), np.asarray(mix_ids, np.int32),
            np.asarray(mix_w, np.float32))


def colour_positions(ids, mix_ids, mix_w) -> np.ndarray:
    """The token index of each mix row's colour word (its first occurrence), -1 elsewhere."""
    pos = np.full((len(ids),), -1, np.int32)
    for i in np.nonzero(mix_w[:, 0] > 0)[0]:
        pos[i] = np.nonzero(ids[i] == mix_ids[i, 0])[0][0]
    return pos


def mixup_loss(pipe: Pipeline, empty, caption_dropout: float = 0.1, snr_gamma: float = 5.0):
    """``loss(p, (latents, ids, mix ids, mix weights, positions, pixel weights), rng)`` over
    ``p = {"unet", "text_encoder"}``: the diffusion loss with each mix row's colour-word
    embedding (at ``positions``; -1 = none) replaced by the mix of its anchors' rows of
    ``p``'s token table; captions dropped to ``empty`` (the empty prompt's ids) get no mix."""
    sched = pipe.scheduler
    alphas = schedules.alphas_cumprod(sched)
    empty = jnp.asarray(empty)

    def loss_fn(p, batch, key):
        x0, tk, mids, mw, mpos, wt = batch
        k_drop, k_loss = jax.random.split(key)
        drop = jax.random.uniform(k_drop, (tk.shape[0],)) < caption_dropout
        tk = jnp.where(drop[:, None], empty[None], tk)
        table = token_table(p)
        mixed = jnp.einsum("bk,bkd->bd", mw, table[mids])
        hot = (jax.nn.one_hot(mpos, tk.shape[1]) * (1.0 - drop[:, None]))[..., None]
        emb = table[tk] * (1 - hot) + hot * mixed[:, None, :]
        context = pipe.encode_text({"text_encoder": p["text_encoder"]}, tk, embeddings=emb)
        unet = lambda x, t, c: denoise(pipe, p["unet"], x, t, c)
        per = losses.denoising_loss(unet, alphas, sched.prediction_type, snr_gamma)(
            x0, context, k_loss, wt)
        return jnp.mean(per)

    return loss_fn


def train_colour_mixup(pipe: Pipeline, params, workdir: str, *, steps: int, num: int,
                       mix: float, lr: float, seed: int, batch_size: int = 64,
                       warmup: int = 100, ema_decay: float = 0.999, snr_gamma: float = 5.0,
                       object_weight: float = 4.0, caption_dropout: float = 0.1,
                       world: str = "v2_brief", spread: float = 15.0, p_three: float = 0.3,
                       log_every: int = 100, ckpt_every: int = 500):
    """Fine-tunes ``params``' text encoder + UNet as the module docstring says (AdamW, lr
    warm-up then cosine, EMA); resumes from ``workdir``'s last checkpoint. Returns the
    pipeline params with the EMA text encoder and UNet."""
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix must be in [0, 1], got {mix}.")
    images, captions, masks, mix_ids, mix_w = mixup_data(
        pipe, num, mix, seed, world=world, spread=spread, p_three=p_three)
    ids = pipe.tokenize(captions, warn=False)
    pos = colour_positions(ids, mix_ids, mix_w)
    latents = np.concatenate([np.asarray(encode_uint8(pipe, params, images[s:s + 256]))
                              for s in range(0, num, 256)])
    weight = 1.0 + object_weight * mask_coverage(masks, pipe.vae_scale_factor)
    loss_fn = mixup_loss(pipe, pipe.tokenize([""], warn=False)[0], caption_dropout, snr_gamma)
    opt = adamw_with_warmup(lr, warmup, steps)
    state = state_lib.create({"unet": params["unet"], "text_encoder": params["text_encoder"]},
                             opt, seed)

    def batch_fn(s):
        idx = batching.host_slice(batching.batch_indices(num, batch_size, s, seed))
        return tuple(jnp.asarray(a[idx]) for a in (latents, ids, mix_ids, mix_w, pos, weight))

    state = train_loop(make_train_step(loss_fn, opt, ema_decay), state, batch_fn, steps,
                       workdir, log_every=log_every, ckpt_every=ckpt_every, desc="mixup")
    return dict(params, **parallel.gather(state.ema_params))


def run_colour_mixup(config, workdir: str) -> str:
    """The stage from a ``configs/colour_mixup.py`` config; returns the export folder."""
    if not config.init_from:
        raise ValueError("configs/colour_mixup.py: init_from is empty; give the pipeline to "
                         "fine-tune (--config.init_from=DIR or embedded).")
    pipe, params = load_pipeline(config.init_from)  # a folder or "embedded[:NAME]"
    params = train_colour_mixup(
        pipe, params, workdir, steps=config.steps, num=config.num_train, mix=config.mix,
        lr=config.lr, seed=config.seed, batch_size=config.batch_size, warmup=config.warmup,
        ema_decay=config.ema_decay, snr_gamma=config.snr_gamma,
        object_weight=config.object_weight, caption_dropout=config.caption_dropout,
        world=config.world, spread=config.spread, p_three=config.p_three,
        log_every=config.log_every, ckpt_every=config.checkpoint_every)
    export = config.export_dir or os.path.join(workdir, "export")
    save_pipeline(pipe, params, export, dtype=np.dtype(config.export_dtype))
    return export
