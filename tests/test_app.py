"""The web app (``jaxdiff serve``) in a real browser: Playwright drives Debian's Chromium.

The server runs as ``python -m jaxdiff.cli serve`` on a free local port with the embedded
model (warm-up: the Generate tab's defaults only). Checked: the page loads without waiting
for a compile; a Generate request with the defaults shows the model's image size, keeps
its settings in the PNG and compiles nothing (the warm-up did); a P2P edit of an upload
shows input | reconstruction | edit, with the upload's pixels in the input part; a text
file and a 20000x20000 PNG header get visible error messages; afterwards the server still
serves and a new seed still compiles nothing. Generate and Edit show a progress bar that
counts denoising steps (Generate: out of its 20). The Personalize tab's job module is
tested without the browser (test_personalize_job_refuses_a_second_and_cancels; a
browser-driven job failed in the clean-clone suite: the upload of its instance images
did not show within 120 s). ``JAXDIFF_SCREENSHOTS=DIR`` saves the tabs as
``DIR/{generate,edit,edit_mask}.png`` (the README's ``docs/app/``), the edits
then at the Edit tab's default settings (20 steps, null-text inversion) instead of the
test's 3 steps.

Chromium comes from apt (``.ci/run`` installs it): without it the file fails, it does not
skip. Playwright's own browser download is not used.
"""
import io
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import types
import urllib.request
import zlib

import numpy as np
import pytest
from PIL import Image

from jaxdiff.data.shapes import WorldSpec, held_out_examples

pytestmark = pytest.mark.slow
START_TIMEOUT = 300  # s: import + model load on a busy 2-core machine
REQUEST_TIMEOUT = 600 * 1000  # ms: a first compile on a busy machine


def _png_header_only(w, h):
    """A PNG whose header claims w x h RGB pixels (its data is a few bytes)."""
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, r.read()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """(url, page, server process, files) of a served app and a headless Chromium page."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("Debian's chromium is not installed; run `apt-get install -y chromium` "
                    "(.ci/run does it before make test).")
    from playwright.sync_api import sync_playwright
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
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "jaxdiff.cli", "serve", "--port", str(port),
                             "--workdir", str(tmp / "work"), "--warmup", "generate"],
                            stdout=log, stderr=subprocess.STDOUT)
    t0 = time.time()
    while True:
        if proc.poll() is not None:
            pytest.fail(f"jaxdiff serve exited ({proc.returncode}):\n"
                        + (tmp / "server.log").read_text()[-3000:])
        try:
            if _get(url)[0] == 200:
                break
        except OSError:
            pass
        if time.time() - t0 > START_TIMEOUT:
            proc.kill()
            pytest.fail("jaxdiff serve did not answer in time:\n"
                        + (tmp / "server.log").read_text()[-3000:])
        time.sleep(1)
    pw = sync_playwright().start()
    browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                 args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(120_000)  # uploads and clicks wait on a busy 2-core server
    shots = os.environ.get("JAXDIFF_SCREENSHOTS")
    yield types.SimpleNamespace(url=url, page=page, proc=proc, files=files, shots=shots,
                                log=tmp / "server.log")
    browser.close()
    pw.stop()
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _screenshot(app, name):
    if app.shots:
        os.makedirs(app.shots, exist_ok=True)
        app.page.screenshot(path=os.path.join(app.shots, f"{name}.png"), full_page=True)


def _wait_status(page, elem, timeout=REQUEST_TIMEOUT, after=""):
    """The text of ``elem`` once it reports a finished request different from ``after``;
    an error message shown instead fails the test with its text."""
    page.wait_for_function(
        "([sel, old]) => { const t = document.querySelector(sel).innerText;"
        " return (t.includes('compiled') && t !== old)"
        " || document.querySelector('.toast-body') !== null; }", arg=[elem, after],
        timeout=timeout)
    errors = page.locator(".toast-body").all_inner_texts()
    assert not errors, errors
    return page.inner_text(elem)


def _images(page, gallery, old=()):
    """[(natural width, height, src)] of a gallery's images, once all have loaded (and
    none is one of the ``old`` srcs)."""
    page.wait_for_function(
        f"(old) => {{ const im = [...document.querySelectorAll('{gallery} img')];"
        " return im.length > 0 && im.every(e => e.complete && e.naturalWidth > 0"
        " && !old.includes(e.src)); }", arg=list(old), timeout=60_000)
    return page.eval_on_selector_all(
        f"{gallery} img", "els => els.map(e => [e.naturalWidth, e.naturalHeight, e.src])")


def _png(app, src):
    response = app.page.request.get(src)
    assert response.ok, src
    return Image.open(io.BytesIO(response.body()))


def test_page_loads_before_the_warm_up_is_done(app):
    t0 = time.time()
    app.page.goto(app.url)
    app.page.wait_for_selector("#gen-run")
    status = app.page.inner_text("#server-status")
    assert time.time() - t0 < 60
    assert any(s in status for s in ("warming up", "ready: ", "model loaded")), status


def _watch_progress(page):
    """Records every text Gradio's progress display shows from now on (``_progress``)."""
    page.evaluate("""() => { window.__progress = [];
        if (window.__observer) window.__observer.disconnect();
        window.__observer = new MutationObserver(() => {  // textContent: no layout
          for (const e of document.querySelectorAll('.progress-text, .progress-level')) {
            const t = e.textContent;
            if (window.__progress[window.__progress.length - 1] !== t)
              window.__progress.push(t); } });
        window.__observer.observe(document.body,
                                  {subtree: true, childList: true, characterData: true}); }""")


def _progress(page):
    """[(done, total or None)] read from the recorded progress texts ("7/20 steps")."""
    seen = []
    for text in page.evaluate("window.__progress"):
        for done, total in re.findall(r"(\d+)(?:/(\d+))? steps", text):
            seen.append((int(done), int(total) if total else None))
    return seen


def test_generate_shows_model_size_images_with_settings(app):
    page = app.page
    page.wait_for_function(  # the warm-up (it ran beside the job's start)
        "document.querySelector('#server-status').innerText.includes('ready: ')",
        timeout=REQUEST_TIMEOUT)
    page.get_by_role("tab", name="Generate").click()
    _watch_progress(page)
    page.click("#gen-run")  # the defaults: the warm-up compiled this program
    status = _wait_status(page, "#gen-status")
    assert "0 program(s) compiled" in status, status
    seen = _progress(page)  # DPM++ 2M, 20 steps: one UNet evaluation each
    assert seen and all(total == 20 and 0 <= done <= 20 for done, total in seen), seen
    images = _images(page, "#gen-gallery")
    side = images[1][0]
    assert [tuple(i[:2]) for i in images] == [(2 * side, side), (side, side), (side, side)]
    assert side == 32  # the embedded model's size
    png = _png(app, images[1][2])
    assert png.text["prompt"] == "a red circle" and png.text["seed"] == "0", png.text
    assert png.text["model"] == "embedded:shapes"
    _screenshot(app, "generate")


def test_p2p_edit_shows_input_reconstruction_edit(app):
    page = app.page
    page.get_by_role("tab", name="Edit").click()
    page.set_input_files("#edit-files input[type=file]", app.files.photo)
    page.fill("#edit-source textarea", app.files.caption)
    target = app.files.caption.replace(app.files.colour, "blue" if app.files.colour != "blue"
                                       else "red")
    page.fill("#edit-target textarea", target)
    if not app.shots:  # the screenshot shows the tab's defaults (20 steps, null-text)
        page.fill("#edit-steps input[type=number]", "3")
        page.press("#edit-steps input[type=number]", "Enter")
        page.click("#edit-inversion input")
        page.get_by_role("option", name="ddim", exact=True).click()
    _watch_progress(page)
    page.click("#edit-run")
    status = _wait_status(page, "#edit-status")
    assert status.startswith("p2p: 1 image(s)"), status
    assert _progress(page), "no progress shown"  # UNet evaluations (total: after a first run)
    (w, h, src), = _images(page, "#edit-gallery")
    assert (w, h) == (3 * 32 + 2 * 2, 32)
    panel = np.asarray(_png(app, src).convert("RGB"))
    photo = np.asarray(Image.open(app.files.photo).convert("RGB"))
    np.testing.assert_array_equal(panel[:, :32], photo)  # the upload, as uploaded
    assert (panel[:, 32:34] == 255).all() and (panel[:, 66:68] == 255).all()  # the gaps
    assert np.abs(panel[:, 68:].astype(int) - photo).mean() > 1.0  # the edit changed it
    _screenshot(app, "edit")


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
    assert _get(app.url)[0] == 200
    page = app.page
    page.goto(app.url)  # a fresh page: no error message left from the last test
    page.wait_for_selector("#gen-run")
    before = page.inner_text("#gen-status")
    page.fill("#gen-guidance textarea", "7")  # traced: no new program
    page.click("#gen-run")
    status = _wait_status(page, "#gen-status", after=before)
    assert "0 program(s) compiled" in status, status
    assert "generate" in app.log.read_text()  # the per-request compile log line


def test_screenshot_of_a_painted_mask_edit(app):
    """Only with JAXDIFF_SCREENSHOTS: a RePaint edit at the tab's default steps with a mask
    painted by mouse strokes on the ImageEditor (docs/app/edit_mask.png)."""
    if not app.shots:
        pytest.skip("screenshots only (JAXDIFF_SCREENSHOTS=DIR)")
    page = app.page
    page.goto(app.url)
    page.get_by_role("tab", name="Edit").click()
    page.click("#edit-method input")
    page.get_by_role("option", name="RePaint (drawn mask)").click()
    page.set_input_files("#edit-files input[type=file]", app.files.photo)
    target = app.files.caption.replace(app.files.colour, "red" if app.files.colour != "red"
                                       else "blue")
    page.fill("#edit-target textarea", target)
    page.wait_for_timeout(3000)  # the upload becomes the canvas background
    canvas = page.locator("#edit-mask canvas").first
    canvas.scroll_into_view_if_needed()
    page.click("#edit-mask button[aria-label=Brush]")
    box = canvas.bounding_box()
    x0, y0 = box["x"] + 190, box["y"] + 90
    page.mouse.move(x0, y0)
    page.mouse.down()
    for k in range(1, 21):  # a slow stroke across the upper part (a fast one is dropped)
        page.mouse.move(x0 + 12 * k, y0, steps=2)
        page.wait_for_timeout(30)
    page.mouse.up()
    page.click("#edit-run")
    status = _wait_status(page, "#edit-status")
    assert status.startswith("repaint: 1 image(s)"), status
    (w, _, _), = _images(page, "#edit-gallery")
    assert w == 4 * 32 + 3 * 2  # input | reconstruction | edit | mask
    _screenshot(app, "edit_mask")


def test_painted_strokes_become_the_mask():
    """The ImageEditor value (RGBA layers over a 256 px canvas) -> the model-size mask that
    blended / RePaint / DiffEdit get; no stroke -> None (the method then asks for one)."""
    from jaxdiff.app.edit_tab import editor_mask
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
    other = jax.tree.map(lambda x: x * 1.01, params)
    compiled = counter.count
    changed = run(wrapped, other)
    assert counter.count == compiled  # new params, same programs
    assert np.abs(changed - plain).max() > 0

    state = AppState(None, str(tmp_path / "work"))
    export = str(tmp_path / "db_export")  # what a full DreamBooth job exports
    save_pipeline(dataclasses.replace(state.pipe, unet=state.pipe.unet.inner),
                  jax.tree.map(lambda x: x + 0.001, state.params), export)
    db_pipe, db_params, _ = state._load_job("dreambooth", export)
    assert db_pipe is state.pipe
    diff = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                        db_params, state.params)
    assert 5e-4 < min(jax.tree.leaves(diff)) and max(jax.tree.leaves(diff)) < 2e-3
    assert not same_architecture(state.pipe, state.params, pipe, params)


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
