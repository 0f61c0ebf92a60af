"""edit/{sdedit,diffedit,blended,repaint,ilvr}.py end to end on the embedded model (32x32),
few steps: files written, CLI output equals the library, bad input gives one line."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from jaxdiff.data import WorldSpec, held_out_examples
from jaxdiff.editing import sdedit
from jaxdiff.pipeline import from_uint8, to_uint8
from torchref.scripts import load_script


def _load(name):
    return load_script("edit", name)


@pytest.fixture(autouse=True)
def loaded(reuse_embedded):
    """The CLI gets the already loaded pipeline object, so runs share compiled programs."""
    return reuse_embedded


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world_methods")
    ex = held_out_examples(WorldSpec(image_size=32), 2, num_objects=1)
    (folder / "imgs").mkdir()
    (folder / "masks").mkdir()
    for i, e in enumerate(ex):
        Image.fromarray(e["image"]).save(folder / "imgs" / f"w{i}.png")
        Image.fromarray((e["masks"][0] * 255).astype(np.uint8)).save(folder / "masks" / f"w{i}.png")
    return folder, ex


def _read(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_sdedit_cli_equals_library(world, loaded, tmp_path):
    folder, ex = world
    out = tmp_path / "sd"
    rc = _load("sdedit").main(["--image", str(folder / "imgs"), "--target-prompt",
                               "a blue circle", "--strength", "0.5", "--steps", "4",
                               "--guidance", "5", "--out", str(out)])
    assert rc == 0
    for name in ("input", "reconstruction", "edit", "panel"):
        assert (out / "w0" / f"{name}.png").exists()
    settings = json.loads((out / "w1" / "settings.json").read_text())
    assert settings["strength"] == 0.5 and settings["method"] == "sdedit"
    pipe, params = loaded
    images = np.stack([e["image"] for e in ex])
    want = to_uint8(sdedit.sdedit(pipe, params, from_uint8(images), "a blue circle",
                                  "", strength=0.5, steps=4, guidance_scale=5.0)["edited"])
    for i in range(2):
        got = _read(out / f"w{i}" / "edit.png")
        assert np.abs(got.astype(int) - want[i]).max() <= 1
    assert json.loads((out / "summary.json").read_text())["done"] == ["w0", "w1"]


@pytest.mark.parametrize("method,extra", [
    ("blended", ["--blending-percentage", "0.25"]),
    ("repaint", ["--jump-length", "2", "--jump-n-sample", "2"]),
    ("diffedit", ["--num-maps", "2", "--source-prompt", "a red circle"]),
    ("ilvr", ["--factor", "2"])])
def test_method_cli_writes_results(world, tmp_path, method, extra):
    folder, _ = world
    out = tmp_path / method
    mask = [] if method == "ilvr" else ["--mask", str(folder / "masks")]
    rc = _load(method).main(["--image", str(folder / "imgs"), *mask, "--target-prompt",
                             "a green star", "--steps", "3", "--out", str(out), *extra])
    assert rc == 0
    names = {"input", "reconstruction", "edit", "panel"} | ({"mask"} if mask else set())
    for i in range(2):
        assert {f[:-4] for f in os.listdir(out / f"w{i}") if f.endswith(".png")} == names
        assert _read(out / f"w{i}" / "edit.png").shape == (32, 32, 3)
    if method == "diffedit":  # the given masks were used, not the automatic ones
        m = _read(out / "w0" / "mask.png")[..., 0] > 127
        gt = _read(folder / "masks" / "w0.png")[..., 0] > 127
        assert (m & gt).sum() >= 0.5 * gt.sum()


def test_bad_inputs_are_one_line_errors(world, tmp_path, capsys):
    folder, _ = world
    # a job without a mask fails alone; the other job is written
    (tmp_path / "jobs.jsonl").write_text("\n".join(json.dumps(x) for x in [
        dict(image=str(folder / "imgs" / "w0.png"), target_prompt="a red square",
             mask=str(folder / "masks" / "w0.png")),
        dict(image=str(folder / "imgs" / "w1.png"), target_prompt="a red square")]))
    out = tmp_path / "bl"
    rc = _load("blended").main(["--manifest", str(tmp_path / "jobs.jsonl"), "--steps", "2",
                                "--out", str(out)])
    assert rc == 1 and (out / "w0" / "edit.png").exists() and not (out / "w1").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "w1.png" in err[0] and "mask" in err[0]
    rc = _load("ilvr").main(["--image", str(folder / "imgs" / "w0.png"), "--target-prompt",
                             "x", "--factor", "3", "--out", str(tmp_path / "il")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "factor" in err[0]
    assert not (tmp_path / "il").exists()
    rc = _load("sdedit").main(["--image", str(folder / "imgs"), "--target-prompt", "x",
                               "--strength", "1.5", "--out", str(tmp_path / "sd")])
    assert rc == 2 and "--strength" in capsys.readouterr().err
