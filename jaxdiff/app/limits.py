"""Uploads decoded with limits: file size and pixel count are checked before any pixel is
decoded, so a decompression bomb (a small PNG claiming 20000x20000 pixels) is refused with
one line instead of filling the memory.

Pillow reads only the header in ``Image.open``; the pixel count is checked there, before
``load``. Pillow's own bomb guard (``Image.MAX_IMAGE_PIXELS``) would otherwise stop at
about 179 million pixels with an exception the user never sees; ours is lower and its
message says what to do. The checked file is then decoded by ``jaxdiff.data.images``
(the one home of image reading), at the model's resolution. A mask painted on the Edit
tab's image editor is turned into a model-size mask here too (``editor_mask``), without
gradio.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Optional, Sequence, Tuple

import numpy as np

from jaxdiff.data.images import InputError, load_image

MB = 1 << 20


@dataclasses.dataclass(frozen=True)
class UploadLimits:
    """max_bytes: largest upload file; max_pixels: largest width x height before decoding;
    max_images: most files in one request."""
    max_bytes: int = 20 * MB
    max_pixels: int = 16_000_000
    max_images: int = 8


def check_upload(path: str, limits: UploadLimits, name: str = "") -> Tuple[int, int]:
    """(width, height) of an image file, read from its header only.

    Raises:
      InputError: one line (the file's name, what is wrong, what to do) for a missing,
        too large or unreadable file, or one with too many pixels.
    """
    from PIL import Image, UnidentifiedImageError
    name = name or os.path.basename(path)
    if not os.path.isfile(path):
        raise InputError(f"{name}: upload not found; upload it again.")
    size = os.path.getsize(path)
    if size > limits.max_bytes:
        raise InputError(f"{name}: file is {size / MB:.1f} MB, the limit is "
                         f"{limits.max_bytes / MB:.0f} MB; upload a smaller image.")
    try:
        with Image.open(path) as im:  # header only: no pixel is decoded here
            w, h = im.size
    except Image.DecompressionBombError as e:  # Pillow's own guard, above ~179 megapixels
        found = re.search(r"\((\d+) pixels\)", str(e))
        pixels = f"{int(found.group(1)) / 1e6:.0f} megapixels" if found else "too many pixels"
        raise InputError(f"{name}: image has {pixels}, the limit is "
                         f"{limits.max_pixels / 1e6:.0f}; downscale it first.") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise InputError(f"{name}: not an image ({type(e).__name__}); upload a PNG, JPEG, "
                         "BMP, GIF, TIFF or WebP file.") from None
    if w * h > limits.max_pixels:
        raise InputError(f"{name}: image is {w}x{h}, {w * h / 1e6:.0f} megapixels, the "
                         f"limit is {limits.max_pixels / 1e6:.0f}; downscale it first.")
    return w, h


def decode_uploads(paths: Sequence[str], size: Tuple[int, int], limits: UploadLimits,
                   names: Sequence[str] = ()) -> np.ndarray:
    """Checked and decoded uploads: uint8 [N, H, W, 3] at ``size = (H, W)`` (centre crop,
    as the edit commands' default ``--fit crop``).

    Raises:
      InputError: one line for no file, too many files, or the first bad file.
    """
    paths = [p for p in paths if p]
    if not paths:
        raise InputError("no image uploaded; upload one or more images first.")
    if len(paths) > limits.max_images:
        raise InputError(f"{len(paths)} images uploaded, the limit is {limits.max_images} "
                         "per request; upload fewer.")
    names = list(names) or [os.path.basename(p) for p in paths]
    out = []
    for path, name in zip(paths, names):
        check_upload(path, limits, name)
        try:
            out.append(load_image(path, size, fit="crop"))
        except InputError as e:  # name the upload, not the server's temporary path
            raise InputError(str(e).replace(path, name)) from None
    return np.stack(out)


def editor_mask(editor, side: int) -> Optional[np.ndarray]:
    """float32 [side, side] mask (1 = edit) from an ImageEditor value: wherever any layer
    was painted; None when nothing was."""
    layers = (editor or {}).get("layers") or []
    alpha = None
    for layer in layers:
        layer = np.asarray(layer)
        if layer.ndim == 3 and layer.shape[-1] == 4:
            a = layer[..., 3] > 0
            alpha = a if alpha is None else (alpha | a)
    if alpha is None or not alpha.any():
        return None
    from PIL import Image
    small = Image.fromarray(alpha.astype(np.uint8) * 255).resize((side, side), Image.BILINEAR)
    return (np.asarray(small) >= 128).astype(np.float32)
