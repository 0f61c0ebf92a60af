"""Image files: reading any image or mask at the model resolution, writing PNGs, grids, panels.

The one home of image file I/O; the command-line tools, training (instance folders,
sample grids) and the benches all use it. It depends only on numpy and Pillow.

Reading: images of any mode are converted to RGB uint8: grayscale and 1-bit are
replicated to three channels; palette images are expanded; 16-bit grayscale (``I;16``,
``I``) is scaled from 0..65535 to 0..255; transparent images (RGBA, LA, palette with
transparency) are composited on white (``alpha="white"``, default) or their alpha is
ignored (``alpha="drop"``); EXIF orientation is applied. 32-bit float images are rejected.
Sizes are brought to the model resolution ``size = (H, W)``: ``fit="crop"`` (default)
centre-crops to the model's aspect ratio and resizes (Lanczos), ``"resize"`` resizes
without keeping the aspect ratio, ``"reject"`` refuses any other size. Any size works,
including sizes that are not multiples of 8, because the output is always the model
resolution.

Masks: white (>= 50 % of full scale) marks the region to edit. A mask with a varying
alpha channel uses the alpha; otherwise its luminance. It goes through the same crop /
resize as its image (bilinear, then the 50 % threshold); it must have the image's
aspect ratio, and an all-black mask is an error.

Every reading problem is an ``InputError`` with one line naming the file, what is wrong
and what to do. Writers are atomic (temporary file + rename): no partial file is left.
"""
from __future__ import annotations

import json
import os
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
FITS = ("crop", "resize", "reject")
ALPHAS = ("white", "drop")


class InputError(ValueError):
    """Bad user input; the message is one line (file, what is wrong, what to do)."""


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


def list_image_files(folder: str) -> List[str]:
    """Sorted paths of the image files directly inside ``folder`` (by extension, any case;
    hidden files skipped)."""
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
                  and os.path.isfile(os.path.join(folder, f)))


def make_grid(images, cols: int) -> np.ndarray:
    """uint8 [N, H, W, 3] -> one uint8 grid image with ``cols`` columns."""
    n, h, w, c = images.shape
    rows = -(-n // cols)
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
    return grid


def make_panel(images: Sequence[np.ndarray], gap: int = 2) -> np.ndarray:
    """Side by side with ``gap`` white columns between: uint8 [H, sum(W) + gaps, 3]."""
    h = images[0].shape[0]
    white = np.full((h, gap, 3), 255, np.uint8)
    parts = []
    for i, img in enumerate(images):
        parts += ([white] if i else []) + [np.asarray(img, np.uint8)]
    return np.concatenate(parts, axis=1)


def save_png(path: str, image: np.ndarray, meta: Optional[Mapping[str, Any]] = None):
    """Writes uint8 [H, W, 3] as PNG atomically (temporary file + rename), with text chunks."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    for k, v in (meta or {}).items():
        info.add_text(k, str(v))
    tmp = path + ".tmp"
    Image.fromarray(np.asarray(image, np.uint8)).save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)


def write_json(path: str, obj: Any):
    """Writes JSON atomically (temporary file + rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)
