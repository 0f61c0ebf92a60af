"""edit/p2p.py and jaxdiff.editing.p2p_pipeline end to end on the embedded model (32x32)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
from PIL import Image

from jaxdiff import parallel
from jaxdiff.data import WorldSpec, held_out_examples
from jaxdiff.data.images import make_panel
from jaxdiff.editing import local_blend as lb
from jaxdiff.editing import p2p_pipeline as pp
from jaxdiff.editing import prompt_to_prompt as p2p
from jaxdiff.pipeline import from_uint8
from torchref.scripts import load_script

cli = load_script("edit", "p2p")

FAST = ["--steps", "2", "--inversion", "negative_prompt", "--max-batch", "2"]


@pytest.fixture(autouse=True)
def loaded(reuse_embedded):
    """The CLI gets the already loaded pipeline object, so runs share compiled programs."""
    return reuse_embedded


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world")
    ex = held_out_examples(WorldSpec(image_size=32), 3)
    for i, e in enumerate(ex):
        Image.fromarray(e["image"]).save(folder / f"w{i}.png")
    return folder, ex


def _read(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_manifest_batch_writes_results_and_reports_bad_jobs(world, loaded, capsys):
    folder, ex = world
    (folder / "broken.png").write_bytes(b"not a png")
    cap = [e["caption"] for e in ex]
    swap = lambda c, a, b: c.replace(a, b, 1)
    lines = [dict(image="w0.png", source_prompt=cap[0],
                  target_prompt=swap(cap[0], "purple", "green")),
             dict(image="w1.png", source_prompt=cap[1],
                  target_prompts=[swap(cap[1], "red", "blue"), swap(cap[1], "cross", "star")]),
             dict(image="broken.png", source_prompt="a", target_prompt="b"),
             dict(image="w2.png", source_prompt=cap[2], target_prompt="a big square")]
    manifest = folder / "jobs.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines))
    out = folder / "out"
    rc = cli.main(["--manifest", str(manifest), "--out", str(out)] + FAST)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 2
    assert "broken.png: not a readable image" in err[0]
    assert "w2.png: replace edit needs the same number of words" in err[1]
    assert sorted(os.listdir(out)) == ["summary.json", "w0", "w1"]
    assert sorted(os.listdir(out / "w1")) == ["edit_0.png", "edit_1.png", "input.png",
                                             "panel.png", "reconstruction.png",
                                             "settings.json"]
    np.testing.assert_array_equal(_read(out / "w0" / "input.png"), ex[0]["image"])
    panel = _read(out / "w1" / "panel.png")
    parts = [_read(out / "w1" / f) for f in ("input.png", "reconstruction.png",
                                              "edit_0.png", "edit_1.png")]
    np.testing.assert_array_equal(panel, make_panel(parts))
    settings = json.load(open(out / "w1" / "settings.json"))
    assert settings["inversion"] == "negative_prompt" and settings["steps"] == 2
    assert settings["target_prompts"][1].endswith(cap[1].split(" ", 4)[-1])
    assert json.load(open(out / "summary.json"))["done"] == ["w0", "w1"]
    # The CLI's images are the library's: the same edit of w1 through p2p_edit.
    s = pp.P2PSettings(inversion="negative_prompt", steps=2)
    pipe, params = loaded
    lib = pp.p2p_edit_chunked(pipe, params, np.stack([ex[0]["image"], ex[1]["image"]]),
                              cap[:2], [lines[0]["target_prompt"],
                                        lines[1]["target_prompts"][0]], s, max_batch=2)
    np.testing.assert_array_equal(_read(out / "w1" / "edit_0.png"), lib.edited[1])
    np.testing.assert_array_equal(_read(out / "w1" / "reconstruction.png"),
                                  lib.reconstruction[1])


def test_photo_with_null_text_and_local_blend(tmp_path, capsys):
    photo = tmp_path / "cat.jpg"
    Image.fromarray(skimage.data.chelsea()).save(photo)  # 451x300 -> centre crop to 32x32
    out = tmp_path / "out"
    rc = cli.main(["--image", str(photo), "--source-prompt", "a red circle",
                   "--target-prompt", "a blue circle", "--blend-words", "red", "blue",
                   "--steps", "2", "--inner-steps", "2", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    files = sorted(os.listdir(out / "cat"))
    assert files == ["edit.png", "input.png", "mask.png", "panel.png", "reconstruction.png",
                     "settings.json"]
    mask = _read(out / "cat" / "mask.png")
    assert mask.shape == (32, 32, 3) and set(np.unique(mask)) <= {0, 255}
    settings = json.load(open(out / "cat" / "settings.json"))
    assert settings["inversion"] == "null_text" and settings["blend_words"] == ["red", "blue"]
    assert 1 <= settings["null_text_mean_inner_steps"] <= 2


def test_local_blend_partial_mask_keeps_source_outside(world, loaded, tmp_path, capsys):
    """LocalBlend at threshold 0.95, where its mask is partial on this model (at the default
    0.3 it covers every cell here, so a LocalBlend that did nothing would pass the test
    above). w1 is "a small red cross on the right ..."; red -> green.

    The CLI (the photo test's settings: null-text, 2 steps, 2 inner steps, one image, so
    its compiled program) writes a mask covering part of the image. Outside the mask the
    edit must equal the source branch (the reconstruction): LocalBlend sets
    x_tgt = x_src + mask * (x_tgt - x_src) after each step, so the final target latents
    equal the source latents (to float32 rounding) where the mask is 0; checked in latent space with
    ``p2p_pipeline.edit_latents``. Pixels cannot show it: this model's VAE decoder mixes
    the whole 8x8 latent (mid-block attention), so pixels two latent cells away from the
    mask still move by up to 13/255 here (25/255 without LocalBlend). The latent run uses negative-prompt inversion (a third
    of null-text's compile time); LocalBlend is the same code for every inversion.
    """
    folder, ex = world
    pipe, params = loaded
    src = ex[1]["caption"]
    assert "red" in src.split()
    tgt = src.replace("red", "green", 1)
    out = tmp_path / "out"
    rc = cli.main(["--image", str(folder / "w1.png"), "--source-prompt", src,
                   "--target-prompt", tgt, "--blend-words", "red", "green",
                   "--blend-threshold", "0.95", "--steps", "2", "--inner-steps", "2",
                   "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    mask = _read(out / "w1" / "mask.png")
    assert set(np.unique(mask)) <= {0, 255} and 0.1 < (mask > 127).mean() < 0.9
    assert json.loads((out / "w1" / "settings.json").read_text())["blend_threshold"] == 0.95

    control = p2p.make_control(pipe, [src], [tgt], 2)
    blend = lb.make_local_blend(pipe, [src], [tgt], 2, ["red", "green"], threshold=0.95)

    @jax.jit
    def run(params, images, ids, control, blend):
        z0 = pipe.encode_images(params, from_uint8(images))
        res, _ = pp.edit_latents(pipe, params, z0, ids[0:1], ids[1:2], ids[2:3],
                                 jnp.arange(1), control, blend, jnp.float32(7.5), steps=2,
                                 inversion="negative_prompt", num_inner_steps=2)
        return res

    res = run(params, ex[1]["image"][None], pipe.tokenize([src, tgt, ""]), control, blend)
    m = np.asarray(res.mask[..., 0]) > 0.5
    assert 0.1 < m.mean() < 0.9
    x_src, x_tgt = np.asarray(res.source), np.asarray(res.target)
    # x_src + 0 * (...): equal to float32 rounding. Not bit for bit: XLA may compute x_src
    # once inside the blend's fusion and once for the output, and the two copies may round
    # differently (1-2 ulp seen with XLA:CPU's pre-MLIR fusion emitters, the suite's flags).
    np.testing.assert_allclose(x_tgt[~m], x_src[~m], rtol=1e-6, atol=1e-6)
    assert np.abs(x_tgt - x_src)[m].mean() > 0.1  # the edit changed the masked cells


@pytest.mark.parametrize("argv, message", [
    (["--reweight", "red2"], "--reweight 'red2': expected WORD=FACTOR"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--cross-replace-steps", "1.5"], "cross_replace_steps must be in [0, 1]"),
    (["--image", "/nonexistent.png"], "/nonexistent.png: no such file"),
])
def test_bad_input_is_one_line(world, tmp_path, capsys, argv, message):
    folder, ex = world
    base = ["--image", str(folder / "w0.png"), "--source-prompt", "a b", "--target-prompt",
            "a c", "--out", str(tmp_path / "o")]
    if argv[0] == "--image":
        base = base[2:]
    rc = cli.main(base + argv)
    err = capsys.readouterr().err
    assert rc in (1, 2) and message in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "o" / "w0")


def test_traced_settings_do_not_recompile(world, loaded):
    folder, ex = world
    pipe, params = loaded
    images = np.stack([e["image"] for e in ex[:2]])
    cap = [e["caption"] for e in ex[:2]]
    program = pp._compiled(pipe, 2, "negative_prompt", 10, parallel.make_mesh())  # p2p_edit's
    before = program._cache_size()
    for g, cross, self_ in [(7.5, 0.8, 0.4), (3.0, 0.2, 0.9)]:
        pp.p2p_edit(pipe, params, images, cap, cap, pp.P2PSettings(
            inversion="negative_prompt", steps=2, guidance=g, cross_replace_steps=cross,
            self_replace_steps=self_, mode="reweight", reweight={cap[0].split()[1]: 2.0}))
    assert program._cache_size() - before <= 1
