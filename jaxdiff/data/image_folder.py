"""Instance images for personalization from a plain folder of image files.

``load_image_folder(folder, size, fit="crop")`` reads every image file directly inside
``folder`` (sorted by name; ``.png .jpg .jpeg .bmp .gif .tif .tiff .webp``, any case;
hidden files and other extensions such as caption ``.txt`` files are ignored) and returns
uint8 ``[N, H, W, 3]`` at the model resolution ``size = (H, W)``.

Modes are converted as ``jaxdiff.data.images.load_image`` does (grayscale, palette,
16-bit, RGBA/LA composited on white, EXIF orientation). Mixed sizes policy (``fit``):

* ``"crop"`` (default, what DreamBooth / Textual Inversion scripts do): every image is
  centre-cropped to the model's aspect ratio and resized, whatever its size;
* ``"resize"``: resized to the model resolution without keeping the aspect ratio;
* ``"reject"``: every image must already be exactly ``W x H``; the first that is not is
  named in the error.

Every problem (missing or empty folder, unreadable file, wrong size under ``"reject"``)
raises ``InputError`` with one line naming the path, what is wrong and what to do.

``load_mask_folder(folder, paths, size)`` reads one mask per instance image (same name,
white = the subject) for the personalization recipes' masked loss.
"""
from __future__ import annotations

import os
from typing import List, Tuple

import numpy as np

from jaxdiff.data.images import FITS, IMAGE_EXTENSIONS, InputError, image_size, load_image, \
    load_mask


def list_images(folder: str) -> List[str]:
    """Sorted paths of the image files directly inside ``folder`` (see module docstring)."""
    if not os.path.exists(folder):
        raise InputError(f"{folder}: instance image folder not found; pass the folder that "
                         "holds your subject's images.")
    if not os.path.isdir(folder):
        raise InputError(f"{folder}: is a file, not a folder; pass the folder that holds "
                         "your subject's images.")
    names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    images = [os.path.join(folder, n) for n in names
              if n.lower().endswith(IMAGE_EXTENSIONS)
              and os.path.isfile(os.path.join(folder, n))]
    if not images:
        what = f"{len(names)} other file(s)" if names else "nothing"
        raise InputError(f"{folder}: no image files (found {what}); add "
                         f"{'/'.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)} images.")
    return images


def load_image_folder(folder: str, size: Tuple[int, int], *, fit: str = "crop",
                      alpha: str = "white") -> Tuple[np.ndarray, List[str]]:
    """Reads the folder's images at the model resolution.

    Args:
      folder: directory of image files.
      size: ``(H, W)`` model resolution in pixels.
      fit: ``"crop"``, ``"resize"`` or ``"reject"`` (mixed-size policy, module docstring).
      alpha: ``"white"`` (composite transparency on white) or ``"drop"``.
    Returns:
      ``(images uint8 [N, H, W, 3], paths [N])``.
    Raises:
      InputError: one line naming the folder or file at fault.
    """
    if fit not in FITS:
        raise InputError(f"unknown fit {fit!r}; use one of {', '.join(FITS)}.")
    paths = list_images(folder)
    images = np.stack([load_image(p, tuple(size), fit=fit, alpha=alpha) for p in paths])
    return images, paths


def load_mask_folder(folder: str, paths: List[str], size: Tuple[int, int], *,
                     fit: str = "crop") -> np.ndarray:
    """The masks of the images at ``paths`` (``load_image_folder``'s) from ``folder``: for
    each image the file there with the same name before the extension (any image
    extension), read by ``images.load_mask`` (white / opaque = the subject) with the same
    ``fit``. Returns bool ``[N, H, W]``; a missing, unreadable, empty or mis-shaped mask is
    an ``InputError`` naming it."""
    if not os.path.isdir(folder):
        raise InputError(f"{folder}: mask folder not found; pass a folder with one mask per "
                         "instance image, named as the image.")
    by_stem = {}
    for p in list_images(folder):
        by_stem.setdefault(os.path.splitext(os.path.basename(p))[0], p)
    out = []
    for p in paths:
        stem = os.path.splitext(os.path.basename(p))[0]
        if stem not in by_stem:
            raise InputError(f"{folder}: no mask for {os.path.basename(p)} (looked for "
                             f"{stem}.png or another image file named {stem}); add one, "
                             "white where the subject is.")
        out.append(load_mask(by_stem[stem], tuple(size), fit=fit, image_size=image_size(p)))
    return np.stack(out)
