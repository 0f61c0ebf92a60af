"""Resumable edit manifests (issue 13): complete result folders are skipped and counted,
--overwrite redoes them, what a killed run left half-written is removed, summary.json
records devices / processes / mesh / per-chunk timings, progress lines give images/s and
the ETA, and an edit's noise depends on its index in the manifest, not on the chunk it
ran in. The last test SIGKILLs a real
``edit/sdedit.py`` run mid-manifest and re-runs it (slow).

Truth for the fast tests: a stand-in edit (``EditTool.edit``) that writes each pair's
manifest index into its pixels, so which pair went where is read back from the files.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from jaxdiff.cli import edit_args, edit_runner
from jaxdiff.data import WorldSpec, held_out_examples

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume")
    ex = held_out_examples(WorldSpec(image_size=32), 6, num_objects=1, seed=3)
    lines = []
    for i, e in enumerate(ex):
        Image.fromarray(e["image"]).save(folder / f"j{i}.png")
        targets = ["a blue star", "a red cross"] if i == 2 else ["a blue star"]
        lines.append(json.dumps(dict(image=f"j{i}.png", target_prompts=targets)))
    (folder / "jobs.jsonl").write_text("\n".join(lines))
    return folder / "jobs.jsonl"


def _stand_in(calls):
    def edit(pipe, params, chunk):
        calls.append(list(chunk.index))
        edited = np.broadcast_to(np.asarray(chunk.index, np.uint8)[:, None, None, None],
                                 chunk.images.shape)
        return dict(edited=edited, reconstruction=chunk.images)
    return edit


def _run(manifest, out, *extra):
    parser = edit_args.add_common_args(argparse.ArgumentParser())
    args = parser.parse_args(["--manifest", str(manifest), "--out", str(out),
                              "--max-batch", "3", *extra])
    calls = []
    rc = edit_runner.run_edits(args, edit_runner.EditTool("stand-in", _stand_in(calls),
                                                          dict(method="stand-in")))
    return rc, calls


def _pixel(path):
    return int(np.asarray(Image.open(path))[0, 0, 0])


def test_skip_overwrite_partial_and_summary(manifest, tmp_path, reuse_embedded, capsys):
    out = tmp_path / "out"
    rc, calls = _run(manifest, out)
    assert rc == 0 and calls == [[0, 1, 2], [3, 4, 5], [6]]  # 7 pairs, job 2 has two
    # each edit carries its manifest pair index, whatever chunk it ran in
    assert [_pixel(out / f"j{i}" / "edit.png") for i in (0, 1, 3, 4, 5)] == [0, 1, 4, 5, 6]
    assert [_pixel(out / "j2" / f"edit_{k}.png") for k in (0, 1)] == [2, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["done"] == [f"j{i}" for i in range(6)] and summary["skipped"] == []
    assert summary["devices"] == 1 and summary["processes"] == 1
    assert summary["mesh"] == {"data": 1}
    assert [c["images"] for c in summary["chunks"]] == [3, 3, 1]
    assert all(c["seconds"] >= 0 and c["process"] == 0 for c in summary["chunks"])
    assert summary["images_per_s"] > 0
    lines = capsys.readouterr().out.splitlines()  # not a terminal: one line per chunk
    assert [x.split(",")[0] for x in lines[:3]] == [f"stand-in: {k}/7 images" for k in (3, 6, 7)]
    assert all("images/s, ETA" in x for x in lines[:3])

    # What a killed run leaves: j2 and j4 only in write_result's temporary folders (being
    # written; being replaced), j5 a folder without its settings.json (not complete).
    stamp = {n: os.stat(out / n / "settings.json").st_mtime_ns for n in ("j0", "j1", "j3")}
    os.rename(out / "j2", out / ".j2.x1y2z3w4")
    os.rename(out / "j4", out / ".j4.old.abcd_234")
    (out / "j5" / "settings.json").unlink()
    rc, calls = _run(manifest, out)
    assert rc == 0 and calls == [[2, 3, 5], [6]]
    assert "skipped 3 job(s)" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == [f"j{i}" for i in range(6)] + ["summary.json"]
    assert {n: os.stat(out / n / "settings.json").st_mtime_ns for n in stamp} == stamp
    assert _pixel(out / "j4" / "edit.png") == 5 and _pixel(out / "j2" / "edit_1.png") == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["done"] == [f"j{i}" for i in range(6)]
    assert summary["skipped"] == ["j0", "j1", "j3"]

    rc, calls = _run(manifest, out, "--overwrite")
    assert rc == 0 and calls == [[0, 1, 2], [3, 4, 5], [6]]
    assert "skipped" not in capsys.readouterr().out


@pytest.mark.slow
def test_sigkill_mid_manifest_then_rerun(tmp_path):
    """A real edit process is killed after a few jobs; the re-run skips exactly the
    finished ones, leaves them untouched, removes nothing else, finishes the rest, and
    every edit equals an uninterrupted run's (one image per chunk in both)."""
    ex = held_out_examples(WorldSpec(image_size=32), 12, num_objects=1, seed=4)
    for i, e in enumerate(ex):
        Image.fromarray(e["image"]).save(tmp_path / f"k{i:02d}.png")
    (tmp_path / "jobs.jsonl").write_text("\n".join(
        json.dumps(dict(image=f"k{i:02d}.png", target_prompt="a green square"))
        for i in range(12)))
    names = [f"k{i:02d}" for i in range(12)]

    def start(out):
        return subprocess.Popen(
            [sys.executable, os.path.join(REPO, "edit", "sdedit.py"), "--manifest",
             str(tmp_path / "jobs.jsonl"), "--out", str(out), "--steps", "2", "--strength",
             "0.6", "--max-batch", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))

    def finish(proc):
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        return out

    finish(start(tmp_path / "full"))  # also fills the persistent compilation cache
    proc = start(tmp_path / "cut")
    cut = tmp_path / "cut"
    deadline = time.time() + 300
    while time.time() < deadline:
        done = [n for n in names if (cut / n / "settings.json").exists()]
        if len(done) >= 3:
            break
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [n for n in names if (cut / n).exists()]
    assert 3 <= len(done) < 12 and done == names[:len(done)], done
    assert not (cut / "summary.json").exists()
    stamp = {n: os.stat(cut / n / "edit.png").st_ino for n in done}
    out = finish(start(cut))
    assert f"skipped {len(done)} job(s)" in out and f"edited {12 - len(done)} image(s)" in out
    assert sorted(os.listdir(cut)) == names + ["summary.json"]  # no partial folder left
    assert {n: os.stat(cut / n / "edit.png").st_ino for n in done} == stamp  # not redone
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["done"] == names and summary["skipped"] == done
    for n in names:
        np.testing.assert_array_equal(np.asarray(Image.open(cut / n / "edit.png")),
                                      np.asarray(Image.open(tmp_path / "full" / n / "edit.png")))
