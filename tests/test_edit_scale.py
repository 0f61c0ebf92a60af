"""Edit programs at scale (issue 13): the batch split over 8 forced host devices equals one
device, and a 2-process ``jax.distributed`` edit of a manifest equals one process.

One subprocess with 8 CPU devices runs one method of each family (null-text + P2P;
DiffEdit; the mask/strength family through blended) on a batch of 3 images (padded to 8)
with a 1-device mesh and with the 8-device mesh; each program compiles once per mesh.
Truth: the 1-device run, within the batch-vs-single tolerance of test_edit_batch.py.
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
    import os, sys
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8")
    import jax, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    import jaxdiff
    from jaxdiff import parallel
    from jaxdiff.data import WorldSpec, held_out_examples
    from jaxdiff.editing import blended, diffedit, p2p_pipeline
    from jaxdiff.pipeline import from_uint8
    assert jax.device_count() == 8
    pipe, params = jaxdiff.load_pipeline(None)
    ex = held_out_examples(WorldSpec(image_size=32), 3, num_objects=1)
    imgs = np.stack([e["image"] for e in ex])
    masks = np.stack([e["masks"][0] for e in ex]).astype(np.float32)
    src = [e["caption"] for e in ex]
    tgt = ["a green star"] * 3
    settings = p2p_pipeline.P2PSettings(steps=2, num_inner_steps=2, mode="refine")
    calls = dict(
        p2p=lambda m: p2p_pipeline.p2p_edit(pipe, params, imgs, src, [s + " star" for s in src],
                                            settings, mesh=m)._asdict(),
        diffedit=lambda m: diffedit.diffedit(pipe, params, from_uint8(imgs), src, tgt,
                                             num_maps=2, steps=2, seed=3, mesh=m),
        blended=lambda m: blended.blended(pipe, params, from_uint8(imgs), masks, tgt, steps=2,
                                          seed=3, mesh=m))
    rows = parallel.shard_rows(imgs, parallel.make_mesh())
    assert [s.data.shape[0] for s in rows.addressable_shards] == [1] * 8  # 3 -> 8 rows
    out = {}
    for name, call in calls.items():
        for mesh in ("one", "eight"):
            got = call(parallel.make_mesh(jax.devices()[:1] if mesh == "one" else None))
            out.update({f"{name}/{mesh}/{k}": np.asarray(v) for k, v in got.items()})
    np.savez(sys.argv[1], **out)
    print("OK")
""")


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("eight") / "out.npz")
    out = subprocess.run([sys.executable, "-c", EIGHT, path], capture_output=True, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=900)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _pair(got, name, key):
    return got[f"{name}/one/{key}"], got[f"{name}/eight/{key}"]


def test_p2p_null_text_eight_devices_equal_one(eight):
    for key in ("edited", "reconstruction"):
        one, many = _pair(eight, "p2p", key)
        assert one.shape == (3, 32, 32, 3)
        assert np.abs(one.astype(int) - many.astype(int)).max() <= 1, key
    one, many = _pair(eight, "p2p", "inner_steps")
    np.testing.assert_array_equal(one, many)       # null-text took the same Adam steps
    assert one.shape[1] == 3 and one.sum() > 0


@pytest.mark.parametrize("name", ["diffedit", "blended"])
def test_mask_methods_eight_devices_equal_one(eight, name):
    one, many = _pair(eight, name, "latents")
    assert one.shape == (3, 8, 8, 4)
    np.testing.assert_allclose(many, one, atol=1e-4, rtol=1e-5)
    np.testing.assert_array_equal(*_pair(eight, name, "latent_mask"))
    assert not np.allclose(one[0], one[1])


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
