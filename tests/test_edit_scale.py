"""Edit programs at scale (issue 13): the batch split over 8 forced host devices equals one
device for every method family, the sharded programs hold no cross-device collective, and
a 2-process ``jax.distributed`` edit of a manifest equals one process.

One subprocess with 8 CPU devices (JAX starts once) runs every family — P2P with each
inversion (ddim, null-text, negative-prompt, direct), DiffEdit, SDEdit, blended, RePaint,
ILVR — on 3 images (padded to 8 rows, 5 of them padding) with a 1-device mesh and with
the 8-device mesh: each program compiles once per mesh. The direct-inversion P2P call
edits two of the images twice (5 edits of 3 images: ``device_layout`` puts each edit on
its image's device). To keep the 18 compiles cheap the pipeline is a micro one: a
one-level UNet (cross-attention in its down and mid blocks: P2P's controller acts there)
and a one-level VAE, 8x8 images and latents, random weights, beside the embedded text
encoder. Truth: the 1-device run, within the batch-vs-single tolerance
of test_edit_batch.py (latents 1e-4; uint8 images 1 level).
"""
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from jaxdiff.data import WorldSpec, held_out_examples

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EIGHT = textwrap.dedent("""
    import dataclasses, os, sys
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8")
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    import jaxdiff
    from jaxdiff import parallel
    from jaxdiff.editing import blended, diffedit, ilvr, p2p_pipeline as pp, repaint, sdedit
    from jaxdiff.models import AutoencoderKL, UNet2DConditionModel, UNetConfig, VAEConfig
    from jaxdiff.pipeline import dummy_inputs, from_uint8
    assert jax.device_count() == 8
    pipe, params = jaxdiff.load_pipeline(None)
    rng = np.random.default_rng(0)
    unet = UNet2DConditionModel(UNetConfig.from_dict(dict(
        block_out_channels=(8,), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("UpBlock2D",), cross_attention_dim=64, attention_head_dim=2,
        norm_num_groups=4, sample_size=8)))
    vae = AutoencoderKL(VAEConfig.from_dict(dict(
        block_out_channels=(8,), norm_num_groups=4, sample_size=8, mid_block_add_attention=False,
        scaling_factor=0.5)))
    def rand(module, kind):  # numpy weights: no init program to compile
        shapes = jax.eval_shape(module.init, jax.random.key(0), *dummy_inputs(module, kind))
        return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), jnp.float32),
                            shapes["params"])
    pipe = dataclasses.replace(pipe, unet=unet, vae=vae)
    params = dict(params, unet=rand(unet, "unet"), vae=rand(vae, "vae"))
    assert pipe.image_size == 8
    imgs = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    masks = np.zeros((3, 8, 8), np.float32)
    masks[0, 2:6, 2:6], masks[1, :, 4:], masks[2, :4] = 1, 1, 1
    src = ["a red circle", "a blue square", "a green star"]
    tgt = ["a blue circle", "a blue star", "a green square"]
    x = from_uint8(imgs)
    def p2p(inversion, pairs=None):
        targets = tgt if pairs is None else tgt + ["a red star", "a green circle"]
        def call(m):
            r = pp.p2p_edit(pipe, params, imgs, src, targets, pp.P2PSettings(
                inversion=inversion, steps=2, num_inner_steps=2), pair_image=pairs, mesh=m)
            return r._asdict()
        return call
    calls = dict(
        p2p_ddim=p2p("ddim"), p2p_null_text=p2p("null_text"),
        p2p_negative_prompt=p2p("negative_prompt"), p2p_direct=p2p("direct", [0, 1, 2, 2, 0]),
        diffedit=lambda m: diffedit.diffedit(pipe, params, x, src, tgt, num_maps=2, steps=2,
                                             strength=(0.8, 0.5, 1.0), seed=3, mesh=m),
        sdedit=lambda m: sdedit.sdedit(pipe, params, x, tgt, strength=(0.6, 1.0, 0.5), steps=2,
                                       seed=3, mesh=m),
        blended=lambda m: blended.blended(pipe, params, x, masks, tgt, steps=2, seed=3, mesh=m),
        repaint=lambda m: repaint.repaint(pipe, params, x, masks, tgt, steps=2, jump_length=1,
                                          jump_n_sample=2, eta=1.0, seed=3, mesh=m),
        ilvr=lambda m: ilvr.ilvr(pipe, params, x, tgt, factor=2, steps=2, seed=3, mesh=m))
    one, eight = parallel.make_mesh(jax.devices()[:1]), parallel.make_mesh()
    out = {}
    for name, call in calls.items():
        for mesh, m in (("one", one), ("eight", eight)):
            out.update({f"{name}/{mesh}/{k}": np.asarray(v) for k, v in call(m).items()})
    # The compiled 8-device null-text + P2P program (the jit cache's executable, no new
    # compile): its HLO text, for collectives.
    run, args, _ = pp._program_and_args(pipe, params, imgs, src, tgt, pp.P2PSettings(
        inversion="null_text", steps=2, num_inner_steps=2), None, eight)
    hlo = run.lower(*args).compile().as_text()
    out["hlo"] = np.frombuffer(hlo.encode(), np.uint8)
    np.savez(sys.argv[1], **out)
    print("OK")
""")

METHODS = ("diffedit", "sdedit", "blended", "repaint", "ilvr")
INVERSIONS = ("ddim", "null_text", "negative_prompt", "direct")


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("eight") / "out.npz")
    out = subprocess.run([sys.executable, "-c", EIGHT, path], capture_output=True, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=1800)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _pair(got, name, key):
    return got[f"{name}/one/{key}"], got[f"{name}/eight/{key}"]


@pytest.mark.parametrize("inversion", INVERSIONS)
def test_p2p_eight_devices_equal_one(eight, inversion):
    name = f"p2p_{inversion}"
    edits = 5 if inversion == "direct" else 3
    for key in ("edited", "reconstruction"):
        one, many = _pair(eight, name, key)
        assert one.shape == (edits, 8, 8, 3)
        assert np.abs(one.astype(int) - many.astype(int)).max() <= 1, key
    assert not np.array_equal(*(eight[f"{name}/one/edited"][i] for i in (0, 1)))
    one, many = _pair(eight, name, "inner_steps")
    np.testing.assert_array_equal(one, many)  # null-text took the same Adam steps
    assert one.shape == (2, 3) and (one.sum() > 0) == (inversion == "null_text")


def test_p2p_edits_of_one_image_share_its_inversion(eight):
    """Direct inversion, edits 2 and 3 of image 2 and edits 0 and 4 of image 0 (different
    target prompts): the same reconstruction, on 1 device and on 8."""
    for mesh in ("one", "eight"):
        rec = eight[f"p2p_direct/{mesh}/reconstruction"].astype(int)
        assert np.abs(rec[2] - rec[3]).max() <= 1 and np.abs(rec[0] - rec[4]).max() <= 1
        assert np.abs(rec[0] - rec[2]).max() > 1


@pytest.mark.parametrize("name", METHODS)
def test_methods_eight_devices_equal_one(eight, name):
    one, many = _pair(eight, name, "latents")
    assert one.shape == (3, 8, 8, 4)
    np.testing.assert_allclose(many, one, atol=1e-4, rtol=1e-5)
    assert not np.allclose(one[0], one[1])
    if f"{name}/one/latent_mask" in eight:
        np.testing.assert_array_equal(*_pair(eight, name, "latent_mask"))


def test_sharded_edit_program_has_no_collectives(eight):
    """The 8-device null-text + P2P program (compiled HLO): 8 partitions, and no
    all-gather / all-reduce / all-to-all / collective-permute / reduce-scatter anywhere —
    each device inverts and edits its own images with all their branches."""
    hlo = eight["hlo"].tobytes().decode()
    assert "num_partitions=8" in hlo and "while" in hlo  # the SPMD program with its loops
    found = {op: hlo.count(op) for op in ("all-gather", "all-reduce", "all-to-all",
                                          "collective-permute", "reduce-scatter")}
    assert not any(found.values()), found


def _manifest(folder, n):
    ex = held_out_examples(WorldSpec(image_size=32), n, num_objects=1, seed=11)
    lines = []
    for i, e in enumerate(ex):
        Image.fromarray(e["image"]).save(folder / f"j{i}.png")
        lines.append(json.dumps(dict(image=f"j{i}.png", target_prompt="a blue star")))
    (folder / "jobs.jsonl").write_text("\n".join(lines))
    return folder / "jobs.jsonl"


SDEDIT = ["--steps", "2", "--strength", "0.6", "--max-batch", "1"]  # as test_edit_resume


def _sdedit(manifest, out, **env):
    return subprocess.Popen(
        [sys.executable, os.path.join(REPO, "edit", "sdedit.py"), "--manifest", str(manifest),
         "--out", str(out), "--seed", "5"] + SDEDIT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu", **env))


def test_two_processes_equal_one_process(tmp_path):
    """5 jobs over 2 processes (jobs 0, 2, 4 and 1, 3): every result folder equals the
    single-process run's; process 0 wrote one merged summary.json. The single-process run
    goes first and fills the persistent compilation cache for the other two."""
    manifest = _manifest(tmp_path, 5)
    one = _sdedit(manifest, tmp_path / "one")
    out, err = one.communicate(timeout=600)
    assert one.returncode == 0 and "edited 5 image(s)" in out, err[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [_sdedit(manifest, tmp_path / "two", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                     JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)) for i in range(2)]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, err[-3000:]
        assert f"edited {3 - i} image(s)" in out and f"[process {i} of 2]" in out, out
    names = [f"j{i}" for i in range(5)]
    assert sorted(os.listdir(tmp_path / "two")) == names + ["summary.json"]  # no part files
    for n in names:  # the same one-image program on the same inputs: exactly equal
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "two" / n / "edit.png")),
                                      np.asarray(Image.open(tmp_path / "one" / n / "edit.png")),
                                      err_msg=n)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["done"] == names and summary["errors"] == []
    assert summary["processes"] == 2 and summary["devices"] == 2
    assert summary["mesh"] == {"data": 1}
    assert sorted(c["process"] for c in summary["chunks"]) == [0, 0, 0, 1, 1]
    assert summary["images_per_s"] > 0
