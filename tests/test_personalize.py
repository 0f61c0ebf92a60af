"""DreamBooth (prior preservation, LoRA mode, class-image cache) and Textual Inversion
training: defining properties of the loss, what trains, and the entrypoints end to end
(their exports, loaded in diffusers PyTorch, compute what jaxdiff does)."""
import dataclasses
import json
import os
import shlex
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from PIL import Image

import jaxdiff
from jaxdiff.adapters import lora as lora_lib
from jaxdiff.training import class_images as class_lib
from jaxdiff.training import dreambooth as db
from jaxdiff.training import recipes
from torchref import models as ref
from torchref.scripts import load_script
from jaxdiff.training import state as state_lib
from jaxdiff.training.step import make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    """Four 16x16 images of a 'new subject' (a ring) plus one 24x20 image (mixed sizes)."""
    folder = tmp_path_factory.mktemp("subject")
    yy, xx = np.mgrid[:16, :16]
    for i in range(4):
        r = np.hypot(yy - 7.5 - (i % 2), xx - 7.5)
        img = np.full((16, 16, 3), 255, np.uint8)
        img[(r > 3 + i % 2) & (r < 6)] = [(200, 30, 30), (30, 30, 200), (30, 160, 30),
                                           (220, 180, 20)][i]
        Image.fromarray(img).save(folder / f"{i}.png")
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(folder / "odd.jpg")
    return str(folder)


def _batch(pipe, params, class_latents, weight, b=2):
    ctx = np.asarray(pipe.encode_text(params, pipe.tokenize(["sks o", "o"])))
    inst = np.asarray(jax.random.normal(jax.random.key(1), (b, 8, 8, 4)))
    return {"instance_latents": inst, "instance_text": np.repeat(ctx[:1], b, 0),
            "class_latents": class_latents, "class_text": np.repeat(ctx[1:], b, 0),
            "prior_weight": np.full((b,), weight, np.float32)}


def test_prior_weight_is_traced_and_weights_only_the_class_term(micro):
    _, pipe, params = micro
    tr = db.make_trainable(params)
    traces = []

    def counted(p, batch, rng):
        traces.append(1)
        return loss(p, batch, rng)

    loss = db.make_dreambooth_loss(pipe, tr.merge, train_text_encoder=False,
                                   prior_preservation=True)
    value_and_grad = jax.jit(jax.value_and_grad(counted))
    rng = jax.random.key(0)
    cls_a = np.asarray(jax.random.normal(jax.random.key(2), (2, 8, 8, 4)))
    cls_b = cls_a[::-1] * 0.5 + 1.0
    out = {(w, name): value_and_grad(tr.params, _batch(pipe, params, c, w), rng)
           for w in (0.0, 1.0, 2.0) for name, c in (("a", cls_a), ("b", cls_b))}
    assert len(traces) == 1  # lambda is data: one trace for every value
    same = lambda x, y: jax.tree.all(jax.tree.map(lambda u, v: bool(np.array_equal(u, v)), x, y))
    assert same(out[0.0, "a"], out[0.0, "b"])        # lambda = 0: class rows irrelevant
    assert not same(out[1.0, "a"][1], out[1.0, "b"][1])
    l0, l1, l2 = (float(out[w, "a"][0]) for w in (0.0, 1.0, 2.0))
    assert l1 - l0 > 1e-3
    np.testing.assert_allclose(l2 - l1, l1 - l0, rtol=1e-4)  # L = L_inst + lambda * L_class


def _old_batch_fn(latents, texts, batch_size, seed, prior_loss_weight):
    """``train_dreambooth``'s batch function before per-image prompts, verbatim (one
    prompt per key, repeated over the rows): the behaviour a single prompt must keep."""
    from jaxdiff.training.batching import host_slice, stream_indices

    def batch_fn(s):
        out = {}
        for i, name in enumerate(latents):
            idx = host_slice(stream_indices(len(latents[name]), batch_size, s, seed + i))
            out[f"{name}_latents"] = latents[name][idx]
            out[f"{name}_text"] = jax.tree.map(lambda v: np.repeat(v, len(idx), axis=0),
                                               texts[name])
        if "class" in latents:
            out["prior_weight"] = np.full((len(idx),), prior_loss_weight, np.float32)
        return out

    return batch_fn


def test_per_image_instance_prompts_pair_each_row_with_its_image(micro, tmp_path):
    """Per-image captions: every instance row of every batch carries the prompt of the image
    its latent came from (found by the latent's content; the prompt's embedding computed
    alone), class rows the class prompt; a single prompt gives exactly the old batches."""
    _, pipe, params = micro
    prompts = ["sks o", "a sks x", "sks b", "o sks", "x a sks"]
    rng = np.random.default_rng(0)
    lat = {"instance": rng.normal(size=(5, 8, 8, 4)).astype(np.float32),
           "class": rng.normal(size=(3, 8, 8, 4)).astype(np.float32)}
    encode = jax.jit(pipe.encode_text)
    alone = {p: np.asarray(encode(params, pipe.tokenize([p])))[0] for p in prompts + ["o"]}
    embeds = list(alone.values())
    assert min(np.abs(a - b).max() for i, a in enumerate(embeds) for b in embeds[i + 1:]) > 1e-2
    for train_text in (True, False):     # token ids / cached embeddings (kept below)
        texts = {"instance": db.encode_prompts(pipe, params, prompts, train_text),
                 "class": db.encode_prompts(pipe, params, ["o"], train_text)}
        want = ((lambda p: pipe.tokenize([p])[0]) if train_text else alone.get)
        batch_fn = db.make_batch_fn(lat, texts, batch_size=4, seed=3, prior_loss_weight=0.5,
                                    paired=("instance",))
        seen = []
        for s in range(3):                # 12 rows: every image at least twice
            b = batch_fn(s)
            for x, t in zip(b["instance_latents"], b["instance_text"]):
                (i,) = [k for k in range(5) if np.array_equal(lat["instance"][k], x)]
                np.testing.assert_allclose(t, want(prompts[i]), atol=1e-5, rtol=0)
                seen.append(i)
            for t in b["class_text"]:
                np.testing.assert_allclose(t, want("o"), atol=1e-5, rtol=0)
            np.testing.assert_array_equal(b["prior_weight"], np.full(4, 0.5, np.float32))
        assert sorted(set(seen)) == list(range(5))
    single = {"instance": texts["instance"][:1], "class": texts["class"]}  # one prompt each
    new = db.make_batch_fn(lat, single, batch_size=4, seed=3, prior_loss_weight=0.5)
    old = _old_batch_fn(lat, single, 4, 3, 0.5)
    for s in range(3):
        got, ref_batch = new(s), old(s)
        assert got.keys() == ref_batch.keys()
        for k in got:
            assert got[k].dtype == ref_batch[k].dtype and np.array_equal(got[k], ref_batch[k])
    with pytest.raises(ValueError, match="^instance_prompt: 2 prompts for 5 instance images; "
                       "give one per image, or one string for all.$"):
        db.train_dreambooth(pipe, params, np.zeros((5, 16, 16, 3), np.uint8),
                            str(tmp_path / "w"), instance_prompt=["sks o", "sks x"], steps=1,
                            batch_size=1, lr=1e-3)
    assert not (tmp_path / "w").exists()


def _primitives(jaxpr, out=None):
    """Every equation of a jaxpr, sub-jaxprs included: (primitive name, input dtypes)."""
    out = [] if out is None else out
    for e in jaxpr.eqns:
        out.append((e.primitive.name, {str(v.aval.dtype) for v in e.invars
                                       if hasattr(v.aval, "dtype")}))
        for sub in jax.extend.core.jaxprs_in_params(e.params):
            _primitives(sub, out)
    return out


def test_compute_dtype_and_remat_reach_the_unet_blocks_of_the_step(micro):
    """configs/dreambooth.py's dtype / remat (``compute_pipe``): in the loss
    ``train_dreambooth`` differentiates, each UNet resnet / transformer block is one
    ``jax.checkpoint`` (recomputed in the backward pass; none without remat) and the UNet's
    matmuls and convolutions take bf16 operands (float32 without)."""
    _, pipe, params = micro
    tr = db.make_trainable(params)
    ctx = np.zeros((2, 7, pipe.unet.config.cross_attention_dim), np.float32)
    lat = np.zeros((2, 8, 8, 4), np.float32)
    batch = {"instance_latents": lat, "instance_text": ctx, "class_latents": lat,
             "class_text": ctx, "prior_weight": np.ones((2,), np.float32)}
    found = {}
    for dtype, remat in (("float32", False), ("bfloat16", True)):
        loss = db.make_dreambooth_loss(db.compute_pipe(pipe, dtype, remat), tr.merge,
                                       train_text_encoder=False, prior_preservation=True)
        found[dtype] = _primitives(jax.make_jaxpr(loss)(tr.params, batch,
                                                        jax.random.key(0)).jaxpr)
    blocks = sum(st["num_resnets"] * (2 if st["cross"] else 1) for st in pipe.unet.plan()
                 if st["resample"] != "mid") + 3          # + the mid block's 2 resnets + 1
    is_remat = lambda n: n in ("checkpoint", "remat2")
    assert sum(is_remat(n) for n, _ in found["bfloat16"]) == blocks
    assert not any(is_remat(n) for n, _ in found["float32"])
    for dtype, eqns in found.items():
        dots = [d for n, d in eqns if n in ("dot_general", "conv_general_dilated")]
        assert dots and all(d == {dtype} for d in dots)
    with pytest.raises(ValueError, match="dtype='float16' must be 'float32' or 'bfloat16'"):
        db.compute_pipe(pipe, "float16")


def test_lora_mode_trains_only_adapters(micro):
    _, pipe, params = micro
    tr = db.make_trainable(params, lora_rank=2, train_text_encoder=True)
    assert set(tr.params) == {"unet", "text_encoder"}
    names = {p[-2] for p in traverse_util.flatten_dict(tr.params)}
    assert names == {"to_q", "to_k", "to_v", "to_out_0", "q_proj", "k_proj", "v_proj",
                     "out_proj"}
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), tr.merge(tr.params), params)
    assert jax.tree.all(same)  # fresh adapters (up = 0) leave the model unchanged
    opt = optax.adam(1e-2)
    state = state_lib.create(tr.params, opt, ema=False)
    sizes = {x.size for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0}
    adapter_sizes = {x.size for x in jax.tree.leaves(tr.params)}
    assert sizes == adapter_sizes  # the optimizer holds adapter-shaped moments only
    loss = db.make_dreambooth_loss(pipe, tr.merge, train_text_encoder=True,
                                   prior_preservation=False)
    ids = pipe.tokenize(["sks o"] * 2)
    batch = {"instance_latents": np.ones((2, 8, 8, 4), np.float32), "instance_text": ids}
    new, _ = jax.jit(make_train_step(loss, opt))(state, batch)
    merged = tr.merge(new.params)
    assert not np.array_equal(merged["unet"]["conv_in"]["kernel"], 0) and jax.tree.all(
        jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), merged["vae"], params["vae"]))
    q = ("text_model", "encoder", "layers_0", "self_attn", "q_proj", "kernel")
    flat_m, flat_p = (traverse_util.flatten_dict(t["text_encoder"]) for t in (merged, params))
    assert not np.array_equal(flat_m[q], flat_p[q])  # the text-encoder adapters trained
    np.testing.assert_array_equal(flat_m[("text_model", "final_layer_norm", "scale")],
                                  flat_p[("text_model", "final_layer_norm", "scale")])


def test_class_images_are_cached_by_model_prompt_count_and_settings(micro, tmp_path):
    _, pipe, params = micro
    settings = dict(steps=2)
    imgs, folder, generated = class_lib.class_images(pipe, params, "o", 2, str(tmp_path),
                                                     settings=settings)
    assert generated and imgs.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(
        imgs, jaxdiff.generate(pipe, params, ["o"] * 2, None, "dpmpp_2m", 2, 5.0, 0))
    again, folder2, generated2 = class_lib.class_images(pipe, params, "o", 2, str(tmp_path),
                                                        settings=settings)
    assert not generated2 and folder2 == folder and np.array_equal(again, imgs)
    with open(os.path.join(folder, "meta.json")) as f:
        assert json.load(f)["class_prompt"] == "o"
    changed = dict(params, unet=jax.tree.map(lambda x: x * 1.01, params["unet"]))
    key = lambda p, prompt="o", n=2, s=None: class_lib.cache_key(
        class_lib.params_digest(p), prompt, n, dict(class_lib.DEFAULT_SETTINGS, **(s or {})),
        (16, 16))
    base = key(params, s=settings)
    assert len({base, key(changed, s=settings), key(params, "x", s=settings),
                key(params, n=3, s=settings), key(params, s=dict(steps=3))}) == 5
    with pytest.raises(ValueError, match="unknown class-image settings"):
        class_lib.class_images(pipe, params, "o", 1, str(tmp_path), settings={"cfg": 1})


def _config(name, variant):
    return load_script("configs", name).get_config(variant)


def _run(script, args, timeout=900):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".jax_cache"))
    return subprocess.run([sys.executable, os.path.join(ROOT, "train", script)] + args,
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)


def test_dreambooth_entrypoint_end_to_end(micro, subject, tmp_path, torch, capsys):
    folder, pipe, params = micro
    cache = str(tmp_path / "cache")
    common = ["--config", "configs/dreambooth.py:tiny", f"--config.model={folder}",
              f"--config.instance_dir={subject}", "--config.instance_prompt=sks o",
              "--config.class_prompt=o", f"--config.class_cache_dir={cache}"]
    work = str(tmp_path / "db")
    r = _run("dreambooth.py", common + ["--workdir", work])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "generated 2 class images" in r.stdout
    with open(os.path.join(work, "log.jsonl")) as f:
        logs = [json.loads(line) for line in f]
    assert [m["step"] for m in logs] == [1, 2] and all(np.isfinite(m["loss"]) for m in logs)
    assert os.path.isfile(os.path.join(work, "samples", "step_000002.png"))
    _, trained = jaxdiff.load_pipeline(os.path.join(work, "export"))
    assert not np.array_equal(trained["unet"]["conv_in"]["kernel"],
                              params["unet"]["conv_in"]["kernel"])
    np.testing.assert_array_equal(trained["vae"]["encoder"]["conv_in"]["kernel"],
                                  params["vae"]["encoder"]["conv_in"]["kernel"])
    from diffusers import StableDiffusionPipeline
    tp = StableDiffusionPipeline.from_pretrained(os.path.join(work, "export"))
    out = tp("sks o", num_inference_steps=2, output_type="np").images
    assert out.shape == (1, 16, 16, 3) and np.isfinite(out).all()
    # diffusers' UNet from the export computes what jaxdiff's trained UNet does.
    got, want = ref.unet_outputs(tp.unet, pipe.unet, trained["unet"])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # A second experiment with the same class prompt reuses the cached class images; LoRA
    # mode exports only the adapters (UNet and, the config's default, text encoder), which
    # diffusers loads. (In-process: same recipe.)
    config = _config("dreambooth", "tiny")
    # lr 0.1 so that one step moves the adapters measurably; alpha 8 (scale 4, not the
    # default 1) so that the file's alpha metadata must reach diffusers; the step in bf16
    # with remat (the memory plan's settings: config to train step).
    config.update(model=folder, instance_dir=subject, instance_prompt="sks o", class_prompt="o",
                  class_cache_dir=cache, lora_rank=2, lora_alpha=8.0, lr=0.1, sample_every=0,
                  steps=1, dtype="bfloat16", remat=True)
    work2 = str(tmp_path / "db_lora")
    lora_file = recipes.run_dreambooth(config, work2)
    assert "reused 2 class images" in capsys.readouterr().out
    assert lora_file == os.path.join(work2, "export", lora_lib.WEIGHT_NAME)
    assert os.listdir(os.path.join(work2, "export")) == [lora_lib.WEIGHT_NAME]
    # diffusers' UNet with the LoRA file loaded computes jaxdiff's UNet with the same
    # adapters merged at scale alpha / rank; the adapters change the output well beyond that.
    lora, alpha = lora_lib.load_lora(lora_file)
    assert alpha == 8.0 and lora_lib.lora_rank(lora) == 2
    assert set(lora) == {"unet", "text_encoder"}
    merged = lora_lib.merge_lora(params, lora, lora_lib.lora_scale(alpha, 2))
    tp = StableDiffusionPipeline.from_pretrained(folder)
    base, want_base = ref.unet_outputs(tp.unet, pipe.unet, params["unet"])
    tp.load_lora_weights(lora_file)
    got, want = ref.unet_outputs(tp.unet, pipe.unet, merged["unet"])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(base, want_base, atol=1e-4, rtol=0)
    assert np.abs(want - want_base).max() > 1e-3  # 10x the tolerance
    ids = pipe.tokenize(["sks o"])
    with torch.no_grad():
        want_text = tp.text_encoder(torch.from_numpy(ids.astype(np.int64)))[0].numpy()
    np.testing.assert_allclose(pipe.encode_text(merged, ids), want_text, atol=1e-4, rtol=0)
    assert np.abs(want_text - np.asarray(pipe.encode_text(params, ids))).max() > 1e-3
    # Bad input: one line naming the folder.
    config.instance_dir = str(tmp_path / "none")
    with pytest.raises(ValueError) as e:
        recipes.run_dreambooth(config, str(tmp_path / "bad"))
    assert str(e.value) == (f"{tmp_path / 'none'}: instance image folder not found; pass the "
                            "folder that holds your subject's images.")

def test_textual_inversion_entrypoint_end_to_end(micro, subject, tmp_path, torch):
    from jaxdiff.adapters import textual_inversion as ti
    folder, pipe, params = micro
    work = str(tmp_path / "ti")
    r = _run("textual_inversion.py", [
        "--config", "configs/textual_inversion.py:tiny", "--workdir", work,
        f"--config.model={folder}", f"--config.instance_dir={subject}",
        "--config.placeholder_token=<ring>", "--config.initializer_token=o",
        "--config.num_vectors=2", "--config.lr=0.1"])
    assert r.returncode == 0, r.stderr[-3000:]
    file = os.path.join(work, "export", ti.WEIGHT_NAME)
    name, rows = ti.load_learned_embeds(file)
    assert name == "<ring>" and rows.shape == (2, 32)
    tok = ti.add_tokens(pipe.tokenizer, "<ring>", 2)
    init = ti.init_embeddings(params, tok, "o", 2)
    assert np.abs(np.asarray(rows) - np.asarray(init)).min() > 1e-3  # both vectors trained
    assert os.path.isfile(os.path.join(work, "samples", "step_000002.png"))
    from diffusers import StableDiffusionPipeline
    tp = StableDiffusionPipeline.from_pretrained(folder)
    tp.load_textual_inversion(file)
    with torch.no_grad():
        want = tp.encode_prompt(["a <ring>"], "cpu", 1, False)[0].numpy()
    ids = dataclasses.replace(pipe, tokenizer=tok).tokenize([ti.expand_prompt("a <ring>",
                                                                              "<ring>", 2)])
    got = jax.jit(lambda p, r: ti.encode_text(pipe, p, r, ids))(params, rows)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_textual_inversion_refuses_an_existing_token(micro, subject, tmp_path):
    folder, _, _ = micro
    config = _config("textual_inversion", "tiny")
    config.update(model=folder, instance_dir=subject, placeholder_token="o")
    with pytest.raises(ValueError, match=r"placeholder token\(s\) \['o'\] already exist") as e:
        recipes.run_textual_inversion(config, str(tmp_path / "w"))
    assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "w")


def _readme_command(comment):
    """The README command under ``# <comment>...`` (continuation lines joined)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# " + comment))
    cmd = []
    for line in lines[start + 1:]:
        cmd.append(line.rstrip("\\").strip())
        if not line.endswith("\\"):
            break
    return " ".join(cmd)


def test_readme_textual_inversion_command_with_tuple_templates(micro, subject, tmp_path):
    """The README's Textual Inversion command, tuple ``--config.templates='(...)'`` and
    shell quoting as shown, run smoke-sized: the templates reach the run (they are the
    prompts of its sample grid)."""
    folder, _, _ = micro
    cmd = _readme_command("Textual Inversion")
    assert "--config.templates='(" in cmd, cmd
    cmd = cmd.replace(".venv/bin/python", shlex.quote(sys.executable)).replace(
        "configs/textual_inversion.py ", "configs/textual_inversion.py:tiny ")
    work = str(tmp_path / "ti")
    cmd += " " + " ".join(shlex.quote(a) for a in [
        "--workdir", work, f"--config.model={folder}", f"--config.instance_dir={subject}",
        "--config.initializer_token=o", "--config.steps=1", "--config.sample_every=1"])
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".jax_cache"))
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.isfile(os.path.join(work, "export", "learned_embeds.safetensors"))
    grid = Image.open(os.path.join(work, "samples", "step_000001.png"))
    assert grid.text["prompts"] == "a <ring> | a photo of a <ring>"


def test_target_follows_the_scheduler_prediction_type(micro):
    """A UNet that outputs 0 on x0 = 0 latents: the epsilon loss is E[eps^2] ~ 1, the
    v-prediction loss E[alpha_bar_t * eps^2] (v = sqrt(a) eps - sqrt(1 - a) x0) is smaller."""
    _, pipe, params = micro
    flat = traverse_util.flatten_dict(params["unet"])
    flat = {k: (jnp.zeros_like(v) if k[0] == "conv_out" else v) for k, v in flat.items()}
    zero = dict(params, unet=traverse_util.unflatten_dict(flat))
    batch = _batch(pipe, zero, np.zeros((2, 8, 8, 4), np.float32), 1.0)
    batch["instance_latents"] = np.zeros_like(batch["instance_latents"])
    out = {}
    for kind in ("epsilon", "v_prediction"):
        p = dataclasses.replace(pipe, scheduler=dataclasses.replace(pipe.scheduler,
                                                                    prediction_type=kind))
        loss = db.make_dreambooth_loss(p, lambda tr: dict(zero, **tr), train_text_encoder=False,
                                       prior_preservation=True)
        out[kind] = float(jax.jit(loss)({"unet": zero["unet"]}, batch, jax.random.key(3)))
    assert abs(out["epsilon"] / 2 - 1) < 0.1            # two terms (lambda = 1), each ~1
    assert out["v_prediction"] < 0.9 * out["epsilon"]
