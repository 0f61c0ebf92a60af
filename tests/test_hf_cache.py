"""``--model org/name``: models in a local Hugging Face hub cache, never downloaded.

A fake cache is built as huggingface_hub lays it out (``models--org--name/blobs``,
``snapshots/<commit>/`` of symlinks into the blobs, ``refs/<branch>``) from the embedded
model; what loads from it must equal the embedded model read from its folder.
"""
import os
import shutil

import jax
import numpy as np
import pytest

import jaxdiff
from jaxdiff import cli
from jaxdiff.weights import DEFAULT_MODEL, hf_cache

MAIN, TAGGED = "a" * 40, "b" * 40


def _snapshot(repo_dir, commit, source):
    """Copies ``source`` into ``blobs/`` and links it from ``snapshots/<commit>/``."""
    snap = os.path.join(repo_dir, "snapshots", commit)
    for root, _, names in os.walk(source):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), source)
            blob = os.path.join(repo_dir, "blobs", f"{commit[:8]}-{rel.replace(os.sep, '_')}")
            os.makedirs(os.path.dirname(blob), exist_ok=True)
            shutil.copyfile(os.path.join(root, name), blob)
            os.makedirs(os.path.dirname(os.path.join(snap, rel)), exist_ok=True)
            os.symlink(blob, os.path.join(snap, rel))
    return snap


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """(hub cache root, embedded params): org/tiny at refs/main, and a tag ``v0`` whose
    snapshot has the VAE's conv_in bias zeroed, so revisions are told apart."""
    from safetensors.numpy import load_file, save_file
    root = str(tmp_path_factory.mktemp("hf") / "hub")
    repo = os.path.join(root, "models--org--tiny")
    _snapshot(repo, MAIN, DEFAULT_MODEL)
    changed = str(tmp_path_factory.mktemp("changed") / "m")
    shutil.copytree(DEFAULT_MODEL, changed)
    vae = os.path.join(changed, "vae", "diffusion_pytorch_model.safetensors")
    t = load_file(vae)
    t["encoder.conv_in.bias"] = np.zeros_like(t["encoder.conv_in.bias"])
    save_file(t, vae)
    for comp, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):  # v0 also has fp16 variant files
        t = load_file(os.path.join(changed, comp, stem + ".safetensors"))
        save_file({k: v.astype(np.float16) for k, v in t.items()},
                  os.path.join(changed, comp, stem + ".fp16.safetensors"))
    _snapshot(repo, TAGGED, changed)
    os.makedirs(os.path.join(repo, "refs"))
    for ref, commit in (("main", MAIN), ("v0", TAGGED)):
        with open(os.path.join(repo, "refs", ref), "w") as f:
            f.write(commit + "\n")
    return root, jaxdiff.load_pipeline(None)[1]


def test_revision_and_fp16_variant(hub, monkeypatch):
    """revision= and variant= reach the cache lookup: the v0 snapshot's *.fp16.safetensors
    are read (float16 values of v0's weights); the CLI passes --revision / --variant on."""
    root, want = hub
    monkeypatch.setenv("HF_HUB_CACHE", root)
    _, v0 = jaxdiff.load_pipeline("org/tiny", revision="v0")
    _, half = jaxdiff.load_pipeline("org/tiny", revision="v0", variant="fp16")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(
        a, np.asarray(b).astype(np.float16).astype(np.float32)), half, v0)
    assert not _bias(half).any()
    with pytest.raises(FileNotFoundError, match="fp16"):
        jaxdiff.load_pipeline("org/tiny", variant="fp16")  # main has no fp16 files


def test_cli_revision_and_variant_flags(hub, tmp_path, monkeypatch, capsys):
    root, _ = hub
    monkeypatch.setenv("HF_HUB_CACHE", root)
    for flags, says in ((["--revision", "v9"], "revision 'v9'"),
                        (["--revision", "v0", "--variant", "bf16"], "bf16.safetensors")):
        out = tmp_path / "out"
        assert cli.main(["generate", "--model", "org/tiny", "--prompt", "x", "--out", str(out)]
                        + flags) == 2
        err = [line for line in capsys.readouterr().err.splitlines()
               if line.startswith("error:")]
        assert len(err) == 1 and says in err[0] and not out.exists()


def _bias(params):
    return np.asarray(params["vae"]["encoder"]["conv_in"]["bias"])


def test_org_name_loads_the_cached_snapshot(hub, monkeypatch):
    root, want = hub
    monkeypatch.setenv("HF_HUB_CACHE", root)
    _, got = jaxdiff.load_pipeline("org/tiny")
    jax.tree.map(np.testing.assert_array_equal, got, want)
    _, tagged = jaxdiff.load_pipeline("org/tiny", revision="v0")
    assert not _bias(tagged).any() and _bias(want).any()
    assert hf_cache.find_snapshot("org/tiny", TAGGED).endswith(TAGGED)
    assert hf_cache.find_snapshot("org/tiny", "c" * 40) is None


def test_cache_location_follows_hf_home_and_hf_hub_cache(hub, tmp_path, monkeypatch):
    root, _ = hub
    home = tmp_path / "home"
    os.makedirs(home)
    os.symlink(root, home / "hub")
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    assert hf_cache.hub_cache_dir() == str(home / "hub")
    assert hf_cache.find_snapshot("org/tiny").endswith(MAIN)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))  # wins over HF_HOME
    assert hf_cache.find_snapshot("org/tiny") is None
    monkeypatch.delenv("HF_HOME")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hf_cache.hub_cache_dir() == str(tmp_path / "xdg" / "huggingface" / "hub")


def test_missing_model_is_one_line_saying_where_and_how(hub, tmp_path, monkeypatch, capsys):
    root, _ = hub
    monkeypatch.setenv("HF_HUB_CACHE", root)
    with pytest.raises(FileNotFoundError) as e:
        jaxdiff.load_pipeline("org/absent")
    msg = str(e.value)
    assert "\n" not in msg and os.path.join(root, "models--org--absent") in msg
    assert "hf download org/absent" in msg
    with pytest.raises(FileNotFoundError, match="revision 'v9'"):
        jaxdiff.load_pipeline("org/tiny", revision="v9")
    out = tmp_path / "out"
    assert cli.main(["generate", "--model", "org/absent", "--prompt", "x", "--out",
                     str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "models--org--absent" in err[0] and not out.exists()
