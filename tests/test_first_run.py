"""What a new user sees first: no PyTorch notice from transformers on a machine without it."""
import subprocess
import sys
import textwrap

# Run in a fresh interpreter where torch looks absent (the test extra installs it).
HIDE_TORCH = textwrap.dedent("""
    import importlib.metadata as md, importlib.util, sys
    find, version = importlib.util.find_spec, md.version
    importlib.util.find_spec = lambda n, *a, **k: None if n.split(".")[0] == "torch" else find(n, *a, **k)
    def hidden(n):
        if n == "torch":
            raise md.PackageNotFoundError(n)
        return version(n)
    md.version = hidden
""")


def _stderr(code):
    out = subprocess.run([sys.executable, "-c", HIDE_TORCH + code], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stderr


def test_transformers_pytorch_notice_is_silenced_but_kept_without_jaxdiff():
    # The simulation is real: transformers alone prints the notice ...
    assert "PyTorch was not found" in _stderr("import transformers")
    # ... and importing jaxdiff first (loading the embedded model) drops exactly it.
    err = _stderr("import jaxdiff\njaxdiff.load_pipeline(None)\n"
                  "import logging; logging.getLogger('transformers').warning('kept')")
    assert "PyTorch was not found" not in err
    assert "kept" in err
