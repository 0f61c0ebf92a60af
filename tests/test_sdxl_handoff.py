"""SDXL base -> refiner hand-off and micro-conditioning (issue #15): the base with
``denoising_end`` and the refiner with ``denoising_start`` (dpmpp_2m, heun) equal diffusers'
StableDiffusionXLPipeline -> StableDiffusionXLImg2ImgPipeline chain; ``jaxdiff generate
--refiner`` writes the library's images, also for a refiner in the Hugging Face cache with
``--refiner-revision`` / ``--refiner-variant``; micro-conditioning (sizes, crops, aesthetic
scores) equals diffusers' without recompiling; bad requests and flags are one line. The
models themselves against diffusers / transformers: tests/test_sdxl.py."""
import dataclasses

import jax
import numpy as np
import pytest

import jaxdiff
from torchref import models as ref

PROMPTS = ["a red circle", "blue square"]


@pytest.fixture(scope="module")
def saved(sdxl_loaded):
    """The session's tiny SDXL folders and loaded pipelines (tests/conftest.py), and a
    module-own path -> loaded pipeline map for the command-line tests (``_reuse_loaded``)."""
    return dict(sdxl_loaded)



# dpmpp_2m: the refiner's first step has no history (first order, as diffusers). heun:
# the base stops after a predictor evaluation, the refiner starts one evaluation earlier
# (diffusers' order-2 "+1"). SDXL's default "euler" passed here too (left out for time
# since the dpmpp_2m case was added).
@pytest.mark.parametrize("sampler,spans", [("dpmpp_2m", ((0, 3), (3, 5))),
                                           ("heun", ((0, 5), (4, 9)))])
def test_sdxl_base_to_refiner_handoff_matches_diffusers(torch, saved, sampler, spans):
    """Base with denoising_end=0.6 (timesteps 801, 601, 401 of 5; heun: 801, 601, 601,
    401, 401 of 9 evaluations) returns latents; the refiner (aesthetic-score time ids,
    second encoder only) finishes them from denoising_start=0.6 (201, 1; heun: 401, 201,
    201, 1, 1): both equal diffusers' StableDiffusionXLPipeline ->
    StableDiffusionXLImg2ImgPipeline(image=latents) chain; prompt / seed changes reuse
    the compiled programs."""
    from diffusers import (DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                           HeunDiscreteScheduler)
    from jaxdiff import parallel, sampling
    tb, tr = saved["pipeline"][0], saved["refiner_pipeline"][0]
    kind = {"euler": EulerDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler,
            "heun": HeunDiscreteScheduler}
    if sampler in kind:  # copies: the fixture's pipelines keep DDIM
        tb, tr = (type(t).from_pipe(t, scheduler=kind[sampler].from_config(
            t.scheduler.config)) for t in (tb, tr))
    (pipe, params), (rpipe, rparams) = saved["jax_base"], saved["jax_refiner"]
    noise = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
    kw = dict(num_inference_steps=5, guidance_scale=5.0, output_type="latent")
    with torch.no_grad():
        mid_want = tb(PROMPTS, latents=torch.tensor(ref.nchw(noise)), denoising_end=0.6,
                      **kw).images
        want = tr(PROMPTS, image=mid_want, denoising_start=0.6, **kw).images.numpy()
    common = dict(sampler=sampler, steps=5, guidance_scale=5.0, output="latents")
    mid = jaxdiff.generate(pipe, params, PROMPTS, latents=noise, denoising_end=0.6, **common)
    np.testing.assert_allclose(ref.nchw(mid), mid_want.numpy(), atol=1e-3, rtol=0)
    got = jaxdiff.generate(rpipe, rparams, PROMPTS, latents=mid, denoising_start=0.6, **common)
    np.testing.assert_allclose(ref.nchw(got), want, atol=1e-3, rtol=0)
    assert np.abs(want - mid_want.numpy()).max() > 0.1  # the refiner's steps did something
    assert sampling.step_span(pipe, sampler, 5, None, 0.6) == spans[0] + (False,)
    assert sampling.step_span(rpipe, sampler, 5, 0.6) == spans[1] + (True,)
    mesh = parallel.make_mesh()
    programs = [sampling._compiled(pipe, sampler, 5, False, mesh, (), True, spans[0] + (False,)),
                sampling._compiled(rpipe, sampler, 5, False, mesh, (), False, spans[1] + (True,))]
    jaxdiff.generate(pipe, params, ["a green ring", "x"], seed=7, denoising_end=0.6, **common)
    jaxdiff.generate(rpipe, rparams, ["a green ring", "x"], seed=7, latents=mid,
                     denoising_start=0.6, **common)
    assert [p._cache_size() for p in programs] == [1, 1]


def test_sdxl_handoff_bad_requests_fail_before_compiling(saved):
    pipe, params = saved["jax_base"]
    bad = [(dict(denoising_end=0.6), "output='latents'"),
           (dict(denoising_start=0.6, output="latents"), "needs latents="),
           (dict(denoising_end=1.0, output="latents"), "strictly between"),
           (dict(denoising_start=0.7, denoising_end=0.6, output="latents"), "below"),
           (dict(denoising_start=0.99, denoising_end=0.995, output="latents",
                 latents=np.zeros((1, 8, 8, 4), np.float32)), "no step")]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            jaxdiff.generate(pipe, params, "a", **dict(dict(steps=5), **kw))


def _reuse_loaded(saved, monkeypatch):
    """``jaxdiff generate`` gets the module's already loaded base / refiner for their
    folders, so it runs the hand-off test's programs; other paths load once each."""
    from jaxdiff.cli import generate as gen, refiner_args
    loaded = saved.setdefault("by_path", {saved["pipeline"][1]: saved["jax_base"],
                                          saved["refiner_pipeline"][1]: saved["jax_refiner"]})

    def load(path=None, **kw):  # others (the SD 1.x folder of the error tests): once each
        if path not in loaded:
            loaded[path] = jaxdiff.load_pipeline(path, **kw)
        return loaded[path]
    monkeypatch.setattr(gen, "load_pipeline", load)
    monkeypatch.setattr(refiner_args, "load_pipeline", load)
    return saved["pipeline"][1], saved["refiner_pipeline"][1]


def test_refiner_command_line_writes_the_library_handoff(saved, tmp_path, monkeypatch):
    """``jaxdiff generate --model BASE --refiner REFINER --denoising-end 0.6`` writes the
    images of the library's two calls (base ``denoising_end`` -> latents -> refiner
    ``denoising_start``), itself equal to diffusers above; same sampler, steps and batch
    as the dpmpp_2m hand-off test, so no new program compiles after it."""
    from PIL import Image
    from jaxdiff import cli
    base_dir, ref_dir = _reuse_loaded(saved, monkeypatch)
    (pipe, params), (rpipe, rparams) = saved["jax_base"], saved["jax_refiner"]
    out = tmp_path / "out"
    argv = ["generate", "--model", base_dir, "--refiner", ref_dir, "--denoising-end", "0.6",
            "--sampler", "dpmpp_2m", "--steps", "5", "--guidance", "5", "--seed", "3",
            "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--out", str(out)]
    assert cli.main(argv) == 0
    common = dict(sampler="dpmpp_2m", steps=5, guidance_scale=5.0, seed=3)
    mid = jaxdiff.generate(pipe, params, PROMPTS, denoising_end=0.6, output="latents",
                           **common)
    want = jaxdiff.generate(rpipe, rparams, PROMPTS, latents=mid, denoising_start=0.6,
                            **common)
    got = np.stack([np.asarray(Image.open(out / f"{i:04d}.png").convert("RGB"))
                    for i in range(2)])
    np.testing.assert_array_equal(got, want)
    import json
    with open(out / "settings.json") as f:
        settings = json.load(f)
    assert settings["refiner"] == ref_dir and settings["denoising_end"] == 0.6


def test_refiner_from_the_hf_cache_with_revision_and_variant(saved, tmp_path, monkeypatch,
                                                             capsys):
    """``--refiner org/name --refiner-revision v0 --refiner-variant fp16`` (as --revision /
    --variant for --model) reads the tag's snapshot's *.fp16.safetensors from a local
    Hugging Face cache laid out as huggingface_hub does (refs/v0 -> snapshots/<commit>, no
    refs/main): the refiner the command runs has the float16 values of the refiner's
    weights and its images are the library's two calls with them; a revision or variant
    that is not there is one line naming --refiner, before any compile or output."""
    import json
    import shutil
    from PIL import Image
    from safetensors.numpy import load_file, save_file
    from jaxdiff import cli
    from jaxdiff.cli import refiner_args
    base_dir, ref_dir = _reuse_loaded(saved, monkeypatch)
    (pipe, params), (rpipe, rparams) = saved["jax_base"], saved["jax_refiner"]
    repo = tmp_path / "hub" / "models--org--xl-refiner"
    commit = "c" * 40
    shutil.copytree(ref_dir, repo / "snapshots" / commit)
    for f in (repo / "snapshots" / commit).glob("*/*.safetensors"):
        save_file({k: v.astype(np.float16) for k, v in load_file(str(f)).items()},
                  str(f.with_suffix(".fp16.safetensors")))
    (repo / "refs").mkdir()
    (repo / "refs" / "v0").write_text(commit + "\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    loads = []

    def load(path=None, **kw):  # the real cache lookup; the module's refiner object (and
        got_pipe, got = jaxdiff.load_pipeline(path, **kw)  # its compiled program) with
        assert got_pipe.unet.config == rpipe.unet.config   # the params read
        loads.append((path, kw, got))
        return rpipe, got
    monkeypatch.setattr(refiner_args, "load_pipeline", load)
    argv = ["generate", "--model", base_dir, "--refiner", "org/xl-refiner",
            "--denoising-end", "0.6", "--sampler", "dpmpp_2m", "--steps", "5", "--guidance",
            "5", "--seed", "3", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1]]
    for flags, says in ((["--refiner-revision", "v9"], "revision 'v9'"),
                        ([], "revision 'main'"),
                        (["--refiner-revision", "v0", "--refiner-variant", "bf16"],
                         "bf16.safetensors")):
        assert cli.main(argv + flags + ["--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --refiner: ") and "\n" not in err and says in err, err
        assert not (tmp_path / "bad").exists()
    out = tmp_path / "out"
    flags = ["--refiner-revision", "v0", "--refiner-variant", "fp16", "--out", str(out)]
    assert cli.main(argv + flags) == 0
    (path, kw, got), = loads
    assert (path, kw) == ("org/xl-refiner", dict(revision="v0", variant="fp16"))
    half = jax.tree.map(lambda a: np.asarray(a).astype(np.float16).astype(np.float32), rparams)
    jax.tree.map(np.testing.assert_array_equal, got, half)
    assert any(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a != b).any()), got, rparams)))
    common = dict(sampler="dpmpp_2m", steps=5, guidance_scale=5.0, seed=3)
    mid = jaxdiff.generate(pipe, params, PROMPTS, denoising_end=0.6, output="latents",
                           **common)
    want = jaxdiff.generate(rpipe, got, PROMPTS, latents=mid, denoising_start=0.6, **common)
    images = np.stack([np.asarray(Image.open(out / f"{i:04d}.png").convert("RGB"))
                       for i in range(2)])
    np.testing.assert_array_equal(images, want)
    with open(out / "settings.json") as f:
        settings = json.load(f)
    assert (settings["refiner"], settings["refiner_revision"], settings["refiner_variant"]) \
        == ("org/xl-refiner", "v0", "fp16")


@pytest.mark.parametrize("extra,match", [
    (["--denoising-end", "1.2"], "strictly between 0 and 1"),
    (["--denoising-end", "0.6", "--steps", "1"], "leave no step"),
    (["--textual-inversion", "x.safetensors"], "cannot be combined with --textual-inversion"),
    (["--model", "SD1"], "needs an SDXL --model"),
    (["--refiner", "SD1"], "is not an SDXL model"),
    (["--refiner", None], "--denoising-end needs --refiner"),
    (["--refiner", None, "--denoising-end", None, "--refiner-variant", "fp16"],
     "--refiner-variant needs --refiner"),
    (["--model", "SD1", "--refiner", None, "--denoising-end", None, "--original-size", "8 8"],
     "--original-size is SDXL micro-conditioning"),
    (["--refiner", None, "--denoising-end", None, "--aesthetic-score", "3"],
     "--aesthetic-score is the SDXL refiner's"),
    (["--negative-original-size", "8 8"], "only given both --negative-original-size")])
def test_refiner_command_line_bad_flags_are_one_line(saved, tmp_path, monkeypatch, capsys,
                                                     tiny_pipe_dir, extra, match):
    """Each: exit status 2, one ``error:`` line naming the flag, no output folder."""
    from jaxdiff import cli
    base_dir, ref_dir = _reuse_loaded(saved, monkeypatch)
    flags = {"--model": base_dir, "--refiner": ref_dir, "--denoising-end": "0.6"}
    for flag, value in zip(extra[::2], extra[1::2]):
        flags[flag] = tiny_pipe_dir if value == "SD1" else value
    argv = ["generate", "--prompt", "a", "--out", str(tmp_path / "out")]
    for flag, value in flags.items():
        argv += [flag] + value.split(" ") if value is not None else []
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and match in err, err
    assert not (tmp_path / "out").exists()


def test_micro_conditioning_command_line_writes_the_library_images(saved, tmp_path,
                                                                   monkeypatch):
    """``--original-size --crop-top-left --target-size --negative-* --aesthetic-score
    --negative-aesthetic-score`` with ``--refiner``: the base gets the sizes and crops, the
    (aesthetic-score) refiner the original size, crops and scores; the images are the
    library's calls (the programs of the dpmpp_2m hand-off), settings.json records them."""
    import json
    from PIL import Image
    from jaxdiff import cli
    base_dir, ref_dir = _reuse_loaded(saved, monkeypatch)
    (pipe, params), (rpipe, rparams) = saved["jax_base"], saved["jax_refiner"]
    out = tmp_path / "out"
    argv = ["generate", "--model", base_dir, "--refiner", ref_dir, "--denoising-end", "0.6",
            "--sampler", "dpmpp_2m", "--steps", "5", "--guidance", "5", "--seed", "3",
            "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--out", str(out),
            "--original-size", "40", "24", "--crop-top-left", "4", "12", "--target-size", "16",
            "32", "--negative-original-size", "8", "8", "--negative-crop-top-left", "2", "0",
            "--negative-target-size", "24", "16", "--aesthetic-score", "3",
            "--negative-aesthetic-score", "7.5"]
    assert cli.main(argv) == 0
    common = dict(sampler="dpmpp_2m", steps=5, guidance_scale=5.0, seed=3)
    mid = jaxdiff.generate(pipe, params, PROMPTS, denoising_end=0.6, output="latents",
                           **common, **MICRO)
    refine = {k: v for k, v in MICRO.items() if "target" not in k}
    want = jaxdiff.generate(rpipe, rparams, PROMPTS, latents=mid, denoising_start=0.6,
                            **common, **refine, aesthetic_score=3.0,
                            negative_aesthetic_score=7.5)
    got = np.stack([np.asarray(Image.open(out / f"{i:04d}.png").convert("RGB"))
                    for i in range(2)])
    np.testing.assert_array_equal(got, want)
    with open(out / "settings.json") as f:
        settings = json.load(f)
    assert settings["crops_coords_top_left"] == [4, 12] and settings["aesthetic_score"] == 3.0
    assert settings["negative_target_size"] == [24, 16]


# Micro-conditioning away from the defaults (base: negative sizes and crop as well; the
# refiner: its original size, crop and aesthetic scores), pixels of the 16 x 16 images.
MICRO = dict(original_size=(40, 24), crops_coords_top_left=(4, 12), target_size=(16, 32),
             negative_original_size=(8, 8), negative_crops_coords_top_left=(2, 0),
             negative_target_size=(24, 16))
REFINE = dict(original_size=(48, 32), crops_coords_top_left=(0, 8), aesthetic_score=3.0,
              negative_original_size=(8, 16), negative_crops_coords_top_left=(4, 0),
              negative_aesthetic_score=7.5)


def test_sdxl_micro_conditioning_matches_diffusers_without_recompiling(torch, saved):
    """``generate(..., original_size=, crops_coords_top_left=, target_size=, negative_*=)``
    (base, denoising_end) and ``aesthetic_score=`` / ``negative_aesthetic_score=`` (refiner,
    denoising_start) equal diffusers' StableDiffusionXLPipeline ->
    StableDiffusionXLImg2ImgPipeline with the same keyword arguments (diffusers' base one
    image at a time: its time ids misalign with differing negatives for a batch of 2, see
    the comment); the defaults give
    other latents (the arguments are used); the time ids are traced: the dpmpp_2m hand-off
    test's two programs run every call, none compiles again."""
    from diffusers import DPMSolverMultistepScheduler
    from jaxdiff import parallel, sampling
    tb, tr = (type(t).from_pipe(t, scheduler=DPMSolverMultistepScheduler.from_config(
        t.scheduler.config)) for t in (saved["pipeline"][0], saved["refiner_pipeline"][0]))
    (pipe, params), (rpipe, rparams) = saved["jax_base"], saved["jax_refiner"]
    noise = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
    kw = dict(num_inference_steps=5, guidance_scale=5.0, output_type="latent")
    with torch.no_grad():  # the base one image at a time: for B > 1 diffusers pairs its
        # [negative; positive] time ids with the embeddings' [negatives; positives] wrongly
        mid_want = torch.cat([tb(p, latents=torch.tensor(ref.nchw(noise[i:i + 1])),
                                 denoising_end=0.6, **kw, **MICRO).images
                              for i, p in enumerate(PROMPTS)])
        want = tr(PROMPTS, image=mid_want, denoising_start=0.6, **kw, **REFINE).images.numpy()
    common = dict(sampler="dpmpp_2m", steps=5, guidance_scale=5.0, output="latents")
    mid = jaxdiff.generate(pipe, params, PROMPTS, latents=noise, denoising_end=0.6, **common,
                           **MICRO)
    np.testing.assert_allclose(ref.nchw(mid), mid_want.numpy(), atol=1e-3, rtol=0)
    got = jaxdiff.generate(rpipe, rparams, PROMPTS, latents=mid, denoising_start=0.6,
                           **common, **REFINE)
    np.testing.assert_allclose(ref.nchw(got), want, atol=1e-3, rtol=0)
    plain = jaxdiff.generate(pipe, params, PROMPTS, latents=noise, denoising_end=0.6, **common)
    plain_refined = jaxdiff.generate(rpipe, rparams, PROMPTS, latents=mid,
                                     denoising_start=0.6, **common)
    assert np.abs(plain - mid).max() > 1e-2 and np.abs(plain_refined - got).max() > 1e-2
    mesh = parallel.make_mesh()
    programs = [sampling._compiled(pipe, "dpmpp_2m", 5, False, mesh, (), True, (0, 3, False)),
                sampling._compiled(rpipe, "dpmpp_2m", 5, False, mesh, (), False, (3, 5, True))]
    assert [p._cache_size() for p in programs] == [1, 1]


def test_sdxl_micro_conditioning_bad_requests_are_one_line(saved):
    """Before any compile: a non-SDXL pipeline, values diffusers would ignore, wrong
    lengths, unknown names."""
    (pipe, params), (rpipe, _) = saved["jax_base"], saved["jax_refiner"]
    sd = dataclasses.replace(pipe, text_encoder_2=None)  # one encoder: not SDXL
    bad = [(sd, dict(original_size=(8, 8)), "original_size is SDXL micro-conditioning"),
           (pipe, dict(aesthetic_score=5.0), "only a refiner"),
           (rpipe, dict(target_size=(8, 8)), "aesthetic score, not a target size"),
           (pipe, dict(negative_original_size=(8, 8)), "only given both"),
           (pipe, dict(original_size=(8, 8, 8)), "must be 2 number")]
    for p, kw, msg in bad:
        with pytest.raises(ValueError, match=msg) as e:
            jaxdiff.generate(p, params, "a", steps=5, **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(TypeError, match="unknown micro-conditioning argument 'crop'"):
        jaxdiff.generate(pipe, params, "a", steps=5, crop=(1, 1))
