"""Imagic and UniTune on the embedded model and held-out world images: fine-tuning on the
image makes the model reconstruct it better than the base model (eta = 0 for Imagic, the
token prompt for UniTune), rows of a batch are independent, traced values never recompile.

Every call shares one compiled program (2 images, 2 variants, tiny stage sizes): UniTune
runs on Imagic's program with the embedding stage's learning rate at 0.
"""
import numpy as np
import pytest

from jaxdiff.data import WorldSpec, held_out_examples
from jaxdiff.editing import imagic, unitune
from jaxdiff.pipeline import from_uint8

STAGES = imagic.Stages(embedding_steps=20, finetune_steps=40, lora_rank=4, draws=4)
STEPS = 10
LR = 3e-3


@pytest.fixture(scope="module")
def world(embedded):
    pipe, params = embedded
    ex = held_out_examples(WorldSpec(image_size=pipe.image_size), 2, num_objects=1)
    images = from_uint8(np.stack([e["image"] for e in ex]))
    captions = [e["caption"] for e in ex]
    run = lambda fn, x, prompts, **kw: {k: np.asarray(v) for k, v in fn(
        pipe, params, x, prompts, stages=STAGES, steps=STEPS, seed=3, **kw).items()}
    tuned = run(imagic.imagic, images, captions, etas=(0.0, 1.0), finetune_lr=LR)
    program = imagic._compiled(pipe, STEPS, STAGES, imagic.batch_inputs.edit_mesh(None))
    return dict(pipe=pipe, images=np.asarray(images), captions=captions, run=run,
                tuned=tuned, program=program, compiles=program._cache_size())


def _mse(edited, images):
    return ((edited - images) ** 2).mean(axis=(-3, -2, -1))


def test_imagic_eta0_finetuned_reconstructs_better_than_base(world):
    x, tuned = world["images"], world["tuned"]
    base = world["run"](imagic.imagic, x, world["captions"], etas=(0.0, 1.0), finetune_lr=0.0)
    np.testing.assert_array_equal(base["optimized_embedding"], tuned["optimized_embedding"])
    ft, bs = _mse(tuned["edited"][:, 0], x), _mse(base["edited"][:, 0], x)
    assert np.all(ft < 0.7 * bs), (ft, bs)
    # Stage (a) lowered its loss; stage (b) too, below where the base model stays.
    assert tuned["embedding_loss"][:, -5:].mean() < tuned["embedding_loss"][:, :5].mean()
    assert tuned["finetune_loss"][:, -10:].mean() < base["finetune_loss"][:, -10:].mean()
    # eta moves the sample away from the reconstruction (toward the target text).
    assert np.all(_mse(tuned["edited"][:, 1], x) > ft)
    assert world["program"]._cache_size() == world["compiles"]  # lr 0: the same program


def test_unitune_finetuned_reconstructs_better_than_base(world):
    x = world["images"]
    kw = dict(strengths=(0.6, 0.9), interpolations=0.0)
    ft = world["run"](unitune.unitune, x, "", finetune_lr=LR, **kw)
    bs = world["run"](unitune.unitune, x, "", finetune_lr=0.0, **kw)
    for k in range(2):  # at each strength
        a, b = _mse(ft["edited"][:, k], x), _mse(bs["edited"][:, k], x)
        assert np.all(a < b), (k, a, b)
    # Interpolation 1 returns the input's latent (the VAE round trip).
    full = world["run"](unitune.unitune, x, "", finetune_lr=LR, strengths=0.9,
                        interpolations=(0.0, 1.0))
    np.testing.assert_allclose(full["edited"][:, 1], full["reconstruction"], atol=1e-5)
    np.testing.assert_allclose(full["edited"][:, 0], ft["edited"][:, 1], atol=1e-5)
    assert world["program"]._cache_size() == world["compiles"]  # Imagic's program


def test_rows_are_independent_and_traced_values_do_not_recompile(world):
    """A batch's image is edited as it is alone: swapping the rows (each keeps its
    sample index, which picks its noise) swaps the results."""
    x, c, tuned = world["images"], world["captions"], world["tuned"]
    swapped = world["run"](imagic.imagic, x[::-1], c[::-1], etas=(0.0, 1.0), finetune_lr=LR,
                           sample_index=[1, 0])
    np.testing.assert_allclose(swapped["edited"][::-1], tuned["edited"], atol=2e-5)
    # New eta values, learning rates, guidance: no new program.
    world["run"](imagic.imagic, x, c, etas=(0.3, 0.8), finetune_lr=1e-4, embedding_lr=1e-2,
                 guidance_scale=3.0)
    assert world["program"]._cache_size() == world["compiles"] == 1
