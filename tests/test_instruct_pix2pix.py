"""InstructPix2Pix sampling (jaxdiff.editing.instruct_pix2pix) and edit/instruct.py.

Truth: diffusers' StableDiffusionInstructPix2PixPipeline on the same tiny random 8-channel
pipeline, initial latents and per-step noise (Euler ancestral, its checkpoint's scheduler);
with s_T = s_I = 1 diffusers runs the plain conditional call (the text + image branch
alone), so the sweep's (1, 1) pair is checked against exactly that. Two programs compile
here: the 2-pair sweep over 2 images and the single-pair program over 1 image (shared by
the batch == single check, the recompilation count and the CLI run).
"""
import json
import os

import numpy as np
import pytest

import jaxdiff
from jaxdiff.editing import batch_inputs, instruct_pix2pix as ip
from torchref import models as ref
from torchref.scripts import load_script

STEPS = 4
PROMPTS = ["make it red", "blue sq"]
NEGATIVE = ["green", "dark"]
PAIRS = ((5.0, 1.5), (1.0, 1.0))  # (s_T, s_I)
SEED = 3


@pytest.fixture(scope="module")
def case(tmp_path_factory, torch):
    """The diffusers pipeline, its folder loaded by jaxdiff, inputs, and the jaxdiff sweep."""
    folder = str(tmp_path_factory.mktemp("ip2p_tiny"))
    tp = ref.make_torch_instruct_pipeline(folder, unet="sd1_micro")
    pipe, params = jaxdiff.load_pipeline(folder)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    noise = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    sweep = ip.edit(pipe, params, images, PROMPTS, steps=STEPS,
                    text_guidance=[p[0] for p in PAIRS], image_guidance=[p[1] for p in PAIRS],
                    negative_prompt=NEGATIVE, latents=noise, seed=SEED, output="latents")
    return dict(folder=folder, tp=tp, pipe=pipe, params=params, images=images, noise=noise,
                sweep=sweep)


def _diffusers(case, torch, monkeypatch, text_scale, image_scale):
    """diffusers' final latents (NHWC), its ancestral noise replaced by jaxdiff's draws."""
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as ea
    keys = batch_inputs.image_keys(SEED, 2)
    draws = iter([torch.tensor(ref.nchw(batch_inputs.step_noise(keys, i, (8, 8, 4))))
                  for i in range(STEPS)])
    monkeypatch.setattr(ea, "randn_tensor", lambda shape, **kw: next(draws))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only spin (x50 CPU time when loaded)
    try:
        with torch.no_grad():
            out = case["tp"](PROMPTS, image=torch.tensor(ref.nchw((case["images"] + 1) / 2)),
                             negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                             guidance_scale=text_scale, image_guidance_scale=image_scale,
                             latents=torch.tensor(ref.nchw(case["noise"])),
                             output_type="latent")
    finally:
        torch.set_num_threads(threads)
    assert next(draws, None) is None  # every step drew its noise
    return ref.nhwc(out.images.numpy())


@pytest.mark.parametrize("k", range(len(PAIRS)))
def test_sweep_matches_diffusers(case, torch, monkeypatch, k):
    """(5, 1.5): the three-branch guidance; (1, 1): diffusers skips guidance and calls the
    UNet on the text + image branch alone (the defining property)."""
    want = _diffusers(case, torch, monkeypatch, *PAIRS[k])
    np.testing.assert_allclose(case["sweep"][k], want, atol=1e-3, rtol=0)
    assert np.abs(case["sweep"][k] - case["noise"]).max() > 0.1  # it did move
    assert np.abs(case["sweep"][k] - case["sweep"][1 - k]).max() > 0.1  # the pairs differ


def test_single_equals_batch_row_and_scales_do_not_recompile(case, monkeypatch):
    """Image 1 alone (its own noise and sample index) equals row 1 of the batched sweep;
    new s_T, s_I and seed run the same compiled program."""
    traces = []
    real = ip.instruct_latents
    monkeypatch.setattr(ip, "instruct_latents", lambda *a, **k: traces.append(1) or real(*a, **k))
    c = case
    one = lambda sT, sI, seed=SEED: ip.edit(
        c["pipe"], c["params"], c["images"][1:], PROMPTS[1], steps=STEPS, text_guidance=sT,
        image_guidance=sI, negative_prompt=NEGATIVE[1], latents=c["noise"][1:], seed=seed,
        sample_index=[1], output="latents")
    got = one(*PAIRS[0])
    first = len(traces)
    np.testing.assert_allclose(got[0], c["sweep"][0][1], atol=1e-4, rtol=1e-5)
    other = one(2.0, 1.2, seed=11)
    again = one(*PAIRS[0])
    assert first <= 1 and len(traces) == first
    assert np.abs(other - got).max() > 0.1
    np.testing.assert_array_equal(again, got)


def test_bad_requests_fail_in_one_line(case, embedded):
    c = case
    with pytest.raises(ValueError, match="same number"):
        ip.edit(c["pipe"], c["params"], c["images"], PROMPTS, text_guidance=[1.0, 2.0],
                image_guidance=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="InstructPix2Pix pipeline"):  # not text-to-image
        jaxdiff.generate(c["pipe"], c["params"], PROMPTS)
    plain, params = embedded  # the embedded 4-channel model
    with pytest.raises(ValueError, match="takes 4 input channels; InstructPix2Pix needs 8"):
        ip.edit(plain, params, c["images"], PROMPTS)


def test_saved_folder_is_diffusers_instruct_pipeline(case, tmp_path, torch):
    """jaxdiff's save: diffusers' InstructPix2Pix class reads it with the same weights."""
    from diffusers import StableDiffusionInstructPix2PixPipeline
    out = jaxdiff.save_pipeline(case["pipe"], case["params"], str(tmp_path / "saved"))
    with open(os.path.join(out, "model_index.json")) as f:
        assert json.load(f)["_class_name"] == "StableDiffusionInstructPix2PixPipeline"
    back = StableDiffusionInstructPix2PixPipeline.from_pretrained(out)
    assert back.unet.config.in_channels == 8
    want = case["tp"].unet.state_dict()
    for name, value in back.unet.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), want[name].numpy(), err_msg=name)
    # float16 (how the embedded model's instruct weights ship): the same tensors rounded,
    # read back by jaxdiff as float32 params.
    half = jaxdiff.save_pipeline(case["pipe"], case["params"], str(tmp_path / "half"),
                                 dtype=np.float16)
    from safetensors.numpy import load_file
    stored = load_file(os.path.join(half, "unet", "diffusion_pytorch_model.safetensors"))
    back16 = StableDiffusionInstructPix2PixPipeline.from_pretrained(half)
    for name, value in back16.unet.state_dict().items():
        assert stored[name].dtype == np.float16, name
        np.testing.assert_array_equal(value.numpy(), want[name].numpy().astype(np.float16),
                                      err_msg=name)
    _, params16 = jaxdiff.load_pipeline(half)
    k = np.asarray(params16["unet"]["conv_in"]["kernel"])
    assert k.dtype == np.float32
    np.testing.assert_array_equal(
        k, np.asarray(case["params"]["unet"]["conv_in"]["kernel"]).astype(np.float16))


def test_cli_edits_like_the_library_and_refuses_a_plain_model(case, embedded, tmp_path,
                                                              capsys, monkeypatch):
    """edit/instruct.py on one image equals the library call (same seed and index); a
    4-channel --model is one error line, exit status 2. (The CLI gets the loaded pipeline
    objects, so it runs the programs compiled above.)"""
    from PIL import Image
    from jaxdiff.pipeline import to_uint8
    tool = load_script("edit", "instruct")
    img = to_uint8(case["images"][1])
    Image.fromarray(img).save(tmp_path / "src.png")
    args = ["--image", str(tmp_path / "src.png"), "--target-prompt", PROMPTS[1],
            "--negative-prompt", NEGATIVE[1], "--steps", str(STEPS), "--guidance", "5",
            "--image-guidance", "1.5", "--seed", str(SEED)]
    monkeypatch.setattr(jaxdiff, "load_pipeline",
                        lambda path=None, **kw: (case["pipe"], case["params"]))
    assert tool.main(args + ["--model", case["folder"], "--out", str(tmp_path / "out")]) == 0
    edited = np.asarray(Image.open(tmp_path / "out" / "src" / "edit.png"))
    want = ip.edit(case["pipe"], case["params"], img[None], PROMPTS[1], steps=STEPS,
                   text_guidance=5.0, image_guidance=1.5, negative_prompt=NEGATIVE[1],
                   seed=SEED, sample_index=[0])
    np.testing.assert_array_equal(edited, want[0])
    settings = json.loads((tmp_path / "out" / "src" / "settings.json").read_text())
    assert settings["method"] == "instruct_pix2pix" and settings["image_guidance"] == 1.5
    capsys.readouterr()
    plain = os.path.join(os.path.dirname(jaxdiff.__file__), "assets", "shapes")
    monkeypatch.setattr(jaxdiff, "load_pipeline", lambda path=None, **kw: embedded)
    assert tool.main(args + ["--model", plain, "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "InstructPix2Pix needs 8" in err[0]
    assert not os.path.exists(tmp_path / "bad" / "src")
