"""Training GLIGEN layers (issue #14, point 3) on the embedded model: the TFDS records'
grounding against their masks, the zero gates (and the open-gate start) starting exactly
at the base UNet, a few
steps of the tiny recipe lowering the loss with the base weights untouched, exact resume,
the export loading in diffusers' GLIGEN pipeline with equal outputs, and one-line errors
for bad configs."""
import dataclasses
import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import schedules
from jaxdiff.data import shapes, tfds_shapes
from jaxdiff.models.gligen import merge_params, split_params
from jaxdiff.training import control as ctl
from jaxdiff.training import gligen as gl
from jaxdiff.training import losses
from jaxdiff.weights import convert
from jaxdiff.weights.gligen import with_gligen

pytestmark = pytest.mark.slow  # trains (a few steps)

STEPS, REPEAT = 3, 8
TRAIN = dict(batch_size=4, lr=1e-2, warmup=0, weight_decay=1e-2, log_every=1, seed=0)


def _config():
    from torchref.scripts import load_script
    return load_script("configs", "gligen").get_config("tiny")


@functools.lru_cache(maxsize=None)
def _probe(pipe, module, max_objs):
    """jitted (params, base UNet, layers, latents, ids, grounding) -> (inputs of one
    evaluation: the scenes repeated REPEAT times on fixed noise, timesteps spread over
    the schedule; the GLIGEN UNet's output there, the base UNet's, the GLIGEN UNet's
    denoising loss)."""
    alphas = schedules.alphas_cumprod(pipe.scheduler)
    target = losses.diffusion_target(pipe.scheduler.prediction_type)

    def run(params, base, layers, latents, ids, grounding):
        tile = lambda a: jnp.tile(a, (REPEAT,) + (1,) * (a.ndim - 1))
        latents = tile(latents)
        ctx = tile(pipe.encode_text(params, ids))
        g = tuple(tile(a) for a in gl.pad_slots(grounding, max_objs))
        t = jnp.linspace(20, 980, latents.shape[0]).astype(jnp.int32)
        noise = jax.random.normal(jax.random.key(7), latents.shape)
        a = jnp.asarray(alphas)[t][:, None, None, None]
        x = jnp.sqrt(a) * latents + jnp.sqrt(1 - a) * noise
        got = gl.gligen_output(module, base, layers, x, t, ctx, g)
        plain = pipe.unet.apply({"params": base}, x, t, ctx)
        return (x, t, ctx, g), got, plain, jnp.mean((got - target(latents, noise, a)) ** 2)
    return jax.jit(run)


@pytest.fixture(scope="module")
def run(embedded, tmp_path_factory):
    """The tiny recipe's data (TFDS records with grounding, 4 scenes) for the embedded
    model, fresh GLIGEN layers, one run of STEPS steps (checkpoints at 2 and 3) and a run
    resumed from its step-2 checkpoint; the export of the first."""
    pipe, params = embedded
    before = jax.tree.map(np.array, params)
    root = tmp_path_factory.mktemp("gligen_training")
    cfg = _config()
    cfg.data.num_train, cfg.data.num_test = 4, 2
    gpipe, base, init = gl.new_gligen_layers(pipe, params, seed=0)
    latents, ids, grounding = gl.prepare_data(cfg, pipe, params, str(root))
    source = ctl.shapes_train_source(cfg, pipe, str(root))  # the files just prepared
    # No dropout here: the probe measures the loss with captions and boxes
    # (test_grounding_dropout checks the dropout itself).
    loss = gl.make_gligen_loss(pipe, params, gpipe.unet, base, max_objs=cfg.gligen.max_objs,
                               caption_dropout=0.0, grounding_dropout=0.0)
    arrays = (latents, ids) + grounding
    full = ctl.train_frozen(loss, init, arrays, str(root / "a"), steps=STEPS, ckpt_every=2,
                            **TRAIN)
    # Resume: a fresh workdir holding only the step-2 checkpoint of the first run (what a
    # run killed after step 2 leaves), run again to STEPS (the same compiled step).
    os.makedirs(root / "b" / "checkpoints")
    shutil.copytree(root / "a" / "checkpoints" / "2", root / "b" / "checkpoints" / "2")
    resumed = ctl.train_frozen(loss, init, arrays, str(root / "b"), steps=STEPS,
                               ckpt_every=2, **TRAIN)
    export = gl.export_gligen(gpipe, params, base, full, str(root / "export"))
    return dict(pipe=pipe, params=params, before=before, gpipe=gpipe, base=base, init=init,
                data=(latents, ids, grounding), source=source, full=full, resumed=resumed,
                export=export, root=root, max_objs=cfg.gligen.max_objs,
                jitter=cfg.data.jitter)


def test_tfds_records_hold_the_grounding_of_their_masks(run):
    """Each box is the tight box of its object's mask (every mask pixel inside, a mask
    pixel on each of its four edges); circles and squares are centred within the config's
    jitter (0.3) of their anchor and, where the image edge does not cut them, as wide as
    their size says; each phrase is the caption's noun for its object."""
    assert run["jitter"] == 0.3
    assert str(tfds_shapes.ShapesWorld.VERSION) == "1.3.0"
    spec = shapes.world("v2")
    src = run["source"]
    for i in range(len(src)):
        r = src[i]
        k, caption = int(r["num_objects"]), tfds_shapes.decode_caption(r["caption"])
        n = r["masks"].shape[-1]
        for j in range(shapes.MAX_OBJECTS):
            phrase = r["phrases"][j].decode()
            if j >= k:
                assert phrase == "" and not r["boxes"][j].any()
                continue
            x0, y0, x1, y1 = np.round(r["boxes"][j] * n).astype(int)
            m = r["masks"][j]
            assert m.sum() == m[y0:y1, x0:x1].sum() > 0
            assert m[y0].any() and m[y1 - 1].any() and m[:, x0].any() and m[:, x1 - 1].any()
            shape = spec.shapes[r["shape"][j]]
            if shape in ("circle", "square"):
                cx, cy = dict(spec.positions)[spec.position_names[r["position"][j]]]
                half = dict(spec.sizes)[spec.size_names[r["size"][j]]]
                box = np.asarray(r["boxes"][j], np.float64)
                centre, width = (box[:2] + box[2:]) / 2, box[2:] - box[:2]
                uncut = (box[:2] > 0) & (box[2:] < 1)
                assert np.all(np.abs(centre - [cx, cy]) <= run["jitter"] + 1.5 / n), box
                np.testing.assert_allclose(width[uncut], 2 * half, atol=1.5 / n)
            assert f" {phrase} " in f" {caption} ", (phrase, caption)
            words = phrase.split()
            assert words[-1] == (shape if r["mention_shape"][j] else "object")
            assert (words[0] in spec.size_names) == bool(r["mention_size"])
    _, _, (boxes, emb, masks) = run["data"]
    counts = np.array([int(src[i]["num_objects"]) for i in range(len(src))])
    np.testing.assert_array_equal(masks, np.arange(2)[None] < counts[:, None])
    np.testing.assert_array_equal(boxes, np.stack([src[i]["boxes"] for i in range(len(src))]))
    assert not emb[masks == 0].any() and (np.abs(emb[masks == 1]).sum(-1) > 0).all()


def test_zero_gates_start_at_the_base_unet_and_training_lowers_the_loss(run):
    probe = _probe(run["pipe"], run["gpipe"].unet, run["max_objs"])
    _, got, plain, loss0 = probe(run["params"], run["base"], run["init"], *run["data"])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(plain))
    _, got, plain, loss1 = probe(run["params"], run["base"], run["full"], *run["data"])
    assert np.abs(np.asarray(got) - np.asarray(plain)).max() > 1e-4
    assert float(loss1) < float(loss0), (float(loss0), float(loss1))


def test_open_attention_gates_start_at_the_base_unet_with_a_live_attention_path(run):
    """``attn_gate`` (configs/gligen.py's ``gligen.attn_gate_init``): the same start, the
    GLIGEN UNet's output equal to the base UNet's bit for bit, but the fusers' attention
    output projections get gradients at the first step; with diffusers' closed gates
    (tanh(0) = 0) they get none."""
    pipe, params = run["pipe"], run["params"]
    _, _, opened = gl.new_gligen_layers(pipe, params, seed=0, attn_gate=1.0)
    leaves = {jax.tree_util.keystr(k): v for k, v in
              jax.tree_util.tree_flatten_with_path(opened)[0]}
    gates = [v for k, v in leaves.items() if "alpha_attn" in k]
    outs = [v for k, v in leaves.items() if "fuser" in k and "to_out_0" in k]
    assert gates and all(float(a) == 1.0 for a in gates)
    assert outs and not any(np.asarray(v).any() for v in outs)
    _, got, plain, _ = _probe(pipe, run["gpipe"].unet, run["max_objs"])(
        params, run["base"], opened, *run["data"])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(plain))
    loss = gl.make_gligen_loss(pipe, params, run["gpipe"].unet, run["base"],
                               max_objs=run["max_objs"], caption_dropout=0.0,
                               grounding_dropout=0.0)
    latents, ids, grounding = run["data"]
    grad = jax.jit(jax.grad(loss))
    out_grad = lambda layers: max(
        float(np.abs(np.asarray(v)).max()) for k, v in jax.tree_util.tree_flatten_with_path(
            grad(layers, (latents, ids) + tuple(grounding), jax.random.key(3)))[0]
        if "fuser" in jax.tree_util.keystr(k) and "to_out_0" in jax.tree_util.keystr(k))
    assert out_grad(run["init"]) == 0.0
    assert out_grad(opened) > 0.0


def test_base_weights_are_bit_identical_and_only_gligen_layers_moved(run):
    for a, b in zip(jax.tree.leaves(run["before"]), jax.tree.leaves(run["params"])):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert split_params(run["full"])[0] == {}  # nothing but position_net and the fusers
    fusers = [v for k, v in jax.tree_util.tree_flatten_with_path(run["full"])[0]
              if "alpha_attn" in jax.tree_util.keystr(k)]
    assert fusers and all(abs(float(a)) > 0 for a in fusers)  # every gate opened
    init_pos, pos = run["init"]["position_net"], run["full"]["position_net"]
    assert np.abs(np.asarray(pos["linears_4"]["kernel"])
                  - np.asarray(init_pos["linears_4"]["kernel"])).max() > 0


def test_grounding_dropout_drops_whole_images():
    masks = jnp.asarray(np.tile([[1.0, 1.0, 0.0]], (4000, 1)))
    out = np.asarray(gl.drop_grounding(masks, jax.random.key(0), 0.1))
    dropped = out.sum(1) == 0
    assert ((out == np.asarray(masks)) | dropped[:, None]).all()  # all or nothing per image
    assert 0.08 < dropped.mean() < 0.12, dropped.mean()  # 0.1 +- 3.2 sigma
    np.testing.assert_array_equal(gl.drop_grounding(masks, jax.random.key(0), 0.0), masks)
    assert not np.asarray(gl.drop_grounding(masks, jax.random.key(0), 1.0)).any()


def test_resume_is_exact(run):
    assert sorted(os.listdir(run["root"] / "b" / "checkpoints")) == ["2", str(STEPS)]
    for a, b in zip(jax.tree.leaves(run["full"]), jax.tree.leaves(run["resumed"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_loads_in_diffusers_gligen_pipeline_with_equal_outputs(run, torch):
    """diffusers' StableDiffusionGLIGENPipeline reads the export; its UNet holds exactly
    our tensors and, given our grounding, computes our output within 1e-4; jaxdiff's
    ``--gligen`` loader reads it back bit for bit."""
    from diffusers.pipelines.deprecated.stable_diffusion_gligen.pipeline_stable_diffusion_gligen \
        import StableDiffusionGLIGENPipeline
    tp = StableDiffusionGLIGENPipeline.from_pretrained(
        run["export"], safety_checker=None, requires_safety_checker=False)
    assert tp.unet.config.attention_type == "gated"
    merged = merge_params(run["base"], run["full"])
    want = convert.flax_to_torch(merged)
    got = {k: v.numpy() for k, v in tp.unet.state_dict().items()}
    assert set(got) == set(want)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    (x, t, ctx, g), ours, _, _ = _probe(run["pipe"], run["gpipe"].unet, run["max_objs"])(
        run["params"], run["base"], run["full"], *run["data"])
    tt = lambda a: torch.from_numpy(np.array(a))
    boxes, emb, masks = g
    with torch.no_grad():
        theirs = tp.unet(tt(x).permute(0, 3, 1, 2), tt(t), tt(ctx), cross_attention_kwargs={
            "gligen": dict(boxes=tt(boxes), masks=tt(masks), positive_embeddings=tt(emb))}
        ).sample.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(theirs, np.asarray(ours), atol=1e-4, rtol=0)
    gpipe, gparams = with_gligen(run["pipe"], run["params"], run["export"])
    assert gpipe.unet.config == run["gpipe"].unet.config
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(gparams["unet"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_configs_are_one_line_errors(run):
    pipe, params = run["pipe"], run["params"]
    cfg = _config()
    cfg.gligen.max_objs = 1
    with pytest.raises(ValueError, match=r"^config.gligen.max_objs=1: needs at least the 2 "):
        gl.run_gligen(cfg, "/nonexistent/workdir")
    cfg = _config()
    cfg.train.grounding_dropout = 1.5
    with pytest.raises(ValueError, match=r"^config.train.grounding_dropout=1.5: a probability"):
        gl.run_gligen(cfg, "/nonexistent/workdir")
    cfg = _config()
    cfg.train.min_timestep = 1000
    with pytest.raises(ValueError, match=r"^config.train.min_timestep=1000: use a timestep in "
                                         r"\[0, 1000\)"):
        gl.run_gligen(cfg, "/nonexistent/workdir")
    assert not os.path.exists("/nonexistent/workdir")
    cfg = _config()
    cfg.data.image_size = 16
    with pytest.raises(ValueError, match=r"config.data.image_size=16 but the base model makes "
                                         r"32x32 images"):
        gl.prepare_data(cfg, pipe, params, "/nonexistent")
    other = dataclasses.replace(pipe, unet=pipe.unet.clone(config=dataclasses.replace(
        pipe.unet.config, attention_type="gated-text-image")))
    with pytest.raises(ValueError, match=r"attention_type='gated-text-image'; GLIGEN training "
                                         r"makes the text-box variant"):
        gl.new_gligen_layers(other, params)
    from torchref.scripts import load_script
    with pytest.raises(ValueError, match=r"unknown variant 'big' of configs/gligen.py"):
        load_script("configs", "gligen").get_config("big")
