"""Instruction edits on held-out shapes-world images, per edit kind, by method, JSON out.

    python bench/instruct_quality.py --num 100 --out instruct_quality.json
    python bench/instruct_quality.py --num 100 --methods instruct_pix2pix \
        --instruct-models renderer=runs/ip2p_renderer/export,p2p=runs/ip2p_p2p/export

For every kind of ``jaxdiff.data.instructions.KINDS`` (colour, shape, size, position,
background) ``--num`` held-out triples (``held_out_triples``: source scenes of the world's
test split; position edits on one-object scenes) are rendered exactly and edited by each
method; the world's renderer draws the true edited scene. Per method and kind:

- ``success``: the evaluator reads the edited image as the whole edited scene (the right
  number of objects, every object's shape, colour, size and position, and the
  background); ``attribute``: it reads the instructed attribute of the target object (or
  the background) right, whatever else changed;
- ``psnr_preserved_db``: PSNR between the edit and the input over the pixels the edit
  must keep (``instructions.preserved_region``: outside the union of the target's old
  and new ground-truth masks; for background edits, the objects), per image capped at
  60 dB, then averaged;
- ``psnr_truth_db``: PSNR of the edit against the renderer's edited scene (whole image);
- ``failed``: per attribute of the evaluator (count, shape, colour, size, position,
  background), the share of edits where the edited scene has it wrong (for any object):
  what an unsuccessful edit got wrong;
- ``by_objects``: ``success`` and ``num`` of the one- and the two-object scenes apart
  (an edit of a two-object scene must find the named object: "make the circle blue"
  leaves the square as it is).

Methods are the ``METHODS`` table: name -> ``factory(args) -> edit(images uint8
[N, H, W, 3], triples) -> uint8 [N, H, W, 3]``. Another editing method adds a row by adding
an entry (Imagic, UniTune). ``instruct_pix2pix`` runs ``jaxdiff.editing.instruct_pix2pix``
with each model of ``--instruct-models`` (default: the shipped
``jaxdiff/assets/shapes_instruct``) on the instruction; ``p2p`` runs Prompt-to-Prompt
(issue #6: direct inversion + replace, the best setting of bench/p2p_quality.py) on the
embedded model from the full source caption to the edited caption. ``imagic`` and
``unitune`` fine-tune per image toward the edited caption (stage sizes and learning rates:
configs/imagic.py's unless ``--embedding-steps`` ... ``--finetune-lr`` say otherwise; DDIM
``--p2p-steps``), one row per ``--imagic-etas`` / ``--unitune-strengths`` value, all from
one fine-tuning per image. ``ceiling`` is no
method but a reference row: the renderer's true edited scene through the base model's
autoencoder, what an edit made in its latent space can at best score.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import numpy as np

import jaxdiff
from jaxdiff.data import instructions, shapes
from jaxdiff.editing import imagic, instruct_pix2pix, unitune
from jaxdiff.editing import p2p_pipeline as pp
from jaxdiff.eval import shapes_eval
from jaxdiff.pipeline import from_uint8, to_uint8
from jaxdiff.weights import DEFAULT_MODEL

PSNR_CAP = 60.0
SHIPPED = os.path.join(os.path.dirname(DEFAULT_MODEL), "shapes_instruct")
ATTRIBUTE = {"colour": "colour", "shape": "shape", "size": "size", "position": "position"}


def instruct_factory(args):
    """One edit function per ``--instruct-models`` entry: {row name: edit}."""
    out = {}
    for entry in args.instruct_models.split(","):
        name, _, path = entry.rpartition("=")
        pipe, params = jaxdiff.load_pipeline(path)

        def edit(images, triples, pipe=pipe, params=params):
            return instruct_pix2pix.edit(
                pipe, params, images, [t.instruction for t in triples], steps=args.steps,
                text_guidance=args.text_guidance, image_guidance=args.image_guidance,
                seed=args.seed, sampler=args.sampler)
        out["instruct_pix2pix" + (f" ({name})" if name else "")] = edit
    return out


def p2p_factory(args):
    pipe, params = jaxdiff.load_pipeline(args.base_model)
    settings = pp.P2PSettings(inversion="direct", steps=args.p2p_steps, guidance=7.5)

    def edit(images, triples):
        return pp.p2p_edit(pipe, params, images, [t.caption for t in triples],
                           [t.edited_caption for t in triples], settings).edited
    return {"p2p (direct inversion)": edit}


def _sweep(fn):
    """``row(k, images, triples)``: variant k of ``fn(images [-1, 1], triples) -> [N, E, H,
    W, 3]``, computed once per image set (every variant comes from one fine-tuning)."""
    cache = {}

    def row(k, images, triples):
        key = (images.tobytes(), tuple(t.edited_caption for t in triples))
        if key not in cache:
            cache[key] = to_uint8(np.asarray(fn(from_uint8(images), triples)))
        return cache[key][:, k]
    return row


def stages(args) -> imagic.Stages:
    """Imagic's / UniTune's stage sizes from the command line (defaults: configs/imagic.py)."""
    return imagic.Stages(args.embedding_steps, args.finetune_steps, args.lora_rank, args.draws)


def imagic_factory(args):
    """Imagic (``jaxdiff.editing.imagic``, stage sizes and learning rates from the command
    line) toward the edited caption, one row per ``--imagic-etas`` value, all etas sampled
    from one fine-tuning per image."""
    pipe, params = jaxdiff.load_pipeline(args.base_model)
    etas = [float(e) for e in args.imagic_etas.split(",")]
    run = _sweep(lambda x, ts: imagic.imagic(
        pipe, params, x, [t.edited_caption for t in ts], etas=etas, steps=args.p2p_steps,
        embedding_lr=args.embedding_lr, finetune_lr=args.finetune_lr, stages=stages(args),
        seed=args.seed)["edited"])
    return {f"imagic (eta={e})": functools.partial(run, k) for k, e in enumerate(etas)}


def unitune_factory(args):
    """UniTune (``jaxdiff.editing.unitune``: LoRA per image under "sks", SDEdit toward
    "sks <edited caption>"), one row per ``--unitune-strengths`` value."""
    pipe, params = jaxdiff.load_pipeline(args.base_model)
    strengths = [float(s) for s in args.unitune_strengths.split(",")]
    run = _sweep(lambda x, ts: unitune.unitune(
        pipe, params, x, [t.edited_caption for t in ts], strengths=strengths,
        steps=args.p2p_steps, finetune_lr=args.finetune_lr,
        stages=stages(args)._replace(embedding_steps=0), seed=args.seed)["edited"])
    return {f"unitune (strength={s})": functools.partial(run, k)
            for k, s in enumerate(strengths)}


def ceiling_factory(args):
    """Not an editing method: the true edited scene (the renderer's) through the base
    model's autoencoder, the best any edit in its latent space can score."""
    pipe, params = jaxdiff.load_pipeline(args.base_model)
    spec = shapes.world("v1", image_size=pipe.image_size)
    roundtrip = jax.jit(lambda p, x: pipe.decode_latents(p, pipe.encode_images(p, x)))

    def edit(images, triples):
        truth = np.stack([instructions.render_pair(spec, t)[1] for t in triples])
        return to_uint8(np.asarray(roundtrip(params, from_uint8(truth))))
    return {"autoencoder ceiling (true edit, VAE round trip)": edit}


METHODS = {"instruct_pix2pix": instruct_factory, "p2p": p2p_factory, "imagic": imagic_factory,
           "unitune": unitune_factory, "ceiling": ceiling_factory}


def _psnr(a, b, region=None) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    diff = (a - b) if region is None else (a - b)[region]
    mse = float(np.mean(diff ** 2)) if diff.size else 0.0
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * np.log10(255.0 ** 2 / mse))


def score(spec, triples, sources, truths, regions, edited) -> dict:
    """Metrics of one method on one kind (see the module docstring)."""
    succ, attr, keep, truth, wrong, count = [], [], [], [], [], []
    for t, src, gt, region, img in zip(triples, sources, truths, regions, edited):
        acc = shapes_eval.attribute_accuracy(img, t.edited_objects, spec, t.edited_background)
        succ.append(acc["all"])
        count.append(len(t.objects))
        wrong.append({k: not v for k, v in acc.items() if k != "all"})
        if t.kind == "background":
            attr.append(acc["background"])
        else:
            found = shapes_eval.evaluate(img, spec)["objects"]
            want = getattr(t.edited_objects[t.target], ATTRIBUTE[t.kind])
            ok = (len(found) == len(t.objects)
                  and found[t.target][ATTRIBUTE[t.kind]] == want)
            attr.append(ok)
        keep.append(_psnr(img, src, region))
        truth.append(_psnr(img, gt))
    r = lambda v: round(float(np.mean(v)), 3)
    failed = {k: r([w.get(k, False) for w in wrong])
              for k in ("count", "shape", "colour", "size", "position", "background")}
    by_objects = {str(n): {"success": r([s for s, c in zip(succ, count) if c == n]),
                           "num": count.count(n)} for n in sorted(set(count))}
    return {"success": r(succ), "attribute": r(attr), "psnr_preserved_db": r(keep),
            "psnr_truth_db": r(truth), "failed": failed, "by_objects": by_objects,
            "num": len(triples)}


def kind_data(spec, kind: str, num: int):
    """(triples, sources uint8 [N, H, W, 3], true edits, regions to keep [N][H, W]) of
    ``num`` held-out triples of one kind, rendered exactly."""
    ts = instructions.held_out_triples(spec, kind, num)
    pairs = [instructions.render_pair(spec, t) for t in ts]
    return (ts, np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]),
            [instructions.preserved_region(t, p[2], p[3]) for t, p in zip(ts, pairs)])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num", type=int, default=100, help="held-out triples per kind")
    ap.add_argument("--kinds", default=",".join(instructions.KINDS))
    ap.add_argument("--methods", default=",".join(METHODS), help=f"among {list(METHODS)}")
    ap.add_argument("--instruct-models", default=SHIPPED,
                    help="comma-separated [name=]DIR of InstructPix2Pix pipelines")
    ap.add_argument("--base-model", default=None, help="pipeline of P2P (default embedded)")
    ap.add_argument("--steps", type=int, default=20, help="InstructPix2Pix sampler steps")
    ap.add_argument("--sampler", default="euler_a")
    ap.add_argument("--text-guidance", type=float, default=7.5)
    ap.add_argument("--image-guidance", type=float, default=1.5)
    ap.add_argument("--p2p-steps", type=int, default=50,
                    help="DDIM steps of P2P, Imagic and UniTune")
    ap.add_argument("--imagic-etas", default="0.5,0.7,0.9", help="Imagic rows' etas")
    ap.add_argument("--unitune-strengths", default="0.5,0.7,0.9",
                    help="UniTune rows' SDEdit strengths")
    ap.add_argument("--embedding-steps", type=int, default=imagic.Stages().embedding_steps,
                    help="Imagic stage (a) steps (default: configs/imagic.py)")
    ap.add_argument("--finetune-steps", type=int, default=imagic.Stages().finetune_steps,
                    help="Imagic stage (b) / UniTune fine-tuning steps")
    ap.add_argument("--lora-rank", type=int, default=imagic.Stages().lora_rank)
    ap.add_argument("--draws", type=int, default=imagic.Stages().draws,
                    help="(t, noise) draws per fine-tuning step")
    ap.add_argument("--embedding-lr", type=float, default=1e-3)
    ap.add_argument("--finetune-lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the JSON here (atomically)")
    args = ap.parse_args()

    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        ap.error(f"--methods: unknown {sorted(unknown)}; known: {sorted(METHODS)}")
    kinds = args.kinds.split(",")
    base, _ = jaxdiff.load_pipeline(args.base_model)
    spec = shapes.world("v1", image_size=base.image_size)
    data = {kind: kind_data(spec, kind, args.num) for kind in kinds}
    result = {"bench": "instruct_quality", "num_per_kind": args.num, "world": "v1",
              "steps": args.steps, "sampler": args.sampler,
              "text_guidance": args.text_guidance, "image_guidance": args.image_guidance,
              "p2p_steps": args.p2p_steps, "seed": args.seed, "methods": {}}
    if {"imagic", "unitune"} & set(args.methods.split(",")):
        result.update(stages=stages(args)._asdict(), embedding_lr=args.embedding_lr,
                      finetune_lr=args.finetune_lr)
    for method in args.methods.split(","):
        for name, edit in METHODS[method](args).items():
            rows, t0 = {}, time.perf_counter()
            for kind in kinds:
                ts, src, gt, regions = data[kind]
                rows[kind] = score(spec, ts, src, gt, regions, np.asarray(edit(src, ts)))
                print(json.dumps({name: {kind: rows[kind]}}), flush=True)
            rows["seconds_incl_compile"] = round(time.perf_counter() - t0, 1)
            result["methods"][name] = rows
    print(json.dumps(result))
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            json.dump(result, f, indent=2)
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
