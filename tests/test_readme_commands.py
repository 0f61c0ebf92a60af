"""Every command line that README.md and the config docstrings show runs, smoke-sized.

The commands are read from the documents themselves (README ``bash`` blocks, the
``python ...`` lines of ``configs/*.py`` docstrings), so a renamed flag or file breaks this
test. Each runs in bash from a scratch folder that looks like the repository root
(``.venv``, ``train/``, ``edit/``, ``configs/``, ``bench/``, ``candidates/``, ``docs/``
linked in; ``photo.png``, ``mask.png``, ``jobs.jsonl``, ``my_subject/``, ``my_concept/``
made from the shapes world), with the venv's ``bin`` first on PATH (``python`` in a docstring means the activated venv).
Commands run in document order, so later ones use what earlier ones wrote
(``runs/db/export`` ...). What is changed, and only this:

* smoke-size flags are appended (steps, data size, batch; argparse and ml_collections
  take the last value), and ``--height 512 --width 512`` of the Stable Diffusion example
  becomes 32 px on a tiny random SD pipeline standing in for ``/path/to/...``;
* ``/tmp/smoke`` becomes a folder of its own inside the scratch folder;
* the command under "on a machine with 8 devices" gets 8 forced host devices;
* ``make demo`` runs as the Makefile's demo recipe line (smoke-sized); ``make test`` is
  this suite itself and is not started again from inside it.

A plain ``python <script> ...``, ``python -m <module> ...`` (``make demo``'s recipe) or
``jaxdiff ...`` line (no shell syntax, no environment prefix) runs as a child of
tests/forkserver.py — a fresh process forked from one that has the heavy libraries
imported, running the same script file or module with the same argv, working directory
and environment — instead of bash starting a new interpreter (about 4.5 CPU-s of imports
saved per command); every other line (``cp``, the 8-device command) runs in bash. Either
way each command is its own process.
"""
import ast
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

from jaxdiff.data.shapes import WorldSpec, held_out_examples

pytestmark = pytest.mark.slow

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SMOKE = {  # script -> flags appended to every command that runs it
    "jaxdiff generate": "--steps 2",
    "edit/imagic.py": "--steps 2 --embedding-steps 2 --finetune-steps 2 --draws 1",
    "edit/unitune.py": "--steps 2 --finetune-steps 2 --draws 1",
    "edit/": "--steps 2",
    "jaxdiff classify": "--samples 4 8",
    "train/classifier.py": ("--config.data.num_train=64 --config.data.num_test=16"
                            " --config.steps=2 --config.batch_size=8 --config.checkpoint_every=2"
                            " --config.log_every=2"),
    "jaxdiff serve": "--check",  # builds the app (model, tabs, adapter lists) and exits
    "train/clip.py": ("--config.data.num_train=64 --config.data.num_test=16"
                      " --config.train.steps=2 --config.train.batch_size=16"
                      " --config.checkpoint_every=2 --config.model.vision.num_hidden_layers=1"
                      " --config.model.text.num_hidden_layers=1"),
    "bench/clip_quality.py": "--num 4 --num-retrieval 4",
    "train/dreambooth.py": ("--config.steps=2 --config.batch_size=2 --config.num_class_images=2"
                            " --config.class_sampling.steps=2 --config.sample_every=0"
                            " --config.checkpoint_every=2 --config.class_cache_dir=class_cache"),
    "train/textual_inversion.py": ("--config.steps=2 --config.batch_size=2"
                                   " --config.sample_every=0 --config.checkpoint_every=2"),
    "train/controlnet.py": ("--config.data.num_train=16 --config.data.num_test=4"
                            " --config.train.steps=2 --config.train.batch_size=8"
                            " --config.checkpoint_every=2"),
    "train/t2i_adapter.py": ("--config.data.num_train=16 --config.data.num_test=4"
                             " --config.train.steps=2 --config.train.batch_size=8"
                             " --config.adapter.num_res_blocks=1 --config.checkpoint_every=2"),
    "train/gligen.py": ("--config.data.num_train=16 --config.data.num_test=4"
                        " --config.train.steps=2 --config.train.batch_size=8"
                        " --config.checkpoint_every=2 --config.gligen.max_objs=4"),
    "bench/quality.py": ("--num-one 2 --num-two 2 --num-colour-free 2 --num-shape-free 2"
                         " --num-real 2 --steps 2 --guidance 5 --chunk 8"),
    "train/instruct_pix2pix.py": ("--config.data.num_pairs=8 --config.train.steps=1"
                                  " --config.train.batch_size=4 --config.train.warmup=0"
                                  " --config.checkpoint_every=1 --config.log_every=1"
                                  " --config.train.train_text_encoder=False"),
    "train/colour_mixup.py": ("--config.num_train=64 --config.steps=2 --config.batch_size=8"
                              " --config.warmup=1 --config.checkpoint_every=2"
                              " --config.log_every=1"),
    "train/text_to_image.py": ("--config.data.num_train=64 --config.data.num_test=16"
                               " --config.autoencoder.steps=2 --config.diffusion.steps=2"
                               " --config.decoder.steps=2 --config.decoder.batch_size=16"
                               " --config.autoencoder.batch_size=16"
                               " --config.diffusion.batch_size=16 --config.sample_every=0"
                               " --config.checkpoint_every=2"
                               # one learning rate for all: the model-v2 commands that
                               # share an architecture then share one compiled train step
                               # (the persistent cache serves the next one)
                               " --config.diffusion.lr=1e-4"),
}


def _join(lines):
    out, cur = [], ""
    for line in lines:
        line = line.rstrip()
        cur += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            if cur.strip():
                out.append(" ".join(cur.split()))
            cur = ""
    return out


def readme_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        eight = "8 devices" in block
        for cmd in _join(l for l in block.splitlines() if not l.lstrip().startswith("#")):
            out.append((cmd, eight))
    return out


def docstring_commands():
    out = []
    for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        if name.endswith(".py"):
            doc = ast.get_docstring(ast.parse(open(os.path.join(ROOT, "configs", name)).read()))
            out += [(c, False) for c in _join((doc or "").splitlines())
                    if c.startswith("python ")]
    return out


def _program(cmd):
    if cmd.startswith("make "):
        return cmd
    words = shlex.split(cmd, comments=True)
    if os.path.basename(words[0]) == "jaxdiff":
        return "jaxdiff " + words[1]
    return next((w for w in words[1:2] if w.startswith(("train/", "edit/", "bench/"))),
                words[0])


def _smoke(cmd, eight, tmp, tiny_sd):
    program = _program(cmd)
    if cmd == "make demo":  # its recipe line, as the Makefile runs it
        recipe = _join(open(os.path.join(ROOT, "Makefile")).read().split("demo: install\n")[1]
                       .split("\n\n")[0].splitlines())[0]
        cmd = recipe.replace("$(PY)", ".venv/bin/python")
        program = "jaxdiff generate"
    cmd = re.sub(r"\s#\s[^'\"]*$", "", cmd)  # a trailing "# comment"
    # Each /tmp/smoke command gets its own workdir (they train different models).
    cmd = cmd.replace("/tmp/smoke", os.path.join(tmp, f"smoke_{zlib.crc32(cmd.encode())}"))
    if "/path/to/stable-diffusion-v1-5" in cmd:
        cmd = cmd.replace("/path/to/stable-diffusion-v1-5", tiny_sd) + " --height 32 --width 32"
    flags = next((f for key, f in SMOKE.items() if program.startswith(key)), "")
    env = "XLA_FLAGS=\"$XLA_FLAGS --xla_force_host_platform_device_count=8\" " if eight else ""
    return program, f"{env}{cmd} {flags}"


def _scratch(tmp):
    for name in ("train", "edit", "configs", "bench", "candidates", "docs"):
        os.symlink(os.path.join(ROOT, name), os.path.join(tmp, name))
    os.symlink(sys.prefix, os.path.join(tmp, ".venv"))
    examples = held_out_examples(WorldSpec(), 6, num_objects=1)
    Image.fromarray(examples[0]["image"]).save(os.path.join(tmp, "photo.png"))
    Image.fromarray(examples[0]["masks"][0].astype(np.uint8) * 255).save(
        os.path.join(tmp, "mask.png"))
    with open(os.path.join(tmp, "jobs.jsonl"), "w") as f:
        f.write(json.dumps({"image": "photo.png", "source_prompt": "a red circle",
                            "target_prompt": "a blue circle", "blend_words": ["red", "blue"]})
                + "\n")
    for folder, exs in (("my_subject", examples[1:4]), ("my_concept", examples[3:6])):
        os.makedirs(os.path.join(tmp, folder))
        for k, ex in enumerate(exs):
            Image.fromarray(ex["image"]).save(os.path.join(tmp, folder, f"{k}.png"))


class ForkServer:
    """tests/forkserver.py as a subprocess: ``run(script, argv, cwd, env)`` -> (returncode,
    stdout, stderr) of one command run in a freshly forked child."""

    def __init__(self, tmp):
        self.tmp, self.count, self.lock = tmp, 0, threading.Lock()
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "forkserver.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = json.loads(self.proc.stdout.readline())
        assert ready["ready"], ready

    def run(self, script, argv, cwd, env, timeout=900):
        with self.lock:
            self.count += 1
            out, err = (os.path.join(self.tmp, f"cmd{self.count}.{s}") for s in ("out", "err"))
            self.proc.stdin.write(json.dumps(dict(script=script, argv=argv, cwd=cwd, env=env,
                                                  stdout=out, stderr=err, timeout=timeout))
                                  + "\n")
            self.proc.stdin.flush()
            reply = json.loads(self.proc.stdout.readline())
        return reply["returncode"], open(out).read(), open(err).read()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _python_command(line):
    """(script, argv) when ``line`` is a plain ``python X.py ...`` / ``jaxdiff ...`` command
    that the fork server can run as is, else None (bash runs it)."""
    if re.search(r"[$`*?~;&|<>(){}\\]", re.sub(r"'[^']*'|\"[^\"$`\\]*\"", "", line)):
        return None  # shell syntax outside quotes
    words = shlex.split(line)
    if not words or "=" in words[0]:
        return None
    venv_bin = os.path.join(sys.prefix, "bin")
    if words[0] in ("jaxdiff", ".venv/bin/jaxdiff"):
        return os.path.join(venv_bin, "jaxdiff"), [words[0]] + words[1:]
    if words[0] in ("python", ".venv/bin/python") and len(words) > 1:
        if words[1].endswith(".py"):
            return words[1], words[1:]
        if words[1] == "-m" and len(words) > 2:  # python -m sets argv[0] to the module's file
            return f"-m {words[2]}", [words[0]] + words[3:]
    return None


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, tiny_pipe_dir):
    tmp = str(tmp_path_factory.mktemp("readme_root"))
    _scratch(tmp)
    server = ForkServer(str(tmp_path_factory.mktemp("forkserver")))
    yield tmp, tiny_pipe_dir, server
    server.close()


def _unique(commands):
    seen, out = set(), []
    for cmd, eight in commands:
        key = cmd.replace(".venv/bin/python ", "python ")
        if key not in seen and cmd != "make test":
            seen.add(key)
            out.append((cmd, eight))
    return out


COMMANDS = _unique(readme_commands() + docstring_commands())


def test_the_documents_show_commands():
    """The parsers find what the documents show (guards against a silent empty list)."""
    programs = {_program(c) for c, _ in COMMANDS}
    for p in ("make demo", "jaxdiff generate", "jaxdiff serve", "edit/p2p.py", "edit/sdedit.py",
              "edit/diffedit.py", "edit/blended.py", "edit/repaint.py", "edit/ilvr.py",
              "train/dreambooth.py", "train/textual_inversion.py", "train/text_to_image.py"):
        assert p in programs, p
    assert any(eight for _, eight in COMMANDS)


@pytest.mark.parametrize("cmd,eight", COMMANDS, ids=[c[:70] for c, _ in COMMANDS])
def test_command_runs(scratch, cmd, eight):
    tmp, tiny_sd, server = scratch
    _, line = _smoke(cmd, eight, tmp, tiny_sd)
    env = dict(os.environ, PATH=os.path.join(sys.prefix, "bin") + os.pathsep
               + os.environ["PATH"])
    python = _python_command(line)
    if python:
        code, stdout, stderr = server.run(*python, cwd=tmp, env=env)
    else:
        out = subprocess.run(["bash", "-c", line], cwd=tmp, env=env, capture_output=True,
                             text=True, timeout=900)
        code, stdout, stderr = out.returncode, out.stdout, out.stderr
    assert code == 0, f"{line}\n{stdout[-2000:]}\n{stderr[-4000:]}"


def test_fork_server_routes_and_reports_failure(scratch):
    """Plain python / python -m / jaxdiff lines go to the fork server, shell syntax to bash;
    a failing command's exit status and stderr come back (the check above can fail)."""
    tmp, tiny_sd, server = scratch
    assert _python_command(".venv/bin/python edit/p2p.py --prompt 'a <ring>' --steps 2")
    assert _python_command('jaxdiff generate --prompt "a b" --steps 2')[1][:2] == [
        "jaxdiff", "generate"]
    assert _python_command('.venv/bin/python -m jaxdiff.cli generate --prompt "a b"') == (
        "-m jaxdiff.cli", [".venv/bin/python", "generate", "--prompt", "a b"])
    assert _python_command(_smoke("make demo", False, tmp, tiny_sd)[1])[0] == "-m jaxdiff.cli"
    for line in ("cp runs/x/*.safetensors y/", "make demo", "A=1 python x.py",
                 "python x.py && python y.py", "python x.py > out.txt", "python -m"):
        assert _python_command(line) is None, line
    for script in (".venv/bin/jaxdiff", "-m jaxdiff.cli"):
        code, _, err = server.run(script, [".venv/bin/jaxdiff", "generate", "--prompt", "a",
                                           "--out", "o", "--no-such-flag"],
                                  tmp, dict(os.environ))
        assert code == 2 and "unrecognized arguments: --no-such-flag" in err, (script, err)
