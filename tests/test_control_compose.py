"""Spatial control composed with editing (issue #14, point 5): ControlNet and T2I-Adapter
inside SDEdit / img2img (``sdedit(control=...)``) and inside the null-text inversion +
Prompt-to-Prompt program (``p2p_edit(control=...)``); ControlNet + LoRA is in
tests/test_controlnet.py. Scale 0 gives the plain path, a non-zero scale acts, per image
and without recompiling; img2img with a ControlNet equals diffusers'
``StableDiffusionControlNetImg2ImgPipeline`` (control window counted over the steps that
run)."""
import dataclasses
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from torchref import models as ref
from jaxdiff.data import shapes
from jaxdiff.editing import p2p_pipeline as pp
from jaxdiff.editing import sdedit as sd
from jaxdiff.eval import control_eval as ce
from jaxdiff.models.gligen import dummy_gligen, merge_params, split_params
from jaxdiff.control import Control
from jaxdiff.models.t2i_adapter import T2IAdapter, T2IAdapterConfig, adapter_dummy_inputs
from jaxdiff.weights.control import load_controlnet, save_control_model
from jaxdiff.weights.gligen import save_gligen_unet

PROMPTS = ["red dot", "blue sq"]  # the tiny tokenizer holds 14 characters
# test_sdedit.py's settings: the plain program is the one it compiles (persistent cache).
SD = dict(strength=0.6, steps=10, guidance_scale=5.0)
NEG = ["green", "dark"]


@pytest.fixture(scope="module")
def cc(tiny_pipe_dir, tmp_path_factory):
    """The tiny pipeline, a perturbed random "sd1" ControlNet (diffusers-written folder)
    and a random T2I-Adapter fitting its UNet, images, condition images, start noise."""
    root = tmp_path_factory.mktemp("control_compose")
    ref.make_controlnet("sd1", seed=3).save_pretrained(str(root / "cn"), safe_serialization=True)
    pipe, params = jaxdiff.load_pipeline(tiny_pipe_dir)
    rng = np.random.default_rng(0)
    return dict(pipe=pipe, params=params, cn=load_controlnet(str(root / "cn")),
                cn_dir=str(root / "cn"), pipe_dir=tiny_pipe_dir,
                adapter=_random_adapter(pipe, rng),
                images=rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32),
                cond=rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8),
                noise=rng.standard_normal((2, 8, 8, 4)).astype(np.float32))


def _random_adapter(pipe, rng):
    """A full T2I-Adapter fitting the tiny UNet, random weights (shapes from
    ``eval_shape``: no op-by-op init)."""
    module = T2IAdapter(T2IAdapterConfig(channels=tuple(pipe.unet.config.block_out_channels),
                                         num_res_blocks=1,
                                         downscale_factor=pipe.vae_scale_factor))
    shapes_ = jax.eval_shape(module.init, jax.random.key(0), *adapter_dummy_inputs(module))
    return module, jax.tree.map(lambda a: jnp.asarray(
        0.2 * rng.standard_normal(a.shape), a.dtype), shapes_["params"])


def _controls(cc, cn_scale, adapter_scale, start=0.0, end=1.0):
    """The ControlNet (per-image condition images) and the adapter (one image for all)."""
    return [Control(*cc["cn"], cc["cond"], cn_scale, start, end),
            Control(*cc["adapter"], cc["cond"][1], adapter_scale)]


def test_sdedit_with_control(cc):
    """Image 0 at scale 0 is plain img2img; image 1 (ControlNet 1.0, adapter 0.7) moves;
    new scales and windows reuse the compiled program."""
    pipe, params = cc["pipe"], cc["params"]
    kw = dict(negative_prompts=NEG, noise=cc["noise"], **SD)
    plain = np.asarray(sd.sdedit(pipe, params, cc["images"], PROMPTS, **kw)["latents"])
    got = np.asarray(sd.sdedit(pipe, params, cc["images"], PROMPTS, control=_controls(
        cc, np.array([0.0, 1.0]), np.array([0.0, 0.7])), **kw)["latents"])
    np.testing.assert_allclose(got[0], plain[0], atol=1e-5, rtol=0)
    assert np.abs(got[1] - plain[1]).max() > 0.05
    window = np.asarray(sd.sdedit(pipe, params, cc["images"], PROMPTS, control=_controls(
        cc, 1.0, 0.7, 0.5, 1.0), **kw)["latents"])
    assert np.abs(window[1] - got[1]).max() > 1e-3  # the window is traced and acts
    specs = tuple((c.model, False) for c in _controls(cc, 0, 0))
    run = sd._compiled(pipe, "ddim", 10, jaxdiff.parallel.make_mesh(), False, specs)
    assert run._cache_size() == 1


def test_sdedit_controlnet_matches_diffusers_img2img(cc, torch):
    """``StableDiffusionControlNetImg2ImgPipeline`` from the same start noise, with a
    control window: diffusers counts it over the int(10 * 0.6) = 6 steps that run (the
    adapter at scale 0 in the same compiled program as above)."""
    from diffusers import ControlNetModel, StableDiffusionControlNetImg2ImgPipeline
    from PIL import Image
    pipe, params = cc["pipe"], cc["params"]
    z0 = np.asarray(pipe.encode_images(params, cc["images"]))
    tp = StableDiffusionControlNetImg2ImgPipeline.from_pretrained(
        cc["pipe_dir"], controlnet=ControlNetModel.from_pretrained(cc["cn_dir"]),
        safety_checker=None, requires_safety_checker=False)
    tp.set_progress_bar_config(disable=True)
    with torch.no_grad():
        tnoise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3))
        want = tp(PROMPTS, image=torch.tensor(ref.nchw(z0)),
                  control_image=[Image.fromarray(c) for c in cc["cond"]],
                  controlnet_conditioning_scale=0.8, control_guidance_start=0.0,
                  control_guidance_end=0.7, num_inference_steps=10, strength=0.6,
                  negative_prompt=NEG,
                  guidance_scale=5.0, generator=torch.Generator().manual_seed(3),
                  output_type="latent").images.numpy()
    got = sd.sdedit(pipe, params, cc["images"], PROMPTS, NEG, noise=ref.nhwc(tnoise.numpy()),
                    control=_controls(cc, 0.8, 0.0, 0.0, 0.7), **SD)["latents"]
    np.testing.assert_allclose(ref.nchw(got), want, atol=1e-4, rtol=0)


# DDIM inversion: the cheapest program of the family (test time); null-text and direct
# inversion call the same controlled denoiser (``p2p_pipeline.with_spatial_control``).
P2P = pp.P2PSettings(inversion="ddim", steps=3, guidance=5.0)
TARGETS = ["blue dot", "red sq"]


def test_p2p_with_control(cc):
    """Inversion + P2P with the ControlNet and the adapter on every model call: image 0 at
    scale 0 is the plain edit and reconstruction (uint8, to float rounding); image 1
    (scales 1.5 / 0.7) edits and reconstructs differently."""
    pipe, params = cc["pipe"], cc["params"]
    u8 = np.round((cc["images"] + 1) * 127.5).astype(np.uint8)
    plain = pp.p2p_edit(pipe, params, u8, PROMPTS, TARGETS, P2P)
    got = pp.p2p_edit(pipe, params, u8, PROMPTS, TARGETS, P2P, control=_controls(
        cc, np.array([0.0, 1.5]), np.array([0.0, 0.7])))
    diff = lambda a, b: np.abs(a.astype(int) - b.astype(int))
    for a, b in zip(plain[:2], got[:2]):
        assert diff(a[0], b[0]).max() <= 1
        assert diff(a[1], b[1]).max() > 30
    np.testing.assert_array_equal(got.mask, plain.mask)


def test_bad_control_refused_before_compiling(cc, monkeypatch):
    """One line each, before any compile: guess mode in P2P (its inversion runs unguided
    passes), a condition image of another size in SDEdit."""
    monkeypatch.setattr(pp, "_compiled", None)
    monkeypatch.setattr(sd, "_compiled", None)
    u8 = np.zeros((2, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="Prompt-to-Prompt: ControlNet guess mode"):
        pp.p2p_edit(cc["pipe"], cc["params"], u8, PROMPTS, PROMPTS, pp.P2PSettings(),
                    control=Control(*cc["cn"], cc["cond"], guess_mode=True))
    with pytest.raises(ValueError, match=r"control 0 \(ControlNetModel\): condition image "
                                         r"of shape \(2, 12, 16, 3\)"):
        sd.sdedit(cc["pipe"], cc["params"], cc["images"], PROMPTS,
                  control=Control(*cc["cn"], cc["cond"][:, :12]))


# --- bench/control_quality.py: its scoring on ground truth, and a smoke run ---------------

V2 = shapes.world("v2")


def test_condition_scoring_on_ground_truth():
    """The true render of a held-out scene against its own condition: IoU 1 and every
    caption attribute right, for both condition kinds (each decodes to the true mask);
    another scene's condition scores lower."""
    cases = ce.condition_cases(V2, 12)
    truth = np.stack([ex["image"] for ex in shapes.held_out_examples(V2, 12)])
    for kind in ce.KINDS:
        for case in cases:
            np.testing.assert_array_equal(ce.condition_mask(case.conditions[kind], kind),
                                          case.mask)
        got = ce.score_condition(truth, cases, kind, V2)
        assert got["mask_iou"] == 1.0 and got["attributes"]["all"] == 1.0, got
        assert ce.score_condition(truth[::-1], cases, kind, V2)["mask_iou"] < 0.6


def test_condition_cases_off_the_anchors_and_without_layout_words():
    """``bench/control_quality.py --jitter 0.3 --unnamed-layout``'s cases: objects moved off
    their named positions, prompts without position or size words (so no position or size
    target); the true render still scores IoU 1 and colour and background right. Shape is
    not: an object pushed over the image edge is cut (on 200 such true renders the
    evaluator reads 0.70 of the shapes, the bench's ceiling there)."""
    spec = dataclasses.replace(V2, jitter=0.3)
    cases = ce.condition_cases(spec, 12, name_layout=False)
    examples = shapes.held_out_examples(spec, 12)
    assert max(np.abs(o.offset).max() for ex in examples for o in ex["objects"]) > 0.1
    for case, ex in zip(cases, examples):
        assert all(o.position is None and o.size is None for o in case.objects), case.prompt
        assert [o.shape for o in case.objects] == [
            o.shape if said else None for o, said in zip(ex["objects"], ex["mention_shape"])]
    truth = np.stack([ex["image"] for ex in examples])
    for kind in ce.KINDS:
        got = ce.score_condition(truth, cases, kind, spec)
        assert got["mask_iou"] == 1.0, got
        assert got["attributes"]["colour"] == got["attributes"]["background"] == 1.0, got


def test_box_scoring_on_ground_truth():
    """An object rendered at a box's centre (corners and off-grid sizes too) is inside it
    and right; the box shifted away, or a phrase of another colour, is not."""
    cases = ce.grounding_cases(V2, 8, 3, num_two_unnamed=3)
    assert {c.group for c in cases} == set(ce.GROUPS)
    for case in cases:
        objs = []
        for obj, box in zip(case.objects, case.boxes):
            centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
            size = "small" if box[2] - box[0] < 0.35 else "big"
            objs.append(shapes.ShapeObject(obj.shape, obj.colour or "red", size, "centre",
                                           (centre[0] - 0.5, centre[1] - 0.5)))
        image, _ = shapes.render(V2, objs, "gray" if "gray" not in case.prompt else "black")
        hits = ce.box_hits(image, case, V2)
        assert all(hits["inside"]) and all(hits["right"]) and hits["all_right"], case
        far = [(1 - b[2], 1 - b[3], 1 - b[0], 1 - b[1]) if len(case.boxes) == 1 else b
               for b in case.boxes]
        if len(case.boxes) == 1 and abs(sum(far[0]) - 2) > 0.5:  # mirrored box is elsewhere
            assert not any(ce.box_hits(image, case._replace(boxes=tuple(far)), V2)["inside"])
        other = "blue" if objs[0].colour != "blue" else "green"
        wrong = case._replace(objects=(shapes.ShapeObject(objs[0].shape, other, None, None),)
                              + case.objects[1:])
        assert not ce.box_hits(image, wrong, V2)["right"][0]


def _gligen_dir(pipe, params, folder):
    """A GLIGEN UNet on the tiny pipeline: its UNet with random fusers and position net
    (shapes from ``eval_shape``: nothing compiled)."""
    module = type(pipe.unet)(dataclasses.replace(pipe.unet.config, attention_type="gated"))
    dim = pipe.unet.config.cross_attention_dim
    shapes_ = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 8, 8, 4)),
                             jnp.zeros((1,)), jnp.zeros((1, pipe.max_length, dim)),
                             gligen=dummy_gligen("gated", dim))["params"]
    rng = np.random.default_rng(0)
    layers = jax.tree.map(lambda a: (0.2 * rng.standard_normal(a.shape)).astype(np.float32),
                          split_params(shapes_)[1])
    save_gligen_unet(module, merge_params(params["unet"], layers), folder)
    return folder


def test_control_quality_bench_smoke(cc, tmp_path, monkeypatch):
    """``bench/control_quality.py`` end to end on tiny random models (ControlNet, adapter,
    GLIGEN on the tiny 16 px pipeline, world v2 at 16 px): the JSON has every figure.
    GLIGEN batches of 2, 4 DDIM steps: test_gligen.py's sampling program (the persistent
    compilation cache holds it once)."""
    spec = importlib.util.spec_from_file_location(
        "control_quality", os.path.join(os.path.dirname(__file__), "..", "bench",
                                        "control_quality.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    pipe, params = cc["pipe"], cc["params"]
    monkeypatch.setattr(jaxdiff, "load_pipeline", lambda path=None, **kw: (pipe, params))
    save_control_model(*cc["adapter"], str(tmp_path / "adapter"))
    out = tmp_path / "q.json"
    got = bench.main(["--model", cc["pipe_dir"], "--controlnet", cc["cn_dir"], "--adapter",
                      str(tmp_path / "adapter"), "--gligen",
                      _gligen_dir(pipe, params, str(tmp_path / "gligen")), "--num", "2",
                      "--num-two", "1", "--num-two-unnamed", "1", "--steps", "4", "--sampler", "ddim", "--guidance", "5",
                      "--chunk", "2", "--out", str(out)])
    assert json.load(open(out)) == json.loads(json.dumps(got))
    for name, kind in (("controlnet", "segmentation"), ("adapter", "edges")):
        assert got[name]["condition"] == kind
        for row in ("control", "baseline"):
            r = got[name][row]
            assert r["n"] == 2 and 0.0 <= r["mask_iou"] <= 1.0 and "all" in r["attributes"]
    for row in ("grounded", "baseline"):
        g = got["gligen"][row]
        assert set(g) == set(ce.GROUPS)
        assert all(g[group]["n"] == 1 for group in ce.GROUPS)
        assert all(0.0 <= v <= 1.0 for group in g.values() for k, v in group.items()
                   if k != "n")
