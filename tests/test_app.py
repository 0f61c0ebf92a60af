"""The web app (``jaxdiff serve``) in a real browser: Playwright drives Debian's Chromium
(helpers: ``tools/app_browser.py``, shared with ``tools/app_screenshots.py``, which makes
the README's screenshots).

The server runs as ``python -m jaxdiff.cli serve`` on a free local port with the embedded
model (warm-up: the Generate tab's defaults only); it boots while the in-process tests
(first in the file) run. Checked in the browser: the server answers and the page loads
while the warm-up still compiles; a DreamBooth-LoRA job started in the Personalize tab (3
uploaded instance images, 2 steps, a sample grid after each) trains while a P2P edit of
two uploads (one request) shows input | reconstruction | edit per upload (its pixels in
the input part); the job's status shows its progress bar part-way, then finished with both
grids and its result, which the Generate tab uses (``job:<id>`` in its model list) without
compiling; a Generate request with the defaults shows the model's image size, keeps its
settings in the PNG and compiles nothing (the warm-up did); a text file and a 20000x20000
PNG header get visible error messages; afterwards the server still serves and a new
guidance still compiles nothing. Generate and Edit show a progress bar that counts
denoising steps (Generate: out of its 20). Every wait has an explicit timeout (a job:
JOB_TIMEOUT).

Chromium comes from apt (``.ci/run`` installs it): without it the file fails, it does not
skip. Playwright's own browser download is not used.
"""
import os
import re
import sys
import types

import numpy as np
import pytest
from PIL import Image

from jaxdiff.data.shapes import WorldSpec, held_out_examples

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import app_browser as ab  # tools/: shared with tools/app_screenshots.py

pytestmark = pytest.mark.slow
JOB_TIMEOUT = 240_000  # ms: a 2-step LoRA job takes ~30 s on an idle 2-core machine


def _png_header_only(w, h):
    """A PNG whose header claims w x h RGB pixels (its data is a few bytes)."""
    import struct
    import zlib
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


class _App(types.SimpleNamespace):
    @property
    def page(self):
        """The Chromium page, opened once the server answers."""
        try:
            return self.server.page()
        except RuntimeError as e:
            pytest.fail(str(e))


@pytest.fixture(scope="module", autouse=True)
def app(tmp_path_factory):
    """The served app (``server``, ``page``) and the files to upload. Autouse and not waited
    for: the server boots and warms up while the first (in-process) tests run."""
    try:
        ab.chromium_path()
    except RuntimeError as e:
        pytest.fail(f"{e} (.ci/run does it before make test).")
    tmp = tmp_path_factory.mktemp("app")
    example = held_out_examples(WorldSpec(), 1, num_objects=1)[0]
    files = types.SimpleNamespace(photo=str(tmp / "photo.png"), text=str(tmp / "notes.txt"),
                                  bomb=str(tmp / "bomb.png"), caption=example["caption"],
                                  colour=example["objects"][0].colour, instances=[])
    Image.fromarray(example["image"]).save(files.photo)
    for i, e in enumerate(held_out_examples(WorldSpec(), 3, num_objects=1, seed=7)):
        files.instances.append(str(tmp / f"instance_{i}.png"))
        Image.fromarray(e["image"]).save(files.instances[-1])
    (tmp / "notes.txt").write_text("not an image\n")
    (tmp / "bomb.png").write_bytes(_png_header_only(20000, 20000))
    server = ab.Server(str(tmp), ("--warmup", "generate"))
    yield _App(url=server.url, proc=server.proc, files=files, server=server)
    server.close()


def test_painted_strokes_become_the_mask():
    """The ImageEditor value (RGBA layers over a 256 px canvas) -> the model-size mask that
    blended / RePaint / DiffEdit get; no stroke -> None (the method then asks for one)."""
    from jaxdiff.app.limits import editor_mask
    layer = np.zeros((256, 256, 4), np.uint8)
    layer[64:128, 128:256, 3] = 255  # a stroke over rows 1/4-1/2, right half
    mask = editor_mask({"background": None, "layers": [np.zeros_like(layer), layer]}, 32)
    expected = np.zeros((32, 32), np.float32)
    expected[8:16, 16:] = 1.0
    np.testing.assert_array_equal(mask, expected)
    assert editor_mask({"layers": [np.zeros_like(layer)]}, 32) is None
    assert editor_mask(None, 32) is None


def test_personalize_job_refuses_a_second_and_cancels(tmp_path):
    """A background Textual-Inversion job: a second one is refused while it runs; cancel
    ends its process group and leaves no result to offer."""
    from jaxdiff.app.jobs import Jobs
    images = np.stack([e["image"] for e in held_out_examples(WorldSpec(), 3, num_objects=1)])
    jobs = Jobs(str(tmp_path), None)
    job = jobs.start("textual_inversion", images, 500)
    assert job.state == "running"
    assert len(os.listdir(os.path.join(job.folder, "instances"))) == 3
    with pytest.raises(ValueError, match="still running"):
        jobs.start("textual_inversion", images, 5)
    assert jobs.cancel() is job
    assert job.state == "cancelled" and job.process.returncode is not None
    assert job.export() is None and jobs.finished_adapters("ti") == []


def test_progress_counts_steps_bit_equal_and_a_same_architecture_model_reuses_programs(
        tmp_path):
    """The progress-reporting UNet (app.progress) on a micro pipeline: a guidance sweep
    gives latents bit-equal to the plain pipeline's and reports one evaluation per step
    and scale; other params of the same architecture (a DreamBooth export) compile
    nothing. A full DreamBooth export loaded by AppState runs on the server's own Pipeline
    object; a model of another architecture does not."""
    import dataclasses

    import jax
    from jaxdiff import sampling
    from jaxdiff.app.progress import TICKS, generate_evals, with_progress
    from jaxdiff.app.state import AppState, compile_counter, same_architecture
    from jaxdiff.weights import load_pipeline, save_pipeline

    pipe, params = _micro(*load_pipeline(None))
    wrapped, counter = with_progress(pipe), compile_counter()
    run = lambda p, prm: sampling.generate(p, prm, ["a red circle"] * 2, None, "dpmpp_2m", 4,
                                           [3.0, 6.0], 1, output="latents")
    plain = run(pipe, params)
    before = TICKS.count
    reported = run(wrapped, params)
    assert TICKS.count - before == 4 * 2 == generate_evals(wrapped, "dpmpp_2m", 4, 2)
    np.testing.assert_array_equal(reported, plain)
    # numpy arithmetic: a jax one would compile a program per leaf shape
    other = jax.tree.map(lambda x: np.asarray(x) * np.float32(1.01), params)
    compiled = counter.count
    changed = run(wrapped, other)
    assert counter.count == compiled  # new params, same programs
    assert np.abs(changed - plain).max() > 0

    state = AppState(None, str(tmp_path / "work"))
    export = str(tmp_path / "db_export")  # what a full DreamBooth job exports
    save_pipeline(dataclasses.replace(state.pipe, unet=state.pipe.unet.inner),
                  jax.tree.map(lambda x: np.asarray(x) + np.float32(0.001), state.params), export)
    db_pipe, db_params, _ = state._load_job("dreambooth", export)
    assert db_pipe is state.pipe
    diff = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                        db_params, state.params)
    assert 5e-4 < min(jax.tree.leaves(diff)) and max(jax.tree.leaves(diff)) < 2e-3
    assert not same_architecture(state.pipe, state.params, pipe, params)


def test_serve_flags_adapters_only_from_server_folders_and_atomic_results(tmp_path):
    """``jaxdiff serve``: local host and port 7860 by default; a non-local --host warns
    (and names --auth when it is missing); --auth is USER:PASSWORD. LoRA files are offered and opened only by a name listed from
    the server's folder (safetensors files and run folders: a pickle file, a typed path or
    a path outside the folder is refused with one line). A result folder is written
    atomically: a write that fails leaves nothing behind."""
    from jaxdiff.adapters.lora import WEIGHT_NAME
    from jaxdiff.app.state import NONE, adapter_names, resolve_adapter, write_result_folder
    import argparse

    from jaxdiff.cli.serve import add_parser, host_warning, parse_auth
    from jaxdiff.data.images import InputError
    sub = argparse.ArgumentParser().add_subparsers()
    add_parser(sub)
    args = sub.choices["serve"].parse_args([])
    assert (args.host, args.port, args.auth, args.model) == ("127.0.0.1", 7860, None, None)
    assert host_warning("127.0.0.1", None) == "" and host_warning("localhost", None) == ""
    assert "reachable from other machines" in host_warning("0.0.0.0", ("ann", "pw"))
    assert "--auth" in host_warning("0.0.0.0", None)
    assert "--auth" not in host_warning("0.0.0.0", ("ann", "pw"))
    assert parse_auth("ann:s3:cret") == ("ann", "s3:cret") and parse_auth(None) is None
    with pytest.raises(ValueError, match="USER:PASSWORD"):
        parse_auth("ann")

    loras = tmp_path / "loras"
    (loras / "run1").mkdir(parents=True)
    for f in ("style.safetensors", "old.bin", "old.ckpt", ".hidden.safetensors",
              f"run1/{WEIGHT_NAME}"):
        (loras / f).write_bytes(b"x")
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    assert adapter_names(str(loras), WEIGHT_NAME) == ["run1", "style.safetensors"]
    assert resolve_adapter("run1", str(loras), WEIGHT_NAME, "lora") == str(loras / "run1")
    assert resolve_adapter(NONE, str(loras), WEIGHT_NAME, "lora") is None
    for typed in ("old.bin", "../outside.safetensors", str(tmp_path / "outside.safetensors"),
                  str(loras / "style.safetensors")):
        with pytest.raises(InputError, match="not in the server's LoRA folder"):
            resolve_adapter(typed, str(loras), WEIGHT_NAME, "lora")

    out = tmp_path / "results"
    good, bad = np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 5), np.uint8)
    first, = write_result_folder(str(out), [("a.png", good, {"seed": 0})], {"prompt": "p"})
    assert Image.open(first).text == {"prompt": "p", "seed": "0"}
    with pytest.raises(TypeError):  # the second image cannot be written
        write_result_folder(str(out), [("a.png", good, {}), ("b.png", bad, {})], {})
    assert os.listdir(out) == [os.path.basename(os.path.dirname(first))]


def test_page_loads_before_the_warm_up_is_done(app):
    """The server answered while its warm-up still compiled (the first warm-up job logged
    its end later), and the page shows the status line."""
    import time
    page = app.page
    compiled = app.server.logged_at("warm-up generate")
    assert compiled is None or app.server.up_at < compiled, (app.server.up_at, compiled)
    t0 = time.time()
    page.goto(app.url)
    page.wait_for_selector("#gen-run")
    status = page.inner_text("#server-status")
    assert time.time() - t0 < 60
    assert any(s in status for s in ("warming up", "ready: ")), status


def test_personalize_job_trains_while_a_p2p_edit_runs_then_generate_uses_it(app):
    """A DreamBooth-LoRA job on the three uploaded instance images (2 steps, a sample grid
    after each) runs in the background while a P2P edit is made in the Edit tab (the
    server keeps serving; ``_p2p_edit`` checks the input | reconstruction | edit panel).
    The job's status showed its progress bar part-way (step 1 of 2, during the first
    grid) and ends finished with both grids shown and its result offered as ``job:<id>``;
    Generate with it (a merged LoRA: the warm-up's programs, nothing compiles) keeps its
    name in the PNG."""
    page = app.page
    page.get_by_role("tab", name="Personalize").click()
    ab.upload(page, "#pers-files", app.files.instances)
    ab.set_number(page, "#pers-steps", 2)
    ab.set_number(page, "#pers-sample-every", 1)
    ab.watch_text(page, "#pers-status")
    page.click("#pers-start")
    page.wait_for_function(  # started (or refused with an error message)
        "(document.querySelector('#pers-status')?.innerText || '').includes('dreambooth_lora')"
        " || document.querySelector('.toast-body') !== null", timeout=30_000)
    assert not page.locator(".toast-body").all_inner_texts()
    job = re.search(r"\d{8}-\d{6}-dreambooth_lora-[0-9a-f]{4}",
                    page.inner_text("#pers-status")).group(0)

    _p2p_edit(app)  # while the job trains

    page.get_by_role("tab", name="Personalize").click()
    status = ab.wait_job(page, JOB_TIMEOUT)
    if f"{job} (dreambooth_lora): finished" not in status:
        with open(os.path.join(os.path.dirname(app.server.log), "work", "jobs", job,
                               "job.log")) as f:
            pytest.fail(f"{status}\n{f.read()[-2000:]}")
    assert "step 2 / 2 (100 %)" in status and f"job:{job}" in status, status
    seen = ab.texts(page)  # polled every 2 s: the first grid's compile keeps it at step 1
    assert any("running" in t and "step 1 / 2 (50 %)" in t for t in seen), seen
    grids = ab.images(page, "#pers-samples")  # 2 prompts x 4 images per grid, one per step
    assert len(grids) == 2 and all(w == 4 * 32 and h == 2 * 32 for w, h, _ in grids), grids

    ab.wait_ready(page)  # Generate with the job's model: the warm-up's programs
    page.get_by_role("tab", name="Generate").click()
    before = ab.status_text(page, "#gen-status")
    ab.choose(page, "#gen-model", f"job:{job}")
    page.click("#gen-run")
    status = ab.wait_status(page, "#gen-status", after=before)
    assert "0 program(s) compiled" in status, status
    png = ab.png(page, ab.images(page, "#gen-gallery")[1][2])
    assert png.text["model"] == f"job:{job}" and png.text["prompt"] == "a red circle", png.text
    page.goto(app.url)  # a fresh page: the server's model selected again
    page.wait_for_selector("#gen-run")


def test_generate_shows_model_size_images_with_settings(app):
    page = app.page
    ab.wait_ready(page)  # the warm-up compiled the defaults
    page.get_by_role("tab", name="Generate").click()
    ab.watch_progress(page)
    page.click("#gen-run")
    status = ab.wait_status(page, "#gen-status")
    assert "0 program(s) compiled" in status, status
    seen = ab.progress(page)  # DPM++ 2M, 20 steps: one UNet evaluation each
    assert seen and all(total == 20 and 0 <= done <= 20 for done, total in seen), seen
    images = ab.images(page, "#gen-gallery")
    side = images[1][0]
    assert [tuple(i[:2]) for i in images] == [(2 * side, side), (side, side), (side, side)]
    assert side == 32  # the embedded model's size
    png = ab.png(page, images[1][2])
    assert png.text["prompt"] == "a red circle" and png.text["seed"] == "0", png.text
    assert png.text["model"] == "embedded:shapes"


@pytest.mark.parametrize("name,message", [("text", "not an image"),
                                          ("bomb", "400 megapixels, the limit is 16")])
def test_bad_upload_shows_an_error(app, name, message):
    page = app.page
    page.goto(app.url)  # a fresh page: an empty upload field
    page.get_by_role("tab", name="Edit").click()
    page.set_input_files("#edit-files input[type=file]", getattr(app.files, name))
    page.locator(".toast-body", has_text=message).first.wait_for(timeout=60_000)
    assert app.proc.poll() is None


def test_server_still_healthy_and_cached(app):
    assert app.proc.poll() is None
    assert ab.get(app.url)[0] == 200
    page = app.page
    page.goto(app.url)  # a fresh page: no error message left from the last test
    page.wait_for_selector("#gen-run")
    before = ab.status_text(page, "#gen-status")
    page.fill("#gen-guidance textarea", "7")  # traced: no new program
    page.click("#gen-run")
    status = ab.wait_status(page, "#gen-status", after=before)
    assert "0 program(s) compiled" in status, status
    assert "generate" in app.server.log_tail(10**7)  # the per-request compile log line


def _micro(pipe, params):
    """The embedded pipeline with a one-level cross-attention UNet of random params (a
    cheap compile; as torchref.models.with_micro_unet, at the text encoder's width)."""
    import dataclasses

    import jax
    from jaxdiff.models import UNet2DConditionModel, UNetConfig
    from jaxdiff.pipeline import dummy_inputs
    unet = UNet2DConditionModel(UNetConfig.from_dict(dict(
        block_out_channels=(8,), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",), attention_head_dim=2, norm_num_groups=4,
        cross_attention_dim=pipe.unet.config.cross_attention_dim, sample_size=4)))
    shapes = jax.eval_shape(unet.init, jax.random.key(0), *dummy_inputs(unet, "unet"))
    rng = np.random.default_rng(0)
    unet_params = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32),
                               shapes["params"])
    return dataclasses.replace(pipe, unet=unet), dict(params, unet=unet_params)


def _p2p_edit(app):
    """A P2P edit (DDIM inversion, 3 steps) of two uploads, one request (one batch through
    the method's program): one input | reconstruction | edit panel per upload, in upload
    order, its input part holding the upload's pixels; the photo's colour changed."""
    page = app.page
    page.get_by_role("tab", name="Edit").click()
    uploads = [app.files.photo, app.files.instances[0]]
    ab.upload(page, "#edit-files", uploads)
    page.fill("#edit-source textarea", app.files.caption)
    target = app.files.caption.replace(app.files.colour, "blue" if app.files.colour != "blue"
                                       else "red")
    page.fill("#edit-target textarea", target)
    ab.set_number(page, "#edit-steps", 3)
    ab.choose(page, "#edit-inversion", "ddim")
    ab.watch_progress(page)
    page.click("#edit-run")
    status = ab.wait_status(page, "#edit-status")
    assert status.startswith("p2p: 2 image(s)"), status
    assert ab.progress(page), "no progress shown"  # UNet evaluations (total: after a first run)
    panels = ab.images(page, "#edit-gallery")
    assert [tuple(p[:2]) for p in panels] == [(3 * 32 + 2 * 2, 32)] * 2, panels
    for (_, _, src), path in zip(panels, uploads):
        panel = np.asarray(ab.png(page, src).convert("RGB"))
        upload = np.asarray(Image.open(path).convert("RGB"))
        np.testing.assert_array_equal(panel[:, :32], upload)  # the upload, as uploaded
        assert (panel[:, 32:34] == 255).all() and (panel[:, 66:68] == 255).all()  # the gaps
        if path == app.files.photo:
            assert np.abs(panel[:, 68:].astype(int) - upload).mean() > 1.0  # edited
