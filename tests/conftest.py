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
# default level). Inherited by the subprocesses tests start. Files whose programs loop
# (Adam inversions, fine-tuning) use the ``xla_o1`` fixture below. JAXDIFF_TEST_XLA_OPT=
# default keeps XLA's default; JAXDIFF_TEST_XLA_OPT=<n> picks another level.
# Measured (clean-clone suite, CPU seconds per file, -O0 vs everything at -O1): the loops
# of test_inversion 344 -> 130 and test_imagic_unitune 307 -> 79, but the compile-bound
# files +25-60 % (test_generate 112 -> 176, test_edit_scale 164 -> 236), 69 -> 77 CPU-min.
# Three more XLA:CPU compile-time flags halve the compile time again at -O0 (measured on
# the embedded model, one process each, no cache: generate 6.3 -> 3.5 CPU-s, a UNet Adam
# train step 15.1 -> 6.3; run time unchanged, outputs equal): the pre-MLIR fusion emitters
# (``xla_cpu_use_fusion_emitters=false``), no expensive LLVM passes, codegen in one piece.
# Flag names are jaxlib's: an unknown one aborts XLA, so they are set only for the jaxlib
# versions they were checked on.
# Known -O0 cost (jaxlib 0.10.2, 2026-12-03): a gradient through a conv *inside a loop*
# (scan / fori_loop: CLIP or classifier guidance, Adam loops) keeps its input-gradient
# convs in the "01oi" kernel layout, which XLA:CPU emits as plain loops instead of its conv
# library (outside loops, convolution-canonicalization makes them "01io"); at -O0 those
# loops run ~10x slower (the README's CLIP-guidance command: 40 s of its 74 s running;
# 3 s at -O1, where the compile costs 30 s more). Disabling loop-invariant code motion
# does not change it.
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
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "torch" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.reference)
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept


@pytest.fixture(scope="module")
def xla_o1():
    """Programs compiled while the module runs use LLVM -O1 instead of the suite's -O0.

    For files whose time is running loops, not compiling: -O0 machine code of the Adam
    inversion / fine-tuning programs runs up to 30x slower (one Imagic call of
    test_imagic_unitune: 85 CPU-s at -O0, 2.3 at -O1). Sets the level as a per-compile
    option override (the persistent cache keys on it), restored after the module."""
    from jax._src import compiler  # private: without it the module just runs at -O0
    original = getattr(compiler, "get_compile_options", None)
    if _OPT == "default" or original is None:
        yield
        return

    def with_o1(*args, env_options_overrides=None, **kwargs):
        env = dict(env_options_overrides or {})
        env.setdefault("xla_backend_optimization_level", "1")
        return original(*args, env_options_overrides=env, **kwargs)

    compiler.get_compile_options = with_o1
    yield
    compiler.get_compile_options = original


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
def embedded():
    """(pipe, params) of the shipped model, loaded once: the same Pipeline object across
    modules, so programs compiled for it (cached per pipeline) are shared."""
    import jaxdiff
    return jaxdiff.load_pipeline(None)


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
