"""Shared pytest set-up: persistent compilation cache, fast XLA:CPU compiles, markers, fixtures.

Markers (``make test`` runs everything; ``make test-fast`` deselects both):
  reference -- compares with the PyTorch reference (torch / diffusers / transformers
               models). Set automatically for every test that uses the ``torch`` fixture
               (directly or through ``tiny_pipe_dir``), and by ``pytestmark`` in modules
               that build PyTorch models themselves.
  slow      -- subprocesses, multi-process jobs, training runs and the shipped-model
               floors: the files in ``SLOW_FILES`` below, and tests marked one by one.
"""
import os

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# The suite's time is mostly XLA:CPU compilation of small programs; LLVM at -O0 compiles
# them about a quarter faster than -O1 (a third faster than the default -O2). Results are
# the same programs, only less optimised machine code (the library itself runs at XLA's
# default level). Inherited by the subprocesses tests start. JAXDIFF_TEST_XLA_OPT=default
# keeps XLA's default; JAXDIFF_TEST_XLA_OPT=<n> picks another level.
# Three more XLA:CPU compile-time flags halve the compile time again at -O0 (measured on
# the embedded model, one process each, no cache: generate 6.3 -> 3.5 CPU-s, a UNet Adam
# train step 15.1 -> 6.3; run time unchanged, outputs equal): the pre-MLIR fusion emitters
# (``xla_cpu_use_fusion_emitters=false``), no expensive LLVM passes, codegen in one piece.
# Flag names are jaxlib's: an unknown one aborts XLA, so they are set only for the jaxlib
# versions they were checked on.
# Programs that loop over gradients (null-text / Imagic Adam loops, CLIP and classifier
# guidance, fine-tuning loops) once ran up to 30x slower at -O0 and two files compiled at
# -O1 instead: XLA:CPU emitted JAX's conv-gradient convolutions inside loops as naive
# loops. jaxdiff/models/conv.py writes those gradients as canonical convolutions; since then
# those files run faster at -O0 than they did at -O1 (2026-12-03, same machine, no cache:
# test_inversion's early-stopping null-text test 68 -> 31 s, test_imagic_unitune's
# fine-tuning fixture 120 -> 64 s).
_FAST_COMPILE = ("--xla_cpu_use_fusion_emitters=false --xla_llvm_disable_expensive_passes=true"
                 " --xla_cpu_parallel_codegen_split_count=1")
_OPT = os.environ.get("JAXDIFF_TEST_XLA_OPT", "0")
if _OPT != "default":
    from importlib.metadata import version as _version
    _fast = _FAST_COMPILE if _version("jaxlib").startswith("0.10.") else ""
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_backend_optimization_level={int(_OPT)} {_fast}").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Whole files whose tests start subprocesses / several processes or train for real.
SLOW_FILES = {
    "test_train_scale.py",     # 8 forced devices and a 2-process jax.distributed job
    "test_preemption.py",      # SIGKILL mid-run, then resume
    "test_personalize.py",     # DreamBooth / Textual Inversion entrypoints end to end
    "test_training.py",        # the text-to-image recipe end to end
    "test_p2p_reference.py",   # null-text inversion + P2P against the PyTorch reference
    "test_inversion.py",       # null-text Adam loops on the shipped model
    "test_edit_scale.py",      # edits on 8 forced devices; a 2-process jax.distributed edit
    "test_control_training.py",  # ControlNet / T2I-Adapter train steps and resume
    "test_app.py",             # jaxdiff serve in a subprocess, driven by headless Chromium
}


# The costliest files of the clean-clone suite, heaviest first. `make test` gives whole files
# to its two workers in collection order (--no-loadscope-reorder), so these start first and
# the many short files fill the end. (xdist's default order, most tests first, started the
# long files with few tests last: one worker still ran them while the other idled.)
HEAVY_FIRST = (
    "test_readme_commands.py", "test_inversion.py", "test_imagic_unitune.py", "test_app.py",
    "test_train_scale.py", "test_sdxl_editing.py", "test_edit_scale.py",
    "test_p2p_reference.py", "test_personalize.py", "test_training.py",
    "test_control_training.py", "test_guided_cli.py", "test_preemption.py",
    "test_sdxl_adapters.py", "test_edit_resume.py", "test_edit_batch.py", "test_sdxl.py",
    "test_sdxl_handoff.py",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "torch" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.reference)
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept


@pytest.fixture(scope="session")
def torch():
    """The PyTorch reference (tests only)."""
    import torch as _torch
    _torch.manual_seed(0)
    # One thread: `make test` runs two workers on two cores, and the reference models are
    # tiny — a second thread per worker only oversubscribes the cores (measured: 3-4x the
    # CPU time of diffusers calls on the loaded machine).
    _torch.set_num_threads(1)
    return _torch


@pytest.fixture(scope="session")
def tiny_pipe_dir(tmp_path_factory, torch):
    """A tiny random diffusers StableDiffusionPipeline (SD1-style) saved once per session.

    Read-only for tests: copy it before editing files inside.
    """
    from torchref import models as ref
    folder = str(tmp_path_factory.mktemp("sd_tiny_shared"))
    ref.make_torch_pipeline(folder, unet="sd1", vae="sd1", text="sd1")
    return folder


@pytest.fixture(scope="module")
def micro(tiny_pipe_dir, tmp_path_factory):
    """The tiny diffusers pipeline with a one-block cross-attention UNet (cheap to compile,
    still has attention projections for LoRA), saved as a diffusers directory:
    ``(folder, pipe, params)``."""
    import jaxdiff
    from torchref import models as ref
    pipe, params = ref.with_micro_unet(*jaxdiff.load_pipeline(tiny_pipe_dir), cross=True,
                                       sample_size=8)
    folder = str(tmp_path_factory.mktemp("micro") / "pipe")
    jaxdiff.save_pipeline(pipe, params, folder)
    return folder, pipe, params


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory, torch):
    """Tiny random diffusers SDXL base and refiner pipelines saved once per session (the
    tests/test_sdxl*.py files): ``{"pipeline" | "refiner_pipeline": (torch pipeline,
    folder), "unet" | "refiner" | "text_encoder_2" | "legacy_eos": (torch module,
    folder)}``; "legacy_eos" is a projection encoder with the legacy eos id. Read-only."""
    from torchref import models as ref
    root = tmp_path_factory.mktemp("sdxl")
    out = {}
    for name, refiner in (("pipeline", False), ("refiner_pipeline", True)):
        tp = ref.make_torch_sdxl_pipeline(str(root / name), seed=int(refiner), refiner=refiner)
        out[name] = (tp, str(root / name))
        out["refiner" if refiner else "unet"] = (tp.unet, str(root / name / "unet"))
    tp = out["pipeline"][0]
    out["text_encoder_2"] = (tp.text_encoder_2, str(root / "pipeline" / "text_encoder_2"))
    legacy = ref.make_text_encoder_2(seed=2, eos_token_id=2)
    legacy.save_pretrained(str(root / "legacy_eos"), safe_serialization=True)
    out["legacy_eos"] = (legacy, str(root / "legacy_eos"))
    return out


@pytest.fixture(scope="session")
def sdxl_loaded(tiny_sdxl):
    """``tiny_sdxl`` and jaxdiff's (pipe, params) of its base and refiner loaded once
    ("jax_base", "jax_refiner"): the same Pipeline objects across the tests/test_sdxl*.py
    files, so their compiled programs (cached per pipeline) are shared."""
    import jaxdiff
    out = dict(tiny_sdxl)
    out["jax_base"] = jaxdiff.load_pipeline(tiny_sdxl["pipeline"][1])
    out["jax_refiner"] = jaxdiff.load_pipeline(tiny_sdxl["refiner_pipeline"][1])
    return out


@pytest.fixture(scope="session")
def embedded():
    """(pipe, params) of the shipped model, loaded once: the same Pipeline object across
    modules, so programs compiled for it (cached per pipeline) are shared."""
    import jaxdiff
    return jaxdiff.load_pipeline(None)


@pytest.fixture(scope="session")
def shapes_v1():
    """(pipe, params) of model v1, the previous embedded model (``candidates/shapes_v1``):
    the trained one-layer-per-block U-Net that tests of growth and of the text DiT's shared
    parts use."""
    import jaxdiff
    return jaxdiff.load_pipeline(os.path.join(os.path.dirname(__file__), "..", "candidates",
                                              "shapes_v1"))


@pytest.fixture
def reuse_embedded(embedded, monkeypatch):
    """Entrypoints under test get the already loaded embedded pipeline."""
    import jaxdiff
    monkeypatch.setattr(jaxdiff, "load_pipeline", lambda path=None, **kw: embedded)
    return embedded



@pytest.fixture
def generation_traces(monkeypatch):
    """A list that gains one entry each time ``jaxdiff.generate``'s sampling loop is traced
    (the compiled-program cache is cleared first): its length is the number of compiles."""
    from jaxdiff import sampling
    sampling._compiled.cache_clear()
    traces = []
    real = sampling.denoise_loop
    monkeypatch.setattr(sampling, "denoise_loop",
                        lambda *a, **k: traces.append(1) or real(*a, **k))
    return traces
