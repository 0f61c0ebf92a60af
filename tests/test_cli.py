"""``jaxdiff generate`` CLI: files and metadata, images equal the library's, clear errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import jaxdiff
from jaxdiff import cli

# The tiny tokenizer is character-level with 16 positions: 14 characters fit.
PROMPTS = ["red dot", "blue sq"]
SETTINGS = ["--sampler", "ddim", "--steps", "2", "--guidance", "3.5", "--seed", "7"]


@pytest.fixture(scope="module")
def pipe_dir(tiny_pipe_dir):
    return tiny_pipe_dir


@pytest.fixture(scope="module")
def loaded(pipe_dir):
    return jaxdiff.load_pipeline(pipe_dir)


def _reuse(loaded, mp):
    """The CLI gets the already loaded pipeline object, so the runs share one compiled
    program (jaxdiff caches programs per pipeline object). Loading from disk is exercised
    by the bad-input tests."""
    mp.setattr(cli.generate, "load_pipeline", lambda path=None, **kw: loaded)


@pytest.fixture(scope="module")
def generated(pipe_dir, loaded, tmp_path_factory):
    """One CLI run: 2 prompts x 2 images in chunks of 2 (the 2nd chunk has sample_offset 2)."""
    out = str(tmp_path_factory.mktemp("cli_out") / "imgs")
    argv = ["generate", "--model", pipe_dir, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
            "--batch", "2", "--max-batch", "2", "--out", out] + SETTINGS
    with pytest.MonkeyPatch.context() as mp:
        _reuse(loaded, mp)
        assert cli.main(argv) == 0
    return out


def _read(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")), dict(im.text)


def test_writes_images_grid_and_settings(generated):
    names = sorted(os.listdir(generated))
    assert names == ["0000.png", "0001.png", "0002.png", "0003.png", "grid.png",
                     "settings.json"]
    images = []
    for i in range(4):
        img, meta = _read(os.path.join(generated, f"{i:04d}.png"))
        assert img.shape == (16, 16, 3)
        assert meta["prompt"] == PROMPTS[i // 2]
        assert (meta["seed"], meta["sampler"], meta["steps"]) == ("7", "ddim", "2")
        assert float(meta["guidance"]) == 3.5 and meta["index"] == str(i)
        images.append(img)
    assert not np.array_equal(images[0], images[1])  # per-sample noise, not one seed reused
    grid, _ = _read(os.path.join(generated, "grid.png"))
    assert grid.shape == (32, 32, 3)  # one row per prompt, one column per image
    np.testing.assert_array_equal(grid[:16, 16:], images[1])
    np.testing.assert_array_equal(grid[16:, :16], images[2])
    with open(os.path.join(generated, "settings.json")) as f:
        settings = json.load(f)
    assert settings["prompts"] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert (settings["sampler"], settings["steps"], settings["guidance"],
            settings["seed"]) == ("ddim", 2, 3.5, 7)


def test_images_equal_library_generate(loaded, generated):
    """Equal to library calls with the same chunks (whether chunks change the images is
    test_generate.py's test_chunks_reproduce_one_batch)."""
    pipe, params = loaded
    kw = dict(sampler="ddim", steps=2, guidance_scale=3.5, seed=7)
    want = np.concatenate([jaxdiff.generate(pipe, params, [p] * 2, sample_offset=2 * i, **kw)
                           for i, p in enumerate(PROMPTS)])
    got = np.stack([_read(os.path.join(generated, f"{i:04d}.png"))[0] for i in range(4)])
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert want.std() > 1.0  # real images, not a constant


@pytest.mark.parametrize("extra,match", [
    (["--model", "{tmp}/no_such_model"], "no such directory"),
    (["--model", "{tmp}"], "model_index.json"),  # a folder, but not a pipeline
    (["--steps", "0"], "--steps must be >= 1"),
    (["--height", "18"], "height=18 must be a positive multiple of 4"),
    (["--width", "0"], "width=0 must be a positive multiple of 4"),
    (["--guidance-interval", "0.5", "0.2"], "--guidance-interval 0.5 0.2: need 0 <= start"),
    (["--condition-annealing", "0.6", "0.9", "-1", "1"], "need 0 <= tau1 < tau2 <= 1"),
    (["--apg", "0", "0", "1"], "-1 < momentum < 1"),
    (["--apg", "0", "0", "0", "--sampler", "heun"], "--apg works with the ddim"),
])
def test_bad_input_is_one_error_line_and_no_files(pipe_dir, tmp_path, capsys, extra, match):
    out = tmp_path / "out"
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    argv = ["generate", "--model", pipe_dir, "--prompt", "x", "--out", str(out)] + extra
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and match in errors[0], err
    assert "Traceback" not in err
    assert not out.exists()


def test_error_is_the_only_stderr_line_from_a_shell(pipe_dir, tmp_path):
    out = subprocess.run([sys.executable, "-m", "jaxdiff.cli", "generate", "--model", pipe_dir,
                          "--prompt", "x", "--steps", "0", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: --steps must be >= 1, got 0."]
    assert not (tmp_path / "o").exists()


def test_long_prompt_is_truncated_with_a_warning(pipe_dir, loaded, tmp_path, monkeypatch):
    _reuse(loaded, monkeypatch)
    long = "a big red circle next to a small blue square"  # far past 14 characters
    argv = ["generate", "--model", pipe_dir, "--prompt", long, "--prompt", PROMPTS[1],
            "--batch", "2", "--max-batch", "2", "--out", str(tmp_path)] + SETTINGS
    with pytest.warns(UserWarning, match="truncated"):
        assert cli.main(argv) == 0
    img, meta = _read(tmp_path / "0000.png")
    assert meta["prompt"] == long  # metadata keeps what the user asked for


@pytest.mark.parametrize("flag,values,kwarg,key", [
    ("--condition-annealing", [0.2, 0.9, 0.5, 1.0], "condition_annealing",
     "condition_annealing"),
    ("--apg", [0.0, 0.0, -0.5], "adaptive_projection", "apg"),
])
def test_sampling_option_flag_equals_the_library(loaded, pipe_dir, tmp_path, monkeypatch,
                                                 flag, values, kwarg, key):
    """``--condition-annealing`` (CADS) and ``--apg`` reach ``generate``'s
    ``condition_annealing`` / ``adaptive_projection`` (same images, not plain CFG's) and
    are written to settings.json."""
    _reuse(loaded, monkeypatch)
    argv = ["generate", "--model", pipe_dir, "--prompt", PROMPTS[0], "--out", str(tmp_path),
            flag, *map(str, values)] + SETTINGS
    assert cli.main(argv) == 0
    pipe, params = loaded
    kw = dict(sampler="ddim", steps=2, guidance_scale=3.5, seed=7)
    want = jaxdiff.generate(pipe, params, [PROMPTS[0]], **{kwarg: values}, **kw)
    plain = jaxdiff.generate(pipe, params, [PROMPTS[0]], **kw)
    got = _read(tmp_path / "0000.png")[0]
    assert np.abs(got.astype(int) - want[0].astype(int)).max() <= 1
    assert np.abs(got.astype(int) - plain[0].astype(int)).max() > 1
    with open(tmp_path / "settings.json") as f:
        assert json.load(f)[key] == values


def test_zero_size_is_an_error_in_the_library(loaded):
    pipe, params = loaded
    with pytest.raises(ValueError, match="height=0 must be a positive multiple"):
        jaxdiff.generate(pipe, params, "x", steps=2, height=0)


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0 and "generate" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0
    for flag in ("--model", "--prompt", "--negative-prompt", "--sampler", "--steps",
                 "--guidance", "--seed", "--batch", "--height", "--width", "--dtype", "--out"):
        assert flag in text, flag
    for name in cli.generate.SAMPLER_NAMES:
        assert name in text


@pytest.fixture(scope="module")
def adapter_files(loaded, tmp_path_factory):
    """A LoRA file with non-zero adapters (rank 2, alpha 4) and a Textual Inversion file."""
    import jax
    from jaxdiff.adapters import lora as lora_lib
    from jaxdiff.adapters import textual_inversion as ti
    _, params = loaded
    lora = lora_lib.init_lora(params, 2, key=jax.random.key(0))
    lora = jax.tree.map(lambda x: x + 0.3, lora)  # up = 0.3, not 0: the adapters act
    folder = tmp_path_factory.mktemp("adapters")
    lora_file = lora_lib.save_lora(lora, str(folder / "lora"), alpha=4)
    rows = np.random.default_rng(0).normal(0, 1, (2, 32)).astype(np.float32)
    ti_file = ti.save_learned_embeds(str(folder / "ti"), "<ring>", rows)
    return lora_file, ti_file, lora


def _images(folder, n):
    return np.stack([_read(os.path.join(folder, f"{i:04d}.png"))[0] for i in range(n)])


def test_lora_scale_zero_is_the_base_model_and_scale_is_applied(
        pipe_dir, loaded, generated, adapter_files, tmp_path, monkeypatch):
    from jaxdiff.adapters import lora as lora_lib
    _reuse(loaded, monkeypatch)
    lora_file, _, lora = adapter_files
    base = _images(generated, 4)
    outs = {}
    for scale in ("0", "0.5"):
        out = str(tmp_path / scale)
        argv = ["generate", "--model", pipe_dir, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                "--batch", "2", "--max-batch", "2", "--out", out, "--lora",
                os.path.dirname(lora_file), "--lora-scale", scale] + SETTINGS
        assert cli.main(argv) == 0
        outs[scale] = _images(out, 4)
    np.testing.assert_array_equal(outs["0"], base)
    # scale 0.5 with alpha 4 / rank 2 merges 1.0 * down @ up, as the library does.
    pipe, params = loaded
    merged = lora_lib.merge_lora(params, lora, 1.0)
    want = jaxdiff.generate(pipe, merged, [PROMPTS[0]] * 2, sampler="ddim", steps=2,
                            guidance_scale=3.5, seed=7)
    assert np.abs(outs["0.5"][:2].astype(int) - want.astype(int)).max() <= 1
    assert np.abs(outs["0.5"].astype(int) - base.astype(int)).max() > 10
    with open(os.path.join(str(tmp_path / "0.5"), "settings.json")) as f:
        assert json.load(f)["lora_scale"] == 0.5


def test_textual_inversion_token_in_prompt(pipe_dir, loaded, adapter_files, tmp_path,
                                           monkeypatch):
    from jaxdiff.adapters import textual_inversion as ti
    _reuse(loaded, monkeypatch)
    _, ti_file, _ = adapter_files
    built = []
    real = cli.generate.apply_adapters
    monkeypatch.setattr(cli.generate, "apply_adapters", lambda *a: built.append(real(*a)) or built[-1])
    out = str(tmp_path / "ti")
    argv = ["generate", "--model", pipe_dir, "--prompt", "a <ring>", "--out", out,
            "--textual-inversion", ti_file] + SETTINGS
    assert cli.main(argv) == 0
    (pipe2, params2, expand), = built
    _, params = loaded
    name, rows = ti.load_learned_embeds(ti_file)
    v = len(loaded[0].tokenizer)
    table = np.asarray(ti.token_table(params2))
    np.testing.assert_array_equal(table[v:], rows)
    np.testing.assert_array_equal(table[:v], ti.token_table(params))
    assert expand("a <ring>") == "a <ring> <ring>_1"
    assert pipe2.tokenizer.convert_tokens_to_ids(["<ring>", "<ring>_1"]) == [v, v + 1]
    # Same pipeline object as the CLI's: reuses its compiled program.
    want = jaxdiff.generate(pipe2, params2, ["a <ring> <ring>_1"], sampler="ddim", steps=2,
                            guidance_scale=3.5, seed=7)
    img, meta = _read(os.path.join(out, "0000.png"))
    assert meta["prompt"] == "a <ring>"
    assert np.abs(img.astype(int) - want[0].astype(int)).max() <= 1


@pytest.mark.parametrize("flag,make,match", [
    ("--lora", "garbage", "not a readable safetensors file"),
    ("--lora", "ti", "is not a diffusers/peft key"),
    ("--lora", "missing", "no such LoRA file or directory"),
    ("--textual-inversion", "lora", "expected one tensor"),
    ("--textual-inversion", "existing", "already exist"),
])
def test_bad_adapter_file_is_one_error_line(pipe_dir, loaded, adapter_files, tmp_path, capsys,
                                            monkeypatch, flag, make, match):
    from jaxdiff.adapters import textual_inversion as ti
    _reuse(loaded, monkeypatch)
    lora_file, ti_file, _ = adapter_files
    path = {"lora": lora_file, "ti": ti_file, "missing": str(tmp_path / "nope"),
            "garbage": str(tmp_path / "x.safetensors")}.get(make)
    if make == "garbage":
        (tmp_path / "x.safetensors").write_bytes(b"\x00" * 64)
    if make == "existing":  # a placeholder that already is a word of the vocabulary
        path = ti.save_learned_embeds(str(tmp_path / "e.safetensors"), "a",
                                      np.zeros((1, 32), np.float32))
    out = tmp_path / "out"
    argv = ["generate", "--model", pipe_dir, "--prompt", "x", "--out", str(out), flag, path]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and match in errors[0], err
    assert "Traceback" not in err and not out.exists()


def test_repeated_lora_flags_equal_load_lora_in_sequence(pipe_dir, loaded, adapter_files,
                                                         tmp_path, monkeypatch, capsys):
    """``--lora A --lora B --lora-scale 0.5 --lora-scale -0.8`` runs the params of
    ``jaxdiff.load_lora`` called for A at 0.5, then for B at -0.8 (each times its own
    alpha / rank: A rank 2 alpha 4, B rank 1 alpha 3, B on the text encoder too), and
    writes the images the library makes with them; mismatched counts are one error line
    before the model is even loaded."""
    import jax
    from jaxdiff.adapters import lora as lora_lib
    _reuse(loaded, monkeypatch)
    pipe, params = loaded
    file_a = adapter_files[0]
    key = jax.random.key(1)
    second = {**lora_lib.init_lora(params, 1, key=key),
              **lora_lib.init_lora(params, 1, key=key, scope="text_encoder")}
    second = jax.tree.map(lambda v: v + 0.2 * jax.random.normal(key, v.shape), second)
    file_b = lora_lib.save_lora(second, str(tmp_path / "b"), alpha=3)
    built = []
    real = cli.generate.apply_adapters
    monkeypatch.setattr(cli.generate, "apply_adapters",
                        lambda *a: built.append(real(*a)) or built[-1])
    out = str(tmp_path / "two")
    argv = ["generate", "--model", pipe_dir, "--prompt", PROMPTS[0], "--batch", "2",
            "--max-batch", "2", "--out", out, "--lora", file_a, "--lora", file_b,
            "--lora-scale", "0.5", "--lora-scale", "-0.8"] + SETTINGS
    assert cli.main(argv) == 0
    (_, got, _), = built
    only_a = jaxdiff.load_lora(pipe, params, file_a, 0.5)
    want = jaxdiff.load_lora(pipe, only_a, file_b, -0.8)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=0, atol=1e-6), got, want)
    for scope in ("unet", "text_encoder"):  # B acts on both, on top of A
        assert max(float(np.abs(np.asarray(w) - np.asarray(a)).max()) for w, a in zip(
            jax.tree.leaves(want[scope]), jax.tree.leaves(only_a[scope]))) > 1e-3, scope
    images = jaxdiff.generate(pipe, want, [PROMPTS[0]] * 2, sampler="ddim", steps=2,
                              guidance_scale=3.5, seed=7)
    assert np.abs(_images(out, 2).astype(int) - images.astype(int)).max() <= 1
    with open(os.path.join(out, "settings.json")) as f:
        settings = json.load(f)
    assert settings["lora"] == [file_a, file_b] and settings["lora_scale"] == [0.5, -0.8]

    def no_load(*a, **kw):
        raise AssertionError("the model was loaded before the flags were checked")
    monkeypatch.setattr(cli.generate, "load_pipeline", no_load)
    capsys.readouterr()  # the progress bar of the run above
    for flags, says in (
            (["--lora", file_a, "--lora", file_b] + ["--lora-scale", "1"] * 3,
             "--lora-scale given 3 times for 2 --lora files"),
            (["--lora-scale", "0.5"], "--lora-scale needs --lora")):
        bad = tmp_path / "bad"
        assert cli.main(["generate", "--model", pipe_dir, "--prompt", "x", "--out", str(bad)]
                        + flags) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and says in err, err
        assert not bad.exists()


def test_peft_lora_for_another_model_is_one_line_naming_file_and_module(
        pipe_dir, loaded, adapter_files, tmp_path, capsys, monkeypatch):
    """A diffusers/peft LoRA file that does not fit (issue #15 point 6): a wider layer (a
    LoRA for another base), a module this model lacks (an SDXL second-encoder module on SD
    1.x), lora_A without its lora_B, lora_A / lora_B of different ranks: each one
    ``error:`` line naming the file and the module as the file names it, nothing written."""
    from safetensors.numpy import save_file
    from jaxdiff.adapters import lora as lora_lib
    _reuse(loaded, monkeypatch)
    state = lora_lib.to_state_dict(adapter_files[2])
    key = sorted(k for k in state if ".attn2.to_k.lora_A" in k)[0]
    module = key[:-len(".lora_A.weight")]
    te2 = "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"
    a, b = state[key], state[module + ".lora_B.weight"]
    cases = [
        ({key: np.zeros((a.shape[0], a.shape[1] + 8), np.float32)}, module, "gives a"),
        ({te2 + ".lora_A.weight": a, te2 + ".lora_B.weight": b}, te2, "no Dense kernel"),
        ({te2 + ".lora_A.weight": a}, te2, "lacks a 'down' or 'up'"),
        ({module + ".lora_B.weight": np.zeros((b.shape[0], a.shape[0] + 1), np.float32)},
         module, "rank 2 but its 'up' matrix 3")]
    for i, (change, name, says) in enumerate(cases):
        path = str(tmp_path / f"bad{i}.safetensors")
        save_file(dict(state, **change), path)
        out = tmp_path / "out"
        argv = ["generate", "--model", pipe_dir, "--prompt", "x", "--out", str(out), "--lora",
                path]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and says in errors[0], err
        assert path in errors[0] and f"'{name}'" in errors[0], errors[0]
        assert "Traceback" not in err and not out.exists()
