"""``jaxdiff generate --classifier / --clip``: the files plain generate writes, images equal to
the library's ``generate_guided`` / ``generate_clip_guided`` (chunked jobs, scale sweeps as
grid rows), and one-line errors for bad guidance flags, before anything is written.

Truth: the library calls with the same arguments (they are tested against the plain sampler
and finite differences in test_classifier_guidance.py and test_clip.py). Tiny random
guiding models on the embedded pipeline, 2 DDIM steps; the CLI gets the test's model
objects (programs are cached per model object, so each path compiles once).
"""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxdiff import cli
from jaxdiff.cli import guided_args
from jaxdiff.clip_guidance import generate_clip_guided
from jaxdiff.data.tokenizer import load_tokenizer
from jaxdiff.guided_sampling import generate_guided
from jaxdiff.models.noisy_classifier import (NoisyClassifier, NoisyClassifierConfig,
                                             save_classifier)
from jaxdiff.training.clip import build_clip, init_params
from jaxdiff.weights import DEFAULT_MODEL
from jaxdiff.weights.clip_format import SHAPES_CLIP

CONFIG = NoisyClassifierConfig(block_out_channels=(8, 16), norm_num_groups=4,
                               heads=(("colour", 3), ("shape", 2)),
                               labels=(("colour", ("red", "green", "blue")),
                                       ("shape", ("circle", "star"))))
SETTINGS = ["--sampler", "ddim", "--steps", "2", "--seed", "5"]
PROMPTS = ["", "a red circle"]


@pytest.fixture(scope="module")
def guides(embedded, tmp_path_factory):
    """A tiny classifier (saved, and the objects) and a tiny noise-aware CLIP on the
    embedded model's 8x8x4 latents; the CLI gets these objects and the loaded pipeline."""
    pipe, _ = embedded
    tmp = tmp_path_factory.mktemp("guides")
    model = NoisyClassifier(CONFIG)
    cparams = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 4)),
                                  jnp.zeros((1,)))["params"]
    folder = save_classifier(str(tmp / "clf"), CONFIG, cparams)
    tok = load_tokenizer(os.path.join(DEFAULT_MODEL, "tokenizer"))
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=2, hidden_act="quick_gelu")
    clip = build_clip(tok, small, dict(small, image_size=8, patch_size=2, num_channels=4), 16,
                      noisy=True, noise_schedule=pipe.scheduler.to_dict())
    clip_params = init_params(clip, 1)
    os.makedirs(tmp / "clip")
    return dict(folder=folder, model=model, cparams=cparams, clip_dir=str(tmp / "clip"),
                clip=clip, clip_params=clip_params, tmp=tmp)


def _run(embedded, guides, argv, mp):
    mp.setattr(cli.generate, "load_pipeline", lambda path=None, **kw: embedded)
    mp.setattr(guided_args, "load_classifier", lambda f: (guides["model"], guides["cparams"]))
    mp.setattr(guided_args, "load_clip", lambda f: (guides["clip"], guides["clip_params"]))
    return cli.main(argv)


def _read(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")), dict(im.text)


def _images(out, n):
    return np.stack([_read(os.path.join(out, f"{i:04d}.png"))[0] for i in range(n)])


def test_classifier_flags_write_what_the_library_makes(embedded, guides, monkeypatch):
    """2 prompts x 2 images in chunks of 2, a sweep over 2 scales with CFG: 8 images,
    scale-major, each PNG tagged with its scale; the grid has one row per scale."""
    pipe, params = embedded
    out = str(guides["tmp"] / "clf_out")
    argv = ["generate", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--batch", "2",
            "--max-batch", "2", "--guidance", "3", "--classifier", guides["folder"],
            "--class", "colour=blue", "--class", "shape=star", "--class", "shape=0",
            "--classifier-scale", "0", "40", "--out", out] + SETTINGS
    assert _run(embedded, guides, argv, monkeypatch) == 0
    assert sorted(os.listdir(out)) == [f"{i:04d}.png" for i in range(8)] + [
        "grid.png", "settings.json"]
    got = _images(out, 8).reshape(2, 4, 32, 32, 3)
    labels = {"colour": [2, 2], "shape": [1, 0]}
    kw = dict(classifier_scale=[0.0, 40.0], guidance_scale=3.0, sampler="ddim", steps=2,
              seed=5)
    want = np.concatenate([
        generate_guided(pipe, params, guides["model"], guides["cparams"],
                        {h: [v[k]] * 2 for h, v in labels.items()}, [PROMPTS[k]] * 2,
                        sample_offset=2 * k, **kw) for k in range(2)], axis=1)
    np.testing.assert_array_equal(got, want)
    assert np.abs(got[1].astype(int) - got[0]).max() > 0    # the scale acts
    _, meta = _read(os.path.join(out, "0005.png"))
    assert (meta["classifier_scale"], meta["prompt"], meta["index"]) == ("40.0", PROMPTS[0], "5")
    grid, _ = _read(os.path.join(out, "grid.png"))
    assert grid.shape == (2 * 32, 4 * 32, 3)
    np.testing.assert_array_equal(grid[32:, 32:64], got[1, 1])
    with open(os.path.join(out, "settings.json")) as f:
        settings = json.load(f)
    assert settings["classifier_scale"] == [0.0, 40.0] and len(settings["prompts"]) == 8


def test_clip_flags_write_what_the_library_makes(embedded, guides, monkeypatch):
    """A noise-aware CLIP reading x_t (mode xt), one guidance text per prompt, no CFG."""
    pipe, params = embedded
    out = str(guides["tmp"] / "clip_out")
    argv = ["generate", "--prompt", "", "--prompt", "", "--guidance", "1", "--clip",
            guides["clip_dir"], "--clip-mode", "xt", "--clip-prompt", "a red star",
            "--clip-guidance-text", "a blue circle", "--clip-scale", "300", "--out",
            out] + SETTINGS
    assert _run(embedded, guides, argv, monkeypatch) == 0
    want = generate_clip_guided(pipe, params, guides["clip"], guides["clip_params"],
                                texts=["a red star", "a blue circle"], mode="xt",
                                prompts=["", ""], clip_scale=[300.0], sampler="ddim",
                                steps=2, seed=5)
    np.testing.assert_array_equal(_images(out, 2), want[0])
    _, meta = _read(os.path.join(out, "0001.png"))
    assert meta["clip_scale"] == "300.0" and meta["clip_mode"] == "xt"
    # Normalized gradients and self-recurrence reach the library call the same way.
    out2 = str(guides["tmp"] / "clip_out2")
    argv = argv[:argv.index("--clip-scale")] + ["--clip-scale", "2", "--clip-normalize",
                                                "--clip-recurrence", "2", "--out", out2] + SETTINGS
    assert _run(embedded, guides, argv, monkeypatch) == 0
    kw = dict(texts=["a red star", "a blue circle"], mode="xt", prompts=["", ""],
              clip_scale=[2.0], sampler="ddim", steps=2, seed=5, normalize=True)
    want2 = generate_clip_guided(pipe, params, guides["clip"], guides["clip_params"],
                                 recurrence=2, **kw)
    np.testing.assert_array_equal(_images(out2, 2), want2[0])
    once = generate_clip_guided(pipe, params, guides["clip"], guides["clip_params"], **kw)
    assert np.abs(want2.astype(int) - once.astype(int)).max() > 2
    with open(os.path.join(out2, "settings.json")) as f:
        settings = json.load(f)
    assert settings["clip_normalize"] is True and settings["clip_recurrence"] == 2
    assert settings["clip_views"] == 1 and settings["clip_candidates"] == 1


@pytest.mark.parametrize("extra,match", [
    (["--classifier", "{clip}", "--class", "shape=star"], "config.json: missing"),
    (["--classifier", "shipped_clip", "--class", "shape=star"], "not a noisy-classifier"),
    (["--clip", "{clf}", "--clip-prompt", "a"], "not a CLIP folder"),
    (["--classifier", "{tmp}/none", "--class", "shape=star"], "no such directory"),
    (["--classifier", "{clf}"], "needs the wanted class"),
    (["--classifier", "{clf}", "--class", "shape=hexagon"], "head shape has classes circle"),
    (["--classifier", "{clf}", "--class", "size=big"], "HEAD=NAME with a head"),
    (["--classifier", "{clf}", "--class", "shape=star", "--class", "shape=star",
      "--class", "shape=star"], "given 3 times for 2 prompts"),
    (["--classifier-scale", "3"], "need --classifier DIR"),
    (["--clip", "shipped"], "needs a target"),
    (["--clip", "shipped", "--clip-prompt", "a", "--clip-mode", "xt"], "needs a noise-aware"),
    (["--clip", "shipped", "--clip-image", "{tmp}/none.png"], "none.png"),
    (["--clip", "shipped", "--clip-prompt", "a", "--classifier", "{clf}"], "give one kind"),
    (["--clip", "shipped", "--clip-prompt", "a", "--height", "64"], "model's size 32x32"),
    (["--clip-normalize"], "need --clip DIR"),
    (["--clip", "shipped", "--clip-prompt", "a", "--clip-recurrence", "2", "--sampler",
      "euler"], "only with --sampler ddim"),
    (["--clip-views", "3"], "need --clip DIR"),
    (["--clip", "shipped", "--clip-prompt", "a", "--clip-mode", "xt", "--clip-views", "2"],
     "V > 1 only with --clip-mode x0"),
    (["--clip-candidates", "2"], "need --clip DIR"),
    (["--clip", "shipped", "--clip-prompt", "a", "--clip-mode", "xt", "--clip-candidates",
      "2"], "N > 1 only with --clip-mode x0"),
])
def test_bad_guidance_flags_are_one_error_line_and_no_files(embedded, guides, tmp_path, capsys,
                                                             monkeypatch, extra, match):
    """The guiding models are read from disk here (the shipped CLIP, the saved classifier)."""
    monkeypatch.setattr(cli.generate, "load_pipeline", lambda path=None, **kw: embedded)
    out = tmp_path / "out"
    fill = dict(tmp=str(tmp_path), clf=guides["folder"], clip=guides["clip_dir"])
    argv = (["generate", "--prompt", "x", "--prompt", "y", "--out", str(out)]
            + [a.format(**fill).replace("shipped_clip", SHAPES_CLIP) for a in extra])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and match in errors[0], err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.slow
def test_guided_program_on_eight_devices_equals_one_device():
    """The classifier-guided program split over 8 forced host devices (5 images padded to
    8, a sweep of 2 scales) gives the images 1 device gives (a subprocess: the device count
    is fixed when JAX starts)."""
    script = textwrap.dedent("""
        import os
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_force_host_platform_device_count=8")
        import jax, jax.numpy as jnp, numpy as np, jaxdiff
        from jaxdiff import parallel
        from jaxdiff.guided_sampling import generate_guided
        from jaxdiff.models.noisy_classifier import NoisyClassifier, NoisyClassifierConfig
        assert jax.device_count() == 8
        pipe, params = jaxdiff.load_pipeline(None)
        model = NoisyClassifier(NoisyClassifierConfig(block_out_channels=(8, 16),
                                                      norm_num_groups=4))
        cp = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)))["params"]
        kw = dict(sampler="euler_a", steps=2, seed=7, output="latents",
                  classifier_scale=[0.0, 30.0])
        labels = {"colour": [0, 1, 2, 3, 4], "shape": [0, 1, 2, 3, 4]}
        many = generate_guided(pipe, params, model, cp, labels, mesh=parallel.make_mesh(), **kw)
        one = generate_guided(pipe, params, model, cp, labels,
                              mesh=parallel.make_mesh(jax.devices()[:1]), **kw)
        assert many.shape == (2, 5, 8, 8, 4), many.shape
        np.testing.assert_allclose(many, one, rtol=1e-5, atol=1e-4)
        assert np.abs(many[1] - many[0]).max() > 1e-3   # the guided row differs
        print("OK")
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
