"""jaxdiff.data.images and the edit command-line layer (jaxdiff.cli.edit_*): every
image/mask conversion and error path, batch jobs, atomic outputs.

Expected values come from PIL's own conversions or from arithmetic on the synthetic
pixels, never from the code under test.
"""
import argparse
import json
import os

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageOps

from jaxdiff.cli import edit_args, edit_jobs, edit_results
from jaxdiff.data import images


def _save(tmp_path, name, arr_or_im, **kw):
    path = str(tmp_path / name)
    im = arr_or_im if isinstance(arr_or_im, Image.Image) else Image.fromarray(arr_or_im)
    im.save(path, **kw)
    return path


# ----------------------------------------------------------------- real photos, sizes

def test_photo_centre_crop_matches_pil_fit(tmp_path):
    cat = skimage.data.chelsea()  # 451 x 300 RGB photo
    path = _save(tmp_path, "cat.jpg", cat, quality=95)
    for size in [(32, 32), (24, 40)]:  # 40 is not a multiple of 16, 24 not of 16 either
        got = images.load_image(path, size)
        want = np.asarray(ImageOps.fit(Image.open(path).convert("RGB"), size[::-1],
                                       Image.LANCZOS))
        assert got.shape == size + (3,) and got.dtype == np.uint8
        assert np.abs(got.astype(int) - want.astype(int)).mean() < 2.0


def test_photo_resize_and_reject(tmp_path):
    coffee = skimage.data.coffee()  # 600 x 400
    path = _save(tmp_path, "coffee.png", coffee)
    got = images.load_image(path, (32, 32), fit="resize")
    want = np.asarray(Image.fromarray(coffee).resize((32, 32), Image.LANCZOS))
    assert np.abs(got.astype(int) - want.astype(int)).mean() < 1.0
    with pytest.raises(images.InputError, match=r"coffee.png: image is 600x400 but the model "
                       r"needs 32x32.*--fit"):
        images.load_image(path, (32, 32), fit="reject")
    # an image already at the model size is taken exactly as it is, whatever the fit
    small = _save(tmp_path, "small.png", coffee[:32, :32])
    for fit in images.FITS:
        np.testing.assert_array_equal(images.load_image(small, (32, 32), fit=fit), coffee[:32, :32])


def test_grayscale_photo_is_replicated(tmp_path):
    cam = skimage.data.camera()  # 512 x 512, mode L
    path = _save(tmp_path, "camera.png", cam)
    got = images.load_image(path, (512, 512))
    for c in range(3):
        np.testing.assert_array_equal(got[..., c], cam)
    one_bit = _save(tmp_path, "bw.png", Image.fromarray(cam > 128))
    got = images.load_image(one_bit, (512, 512))
    np.testing.assert_array_equal(got[..., 0], np.where(cam > 128, 255, 0))


def test_sixteen_bit_grayscale_is_scaled(tmp_path):
    x = (np.arange(40 * 24, dtype=np.uint32).reshape(24, 40) * 68 % 65536).astype(np.uint16)
    path = _save(tmp_path, "g16.png", Image.fromarray(x))
    assert Image.open(path).mode == "I;16"
    got = images.load_image(path, (24, 40))
    np.testing.assert_array_equal(got[..., 1], np.round(x / 65535.0 * 255.0).astype(np.uint8))


def test_rgba_white_composite_and_drop(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = np.arange(8, dtype=np.uint8)[:, None] * 36  # alpha 0 .. 252 by row
    path = _save(tmp_path, "rgba.png", rgba)
    a = rgba[..., 3:] / 255.0
    want = np.round(np.concatenate([rgba[..., :1] / 255.0 * a + (1 - a),
                                    np.broadcast_to(1 - a, (8, 8, 2))], -1) * 255)
    np.testing.assert_array_equal(images.load_image(path, (8, 8)), want.astype(np.uint8))
    np.testing.assert_array_equal(images.load_image(path, (8, 8), alpha="drop"), rgba[..., :3])
    la = _save(tmp_path, "la.png", Image.fromarray(rgba[..., [0, 3]], "LA"))
    assert images.load_image(la, (8, 8))[0, 0].tolist() == [255, 255, 255]  # alpha 0 -> white
    with pytest.raises(images.InputError, match="alpha"):
        images.load_image(path, (8, 8), alpha="black")


def test_palette_images(tmp_path):
    astro = Image.fromarray(skimage.data.astronaut()).resize((64, 64))
    pal = astro.quantize(16)
    path = _save(tmp_path, "pal.png", pal)
    np.testing.assert_array_equal(images.load_image(path, (64, 64)), np.asarray(pal.convert("RGB")))
    pal.info["transparency"] = 0  # palette entry 0 transparent -> white
    tpath = _save(tmp_path, "palt.png", pal, transparency=0)
    got, idx = images.load_image(tpath, (64, 64)), np.asarray(pal)
    assert (got[idx == 0] == 255).all()
    np.testing.assert_array_equal(got[idx != 0], np.asarray(pal.convert("RGB"))[idx != 0])


def test_exif_orientation_is_applied(tmp_path):
    x = np.zeros((16, 32, 3), np.uint8)
    x[:, :16] = 255  # left half white
    im = Image.fromarray(x)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(tmp_path, "rot.jpg", im, exif=exif, quality=100)
    got = images.load_image(path, (32, 16), fit="reject")  # displayed as 16 wide x 32 high
    assert got[:8].mean() > 240 and got[-8:].mean() < 15  # white half now on top


def test_unreadable_inputs_give_one_line(tmp_path):
    txt = tmp_path / "notes.png"
    txt.write_text("not an image")
    for path, pattern in [(str(txt), "notes.png: not a readable image"),
                          (str(tmp_path / "missing.png"), "missing.png: no such file")]:
        with pytest.raises(images.InputError, match=pattern) as e:
            images.load_image(path, (32, 32))
        assert "\n" not in str(e.value)
    f32 = _save(tmp_path, "f.tiff", Image.fromarray(np.ones((4, 4), np.float32)))
    with pytest.raises(images.InputError, match="float"):
        images.load_image(f32, (4, 4))


# ------------------------------------------------------------------------------- masks

def test_masks_of_every_mode(tmp_path):
    m = np.zeros((40, 60), bool)
    m[10:30, 20:50] = True
    want = np.asarray(Image.fromarray(m).resize((6, 4), Image.NEAREST))  # 10x downscale
    gray = _save(tmp_path, "m.png", (m * 255).astype(np.uint8))
    rgb = _save(tmp_path, "m_rgb.png", np.repeat((m * 255).astype(np.uint8)[..., None], 3, -1))
    m16 = _save(tmp_path, "m16.png", Image.fromarray((m * 65535).astype(np.uint16)))
    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[..., 3] = m * 255  # black paint, the alpha carries the mask
    ra = _save(tmp_path, "m_rgba.png", rgba)
    pal = _save(tmp_path, "m_p.png", Image.fromarray((m * 255).astype(np.uint8)).convert("P"))
    for path in (gray, rgb, m16, ra, pal):
        np.testing.assert_array_equal(images.load_mask(path, (4, 6), image_size=(40, 60)), want,
                                      err_msg=path)
    # a mask drawn at another resolution of the same aspect ratio is resized to match
    np.testing.assert_array_equal(images.load_mask(gray, (4, 6), image_size=(80, 120)), want)


def test_mask_follows_the_image_crop(tmp_path):
    m = np.zeros((40, 80), bool)
    m[:, 20:40] = True  # second quarter: in the centre crop [20:60] it is the left half
    path = _save(tmp_path, "m.png", (m * 255).astype(np.uint8))
    got = images.load_mask(path, (4, 4), fit="crop", image_size=(40, 80))
    assert got[:, :2].all() and not got[:, 2:].any()


def test_mask_errors(tmp_path):
    path = _save(tmp_path, "m.png", np.full((40, 40), 255, np.uint8))
    with pytest.raises(images.InputError, match="another aspect ratio"):
        images.load_mask(path, (8, 8), image_size=(40, 80))
    empty = _save(tmp_path, "e.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(images.InputError, match="e.png: the mask is empty"):
        images.load_mask(empty, (8, 8))


# -------------------------------------------------------------------------- batch jobs

def _parser(mask="optional"):
    return edit_args.add_common_args(argparse.ArgumentParser(), mask=mask)


def test_manifest_reports_bad_lines_and_keeps_the_rest(tmp_path):
    img = skimage.data.astronaut()
    _save(tmp_path, "a.png", img)
    _save(tmp_path, "m.png", np.full((512, 512), 255, np.uint8))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    lines = [json.dumps(dict(image="a.png", source_prompt="s", target_prompt="t",
                             mask="m.png", blend_words="cat")),
             "{not json",
             json.dumps(dict(image="a.png", target_prompt="t", colour="red")),
             json.dumps(dict(image="broken.png", source_prompt="s", target_prompt="t")),
             json.dumps(dict(image="a.png", source_prompt="s")),
             "", "# comment",
             json.dumps(dict(image="a.png", source_prompt="s", target_prompts=["t1", "t2"]))]
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("\n".join(lines))
    args = _parser().parse_args(["--manifest", str(manifest), "--out", "x"])
    jobs, errors = edit_jobs.jobs_from_args(args, options=("blend_words",),
                                     need=("source_prompt", "target_prompt"))
    assert [j.name for j in jobs] == ["a", "broken", "a_1"]
    assert jobs[0].options == {"blend_words": "cat"} and jobs[0].mask == str(tmp_path / "m.png")
    assert jobs[2].target_prompts == ("t1", "t2")
    assert len(errors) == 3 and all("\n" not in e for e in errors)
    assert "jobs.jsonl:2: not valid JSON" in errors[0]
    assert "jobs.jsonl:3: unknown key(s) ['colour']" in errors[1]
    assert "jobs.jsonl:5: no target prompt" in errors[2]
    batch = edit_jobs.load_jobs(jobs, (32, 32), mask="optional")
    assert [j.name for j in batch.jobs] == ["a", "a_1"]
    assert batch.images.shape == (2, 32, 32, 3) and batch.masks.shape == (2, 32, 32)
    assert batch.masks.all()  # a_1 has no mask: all True; m.png is all white
    assert len(batch.errors) == 1 and "broken.png: not a readable image" in batch.errors[0]
    with pytest.raises(images.InputError, match="no mask given"):
        raise images.InputError(edit_jobs.load_jobs(jobs[2:], (32, 32), mask="required").errors[0])


def test_folder_and_files_from_the_command_line(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    masks = tmp_path / "masks"
    masks.mkdir()
    _save(folder, "b.png", skimage.data.coffee())
    _save(folder, "a.jpg", skimage.data.chelsea())
    (folder / "readme.txt").write_text("ignored")
    _save(masks, "a.png", np.full((300, 451), 255, np.uint8))
    args = _parser().parse_args(["--image", str(folder), "--image", str(folder / "b.png"),
                                 "--source-prompt", "s", "--target-prompt", "t",
                                 "--mask", str(masks), "--out", "o"])
    jobs, errors = edit_jobs.jobs_from_args(args)
    assert [j.name for j in jobs] == ["a", "b", "b_1"] and not errors
    batch = edit_jobs.load_jobs(jobs, (16, 16), mask="optional")
    assert len(batch.jobs) == 1 and len(batch.errors) == 2  # b has no mask in the folder
    assert "masks/b.png: no such file" in batch.errors[0]
    (tmp_path / "empty").mkdir()
    with pytest.raises(images.InputError, match="no job to run: .*empty: folder holds no image"):
        edit_jobs.jobs_from_args(_parser().parse_args(["--image", str(tmp_path / "empty"),
                                                "--out", "o"]))
    with pytest.raises(images.InputError, match="command line: no target prompt"):
        edit_jobs.jobs_from_args(_parser().parse_args(["--image", str(folder), "--out", "o"]))


# ----------------------------------------------------------------------------- outputs

def _result(tmp_path, name="job", **kw):
    job = edit_jobs.EditJob(name=name, image="in.png", source_prompt="s", target_prompts=("t1", "t2"))
    src = np.zeros((8, 8, 3), np.uint8)
    edits = [np.full((8, 8, 3), 100, np.uint8), np.full((8, 8, 3), 200, np.uint8)]
    return edit_results.write_result(str(tmp_path), job, source=src, reconstruction=src + 1,
                                edits=edits, settings=dict(steps=3), **kw)


def test_write_result_files_panel_and_settings(tmp_path):
    folder = _result(tmp_path, extra_images={"mask": np.eye(8, dtype=bool)})
    assert sorted(os.listdir(folder)) == ["edit_0.png", "edit_1.png", "input.png", "mask.png",
                                          "panel.png", "reconstruction.png", "settings.json"]
    panel = np.asarray(Image.open(os.path.join(folder, "panel.png")))
    assert panel.shape == (8, 4 * 8 + 3 * 2, 3)
    assert (panel[:, :8] == 0).all() and (panel[:, 8:10] == 255).all()
    assert (panel[:, 10:18] == 1).all() and (panel[:, -8:] == 200).all()
    settings = json.load(open(os.path.join(folder, "settings.json")))
    assert settings["steps"] == 3 and settings["target_prompts"] == ["t1", "t2"]
    assert Image.open(os.path.join(folder, "edit_1.png")).text["prompt"] == "t2"
    assert sorted(os.listdir(tmp_path)) == ["job"]  # no temporaries left
    edit_results.write_summary(str(tmp_path), ["job"], ["x.png: bad"], dict(steps=3))
    assert json.load(open(tmp_path / "summary.json"))["errors"] == ["x.png: bad"]


def test_failed_write_leaves_nothing_and_rewrite_replaces(tmp_path, monkeypatch):
    _result(tmp_path)
    first = os.path.getmtime(tmp_path / "job" / "settings.json")
    calls = []
    real = edit_results.save_png

    def failing(path, *a, **k):
        calls.append(path)
        if len(calls) % 3 == 0:
            raise OSError("disk full")
        return real(path, *a, **k)

    monkeypatch.setattr(edit_results, "save_png", failing)
    with pytest.raises(OSError, match="disk full"):
        _result(tmp_path, name="other")
    with pytest.raises(OSError):
        _result(tmp_path)  # the earlier complete result stays as it was
    monkeypatch.setattr(edit_results, "save_png", real)
    assert sorted(os.listdir(tmp_path)) == ["job"]
    assert os.path.getmtime(tmp_path / "job" / "settings.json") == first
    _result(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["job"]


def test_run_main_turns_bad_input_into_one_line(capsys):
    parser = _parser()

    def fn(args):
        edit_args.check_common_args(args)
        return 0

    assert edit_args.run_main(fn, parser, ["--image", "x.png", "--out", "o", "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --steps must be >= 1, got 0.\n"
    assert edit_args.run_main(fn, parser, ["--image", "x.png", "--out", "o"]) == 0
