"""Shared inputs of the ``edit/`` entrypoints: images, masks, batch jobs (results are
written by ``results.py``).

Stable API (every edit entrypoint uses it):

    load_image(path, size, fit="crop", alpha="white") -> uint8 [H, W, 3]
    load_mask(path, size, fit="crop", image_size=None) -> bool [H, W]   (True = edit here)
    jobs_from_args(args, options=(), need=(...)) -> (jobs [EditJob], errors [str])
    load_jobs(jobs, size, fit=, alpha=, mask=) -> Batch(jobs, images, masks, errors)
    add_common_args(parser, ...) ; run_main(fn, parser, argv)

Images of any mode are converted to RGB uint8: grayscale and 1-bit are replicated to
three channels; palette images are expanded; 16-bit grayscale (``I;16``, ``I``) is scaled
from 0..65535 to 0..255; transparent images (RGBA, LA, palette with transparency) are
composited on white (``alpha="white"``, default) or their alpha is ignored
(``alpha="drop"``); EXIF orientation is applied. 32-bit float images are rejected. Sizes
are brought to the model resolution ``size = (H, W)``: ``fit="crop"`` (default) centre-crops
to the model's aspect ratio and resizes (Lanczos), ``"resize"`` resizes without keeping
the aspect ratio, ``"reject"`` refuses any other size. Any size works, including sizes
that are not multiples of 8, because the output is always the model resolution.

Masks: white (>= 50 % of full scale) marks the region to edit. A mask with a varying
alpha channel uses the alpha; otherwise its luminance. It goes through the same crop /
resize as its image (bilinear, then the 50 % threshold); it must have the image's
aspect ratio, and an all-black mask is an error.

Every problem is an ``InputError`` with one line naming the file, what is wrong and what
to do. In batch mode a bad job is reported and skipped; the rest are processed.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
FITS = ("crop", "resize", "reject")
ALPHAS = ("white", "drop")


class InputError(ValueError):
    """Bad user input; the message is one line (file, what is wrong, what to do)."""


# ----------------------------------------------------------------------------- images

def _open(path: str):
    from PIL import Image, ImageOps, UnidentifiedImageError
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file.")
    try:
        im = Image.open(path)
        im.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable image ({type(e).__name__}); "
                         "use PNG, JPEG, BMP, GIF, TIFF or WebP.") from None
    return ImageOps.exif_transpose(im)


def _to_float_planes(im, path: str) -> np.ndarray:
    """PIL image -> float32 [H, W, C] in [0, 1], C = 3 (RGB) or 4 (RGBA)."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        x = np.asarray(im).astype(np.float32) / 65535.0
        return np.repeat(np.clip(x, 0.0, 1.0)[..., None], 3, axis=-1)
    if mode == "F":
        raise InputError(f"{path}: 32-bit float images are not supported; "
                         "save it as an 8- or 16-bit PNG.")
    transparent = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in im.info)
    try:
        im = im.convert("RGBA" if transparent else "RGB")
    except (ValueError, OSError):
        raise InputError(f"{path}: image mode {mode} cannot be converted to RGB; "
                         "save it as an RGB PNG.") from None
    return np.asarray(im).astype(np.float32) / 255.0


def _crop_box(w: int, h: int, size: Tuple[int, int], fit: str, path: str, what: str):
    """Source box (l, t, r, b) whose content is resized to ``size``; validates ``fit``."""
    H, W = size
    if fit not in FITS:
        raise InputError(f"unknown fit {fit!r}; use one of {', '.join(FITS)}.")
    if fit == "reject" and (h, w) != (H, W):
        raise InputError(f"{path}: {what} is {w}x{h} but the model needs {W}x{H}; resize "
                         "it or use --fit crop / --fit resize.")
    if fit != "crop":
        return (0.0, 0.0, float(w), float(h))
    if w * H > h * W:  # too wide: keep the full height
        cw = h * W / H
        return ((w - cw) / 2, 0.0, (w + cw) / 2, float(h))
    ch = w * H / W
    return (0.0, (h - ch) / 2, float(w), (h + ch) / 2)


def _resize_planes(x: np.ndarray, size, box, resample) -> np.ndarray:
    """float32 [h, w, C] -> [H, W, C], each plane resized in float mode."""
    from PIL import Image
    H, W = size
    if box == (0.0, 0.0, float(x.shape[1]), float(x.shape[0])) and x.shape[:2] == (H, W):
        return x
    planes = [np.asarray(Image.fromarray(x[..., c]).resize((W, H), resample, box=box))
              for c in range(x.shape[-1])]
    return np.stack(planes, axis=-1)


def load_image(path: str, size: Tuple[int, int], *, fit: str = "crop",
               alpha: str = "white") -> np.ndarray:
    """Reads any image file as uint8 [H, W, 3] at the model resolution ``size = (H, W)``.

    See the module docstring for the mode conversions and the ``fit`` / ``alpha`` options.
    Raises InputError with a one-line message.
    """
    from PIL import Image
    if alpha not in ALPHAS:
        raise InputError(f"unknown alpha handling {alpha!r}; use one of {', '.join(ALPHAS)}.")
    im = _open(path)
    box = _crop_box(im.width, im.height, size, fit, path, "image")
    x = _to_float_planes(im, path)
    if x.shape[-1] == 4:
        a = x[..., 3:]
        x = x[..., :3] * a + (1.0 - a) if alpha == "white" else x[..., :3]
    x = _resize_planes(x, size, box, Image.LANCZOS)
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def load_mask(path: str, size: Tuple[int, int], *, fit: str = "crop",
              image_size: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """Reads a mask file of any mode as bool [H, W] (True = region to edit).

    Args:
      size: (H, W) model resolution (the size of the loaded image).
      image_size: (h, w) of the original image file; the mask must have its aspect ratio.
    """
    from PIL import Image
    im = _open(path)
    if image_size is not None:
        h, w = image_size
        if abs(im.width * h - im.height * w) > 0.01 * w * h:
            raise InputError(f"{path}: mask is {im.width}x{im.height} but its image is "
                             f"{w}x{h} (another aspect ratio); draw the mask on the image.")
    box = _crop_box(im.width, im.height, size, "resize" if fit == "reject" else fit, path,
                    "mask")
    x = _to_float_planes(im, path)
    if x.shape[-1] == 4 and np.ptp(x[..., 3]) > 0:
        m = x[..., 3]
    else:
        m = x[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
    m = _resize_planes(m[..., None], size, box, Image.BILINEAR)[..., 0] >= 0.5
    if not m.any():
        raise InputError(f"{path}: the mask is empty (no pixel at >= 50% white); "
                         "paint the region to edit white.")
    return m


def image_size(path: str) -> Tuple[int, int]:
    """(h, w) of an image file after EXIF orientation."""
    im = _open(path)
    return im.height, im.width


# ------------------------------------------------------------------------------- jobs

@dataclasses.dataclass(frozen=True)
class EditJob:
    """One edit: an image, its prompts, an optional mask and method-specific options.

    ``name`` is the job's output folder name (unique within a batch).
    """
    name: str
    image: str
    source_prompt: str = ""
    target_prompts: Tuple[str, ...] = ()
    mask: Optional[str] = None
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


_MANIFEST_KEYS = ("image", "name", "source_prompt", "target_prompt", "target_prompts", "mask")


def _check_prompts(job: EditJob, need: Sequence[str], where: str):
    if "source_prompt" in need and not job.source_prompt:
        raise InputError(f"{where}: no source prompt; give source_prompt / --source-prompt.")
    if "target_prompt" in need and not job.target_prompts:
        raise InputError(f"{where}: no target prompt; give target_prompt / --target-prompt.")


def read_manifest(path: str, options: Sequence[str] = (),
                  need: Sequence[str] = ("target_prompt",)):
    """JSONL manifest -> (jobs, errors). One JSON object per line:

    ``{"image": "a.png", "source_prompt": "...", "target_prompt": "..." | "target_prompts":
    [...], "mask": "m.png", "name": "out-folder", <option>: ...}``. Relative paths are
    relative to the manifest's folder; ``options`` names the extra keys a method accepts
    (anything else is an error for that line). Bad lines become one-line errors.
    """
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such manifest file.")
    base = os.path.dirname(os.path.abspath(path))
    jobs, errors = [], []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise InputError(f"{where}: expected a JSON object, got {type(rec).__name__}.")
            unknown = sorted(set(rec) - set(_MANIFEST_KEYS) - set(options))
            if unknown:
                raise InputError(f"{where}: unknown key(s) {unknown}; allowed: "
                                 f"{sorted(set(_MANIFEST_KEYS) | set(options))}.")
            if "image" not in rec:
                raise InputError(f"{where}: no \"image\" key.")
            targets = rec.get("target_prompts", rec.get("target_prompt", ()))
            targets = (targets,) if isinstance(targets, str) else tuple(targets)
            rel = lambda p: p if p is None or os.path.isabs(p) else os.path.join(base, p)
            job = EditJob(name=str(rec.get("name") or _stem(rec["image"])),
                          image=rel(rec["image"]), source_prompt=rec.get("source_prompt", ""),
                          target_prompts=targets, mask=rel(rec.get("mask")),
                          options={k: rec[k] for k in options if k in rec})
            _check_prompts(job, need, where)
            jobs.append(job)
        except json.JSONDecodeError as e:
            errors.append(f"{where}: not valid JSON ({e.msg} at column {e.colno}).")
        except InputError as e:
            errors.append(str(e))
    return _unique_names(jobs), errors


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0] or "image"


def _unique_names(jobs: List[EditJob]) -> List[EditJob]:
    seen, out = {}, []
    for job in jobs:
        k = seen.get(job.name, 0)
        seen[job.name] = k + 1
        out.append(job if k == 0 else dataclasses.replace(job, name=f"{job.name}_{k}"))
    return out


def _list_images(folder: str) -> List[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))


def jobs_from_args(args, options: Sequence[str] = (),
                   need: Sequence[str] = ("target_prompt",)):
    """(jobs, errors) from ``--manifest`` or ``--image`` (files and/or folders).

    With ``--image`` every job shares ``--source-prompt`` / ``--target-prompt``; ``--mask``
    is one mask file for all images, or a folder holding a mask with each image's stem.
    Raises InputError when no job can be formed at all.
    """
    if args.manifest:
        jobs, errors = read_manifest(args.manifest, options, need)
    else:
        paths, errors = [], []
        for p in args.image:
            if os.path.isdir(p):
                found = _list_images(p)
                if not found:
                    errors.append(f"{p}: folder holds no image files ({', '.join(IMAGE_EXTENSIONS)}).")
                paths += found
            else:
                paths.append(p)
        masks = getattr(args, "mask", None)
        jobs = []
        for p in paths:
            m = masks
            if masks and os.path.isdir(masks):
                cand = [f for f in _list_images(masks) if _stem(f) == _stem(p)]
                m = cand[0] if cand else os.path.join(masks, _stem(p) + ".png")
            jobs.append(EditJob(name=_stem(p), image=p, source_prompt=args.source_prompt or "",
                                target_prompts=tuple(args.target_prompt or ()), mask=m))
        if jobs:
            _check_prompts(jobs[0], need, "command line")
        jobs = _unique_names(jobs)
    if not jobs:
        raise InputError("no job to run: " + ("; ".join(errors) or "no image given."))
    return jobs, errors


class Batch(NamedTuple):
    """Jobs that loaded, their images uint8 [N, H, W, 3], masks bool [N, H, W] or None,
    and one error line per job that did not load."""
    jobs: List[EditJob]
    images: np.ndarray
    masks: Optional[np.ndarray]
    errors: List[str]


def load_jobs(jobs: Sequence[EditJob], size: Tuple[int, int], *, fit: str = "crop",
              alpha: str = "white", mask: str = "none") -> Batch:
    """Loads every job's image (and mask: ``mask`` = "none" | "optional" | "required").

    A job whose files fail is reported in ``errors`` and left out; the rest load.
    With ``mask="optional"`` a job without a mask gets an all-True mask.
    """
    ok, images, masks, errors = [], [], [], []
    for job in jobs:
        try:
            img = load_image(job.image, size, fit=fit, alpha=alpha)
            if mask == "required" and not job.mask:
                raise InputError(f"{job.image}: no mask given; pass --mask or a \"mask\" key.")
            if mask != "none":
                masks.append(load_mask(job.mask, size, fit=fit, image_size=image_size(job.image))
                             if job.mask else np.ones(size, bool))
            ok.append(job)
            images.append(img)
        except InputError as e:
            errors.append(str(e))
    H, W = size
    return Batch(ok, np.stack(images) if images else np.zeros((0, H, W, 3), np.uint8),
                 np.stack(masks) if masks else (None if mask == "none" else
                                                np.zeros((0, H, W), bool)), errors)


# The command-line helpers live in args.py (one concept per file); importable from here.
from jaxdiff.editing.args import (add_common_args, check_common_args, report_errors,  # noqa: E402,F401
                                  run_main)
