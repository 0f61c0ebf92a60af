"""Colour-mixup conditioning: a study of why Textual Inversion misses light lime (issue #22,
point 4), and a fine-tune that lets it select colours between the named ones.

    python bench/colour_mixup.py interp --model MODEL white green black 200,255,150
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python bench/colour_mixup.py train \\
        --workdir runs/mixup_a                          # from the embedded model v2
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python bench/colour_mixup.py train \\
        --init runs/mixup_a/export --seed 22 --mix 0.5 --workdir runs/mixup_b

``interp`` generates "a A circle on a BG background" with the token embedding of the colour
word moved along the segment from word A's row to word B's (lambda 0 ... 1, 12 seeds each,
dpmpp_2m 25 steps, guidance 5) and prints, per lambda, the generated objects' mean colour,
its standard deviation and the share within 40 RGB units of TARGET. On model v2 the colour
jumps from A's to B's between two lambdas (mode switching, large s.d. at the jump); after
the fine-tune it moves through the colours between them.

``train`` fine-tunes text encoder + UNet of ``--init`` (default: the embedded model) for
``--steps`` steps (batch 64, lr ``--lr`` with 100 warm-up steps then cosine, Min-SNR-5, the
object-weighted loss of ``configs/shapes.py:v2_focus`` (x (1 + 4 x coverage)), caption
dropout 0.1, EMA 0.999) on ``--num`` examples: a share ``--mix`` are one-object scenes whose
RGB is a convex mix (Dirichlet(1) weights over 2 anchors, or 3 with probability 0.3) of the
named colours allowed on a random background plus a shade (uniform in a 15-unit ball),
captioned by world v2_brief's grammar with the heaviest anchor's word (always said), whose
token embedding is replaced by the same convex mix of the anchors' word embeddings (no
caption names the mix: only the conditioning carries it); the rest are ordinary world
v2_brief training scenes (``scenes.iterate(seed, v2_brief, "train")``). The EMA weights are
written to ``<workdir>/export`` (diffusers layout, float32); training resumes from
``<workdir>``'s last checkpoint. Measure the export with ``bench/personalize.py --model`` and
``bench/quality.py --model``.
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxdiff
from jaxdiff import generate, parallel, schedules
from jaxdiff.adapters.textual_inversion import token_table
from jaxdiff.data.shapes import SHAPES, WORLD_V2, WORLD_V2_BRIEF, ShapeObject, palette
from jaxdiff.data.shapes.scenes import iterate, make_example
from jaxdiff.denoiser import denoise
from jaxdiff.eval.colour_fidelity import colour_distances, fidelity, object_colour
from jaxdiff.training import batching, losses
from jaxdiff.training import state as state_lib
from jaxdiff.training.latents import encode_uint8, mask_coverage
from jaxdiff.training.loop import train_loop
from jaxdiff.training.optim import adamw_with_warmup
from jaxdiff.training.step import make_train_step
from jaxdiff.weights import save_pipeline

SPREAD = 15.0   # shade ball around a mix (RGB units)
LAMBDAS = (0.0, 0.2, 0.35, 0.5, 0.65, 0.8, 1.0)


def word_ids(pipe, words) -> dict:
    """Each word's single token id (ValueError if one is several tokens)."""
    tok = pipe.tokenizer
    out = {}
    for w in words:
        pieces = tok.tokenize(w)
        if len(pieces) != 1:
            raise ValueError(f"colour word {w!r} is {len(pieces)} tokens; mixup needs one.")
        out[w] = tok.convert_tokens_to_ids(pieces)[0]
    return out


def mixup_data(pipe, num: int, mix: float, seed: int):
    """(images [N,H,W,3], captions, masks [N,H,W], mix ids [N,3], mix weights [N,3]) as the
    module docstring says; rows that are not mixes have zero weights."""
    spec = WORLD_V2_BRIEF
    ids_of = word_ids(pipe, spec.colour_names)
    rng = np.random.default_rng(seed)
    stream = iterate(seed, spec, split="train")
    images, captions, masks, mix_ids, mix_w = [], [], [], [], []
    for _ in range(num):
        if rng.random() < mix:
            bg = spec.background_names[rng.integers(len(spec.backgrounds))]
            pal = palette(spec, bg)
            names = list(pal)
            k = 2 if rng.random() < 0.7 else 3
            pick = rng.choice(len(names), k, replace=False)
            w = rng.dirichlet(np.ones(k))
            order = np.argsort(-w)
            pick, w = pick[order], w[order]
            rgb = sum(wi * np.asarray(pal[names[j]], float) for wi, j in zip(w, pick))
            d = rng.normal(size=3)
            rgb = rgb + SPREAD * rng.random() ** (1 / 3) * d / np.linalg.norm(d)
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


def mixup_loss(pipe, empty, caption_dropout: float = 0.1, snr_gamma: float = 5.0):
    """``loss(p, (latents, ids, mix ids, mix weights, positions, pixel weights), rng)``: the
    diffusion loss with each mix row's colour-word embedding replaced by the mix of its
    anchors' rows (of the text encoder being trained); dropped captions get no mix."""
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


def train(args) -> None:
    t0 = time.time()
    pipe, params = jaxdiff.load_pipeline(args.init)
    images, captions, masks, mix_ids, mix_w = mixup_data(pipe, args.num, args.mix, args.seed)
    ids = pipe.tokenize(captions, warn=False)
    pos = colour_positions(ids, mix_ids, mix_w)
    latents = np.concatenate([np.asarray(encode_uint8(pipe, params, images[s:s + 256]))
                              for s in range(0, args.num, 256)])
    weight = 1.0 + 4.0 * mask_coverage(masks, pipe.vae_scale_factor)
    print(f"data {time.time() - t0:.0f} s, mix rows {int((pos >= 0).sum())}", flush=True)
    loss_fn = mixup_loss(pipe, pipe.tokenize([""], warn=False)[0])
    opt = adamw_with_warmup(args.lr, 100, args.steps)
    state = state_lib.create({"unet": params["unet"], "text_encoder": params["text_encoder"]},
                             opt, args.seed)

    def batch_fn(s):
        idx = batching.host_slice(batching.batch_indices(args.num, 64, s, args.seed))
        return tuple(jnp.asarray(a[idx]) for a in (latents, ids, mix_ids, mix_w, pos, weight))

    state = train_loop(make_train_step(loss_fn, opt, 0.999), state, batch_fn, args.steps,
                       args.workdir, log_every=100, ckpt_every=500, desc="mixup")
    save_pipeline(pipe, dict(params, **parallel.gather(state.ema_params)),
                  os.path.join(args.workdir, "export"))
    print(f"done {time.time() - t0:.0f} s", flush=True)


def interp(args) -> None:
    pipe, params = jaxdiff.load_pipeline(args.model)
    ids_of = word_ids(pipe, (args.a, args.b))
    target = tuple(int(x) for x in args.target.split(","))
    per = 12
    lam_rows = jnp.asarray(np.repeat(np.asarray(LAMBDAS, np.float32), per))
    n = len(lam_rows)
    encode = pipe.encode_text

    def encode_mixed(p, ids, embeddings=None):
        if ids.shape[0] < n or embeddings is not None:
            return encode(p, ids, embeddings)
        table = token_table(p)
        lam = jnp.pad(lam_rows, (0, ids.shape[0] - n))[:, None, None]
        mixed = (1 - lam) * table[ids_of[args.a]] + lam * table[ids_of[args.b]]
        return encode(p, ids, jnp.where((ids == ids_of[args.a])[..., None], mixed, table[ids]))

    # Study only: this pipeline object samples with the mixed rows (a fresh program).
    object.__setattr__(pipe, "encode_text", encode_mixed)
    prompt = f"a {args.a} circle on a {args.bg} background"
    images = generate(pipe, params, [prompt] * n, sampler="dpmpp_2m", steps=25,
                      guidance_scale=5.0, seed=3)
    for i, lam in enumerate(LAMBDAS):
        part = images[i * per:(i + 1) * per]
        found = [c for c in (object_colour(x, WORLD_V2) for x in part) if c is not None]
        f = fidelity(colour_distances(part, target, WORLD_V2))
        print(f"lambda {lam:.2f}: mean {np.mean(found, 0).round().astype(int).tolist()} "
              f"s.d. {np.std(found, 0).round().astype(int).tolist()} within 40 of "
              f"{list(target)}: {f['within']:.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="the colour-mixup fine-tune")
    t.add_argument("--init", default=None, help="pipeline to fine-tune (default: embedded)")
    t.add_argument("--workdir", required=True)
    t.add_argument("--steps", type=int, default=2500)
    t.add_argument("--num", type=int, default=20_000, help="training examples")
    t.add_argument("--mix", type=float, default=0.3, help="share of colour-mix examples")
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--seed", type=int, default=21)
    i = sub.add_parser("interp", help="colour along a segment between two colour words")
    i.add_argument("--model", default=None, help="pipeline directory (default: embedded)")
    i.add_argument("a", help="colour word at lambda 0 (e.g. white)")
    i.add_argument("b", help="colour word at lambda 1 (e.g. green)")
    i.add_argument("bg", help="background word")
    i.add_argument("target", help="R,G,B the 'within 40' share is measured to")
    args = ap.parse_args()
    train(args) if args.cmd == "train" else interp(args)


if __name__ == "__main__":
    main()
