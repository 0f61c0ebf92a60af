"""Floors for the shipped InstructPix2Pix model of the embedded default
(``jaxdiff/assets/shapes_instruct``, issue #16).

The README's figures come from ``bench/instruct_quality.py --methods instruct_pix2pix``
(100 held-out triples per edit kind, s_T 3, s_I 3, 20 Euler ancestral steps); this test
scores the same quantities with the bench's own code on fewer fixed triples, with margins
for that sample's error, so a regression of the shipped weights (or of the code that
samples them) fails here.
"""
import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

import jaxdiff
from jaxdiff.data import instructions, shapes
from jaxdiff.editing import instruct_pix2pix
from jaxdiff.weights.diffusers_format import DEFAULT_MODEL, INSTRUCT_MODEL

pytestmark = pytest.mark.slow

NUM = 16  # held-out triples per kind


def test_shipped_instruct_model_is_a_small_float16_pipeline():
    """A diffusers StableDiffusionInstructPix2PixPipeline folder: 8-channel UNet, float16
    tensors, the VAE of the model it was trained from (``candidates/shapes_v2_focus``,
    frozen by the recipe, so its weights rounded), whose encoder the embedded model keeps
    (``configs/shapes.py:v2_sharp`` fine-tuned only the embedded model's decoder)."""
    with open(os.path.join(INSTRUCT_MODEL, "model_index.json")) as f:
        assert json.load(f)["_class_name"] == "StableDiffusionInstructPix2PixPipeline"
    with open(os.path.join(INSTRUCT_MODEL, "unet", "config.json")) as f:
        assert json.load(f)["in_channels"] == 8
    total = 0
    for kind, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        path = os.path.join(INSTRUCT_MODEL, kind, name + ".safetensors")
        tensors = load_file(path)
        assert {v.dtype for v in tensors.values()} == {np.dtype(np.float16)}, kind
        total += os.path.getsize(path)
        if kind == "vae":
            repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            focus = load_file(os.path.join(repo, "candidates", "shapes_v2_focus", kind,
                                           name + ".safetensors"))
            base = load_file(os.path.join(DEFAULT_MODEL, kind, name + ".safetensors"))
            assert set(tensors) == set(focus) == set(base)
            for k, v in focus.items():
                np.testing.assert_array_equal(tensors[k], v.astype(np.float16), err_msg=k)
                if k.startswith(("encoder.", "quant_conv.")):   # one latent space
                    np.testing.assert_array_equal(tensors[k], base[k], err_msg=k)
    assert total < 4.5 * 2 ** 20, total


@pytest.fixture(scope="module")
def bench():
    from torchref.scripts import load_script
    return load_script("bench", "instruct_quality")


def test_shipped_instruct_model_edits_by_instruction(bench):
    """README (100 triples per kind, s_T 3, s_I 3): success colour / shape / size /
    position / background 0.90 / 0.92 / 0.95 / 0.93 / 0.94, kept at 31-37 dB (background
    edits keep the objects at 21.0 dB; the autoencoder's own ceiling is 21.3). Floors on 16
    fixed held-out triples per kind, all kinds in one program (measured success 1.0 /
    0.875 / 0.94 / 0.875 / 1.0, 0.94 over all 80; attribute >= 0.94; kept 32.2 / 32.1 /
    35.3 / 35.0 / 21.5 dB; the model before: 0.95 overall, the one before that 0.89):
    success >= 0.9 over all and >= 0.75 per kind, the instructed attribute >= 0.9 per
    kind, kept >= 29 dB (background edits >= 20 dB)."""
    pipe, params = jaxdiff.load_pipeline(INSTRUCT_MODEL)
    spec = shapes.world("v1", image_size=pipe.image_size)
    rows = [(kind, *bench.kind_data(spec, kind, NUM)) for kind in instructions.KINDS]
    sources = np.concatenate([r[2] for r in rows])
    texts = [t.instruction for r in rows for t in r[1]]
    edited = np.asarray(instruct_pix2pix.edit(pipe, params, sources, texts, steps=20,
                                              text_guidance=3.0, image_guidance=3.0, seed=0,
                                              sampler="euler_a"))
    scores = {kind: bench.score(spec, ts, src, gt, regions, edited[i * NUM:(i + 1) * NUM])
              for i, (kind, ts, src, gt, regions) in enumerate(rows)}
    print({k: (v["success"], v["attribute"], v["psnr_preserved_db"]) for k, v in scores.items()})
    overall = np.mean([v["success"] for v in scores.values()])
    assert overall >= 0.9, scores
    for kind, v in scores.items():
        assert v["success"] >= 0.75 and v["attribute"] >= 0.9, (kind, v)
        assert v["psnr_preserved_db"] >= (20.0 if kind == "background" else 29.0), (kind, v)
