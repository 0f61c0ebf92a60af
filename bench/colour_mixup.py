"""Colour-mixup conditioning: a study of why Textual Inversion could not reach light lime on
model v2 before its colour-mixup stage (issue #22, point 4), and of what that stage changed.

    python bench/colour_mixup.py --model candidates/shapes_v2_focus white green black 200,255,150
    python bench/colour_mixup.py white green black 200,255,150      # the embedded model

Generates "a A circle on a BG background" with the token embedding of the colour word moved
along the segment from word A's row to word B's (lambda 0 ... 1, 12 seeds each, dpmpp_2m
25 steps, guidance 5) and prints, per lambda, the generated objects' mean colour, its
standard deviation and the share within 40 RGB units of TARGET. Before the stage
(``candidates/shapes_v2_focus``) the colour jumps from A's to B's between two lambdas (mode
switching, large s.d. at the jump); after it (the embedded model) it moves through the
colours between them. The stage itself is ``train/colour_mixup.py``
(``jaxdiff.training.colour_mixup``, ``configs/colour_mixup.py``).
"""
from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np

import jaxdiff
from jaxdiff import generate
from jaxdiff.adapters.textual_inversion import token_table
from jaxdiff.data.shapes import WORLD_V2
from jaxdiff.eval.colour_fidelity import colour_distances, fidelity, object_colour
from jaxdiff.training.colour_mixup import word_ids

LAMBDAS = (0.0, 0.2, 0.35, 0.5, 0.65, 0.8, 1.0)


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
    ap.add_argument("--model", default=None, help="pipeline directory (default: embedded)")
    ap.add_argument("a", help="colour word at lambda 0 (e.g. white)")
    ap.add_argument("b", help="colour word at lambda 1 (e.g. green)")
    ap.add_argument("bg", help="background word")
    ap.add_argument("target", help="R,G,B the 'within 40' share is measured to")
    interp(ap.parse_args())


if __name__ == "__main__":
    main()
