"""Screenshots of the web app's tabs for the README (``docs/app/*.png``), made by driving a
served app in Debian's headless Chromium with the helpers of ``tests/test_app.py``
(``tools/app_browser.py``).

    python tools/app_screenshots.py --out docs/app

What a user sees on a warm server, at the tabs' default settings: the server starts with
its default warm-up (the Generate and Edit defaults compile in the background) and every
screenshot waits for it, so the status lines show warm request times. ``generate.png``: the
Generate defaults. ``edit.png``: a P2P edit (null-text inversion, 20 steps) of a
shapes-world image, one colour word changed. ``edit_mask.png``: RePaint with a mask painted
by mouse strokes on the image editor; RePaint is not warmed up, so the edit runs twice and
the second (warm) run is shown. ``personalize.png``: a finished DreamBooth-LoRA job on
four instance images of one subject (``--job-steps``, a sample grid every
``--sample-every`` steps), its grids beside the status.

Needs the ``app`` extra and Playwright with Debian's chromium (``tools/install-chromium.sh``);
takes a few minutes on a 2-core CPU machine (the job trains for most of it). Screenshots
are written atomically (a temporary file renamed).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import app_browser as ab

from jaxdiff.data.shapes import WorldSpec, held_out_examples


def _shot(page, out, name):
    path = os.path.join(out, f"{name}.png")
    tmp = os.path.join(out, f".{name}.tmp.png")
    page.screenshot(path=tmp, full_page=True)
    os.replace(tmp, path)
    print(f"wrote {path}", flush=True)


def _save(example, path):
    Image.fromarray(example["image"]).save(path)
    return path


def _subject(n, shape="circle", colour="green", seed=11):
    """``n`` held-out shapes-world images of one subject (one ``colour`` ``shape`` each)."""
    found = []
    for e in held_out_examples(WorldSpec(), 400, num_objects=1, seed=seed):
        o = e["objects"][0]
        if o.shape == shape and o.colour == colour:
            found.append(e)
        if len(found) == n:
            return found
    raise RuntimeError(f"fewer than {n} {colour} {shape}s in 400 held-out examples")


def generate(page, out):
    page.get_by_role("tab", name="Generate").click()
    page.click("#gen-run")
    print("generate:", ab.wait_status(page, "#gen-status"), flush=True)
    ab.images(page, "#gen-gallery")
    _shot(page, out, "generate")


def edit(page, out, photo, caption, colour):
    page.get_by_role("tab", name="Edit").click()
    ab.upload(page, "#edit-files", [photo])
    page.fill("#edit-source textarea", caption)
    page.fill("#edit-target textarea",
              caption.replace(colour, "blue" if colour != "blue" else "red"))
    page.click("#edit-run")
    print("edit:", ab.wait_status(page, "#edit-status"), flush=True)
    ab.images(page, "#edit-gallery")
    _shot(page, out, "edit")


def edit_mask(page, out, url, photo, caption, colour):
    page.goto(url)
    page.get_by_role("tab", name="Edit").click()
    ab.choose(page, "#edit-method", "RePaint (drawn mask)")
    ab.upload(page, "#edit-files", [photo])
    page.fill("#edit-target textarea",
              caption.replace(colour, "red" if colour != "red" else "blue"))
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
    page.click("#edit-run")  # compiles RePaint; the second run is what a user sees
    print("edit (repaint, first):", ab.wait_status(page, "#edit-status"), flush=True)
    page.click("#edit-run")
    print("edit (repaint):", ab.wait_status(page, "#edit-status", want=" 0 program(s)"),
          flush=True)
    page.wait_for_timeout(1000)  # the result panel replaces the progress overlay
    (w, _, _), = ab.images(page, "#edit-gallery")
    assert w == 4 * 32 + 3 * 2, w  # input | reconstruction | edit | mask
    _shot(page, out, "edit_mask")


def personalize(page, out, url, instances, steps, sample_every, timeout_s):
    page.goto(url)
    page.get_by_role("tab", name="Personalize").click()
    ab.upload(page, "#pers-files", instances)
    ab.set_number(page, "#pers-steps", steps)
    ab.set_number(page, "#pers-sample-every", sample_every)
    page.click("#pers-start")
    page.wait_for_function(
        "(document.querySelector('#pers-status')?.innerText || '').includes('dreambooth_lora')",
        timeout=60_000)
    job = re.search(r"\d{8}-\d{6}-dreambooth_lora-[0-9a-f]{4}",
                    page.inner_text("#pers-status")).group(0)
    t0 = time.time()
    status = ab.wait_job(page, timeout_s * 1000)
    print(f"personalize ({time.time() - t0:.0f} s):", status, flush=True)
    if f"{job} (dreambooth_lora): finished" not in status:
        raise RuntimeError(f"job {job} did not finish: {status}")
    ab.images(page, "#pers-samples")
    page.wait_for_timeout(1000)
    _shot(page, out, "personalize")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/app", help="folder of the PNGs (default docs/app)")
    p.add_argument("--job-steps", type=int, default=60,
                   help="training steps of the Personalize job (default 60)")
    p.add_argument("--sample-every", type=int, default=30,
                   help="a sample grid every N steps (default 30)")
    p.add_argument("--job-timeout", type=int, default=1200, help="seconds (default 1200)")
    p.add_argument("--only", default="generate,edit,edit_mask,personalize",
                   help="comma list of the screenshots to make")
    p.add_argument("--warmup", default="generate,edit",
                   help="the server's --warmup (default generate,edit: the Generate and "
                   "Edit screenshots show warm requests)")
    args = p.parse_args(argv)
    only = set(args.only.split(","))
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="app_screenshots_") as tmp:
        example = held_out_examples(WorldSpec(), 1, num_objects=1)[0]
        photo = _save(example, os.path.join(tmp, "photo.png"))
        caption, colour = example["caption"], example["objects"][0].colour
        instances = [_save(e, os.path.join(tmp, f"subject_{i}.png"))
                     for i, e in enumerate(_subject(4))]
        server = ab.Server(tmp, ("--warmup", args.warmup), viewport=(1280, 900))
        try:
            page = server.page()
            page.goto(server.url)
            ab.wait_ready(page)  # a warm server
            if "generate" in only:
                generate(page, args.out)
            if "edit" in only:
                edit(page, args.out, photo, caption, colour)
            if "edit_mask" in only:
                edit_mask(page, args.out, server.url, photo, caption, colour)
            if "personalize" in only:
                personalize(page, args.out, server.url, instances, args.job_steps,
                            args.sample_every, args.job_timeout)
        finally:
            server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
