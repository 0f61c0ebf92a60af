"""Floors for the shipped embedded model: what the README says it does, on fixed inputs.

The README's figures come from ``bench/quality.py`` at 200 + 100 prompts; these tests
check the same quantities at a smaller, fixed size with margins for that sample's error,
so a regression of the shipped weights (or of the code that samples them) fails here.
"""
import jax
import numpy as np
import pytest

import jaxdiff
from jaxdiff.data.shapes import WorldSpec, held_out_examples
from jaxdiff.eval import generation as gen

pytestmark = pytest.mark.slow

# bench/quality.py's defaults: DPM-Solver++ 2M, 20 steps, guidance 5, seed 0.
SETTINGS = dict(sampler="dpmpp_2m", steps=20, guidance_scale=5.0, seed=0)


@pytest.fixture(scope="module")
def spec(embedded):
    pipe, _ = embedded
    return WorldSpec(image_size=pipe.image_size)


def test_one_object_prompts_are_right(embedded, spec):
    """README: 90.5 % of one-object prompts with every attribute right (200 prompts).
    Floor: 85 % on 48 fixed held-out prompts."""
    pipe, params = embedded
    cases = gen.prompt_set(spec, num_one=48, num_two=0)
    images = jaxdiff.generate(pipe, params, [c.prompt for c in cases], **SETTINGS)
    scores = gen.score_images(images, cases, spec)
    print(scores)
    assert scores["all"] >= 0.85, scores


def test_vae_reconstructs_held_out_images(embedded, spec):
    """README: 31.5 dB on held-out world images. Floor: 30 dB mean on 32 of them."""
    pipe, params = embedded
    images = np.stack([ex["image"] for ex in held_out_examples(spec, 32)])
    result = gen.vae_psnr(pipe, params, images)
    print(result)
    assert result["mean_db"] >= 30.0, result


def test_embedded_text_dit_loads_and_generates(embedded):
    """``embedded:dit`` (jaxdiff/assets/shapes_dit): a text-DiT pipeline on the default
    model's VAE, text encoder and tokenizer (bit for bit), generating at its native size
    through the same ``generate`` (2 DPM-Solver++ steps: one compile). Its accuracy is a
    bench figure (bench/README.md, "Backbones trained on the shapes world"), not a floor."""
    pipe, params = jaxdiff.load_pipeline("embedded:dit")
    base, base_params = embedded
    assert pipe.is_transformer and not base.is_transformer
    assert pipe.vae.config.scaling_factor == base.vae.config.scaling_factor
    for kind in ("vae", "text_encoder"):
        for a, b in zip(jax.tree.leaves(params[kind]), jax.tree.leaves(base_params[kind])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    images = jaxdiff.generate(pipe, params, ["a big red circle", "a small blue square"],
                              sampler="dpmpp_2m", steps=2, guidance_scale=5.0, seed=0)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    assert images[0].std() > 0
