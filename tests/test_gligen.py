"""GLIGEN (issue #14): parity of the gated UNet (position net + fusers) with diffusers'
``UNet2DConditionModel(attention_type="gated")`` on tiny random weights with strong gates,
the text-image position net, files written by jaxdiff loading in diffusers, sampling equal
to ``StableDiffusionGLIGENPipeline`` from the same latents (scheduled sampling beta traced),
and the one-line errors for bad boxes."""
import dataclasses
import functools
import os
import re

import jax
import numpy as np
import pytest

import jaxdiff
from torchref import models as ref
from jaxdiff import gligen_sampling as gs
from jaxdiff import parallel
from jaxdiff.models.gligen import GLIGENTextBoundingboxProjection, merge_params, split_params
from jaxdiff.weights import convert, save_pipeline
from jaxdiff.weights.gligen import load_gligen_unet, save_gligen_unet, with_gligen

TOL = 1e-4
PROMPTS = ["red dot", "blue sq"]  # the tiny tokenizer holds 14 characters
PHRASES = ["red dot", "sq"]
BOXES = [[0.1, 0.2, 0.5, 0.6], [0.5, 0.1, 0.9, 0.95]]
GEN = dict(sampler="ddim", steps=4, guidance_scale=5.0)


def _gated_unet(torch, seed=0):
    """A perturbed tiny sd1 GLIGEN UNet whose gates are far from zero (tanh 0.76 / -0.71),
    so the fusers move the output well beyond the tolerance."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    tu = ref.perturb(UNet2DConditionModel(**ref.UNET_CONFIGS["sd1"], attention_type="gated"),
                     seed=seed).eval()
    with torch.no_grad():
        for name, p in tu.named_parameters():
            if name.endswith("alpha_attn"):
                p.fill_(1.0)
            elif name.endswith("alpha_dense"):
                p.fill_(-0.9)
    return tu


@pytest.fixture(scope="module")
def gl(torch, tiny_pipe_dir, tmp_path_factory):
    """The torch GLIGEN UNet and its folder, the jaxdiff pipeline with that UNet (the tiny
    pipeline's other parts), diffusers' GLIGEN pipeline loaded from the folder jaxdiff
    writes of it, and shared inputs."""
    from diffusers.pipelines.deprecated.stable_diffusion_gligen.pipeline_stable_diffusion_gligen \
        import StableDiffusionGLIGENPipeline
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only spin on a loaded machine
    root = tmp_path_factory.mktemp("gligen")
    tu = _gated_unet(torch)
    tu.save_pretrained(str(root / "unet"), safe_serialization=True)
    pipe, params = jaxdiff.load_pipeline(tiny_pipe_dir)
    gpipe, gparams = with_gligen(pipe, params, str(root / "unet"))
    # diffusers' GLIGEN pipeline reads the folder jaxdiff writes (model_index names it).
    save_pipeline(gpipe, gparams, str(root / "pipe"))
    tp = StableDiffusionGLIGENPipeline.from_pretrained(
        str(root / "pipe"), safety_checker=None, requires_safety_checker=False)
    tp.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    inputs = dict(x=torch.randn(2, 4, 8, 8, generator=g), t=torch.tensor([3, 871]),
                  ctx=torch.randn(2, 5, 32, generator=g), boxes=torch.rand(2, 3, 4, generator=g),
                  masks=torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]),
                  emb=torch.randn(2, 3, 32, generator=g))
    yield dict(tu=tu, tp=tp, dir=str(root / "unet"), pipe_dir=str(root / "pipe"), pipe=gpipe, params=gparams,
               base=(pipe, params), inputs=inputs)
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def _unet(module):
    """The UNet with grounding; ``enabled`` traced (one program for fusers on and off)."""
    return jax.jit(lambda p, x, t, c, g: module.apply({"params": p}, x, t, c, gligen=g))


def _torch_gligen(inputs):
    return dict(boxes=inputs["boxes"], masks=inputs["masks"], positive_embeddings=inputs["emb"])


def _jax_args(inputs, enabled=True):
    g = {k: v.numpy() for k, v in _torch_gligen(inputs).items()}
    return (ref.nhwc(inputs["x"].numpy()), inputs["t"].numpy(), inputs["ctx"].numpy(),
            dict(g, enabled=np.bool_(enabled)))


def test_grounded_unet_matches_diffusers(torch, gl):
    """Boxes + phrase embeddings with masked slots: the output equals diffusers' within
    1e-4 and moves far beyond it from the plain output; fusers off (traced, the same
    program) is diffusers' UNet without grounding."""
    tu, inputs, unet = gl["tu"], gl["inputs"], gl["pipe"].unet
    args = (inputs["x"], inputs["t"], inputs["ctx"])
    with torch.no_grad():
        want = tu(*args, cross_attention_kwargs={"gligen": _torch_gligen(inputs)}).sample.numpy()
        plain = tu(*args).sample.numpy()
    run = _unet(unet)
    got = run(gl["params"]["unet"], *_jax_args(inputs))
    off = run(gl["params"]["unet"], *_jax_args(inputs, enabled=False))
    np.testing.assert_allclose(ref.nchw(got), want, atol=TOL, rtol=0)
    np.testing.assert_allclose(ref.nchw(off), plain, atol=TOL, rtol=0)
    assert np.abs(want - plain).max() > 100 * TOL
    assert run._cache_size() == 1


def test_text_image_position_net_matches_diffusers(torch):
    """``gated-text-image``'s position net (phrase and image tokens, separate masks)."""
    from diffusers.models.embeddings import GLIGENTextBoundingboxProjection as Ref
    torch.manual_seed(0)
    tm = ref.perturb(Ref(positive_len=32, out_dim=32, feature_type="text-image"), 0.1).eval()
    g = torch.Generator().manual_seed(2)
    kw = dict(boxes=torch.rand(2, 3, 4, generator=g), masks=torch.tensor([[1.0, 1, 0], [1, 0, 0]]),
              phrases_masks=torch.tensor([[1.0, 0, 1], [0, 0, 0]]),
              image_masks=torch.tensor([[0.0, 1, 1], [1, 0, 0]]),
              phrases_embeddings=torch.randn(2, 3, 32, generator=g),
              image_embeddings=torch.randn(2, 3, 32, generator=g))
    with torch.no_grad():
        want = tm(**kw).numpy()
    net = GLIGENTextBoundingboxProjection(32, 32, "text-image")
    np_kw = {k: v.numpy() for k, v in kw.items()}
    shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), **np_kw))["params"]
    params = convert.torch_to_flax({k: v.numpy() for k, v in tm.state_dict().items()}, shapes,
                                   source="position_net")
    got = jax.jit(net.apply)({"params": params}, **np_kw)
    assert got.shape == (2, 6, 32)
    np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=0)


def test_written_unet_loads_in_diffusers(torch, gl, tmp_path):
    """save_gligen_unet -> UNet2DConditionModel.from_pretrained holds exactly the tensors
    of the original diffusers UNet (position_net, 0-d gates, fusers and all), whose grounded
    output the first test compares; the GLIGEN layers split off and merge back."""
    from diffusers import UNet2DConditionModel
    unet, params = gl["pipe"].unet, gl["params"]["unet"]
    save_gligen_unet(unet, params, str(tmp_path / "out"))
    back = UNet2DConditionModel.from_pretrained(str(tmp_path / "out")).eval()
    assert back.config.attention_type == "gated"
    orig = gl["tu"].state_dict()
    assert set(back.state_dict()) == set(orig)
    for k, v in back.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), orig[k].numpy(), err_msg=k)
    base, layers = split_params(params)
    assert set(layers) == {"position_net", "down_blocks_0", "mid_block", "up_blocks_1"}
    assert "fuser" not in str(jax.tree_util.tree_structure(base))
    assert jax.tree.all(jax.tree.map(lambda a, b: a is b, merge_params(base, layers), params))
    assert load_gligen_unet(str(tmp_path / "out"))[0].config == unet.config
    assert load_gligen_unet(gl["pipe_dir"])[0].config == unet.config  # a pipeline folder


def test_layers_folder_joins_the_base_unet(gl, tmp_path):
    """save_gligen_layers writes only position_net + fusers (float16 by default); with_gligen
    puts them into the plain base pipeline's UNet: the base weights are the base's own, the
    layers the float16-rounded originals; a layers folder of another UNet is refused."""
    from jaxdiff.weights import files
    from jaxdiff.weights.gligen import LAYERS_FILE, is_layers_folder, save_gligen_layers
    unet, params = gl["pipe"].unet, gl["params"]["unet"]
    out = save_gligen_layers(unet, params, str(tmp_path / "layers"))
    assert is_layers_folder(out) and sorted(os.listdir(out)) == ["config.json", LAYERS_FILE]
    stored = files.read_tensors(os.path.join(out, LAYERS_FILE))
    assert all(k.startswith("position_net.") or ".fuser." in k for k in stored)
    assert {v.dtype for v in stored.values()} == {np.dtype(np.float16)}
    base_pipe, base_params = gl["base"]
    pipe, joined = with_gligen(base_pipe, base_params, out)
    assert pipe.unet.config == unet.config
    want_base, want_layers = split_params(params)
    got_base, got_layers = split_params(joined["unet"])
    assert jax.tree.all(jax.tree.map(lambda a, b: a is b, got_base, base_params["unet"]))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(
        np.asarray(a), np.asarray(b).astype(np.float16).astype(np.float32)),
        got_layers, want_layers)
    other = dataclasses.replace(unet.config, cross_attention_dim=16)
    with pytest.raises(ValueError, match="cross_attention_dim=16 but the base UNet has"):
        with_gligen(base_pipe, base_params,
                    save_gligen_layers(unet.clone(config=other), params, str(tmp_path / "x")))


def test_generate_matches_diffusers_gligen_pipeline(torch, gl):
    """Equal to StableDiffusionGLIGENPipeline (read from jaxdiff's folder) from the same
    latents (1e-3, as test_generate.py) at gligen_scheduled_sampling_beta 0.5, 1 and 0 (no
    grounding) — one compiled program, beta traced; per-image lists: an image keeps its
    result when another image's objects change."""
    tp, pipe, params = gl["tp"], gl["pipe"], gl["params"]
    noise = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    got = {}
    for beta in (0.5, 1.0, 0.0):
        with torch.no_grad():
            want = tp(PROMPTS, num_inference_steps=4, guidance_scale=5.0, gligen_phrases=PHRASES,
                      gligen_boxes=BOXES, gligen_scheduled_sampling_beta=beta,
                      latents=torch.tensor(ref.nchw(noise)), output_type="latent").images.numpy()
        got[beta] = gs.generate_gligen(pipe, params, PROMPTS, PHRASES, BOXES, latents=noise,
                                       gligen_scheduled_sampling_beta=beta, output="latents",
                                       **GEN)
        np.testing.assert_allclose(ref.nchw(got[beta]), want, atol=1e-3, rtol=0)
    assert np.abs(got[1.0] - got[0.0]).max() > 0.05  # grounding really acts
    assert np.abs(got[0.5] - got[1.0]).max() > 1e-3  # and the schedule matters
    run = gs._compiled(pipe, "ddim", 4, False, parallel.make_mesh())
    assert run._cache_size() == 1
    per_image = gs.generate_gligen(pipe, params, PROMPTS, [PHRASES, PHRASES[:1]],
                                   [BOXES, [[0.0, 0.0, 1.0, 1.0]]], latents=noise,
                                   gligen_scheduled_sampling_beta=1.0, output="latents", **GEN)
    np.testing.assert_allclose(per_image[0], got[1.0][0], atol=1e-5, rtol=0)
    assert np.abs(per_image[1] - got[1.0][1]).max() > 1e-2
    assert run._cache_size() == 1


@pytest.mark.parametrize("text,match", [
    ("0.1,0.2,0.5:a dot", r"--box '0.1,0.2,0.5:a dot': expected 'x0,y0,x1,y1:phrase'"),
    ("0.1,0.2,0.5,0.6", r"expected 'x0,y0,x1,y1:phrase'"),
    ("a,b,c,d:dot", r"expected 'x0,y0,x1,y1:phrase'"),
    ("0.1,0.2,1.5,0.6:dot", r"box '0.1,0.2,1.5,0.6:dot'.*must be 4 fractions .* in \[0, 1\]"),
    ("0.5,0.2,0.5,0.6:dot", r"needs x0 < x1 and y0 < y1"),
])
def test_bad_boxes_are_one_line_errors(text, match):
    with pytest.raises(ValueError, match=match) as e:
        gs.parse_box(text)
    assert "\n" not in str(e.value)


def test_parse_box_and_bad_requests(gl):
    assert gs.parse_box(" 0.1,0.2,0.5,0.6 : a red dot ") == ("a red dot", (0.1, 0.2, 0.5, 0.6))
    pipe, params = gl["pipe"], gl["params"]
    with pytest.raises(ValueError, match="image 0: 2 phrases but 1 boxes"):
        gs.generate_gligen(pipe, params, PROMPTS, PHRASES, BOXES[:1])
    with pytest.raises(ValueError, match=r"box 1 of image 0 \('sq'\).*x0 < x1"):
        gs.generate_gligen(pipe, params, PROMPTS, PHRASES, [BOXES[0], [0.9, 0.1, 0.5, 0.9]])
    with pytest.raises(ValueError, match="at most 1"):
        gs.generate_gligen(pipe, params, PROMPTS, PHRASES, BOXES, max_objs=1)
    with pytest.raises(ValueError, match="attention_type='default'"):
        gs.generate_gligen(*gl["base"], PROMPTS, PHRASES, BOXES)


def test_cli_gligen_equals_library(gl, tiny_pipe_dir, tmp_path, monkeypatch):
    """``jaxdiff generate --gligen DIR --box ... --gligen-beta b``: the PNGs equal the
    library call (both box spellings; the already loaded pipelines, so no recompile)."""
    from PIL import Image
    from jaxdiff import cli
    from jaxdiff.cli import gligen_args
    monkeypatch.setattr(cli.generate, "load_pipeline", lambda path=None, **kw: gl["base"])
    monkeypatch.setattr(gligen_args, "with_gligen",
                        lambda pipe, params, folder: (gl["pipe"], gl["params"])
                        if folder == gl["dir"] and pipe is gl["base"][0] else None)
    out = tmp_path / "out"
    argv = ["generate", "--model", tiny_pipe_dir, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
            "--sampler", "ddim", "--steps", "4", "--guidance", "5.0", "--gligen", gl["dir"],
            "--box", "0.1,0.2,0.5,0.6:red dot", "--box", "sq:0.5,0.1,0.9,0.95",
            "--gligen-beta", "0.5", "--out", str(out)]
    assert cli.main(argv) == 0
    want = gs.generate_gligen(gl["pipe"], gl["params"], PROMPTS, PHRASES, BOXES,
                              gligen_scheduled_sampling_beta=0.5, **GEN)
    got = np.stack([np.asarray(Image.open(out / f"{i:04d}.png").convert("RGB"))
                    for i in range(2)])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("flags,match", [
    (["--gligen", "{gligen}", "--box", "0.1,0.2,1.5,0.6:dot"], r"must be 4 fractions"),
    (["--gligen", "{gligen}", "--box", "0.1,0.2:dot"], r"expected 'x0,y0,x1,y1:phrase'"),
    (["--box", "0.1,0.2,0.5,0.6:dot"], "--box needs a GLIGEN UNet: pass --gligen DIR"),
    (["--gligen", "{gligen}"], "--gligen needs objects"),
    # The shipped layers are the embedded model's: on another base, refused naming both.
    (["--gligen", "shipped", "--box", "0.1,0.2,0.5,0.6:dot"],
     r"GLIGEN layers \S*shapes_gligen: \w+=.* but the base UNet has \w+="),
    (["--gligen", "{plain}", "--box", "0.1,0.2,0.5,0.6:dot"],
     r"attention_type='default'; a GLIGEN UNet has 'gated'"),
    (["--gligen", "{gligen}", "--box", "0.1,0.2,0.5,0.6:dot", "--controlnet", "{gligen}",
      "--control-image", "x.png"], "cannot be combined with --controlnet"),
])
def test_cli_bad_gligen_input_is_refused_before_compiling(gl, tiny_pipe_dir, tmp_path, capsys,
                                                         monkeypatch, flags, match):
    from jaxdiff import cli
    monkeypatch.setattr(cli.generate, "load_pipeline", lambda path=None, **kw: gl["base"])
    monkeypatch.setattr(gs, "_compiled", None)  # any compile attempt would fail loudly
    out = tmp_path / "out"
    subs = dict(gligen=gl["dir"], plain=tiny_pipe_dir)
    argv = ["generate", "--model", tiny_pipe_dir, "--prompt", "x", "--out", str(out)] + [
        f.format(**subs) for f in flags]
    assert cli.main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(match, errors[0]), errors
    assert not out.exists()


def test_shipped_name_without_its_folder_is_a_one_line_error(tmp_path):
    """A jaxdiff installed without one of its shipped models says so, naming the path."""
    from jaxdiff.cli.guided_args import shipped_folder
    missing = str(tmp_path / "shapes_gligen")
    with pytest.raises(FileNotFoundError, match=r"^--gligen shipped: this jaxdiff ships no "
                                                r"such model yet \(.*shapes_gligen is missing\)"):
        shipped_folder("shipped", missing, "--gligen")
    assert shipped_folder(str(tmp_path), missing, "--gligen") == str(tmp_path)


def test_gligen_beta_defaults_to_diffusers_or_the_shipped_layers(gl, embedded):
    """``--gligen-beta`` unset: diffusers' 0.3 for a GLIGEN folder, the shipped layers' own
    0.6 for ``--gligen shipped`` (they were trained on the noisier half of the steps);
    an explicit value always wins."""
    from argparse import Namespace

    from jaxdiff.cli import gligen_args
    from jaxdiff.weights.gligen import SHAPES_GLIGEN_BETA

    def beta(pipe_params, **flags):
        args = Namespace(**dict(dict(gligen=None, box=["0.1,0.1,0.5,0.5:red star"],
                                     gligen_beta=None), **flags))
        return gligen_args.load_gligen(args, *pipe_params)[2].beta

    assert SHAPES_GLIGEN_BETA == 0.6
    assert beta(embedded, gligen="shipped") == 0.6
    assert beta(embedded, gligen="shipped", gligen_beta=0.2) == 0.2
    assert beta(gl["base"], gligen=gl["dir"]) == gligen_args.DEFAULT_BETA == 0.3
