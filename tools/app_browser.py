"""Playwright helpers that drive ``jaxdiff serve`` in Debian's headless Chromium, shared by
``tests/test_app.py`` and ``tools/app_screenshots.py``.

``Server`` starts ``python -m jaxdiff.cli serve`` on a free local port (it does not wait);
``Server.page()`` waits until it answers and opens a Chromium page. The other helpers wait
for what a user would see: a finished request's status line, a gallery's loaded images, a
finished upload, the progress texts Gradio showed. Every wait has an explicit timeout.

Chromium comes from apt (``tools/install-chromium.sh``); Playwright's own browser download
is not used (no internet).
"""
from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request

from PIL import Image

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
START_TIMEOUT = 300  # s: import + model load on a busy 2-core machine
REQUEST_TIMEOUT = 600 * 1000  # ms: a first compile on a busy machine


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise RuntimeError("Debian's chromium is not installed; run `apt-get install -y "
                           "chromium` (tools/install-chromium.sh does it).")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, r.read()


class Server:
    """``jaxdiff serve`` in a subprocess (started at once, not waited for) and, on the first
    ``page()``, a headless Chromium page on it. A thread polls the server every 0.2 s until
    it answers and records when (``up_at``, ``time.time()``), so a caller can run other
    work meanwhile and still tell when the first page could load."""

    def __init__(self, workdir: str, args=("--warmup", "generate"), viewport=(1280, 1000)):
        os.makedirs(workdir, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = os.path.join(workdir, "server.log")
        self._log = open(self.log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jaxdiff.cli", "serve", "--port", str(self.port),
             "--workdir", os.path.join(workdir, "work"), *args],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.viewport = viewport
        self._pw = self._browser = self._page = None
        self.started, self.up_at = time.time(), None
        self._up = threading.Event()
        threading.Thread(target=self._poll, name="app-browser-poll", daemon=True).start()

    def _poll(self):
        while self.proc.poll() is None and time.time() - self.started < START_TIMEOUT:
            try:
                if get(self.url)[0] == 200:
                    self.up_at = time.time()
                    break
            except OSError:
                pass
            time.sleep(0.2)
        self._up.set()

    def log_tail(self, n: int = 3000) -> str:
        with open(self.log) as f:
            return f.read()[-n:]

    def wait_up(self):
        """Returns once the server answers HTTP; RuntimeError (with its log) if it exits or
        does not answer in START_TIMEOUT s."""
        self._up.wait()
        if self.up_at is None:
            what = (f"exited ({self.proc.returncode})" if self.proc.poll() is not None
                    else f"did not answer in {START_TIMEOUT} s")
            raise RuntimeError(f"jaxdiff serve {what}:\n" + self.log_tail())

    def logged_at(self, text: str):
        """``time.time()`` of the first server log line containing ``text`` (None: none)."""
        with open(self.log) as f:
            for line in f:
                if text in line and " jaxdiff serve: " in line:
                    stamp = line.split(" jaxdiff serve: ")[0]  # logging's asctime
                    day, ms = stamp.split(",")
                    return time.mktime(time.strptime(day, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1e3
        return None

    def page(self):
        """The Chromium page (opened on the first call, once the server answers)."""
        if self._page is None:
            self.wait_up()
            from playwright.sync_api import sync_playwright
            self._pw = sync_playwright().start()
            self._browser = self._pw.chromium.launch(executable_path=chromium_path(),
                                                     headless=True, args=["--no-sandbox"])
            w, h = self.viewport
            self._page = self._browser.new_page(viewport={"width": w, "height": h})
            self._page.set_default_timeout(60_000)  # clicks and fills on a busy machine
        return self._page

    def close(self):
        if self._browser is not None:
            self._browser.close()
            self._pw.stop()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def wait_ready(page, timeout=REQUEST_TIMEOUT):
    """Waits until the status line says the warm-up is done."""
    page.wait_for_function(
        "(document.querySelector('#server-status')?.innerText || '').includes('ready: ')",
        timeout=timeout)


_STATUS_TEXT = "(sel) => { const e = document.querySelector(sel);" \
    " return ((e && (e.querySelector('.prose') || e))?.innerText || '').trim(); }"


def status_text(page, elem) -> str:
    """The text of a gr.Markdown status ``elem`` (its content, without the elapsed-time
    counter Gradio overlays while a request runs)."""
    return page.evaluate(_STATUS_TEXT, elem)


def wait_status(page, elem, timeout=REQUEST_TIMEOUT, after="", want="compiled"):
    """The text of ``elem`` once it reports a finished request (it contains ``want``) that
    differs from ``after``; an error message shown instead raises AssertionError with its
    text."""
    page.wait_for_function(
        f"([sel, old, want]) => {{ const t = ({_STATUS_TEXT})(sel);"
        " return (t.includes(want) && t !== old)"
        " || document.querySelector('.toast-body') !== null; }", arg=[elem, after, want],
        timeout=timeout)
    errors = page.locator(".toast-body").all_inner_texts()
    assert not errors, errors
    return status_text(page, elem)


def images(page, gallery, old=(), timeout=60_000):
    """[(natural width, height, src)] of a gallery's images, once all have loaded (and
    none is one of the ``old`` srcs)."""
    page.wait_for_function(
        f"(old) => {{ const im = [...document.querySelectorAll('{gallery} img')];"
        " return im.length > 0 && im.every(e => e.complete && e.naturalWidth > 0"
        " && !old.includes(e.src)); }", arg=list(old), timeout=timeout)
    return page.eval_on_selector_all(
        f"{gallery} img", "els => els.map(e => [e.naturalWidth, e.naturalHeight, e.src])")


def png(page, src) -> Image.Image:
    """The image file behind a gallery ``src`` (as downloaded: with its PNG text)."""
    response = page.request.get(src)
    assert response.ok, src
    return Image.open(io.BytesIO(response.body()))


def upload(page, elem, paths, timeout=30_000):
    """Uploads ``paths`` into the gr.File ``elem`` and waits until Gradio lists them as
    uploaded: one download link per file, pointing at the server's copy. (While uploading,
    Gradio shows "Uploading N files..." with the file names, and the finished list splits
    each name into stem and extension: a wait on the name's text sees only the former.)"""
    page.set_input_files(f"{elem} input[type=file]", list(paths))
    names = [os.path.basename(p) for p in paths]
    page.wait_for_function(
        "([sel, names]) => { const a = [...document.querySelectorAll(sel + ' a.download-link')];"
        " return a.length === names.length && names.every(n => a.some(e =>"
        " e.getAttribute('download') === n && e.href.includes('/gradio_api/file='))); }",
        arg=[elem, names], timeout=timeout)


def watch_progress(page):
    """Records every text Gradio's progress display shows from now on (``progress``)."""
    page.evaluate("""() => { window.__progress = [];
        if (window.__observer) window.__observer.disconnect();
        window.__observer = new MutationObserver(() => {  // textContent: no layout
          for (const e of document.querySelectorAll('.progress-text, .progress-level')) {
            const t = e.textContent;
            if (window.__progress[window.__progress.length - 1] !== t)
              window.__progress.push(t); } });
        window.__observer.observe(document.body,
                                  {subtree: true, childList: true, characterData: true}); }""")


def progress(page):
    """[(done, total or None)] read from the recorded progress texts ("7/20 steps")."""
    seen = []
    for text in page.evaluate("window.__progress"):
        for done, total in re.findall(r"(\d+)(?:/(\d+))? steps", text):
            seen.append((int(done), int(total) if total else None))
    return seen


def watch_text(page, elem):
    """Records every distinct text of ``elem`` from now on (``texts``); the observer sits
    on the document, so a tab switch that re-renders ``elem`` does not stop it."""
    page.evaluate("""(sel) => { const read = () => document.querySelector(sel)?.textContent;
        window.__texts = [read()];
        if (window.__textObserver) window.__textObserver.disconnect();
        window.__textObserver = new MutationObserver(() => { const t = read();
          if (t !== undefined && window.__texts[window.__texts.length - 1] !== t)
            window.__texts.push(t); });
        window.__textObserver.observe(document.body,
                                      {subtree: true, childList: true, characterData: true}); }""",
                  elem)


def texts(page):
    return page.evaluate("window.__texts")


def wait_job(page, timeout):
    """The Personalize status once the newest job has ended (finished, failed or
    cancelled)."""
    page.wait_for_function(
        "['finished', 'failed', 'cancelled'].some(w =>"
        " (document.querySelector('#pers-status')?.innerText || '').includes('): ' + w))",
        timeout=timeout)
    return page.inner_text("#pers-status")


def choose(page, dropdown, option):
    """Picks ``option`` in a gr.Dropdown ``dropdown``."""
    page.click(f"{dropdown} input")
    page.get_by_role("option", name=option, exact=True).click()
    assert page.input_value(f"{dropdown} input") == option


def set_number(page, elem, value):
    page.fill(f"{elem} input[type=number]", str(value))
    page.press(f"{elem} input[type=number]", "Enter")
