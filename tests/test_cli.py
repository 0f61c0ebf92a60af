"""``jaxdiff generate`` CLI: files and metadata, images equal the library's, clear errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import jaxdiff
from jaxdiff import cli

# The tiny tokenizer is character-level with 16 positions: 14 characters fit.
PROMPTS = ["red dot", "blue sq"]
SETTINGS = ["--sampler", "ddim", "--steps", "2", "--guidance", "3.5", "--seed", "7"]


@pytest.fixture(scope="module")
def pipe_dir(tiny_pipe_dir):
    return tiny_pipe_dir


@pytest.fixture(scope="module")
def loaded(pipe_dir):
    return jaxdiff.load_pipeline(pipe_dir)


def _reuse(loaded, mp):
    """The CLI gets the already loaded pipeline object, so the runs share one compiled
    program (jaxdiff caches programs per pipeline object). Loading from disk is exercised
    by the bad-input tests."""
    mp.setattr(jaxdiff, "load_pipeline", lambda path=None, **kw: loaded)


@pytest.fixture(scope="module")
def generated(pipe_dir, loaded, tmp_path_factory):
    """One CLI run: 2 prompts x 2 images in chunks of 2 (the 2nd chunk has sample_offset 2)."""
    out = str(tmp_path_factory.mktemp("cli_out") / "imgs")
    argv = ["generate", "--model", pipe_dir, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
            "--batch", "2", "--max-batch", "2", "--out", out] + SETTINGS
    with pytest.MonkeyPatch.context() as mp:
        _reuse(loaded, mp)
        assert cli.main(argv) == 0
    return out


def _read(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")), dict(im.text)


def test_writes_images_grid_and_settings(generated):
    names = sorted(os.listdir(generated))
    assert names == ["0000.png", "0001.png", "0002.png", "0003.png", "grid.png",
                     "settings.json"]
    images = []
    for i in range(4):
        img, meta = _read(os.path.join(generated, f"{i:04d}.png"))
        assert img.shape == (16, 16, 3)
        assert meta["prompt"] == PROMPTS[i // 2]
        assert (meta["seed"], meta["sampler"], meta["steps"]) == ("7", "ddim", "2")
        assert float(meta["guidance"]) == 3.5 and meta["index"] == str(i)
        images.append(img)
    assert not np.array_equal(images[0], images[1])  # per-sample noise, not one seed reused
    grid, _ = _read(os.path.join(generated, "grid.png"))
    assert grid.shape == (32, 32, 3)  # one row per prompt, one column per image
    np.testing.assert_array_equal(grid[:16, 16:], images[1])
    np.testing.assert_array_equal(grid[16:, :16], images[2])
    with open(os.path.join(generated, "settings.json")) as f:
        settings = json.load(f)
    assert settings["prompts"] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert (settings["sampler"], settings["steps"], settings["guidance"],
            settings["seed"]) == ("ddim", 2, 3.5, 7)


def test_images_equal_library_generate(loaded, generated):
    """Equal to library calls with the same chunks (whether chunks change the images is
    test_generate.py's test_chunks_reproduce_one_batch)."""
    pipe, params = loaded
    kw = dict(sampler="ddim", steps=2, guidance_scale=3.5, seed=7)
    want = np.concatenate([jaxdiff.generate(pipe, params, [p] * 2, sample_offset=2 * i, **kw)
                           for i, p in enumerate(PROMPTS)])
    got = np.stack([_read(os.path.join(generated, f"{i:04d}.png"))[0] for i in range(4)])
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert want.std() > 1.0  # real images, not a constant


@pytest.mark.parametrize("extra,match", [
    (["--model", "{tmp}/no_such_model"], "no such directory"),
    (["--model", "{tmp}"], "model_index.json"),  # a folder, but not a pipeline
    (["--steps", "0"], "--steps must be >= 1"),
    (["--height", "18"], "height=18 must be a positive multiple of 4"),
    (["--width", "0"], "width=0 must be a positive multiple of 4"),
])
def test_bad_input_is_one_error_line_and_no_files(pipe_dir, tmp_path, capsys, extra, match):
    out = tmp_path / "out"
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    argv = ["generate", "--model", pipe_dir, "--prompt", "x", "--out", str(out)] + extra
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and match in errors[0], err
    assert "Traceback" not in err
    assert not out.exists()


def test_error_is_the_only_stderr_line_from_a_shell(pipe_dir, tmp_path):
    out = subprocess.run([sys.executable, "-m", "jaxdiff.cli", "generate", "--model", pipe_dir,
                          "--prompt", "x", "--steps", "0", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: --steps must be >= 1, got 0."]
    assert not (tmp_path / "o").exists()


def test_long_prompt_is_truncated_with_a_warning(pipe_dir, loaded, tmp_path, monkeypatch):
    _reuse(loaded, monkeypatch)
    long = "a big red circle next to a small blue square"  # far past 14 characters
    argv = ["generate", "--model", pipe_dir, "--prompt", long, "--prompt", PROMPTS[1],
            "--batch", "2", "--max-batch", "2", "--out", str(tmp_path)] + SETTINGS
    with pytest.warns(UserWarning, match="truncated"):
        assert cli.main(argv) == 0
    img, meta = _read(tmp_path / "0000.png")
    assert meta["prompt"] == long  # metadata keeps what the user asked for


def test_zero_size_is_an_error_in_the_library(loaded):
    pipe, params = loaded
    with pytest.raises(ValueError, match="height=0 must be a positive multiple"):
        jaxdiff.generate(pipe, params, "x", steps=2, height=0)


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0 and "generate" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0
    for flag in ("--model", "--prompt", "--negative-prompt", "--sampler", "--steps",
                 "--guidance", "--seed", "--batch", "--height", "--width", "--dtype", "--out"):
        assert flag in text, flag
    for name in cli.SAMPLER_NAMES:
        assert name in text
