"""edit/{sdedit,diffedit,blended,repaint,ilvr}.py end to end on the embedded model (32x32),
few steps: files written, every CLI's edit.png equals its library call on the same input
(jaxdiff.editing.<method>), the given mask is used and respected, bad input gives one line.

Where a mask is kept is checked in latent space (the libraries return "latents" and
"latent_mask"): this model's VAE decoder mixes the whole 8x8 latent (mid-block attention),
so a changed masked cell moves pixels several cells away; pixels cannot show locality.
"""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from jaxdiff import schedules
from jaxdiff.data import WorldSpec, held_out_examples
from jaxdiff.data.images import load_image, load_mask
from jaxdiff.editing import blended, diffedit, ilvr, repaint, sdedit
from jaxdiff.editing.batch_inputs import latent_mask
from jaxdiff.pipeline import from_uint8, to_uint8
from torchref.scripts import load_script

STEPS = 3
TARGET = "a green star"
SOURCE = "a red circle"


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


@pytest.fixture(scope="module")
def inputs(world, embedded):
    """What the CLI feeds its library call: images via load_image, masks via load_mask
    (bool -> float32), and the VAE latents z0 of the images."""
    folder, _ = world
    pipe, params = embedded
    size = (pipe.image_size, pipe.image_size)
    images = np.stack([load_image(str(folder / "imgs" / f"w{i}.png"), size) for i in range(2)])
    masks = np.stack([load_mask(str(folder / "masks" / f"w{i}.png"), size, image_size=size)
                      for i in range(2)]).astype(np.float32)
    z0 = np.asarray(jax.jit(pipe.encode_images)(params, from_uint8(images)))
    return images, masks, z0


@pytest.fixture(scope="module")
def library(embedded, inputs):
    """``library(method)``: the call the CLI makes for the two world images (run once)."""
    pipe, params = embedded
    images, masks, _ = inputs
    done = {}

    def get(method):
        if method not in done:
            out = METHODS[method][1](pipe, params, from_uint8(images), masks)
            done[method] = {k: np.asarray(v) for k, v in out.items()}
        return done[method]
    return get


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
        np.testing.assert_array_equal(_read(out / f"w{i}" / "edit.png"), want[i])
    assert json.loads((out / "summary.json").read_text())["done"] == ["w0", "w1"]


# Each CLI run and the library call the CLI makes for it (one chunk of both images, seed
# --seed + 0 = 0; defaults of the CLI spelled out).
METHODS = {
    "blended": (["--blending-percentage", "0.25"], lambda pipe, params, x, m: blended.blended(
        pipe, params, x, m, [TARGET] * 2, "", blending_percentage=0.25, steps=STEPS,
        guidance_scale=7.5, seed=0)),
    "repaint": (["--jump-length", "2", "--jump-n-sample", "2"],
                lambda pipe, params, x, m: repaint.repaint(
                    pipe, params, x, m, [TARGET] * 2, "", steps=STEPS, jump_length=2,
                    jump_n_sample=2, guidance_scale=7.5, seed=0, eta=0.0)),
    "diffedit": (["--num-maps", "2", "--source-prompt", SOURCE],
                 lambda pipe, params, x, m: diffedit.diffedit(
                     pipe, params, x, [SOURCE] * 2, [TARGET] * 2, masks=m,
                     mask_given=[True, True], strength=0.8, mask_strength=0.5, num_maps=2,
                     threshold_ratio=3.0, steps=STEPS, guidance_scale=7.5, seed=0)),
    "ilvr": (["--factor", "2"], lambda pipe, params, x, m: ilvr.ilvr(
        pipe, params, x, [TARGET] * 2, "", factor=2, refine_fraction=1.0, steps=STEPS,
        guidance_scale=7.5, seed=0, eta=0.0)),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_method_cli_equals_library(world, loaded, inputs, library, tmp_path, method):
    """Files written; edit.png / reconstruction.png are the library call's images exactly
    (the same compiled program on the same arrays); mask.png is the given mask at latent
    resolution."""
    folder, _ = world
    pipe, _ = loaded
    masks = inputs[1]
    extra = METHODS[method][0]
    side = pipe.latent_shape(pipe.image_size, pipe.image_size)[0]
    up = pipe.image_size // side
    out = tmp_path / method
    mask = [] if method == "ilvr" else ["--mask", str(folder / "masks")]
    rc = _load(method).main(["--image", str(folder / "imgs"), *mask, "--target-prompt",
                             TARGET, "--steps", str(STEPS), "--out", str(out), *extra])
    assert rc == 0
    names = {"input", "reconstruction", "edit", "panel"} | ({"mask"} if mask else set())
    lib = library(method)
    edited, rec = to_uint8(lib["edited"]), to_uint8(lib["reconstruction"])
    for i in range(2):
        assert {f[:-4] for f in os.listdir(out / f"w{i}") if f.endswith(".png")} == names
        np.testing.assert_array_equal(_read(out / f"w{i}" / "edit.png"), edited[i])
        np.testing.assert_array_equal(_read(out / f"w{i}" / "reconstruction.png"), rec[i])
        if mask:  # the given mask, averaged to the latent grid, binarised, shown per pixel
            want = np.asarray(latent_mask(masks[i:i + 1], (side, side)))[0, ..., 0] > 0.5
            np.testing.assert_array_equal(lib["latent_mask"][i] > 0.5, want)
            np.testing.assert_array_equal(_read(out / f"w{i}" / "mask.png")[..., 0] > 127,
                                          want.repeat(up, 0).repeat(up, 1))
            if method == "diffedit":  # the given mask was used, not the automatic one
                assert ((lib["mask_map"][i] > 0.5) != want).any()


@pytest.mark.parametrize("method", ["blended", "repaint", "diffedit"])
def test_mask_keeps_latents_outside(loaded, inputs, library, method):
    """With the object mask (4 of 64 latent cells per image), the final latents outside the
    mask are the input's, inside they are edited; the test fails if the mask is ignored.

    RePaint and DiffEdit end on z0 exactly where the mask is 0 (alpha-bar 1 after RePaint's
    last step; DiffEdit's background retraces the inversion down to z0): tolerance 1e-5 for
    the separately compiled encoder. Blended diffusion, as the reference, replaces the
    outside by z0 noised to the last step's timestep t (t = 1 at 3 steps): the outside is
    sqrt(a_t) z0 + sqrt(1 - a_t) eps, checked to 6 sigma = 6 sqrt(1 - a_t) ~ 0.25 (the
    observed max is ~3 sigma over ~480 values; an edited cell moves by ~2 on average).
    """
    pipe, _ = loaded
    z0 = inputs[2]
    lib = library(method)
    lat = lib["latents"]
    m = lib["latent_mask"] > 0.5
    frac = m.mean(axis=(1, 2))
    assert (frac > 0).all() and (frac < 1).all()  # the mask is partial in every image
    keep = ~m
    if method == "blended":
        t = schedules.timesteps(pipe.scheduler, STEPS, "ddim")[-1]
        a = float(schedules.alphas_cumprod(pipe.scheduler)[t])
        dev = np.abs(lat - a ** 0.5 * z0)[keep]
        assert dev.max() <= 6 * (1 - a) ** 0.5
    else:
        np.testing.assert_allclose(lat[keep], z0[keep], atol=1e-5, rtol=0)
    assert np.abs(lat - z0)[m].mean() > 0.5  # the masked cells were edited


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
