"""``jaxdiff classify``: zero-shot classification of images among candidate prompts with
the Diffusion Classifier (``jaxdiff.eval.diffusion_classifier``); prints and writes JSON."""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from jaxdiff.data.images import FITS, InputError, list_image_files, load_image, write_json
from jaxdiff.eval import diffusion_classifier as dc
from jaxdiff.weights import load_pipeline
from jaxdiff.weights.hf_cache import is_repo_id
from jaxdiff.weights.loading import is_embedded


def add_parser(sub):
    p = sub.add_parser("classify", help="zero-shot classification among candidate prompts "
                       "(Diffusion Classifier)",
                       description="Pick, for each image, the candidate prompt under which "
                       "the diffusion model denoises it best (Li et al. 2023, adaptive "
                       "elimination of candidates). Default model: the embedded one.")
    p.add_argument("--image", required=True,
                   help="an image file, or a folder of images (all classified as one batch)")
    p.add_argument("--candidates", nargs="+", required=True, metavar="PROMPT",
                   help="candidate prompts, e.g. \"a red circle\" \"a blue circle\"")
    p.add_argument("--model", default=None,
                   help="diffusers-layout pipeline directory, single .safetensors file or "
                   "org/name in the local Hugging Face cache, or embedded:shapes (default) / "
                   "embedded:dit")
    p.add_argument("--samples", type=int, nargs="+", default=[16, 64],
                   help="cumulative (t, noise) samples per elimination stage (default 16 64)")
    p.add_argument("--keep", type=int, nargs="+", default=None,
                   help="candidates kept after each stage, ending with 1 (default: half "
                   "of the candidates after every stage but the last)")
    p.add_argument("--trials", type=int, default=1, help="noise draws per timestep (default 1)")
    p.add_argument("--loss", default="l2", choices=sorted(dc.LOSSES),
                   help="denoising error (default l2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shared noise")
    p.add_argument("--batch", type=int, default=8, help="images per compiled call (default 8)")
    p.add_argument("--fit", default="crop", choices=FITS,
                   help="images of another size: centre-crop then resize (default), resize, "
                   "or reject")
    p.add_argument("--out", default=None, help="JSON file for the results (written atomically)")
    return p


def _check(args):
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}.")
    if len(set(args.candidates)) != len(args.candidates):
        raise ValueError("--candidates has the same prompt twice; give distinct prompts.")
    keep = args.keep if args.keep is not None else [1] * len(args.samples)
    try:
        dc.check_plan(1000, args.samples, keep, args.trials)
    except ValueError as e:
        raise ValueError(f"--samples / --keep / --trials: {e}") from None
    if not os.path.exists(args.image):
        raise FileNotFoundError(f"--image {args.image}: no such file or folder.")
    if args.model is not None and not (os.path.exists(args.model) or is_repo_id(args.model)
                                       or is_embedded(args.model)):
        raise FileNotFoundError(f"--model {args.model}: no such directory or file (nor an "
                                "org/name for the Hugging Face cache, nor embedded:NAME).")
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise FileNotFoundError(f"--out {args.out}: its folder does not exist; create it "
                                "first.")


def _read_images(args, size):
    """(paths, uint8 images [N, H, W, 3], errors {path: message}); a single bad file is an
    error, a bad file in a folder is reported and skipped."""
    if not os.path.isdir(args.image):
        return [args.image], load_image(args.image, size, fit=args.fit)[None], {}
    paths = list_image_files(args.image)
    if not paths:
        raise InputError(f"--image {args.image}: the folder holds no image files (.png, "
                         ".jpg, ...).")
    good, images, errors = [], [], {}
    for path in paths:
        try:
            images.append(load_image(path, size, fit=args.fit))
            good.append(path)
        except InputError as e:
            errors[path] = str(e)
            print(f"error: {e} (skipped)", file=sys.stderr)
    if not good:
        raise InputError(f"--image {args.image}: none of its {len(paths)} image files could "
                         "be read.")
    return good, np.stack(images), errors


def run(args) -> int:
    """Runs ``jaxdiff classify`` for parsed ``args``; returns the exit status."""
    _check(args)
    pipe, params = load_pipeline(args.model)
    paths, images, errors = _read_images(args, (pipe.image_size, pipe.image_size))
    keep = args.keep if args.keep is not None else dc.default_keep(len(args.candidates),
                                                                   len(args.samples))
    results, t0 = [], time.perf_counter()
    for start in range(0, len(paths), args.batch):
        r = dc.classify(pipe, params, images[start:start + args.batch], args.candidates,
                        samples=args.samples, keep=keep, trials=args.trials, seed=args.seed,
                        loss=args.loss)
        for i, path in enumerate(paths[start:start + args.batch]):
            cand = args.candidates
            results.append({
                "image": path, "prediction": cand[int(r.prediction[i])],
                "index": int(r.prediction[i]),
                "ranking": [cand[int(j)] for j in r.ranking[i]],
                "errors": {c: (None if np.isnan(e) else float(e))
                           for c, e in zip(cand, r.errors[i])},
                "samples": {c: int(n) for c, n in zip(cand, r.samples[i])}})
            print(f"{path}: {results[-1]['prediction']}")
    seconds = time.perf_counter() - t0
    if args.out:
        write_json(args.out, {
            "settings": dict(model=args.model or "embedded:shapes", samples=args.samples,
                             keep=keep, trials=args.trials, loss=args.loss, seed=args.seed,
                             fit=args.fit),
            "candidates": list(args.candidates), "results": results,
            "errors": errors, "seconds": seconds})
        print(f"wrote {len(results)} results to {args.out}")
    return 0
