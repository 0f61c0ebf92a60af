"""Instance image folders: modes, mixed sizes, one-line errors."""
import os

import numpy as np
import pytest
from PIL import Image

from jaxdiff.data.image_folder import InputError, list_images, load_image_folder


def _save(folder, name, arr, mode=None):
    Image.fromarray(arr, mode).save(os.path.join(folder, name))


def test_modes_and_mixed_sizes(tmp_path):
    d = str(tmp_path)
    red = np.zeros((8, 24, 3), np.uint8)
    red[..., 0] = 255
    red[:, :8] = 0    # black side bands are cropped away by a centre crop to 1:1
    red[:, 16:] = 0
    _save(d, "a_rgb.png", red)
    _save(d, "b_gray.jpg", np.full((32, 32), 128, np.uint8))
    rgba = np.zeros((16, 16, 4), np.uint8)          # fully transparent -> white
    _save(d, "c_rgba.webp", rgba)
    _save(d, "d_16bit.png", np.full((20, 20), 65535, np.uint16))
    with open(os.path.join(d, "notes.txt"), "w") as f:
        f.write("captions are ignored")
    images, paths = load_image_folder(d, (8, 8))
    assert [os.path.basename(p) for p in paths] == ["a_rgb.png", "b_gray.jpg", "c_rgba.webp",
                                                    "d_16bit.png"]
    assert images.shape == (4, 8, 8, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[0], np.broadcast_to([255, 0, 0], (8, 8, 3)))
    assert np.all(np.abs(images[1].astype(int) - 128) <= 2)
    np.testing.assert_array_equal(images[2], 255)
    np.testing.assert_array_equal(images[3], 255)
    # "resize" keeps the black bands (squeezed), "reject" names the first wrong size.
    squeezed, _ = load_image_folder(d, (8, 8), fit="resize")
    assert squeezed[0, :, 0].max() < 60 and squeezed[0, 4, 4, 0] == 255
    with pytest.raises(InputError, match=r"a_rgb\.png: image is 24x8 but the model needs 8x8"):
        load_image_folder(d, (8, 8), fit="reject")


def test_one_line_errors(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(InputError, match="nope: instance image folder not found"):
        list_images(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=r"empty: no image files \(found nothing\)"):
        list_images(str(empty))
    (empty / "readme.md").write_text("x")
    with pytest.raises(InputError, match=r"no image files \(found 1 other file"):
        list_images(str(empty))
    with pytest.raises(InputError, match="is a file, not a folder"):
        list_images(str(empty / "readme.md"))
    bad = tmp_path / "bad"
    bad.mkdir()
    _save(str(bad), "ok.png", np.zeros((8, 8, 3), np.uint8))
    (bad / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(InputError) as e:
        load_image_folder(str(bad), (8, 8))
    msg = str(e.value)
    assert "broken.jpg: not a readable image" in msg and "\n" not in msg
    with pytest.raises(InputError, match="unknown fit 'stretch'"):
        load_image_folder(str(bad), (8, 8), fit="stretch")
