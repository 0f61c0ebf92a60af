"""InstructPix2Pix data and training pieces against the shapes world's ground truth.

Triples: the edited scene differs from the source in exactly the instructed attribute;
renderer pairs: the exact images agree outside the edited region and the evaluator reads
both scenes; the P2P filter keeps exact pairs and rejects a damaged one, and the mixed
source fills rejected triples with the renderer's pairs; condition dropout
has the paper's rates; the zero-initialised widened UNet equals the base UNet; an
InstructPix2Pix pipeline trains further without being widened again; the pairs take the
configured share of two-object scenes;
bench/instruct_quality.py's scorer reads the true edit and names what an unedited image misses.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.data import instructions, shapes
from jaxdiff.training import instruct_pairs as ipairs
from jaxdiff.training import instruct_pix2pix as ip2p

SPEC = shapes.world("v1")
ATTR = {"colour": "colour", "shape": "shape", "size": "size", "position": "position"}


@pytest.fixture(scope="module")
def data():
    return instructions.renderer_dataset(3, SPEC, 60, split=None)


def _fields(o):
    return {a: getattr(o, a) for a in ("shape", "colour", "size", "position", "offset")}


def test_triples_differ_exactly_by_the_instructed_attribute(data):
    ts = data["triples"]
    assert {t.kind for t in ts} == set(instructions.KINDS)
    assert ts == instructions.triples(3, SPEC, 60)  # deterministic from the seed
    for t in ts:
        assert t.caption == shapes.caption(t.objects, t.background)
        assert t.edited_caption == shapes.caption(t.edited_objects, t.edited_background)
        parsed, bg = shapes.parse_caption(t.edited_caption, SPEC)
        assert bg == t.edited_background
        assert [(o.shape, o.colour, o.size) for o in parsed] == [
            (o.shape, o.colour, o.size) for o in t.edited_objects]
        words = t.instruction.split()
        if t.kind == "background":
            assert t.target == -1 and t.edited_objects == t.objects
            assert t.edited_background != t.background and words[-1] == t.edited_background
            assert t.edited_background not in {o.colour for o in t.objects}
            continue
        assert t.edited_background == t.background
        for k, (a, b) in enumerate(zip(t.objects, t.edited_objects)):
            if k != t.target:
                assert a == b
                continue
            fa, fb = _fields(a), _fields(b)
            changed = [name for name in fa if fa[name] != fb[name]]
            assert changed == [ATTR[t.kind]], (t.instruction, changed)
            assert words[-1] == fb[ATTR[t.kind]]
        if t.kind == "colour":
            assert t.edited_objects[t.target].colour != t.background
        if t.kind == "position":
            assert len(t.objects) == 1


def test_render_pairs_change_only_the_edit_region(data):
    reads = []
    for src, dst, mask, t in zip(data["source"], data["edited"], data["masks"],
                                 data["triples"]):
        ref_src, ref_dst, m_src, m_dst = instructions.render_pair(SPEC, t)
        np.testing.assert_array_equal(src, ref_src)
        keep = instructions.preserved_region(t, m_src, m_dst)
        np.testing.assert_array_equal(src[keep], dst[keep])
        assert (src[~keep] != dst[~keep]).any(-1).sum() > 0
        # The object masks cover every object of both scenes: outside them each image is
        # its background colour (the loss weights of ``train.object_weight``).
        np.testing.assert_array_equal(mask, m_src.any(0) | m_dst.any(0))
        for img, bg in ((src, t.background), (dst, t.edited_background)):
            assert (img[~mask] == dict(SPEC.backgrounds)[bg]).all()
        if sum(r[0] == t.kind for r in reads) < 2:  # the evaluator on two pairs per kind
            reads.append((t.kind, ipairs.read_pair(SPEC, t, src, dst)))
    assert len(reads) == 2 * len(instructions.KINDS)
    reads = [r for _, r in reads]
    assert all(r["source_ok"] and r["edit_ok"] for r in reads)
    assert all(r["psnr"] == float("inf") for r in reads)


def test_filter_keeps_exact_pairs_and_rejects_damaged_ones(data):
    t = next(t for t in data["triples"] if t.kind == "colour")
    src, dst, m_src, m_dst = instructions.render_pair(SPEC, t)
    exact = ipairs.read_pair(SPEC, t, src, dst)
    assert ipairs.keep_pair(exact)
    keep = instructions.preserved_region(t, m_src, m_dst)[..., None]
    # Every preserved pixel 40 levels off (still nearest its own colour): 16 dB.
    damaged = np.where(keep, np.where(dst < 128, dst + 40, dst - 40), dst).astype(np.uint8)
    # The evaluator's masks of a generated pair (``object_masks``) are the exact ones here.
    np.testing.assert_array_equal(ipairs.object_masks(SPEC, src, dst),
                                  m_src.any(0) | m_dst.any(0))
    np.testing.assert_array_equal(exact["masks"], m_src.any(0) | m_dst.any(0))
    r = ipairs.read_pair(SPEC, t, src, damaged)
    assert r["source_ok"] and r["edit_ok"] and 15.0 < r["psnr"] < 20.0
    assert not ipairs.keep_pair(r)
    wrong = dataclasses.replace(t, edited_objects=t.objects)  # the edit did not happen
    assert not ipairs.keep_pair(ipairs.read_pair(SPEC, wrong, src, dst))


def test_fill_from_renderer_keeps_generated_pairs_and_renders_the_rest(data):
    """"p2p+renderer" pairs: a kept triple's pair is the generated one, a rejected triple's
    the renderer's exact pair, in the triples' order."""
    ts = data["triples"][:6]
    kept = np.array([True, False, True, False, False, True])
    rng = np.random.default_rng(0)
    gen = rng.integers(0, 256, (2, int(kept.sum()), 32, 32, 3), dtype=np.uint8)
    gen_masks = rng.random((int(kept.sum()), 32, 32)) < 0.5
    pairs = {"source": gen[0], "edited": gen[1], "masks": gen_masks, "kept": kept}
    out = ipairs.fill_from_renderer(SPEC, ts, pairs)
    assert out["instruction"] == [t.instruction for t in ts]
    k = 0
    for i, t in enumerate(ts):
        if kept[i]:
            np.testing.assert_array_equal(out["source"][i], gen[0][k])
            np.testing.assert_array_equal(out["edited"][i], gen[1][k])
            np.testing.assert_array_equal(out["masks"][i], gen_masks[k])
            k += 1
        else:
            ref_src, ref_dst, m_src, m_dst = instructions.render_pair(SPEC, t)
            np.testing.assert_array_equal(out["source"][i], ref_src)
            np.testing.assert_array_equal(out["edited"][i], ref_dst)
            np.testing.assert_array_equal(out["masks"][i], m_src.any(0) | m_dst.any(0))
    np.testing.assert_array_equal(out["kept"], kept)


def test_held_out_triples_are_held_out():
    ts = instructions.held_out_triples(SPEC, "shape", 10)
    assert all(t.kind == "shape" for t in ts)
    assert all(shapes.split_of(SPEC, t.objects, t.background) == "test" for t in ts)


def test_condition_dropout_rates():
    n = 400_000
    text, image = (np.asarray(x) for x in ip2p.condition_dropout(jax.random.key(0), n, 0.05))
    rates = [np.mean(text & ~image), np.mean(text & image), np.mean(~text & image)]
    np.testing.assert_allclose(rates, [0.05, 0.05, 0.05], atol=0.002)


def test_widened_unet_equals_the_base_unet_at_step_0(embedded):
    pipe, params = embedded
    wide, wparams = ip2p.widen_unet(pipe, params)
    assert wide.unet.config.in_channels == 8
    k = wparams["unet"]["conv_in"]["kernel"]
    np.testing.assert_array_equal(k[:, :, :4], params["unet"]["conv_in"]["kernel"])
    assert not np.asarray(k[:, :, 4:]).any()
    rng = np.random.default_rng(0)
    x, img = (jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32) for _ in range(2))
    ctx = pipe.encode_text(params, pipe.tokenize(["a red circle", "make it blue"]))
    t = jnp.array([10, 700])

    @jax.jit
    def both(p, wp):
        return (pipe.unet.apply({"params": p}, x, t, ctx),
                wide.unet.apply({"params": wp}, jnp.concatenate([x, img], -1), t, ctx))

    base, widened = both(params["unet"], wparams["unet"])
    np.testing.assert_allclose(widened, base, atol=1e-5)


def test_object_weighted_loss_is_the_weighted_mean_of_the_error(embedded, tmp_path):
    """``make_instruct_loss`` with per-pixel weights: constant weights give the plain loss
    (the weights are normalised), weights on one latent pixel give that pixel's error
    alone, so an up-weighted object region moves the loss toward the objects' error; and
    ``train_instruct`` refuses ``object_weight`` without masks in one line."""
    pipe, params = embedded
    wide, wparams = ip2p.widen_unet(pipe, params)
    loss = ip2p.make_instruct_loss(wide, wparams, dropout=0.0)
    rng = np.random.default_rng(1)
    x0, img = (jnp.asarray(rng.normal(size=(1, 8, 8, 4)), jnp.float32) for _ in range(2))
    batch = (x0, img, jnp.asarray(pipe.tokenize(["make it blue"])))
    p = {"unet": wparams["unet"]}
    key = jax.random.key(3)
    f = jax.jit(lambda b: loss(p, b, key))
    plain = f(batch)
    np.testing.assert_allclose(f(batch + (jnp.full((1, 8, 8, 1), 7.0),)), plain, rtol=1e-5)

    def at(*cells):  # weights w at latent pixels (row, col, w), zero elsewhere
        w = np.zeros((1, 8, 8, 1), np.float32)
        for r, c, v in cells:
            w[0, r, c] = v
        return float(f(batch + (jnp.asarray(w),)))

    e_a, e_b = at((3, 5, 1.0)), at((6, 1, 1.0))  # one pixel's error alone (same t, noise)
    assert e_a != pytest.approx(e_b, rel=1e-3)
    np.testing.assert_allclose(at((3, 5, 3.0), (6, 1, 1.0)), (3 * e_a + e_b) / 4, rtol=1e-5)
    with pytest.raises(ValueError, match="^object_weight > 0 needs object_masks"):
        ip2p.train_instruct(wide, wparams, np.zeros((2, 32, 32, 3), np.uint8),
                            np.zeros((2, 32, 32, 3), np.uint8), ["a", "b"], str(tmp_path),
                            steps=1, batch_size=2, lr=1e-3, object_weight=4.0)


def test_an_instruct_pipeline_trains_further_as_it_is(tmp_path):
    """``config.model`` an InstructPix2Pix pipeline (the shipped one): trained on as it is,
    not widened again (its export keeps 8 input channels and the source's image slice of
    ``conv_in`` moves only by training); P2P pairs, which need a text-to-image base, are
    refused in one line before any work."""
    import configs.instruct_pix2pix as cfg_module
    from jaxdiff.weights import load_pipeline
    shipped = "jaxdiff/assets/shapes_instruct"
    config = cfg_module.get_config()
    config.model = shipped
    config.data.source = "p2p"
    with pytest.raises(ValueError, match="^config.model .* is an InstructPix2Pix pipeline"):
        ip2p.run_instruct_pix2pix(config, str(tmp_path / "refused"))
    config.data.source = "renderer"
    config.data.num_pairs = 8
    config.train.update(steps=1, batch_size=4, warmup=0, train_text_encoder=False)
    config.checkpoint_every = config.log_every = 1
    out = ip2p.run_instruct_pix2pix(config, str(tmp_path / "further"))
    (_, before), (pipe, after) = load_pipeline(shipped), load_pipeline(out)
    assert pipe.is_instruct and pipe.unet.config.in_channels == 8
    k0, k1 = (np.asarray(p["unet"]["conv_in"]["kernel"]) for p in (before, after))
    assert k1.shape == k0.shape
    assert 0 < np.max(np.abs(k1 - k0)) < 0.01  # one small step from the shipped weights


def test_pairs_take_the_configured_share_of_two_object_scenes(embedded):
    """``config.data.p_two_objects``: the share of two-object source scenes of every kind
    but position (one object always); the default is the world's own mix, unchanged."""
    import configs.instruct_pix2pix as cfg_module
    pipe, params = embedded
    config = cfg_module.get_config()
    config.data.num_pairs = 400

    def two_share(p):
        config.data.p_two_objects = p
        ts = ipairs.make_pairs(config, pipe, params)["triples"]
        assert all(len(t.objects) == 1 for t in ts if t.kind == "position")
        return np.mean([len(t.objects) == 2 for t in ts if t.kind != "position"])

    assert two_share(1.0) == 1.0 and two_share(0.0) == 0.0
    assert abs(two_share(0.85) - 0.85) < 0.06
    config.data.p_two_objects = cfg_module.get_config().data.p_two_objects  # the default
    default = ipairs.make_pairs(config, pipe, params)
    want = instructions.renderer_dataset(config.seed, SPEC, 400)
    assert default["instruction"] == want["instruction"]
    np.testing.assert_array_equal(default["edited"], want["edited"])


def test_instruct_optimizer_steps_the_image_input_faster():
    """Adam's first step is lr * g / |g| per weight (analytic): conv_in of the UNet moves
    ``input_lr_multiplier`` times as far as any other weight, the text encoder included."""
    tree = {"unet": {"conv_in": {"kernel": jnp.zeros((3, 3, 8, 4)), "bias": jnp.zeros(4)},
                     "conv_out": {"kernel": jnp.zeros((3, 3, 4, 4))}},
            "text_encoder": {"conv_in": {"kernel": jnp.zeros(3)}}}
    grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), tree)
    opt = ip2p.instruct_optimizer(tree, 1e-3, 0, 100, 10.0)
    updates = jax.jit(lambda g: opt.update(g, opt.init(tree), tree)[0])(grads)
    np.testing.assert_allclose(updates["unet"]["conv_in"]["kernel"], -1e-2, rtol=1e-3)
    np.testing.assert_allclose(updates["unet"]["conv_in"]["bias"], -1e-2, rtol=1e-3)
    np.testing.assert_allclose(updates["unet"]["conv_out"]["kernel"], -1e-3, rtol=1e-3)
    np.testing.assert_allclose(updates["text_encoder"]["conv_in"]["kernel"], -1e-3, rtol=1e-3)


@pytest.mark.parametrize("kind", ["colour", "background"])
def test_instruct_bench_scores_the_true_edit_and_names_what_an_unedited_image_misses(kind):
    """bench/instruct_quality.py's scorer on the renderer's images: the true edited scene is
    a success with the input kept (PSNR at the cap); the unedited input fails exactly the
    instructed attribute ("failed" names it) and still keeps the input."""
    from torchref.scripts import load_script
    bench = load_script("bench", "instruct_quality")
    ts = instructions.held_out_triples(SPEC, kind, 12)
    pairs = [instructions.render_pair(SPEC, t) for t in ts]
    src, gt = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    regions = [instructions.preserved_region(t, p[2], p[3]) for t, p in zip(ts, pairs)]
    truth = bench.score(SPEC, ts, src, gt, regions, gt)
    assert (truth["success"], truth["attribute"]) == (1.0, 1.0)
    assert truth["psnr_preserved_db"] == bench.PSNR_CAP and set(truth["failed"].values()) == {0}
    counts = {n: sum(len(t.objects) == int(n) for t in ts) for n in truth["by_objects"]}
    assert {n: v["num"] for n, v in truth["by_objects"].items()} == counts
    assert sum(counts.values()) == len(ts) and len(counts) == 2  # 1- and 2-object scenes
    assert all(v["success"] == 1.0 for v in truth["by_objects"].values())
    same = bench.score(SPEC, ts, src, gt, regions, src)
    assert (same["success"], same["attribute"]) == (0.0, 0.0)
    assert same["psnr_preserved_db"] == bench.PSNR_CAP
    assert same["failed"][kind] == 1.0
    assert all(v["success"] == 0.0 for v in same["by_objects"].values())
    assert all(v == 0 for k, v in same["failed"].items() if k != kind)
