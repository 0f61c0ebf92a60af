"""Imagic and UniTune on the embedded model and held-out world scenes with their object
hollowed out (a ring no world image has): fine-tuning on the image makes the model
reconstruct it better than the base model (eta = 0 for Imagic, the
token prompt for UniTune), rows of a batch are independent, traced values never recompile.

Three calls share one compiled program (4 rows, 3 variants, tiny stage sizes): each row
pair (image a, image b) runs fine-tuned (lr > 0) and as the base model (lr 0, the same
per-image noise), and UniTune runs on Imagic's program with the embedding stage's
learning rate at 0.
"""
import numpy as np
import pytest

from jaxdiff.data import WorldSpec, held_out_examples
from jaxdiff.editing import batch_inputs, imagic, unitune
from jaxdiff.pipeline import from_uint8

# make test-fast leaves it out: the shared fine-tuning fixture alone compiles and runs for
# about a minute (64 s, 2026-12-03, no compilation cache).
pytestmark = pytest.mark.slow


STAGES = imagic.Stages(embedding_steps=10, finetune_steps=30, lora_rank=4, draws=2)
STEPS = 6
LR = np.array([3e-3, 3e-3, 0.0, 0.0], np.float32)  # rows: a, b fine-tuned; a, b base
INDEX = np.array([0, 1, 0, 1])                      # a row's noise: its image's index
EMB_LR = 1e-2  # stage (a): 10 Adam steps that move the embedding off the target text


def _hollowed(examples, num: int = 2):
    """The first ``num`` held-out scenes whose object stays a ring when its inside (the mask
    shrunk by one pixel) is painted with the background: images the shapes world never has,
    so the base model cannot already draw them and fine-tuning has something to learn
    (model v2 reconstructs plain held-out scenes at eta 0 as well as fine-tuned)."""
    out = []
    for e in examples:
        m = e["masks"][0]
        inner = m.copy()
        inner[1:-1, 1:-1] &= m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
        inner[[0, -1], :] = inner[:, [0, -1]] = False
        if inner.sum() >= 6:
            image = e["image"].copy()
            image[inner] = image[~m][0]   # a background pixel
            out.append(dict(e, image=image))
        if len(out) == num:
            return out
    raise AssertionError("not enough big objects among the held-out scenes")


@pytest.fixture(scope="module")
def world(embedded):
    pipe, params = embedded
    ex = _hollowed(held_out_examples(WorldSpec(image_size=pipe.image_size), 12, num_objects=1))
    images = np.asarray(from_uint8(np.stack([e["image"] for e in ex])))[[0, 1, 0, 1]]
    # Each image's target text is the other image's caption: a different shape and colour,
    # so eta (0 -> 1: the optimized embedding -> the target's) has somewhere to go.
    captions = [e["caption"] for e in ex[::-1]] * 2

    def run(fn, x, prompts, index=INDEX, **kw):
        out = fn(pipe, params, x, prompts, stages=STAGES, steps=STEPS, seed=3,
                 sample_index=index, **kw)
        return {k: np.asarray(v) for k, v in out.items()}

    tuned = run(imagic.imagic, images, captions, etas=(0.0, 0.5, 1.0), finetune_lr=LR,
                embedding_lr=EMB_LR)
    program = imagic._compiled(pipe, STEPS, STAGES, batch_inputs.edit_mesh(None))
    return dict(pipe=pipe, params=params, images=images, captions=captions, run=run,
                tuned=tuned, program=program)


def _mse(edited, images):
    return ((edited - images) ** 2).mean(axis=(-3, -2, -1))


def test_imagic_eta0_finetuned_reconstructs_better_than_base(world):
    x, out = world["images"], world["tuned"]
    # Stage (a) is the same for both (the model is frozen there); it lowered its loss.
    np.testing.assert_allclose(out["optimized_embedding"][:2], out["optimized_embedding"][2:],
                               atol=1e-6)
    emb = out["embedding_loss"]
    assert emb[:, -3:].mean() < emb[:, :3].mean()
    err = _mse(out["edited"][:, 0], x)   # eta = 0
    assert np.all(err[:2] < err[2:]) and err[:2].mean() < 0.5 * err[2:].mean(), err
    # Stage (b) fits the image better than the base model does.
    assert out["finetune_loss"][:2, -10:].mean() < out["finetune_loss"][2:, -10:].mean()
    # eta moves the fine-tuned model's sample away from the input (toward the text): on
    # average over the two images, and for at least one of them.
    moved = _mse(out["edited"][:2, 2], x[:2])
    assert moved.mean() > err[:2].mean() and np.any(moved > err[:2]), (moved, err)
    assert world["program"]._cache_size() == 1


def test_unitune_finetuned_reconstructs_better_than_base(world):
    pipe, params, x = world["pipe"], world["params"], world["images"]
    out = world["run"](unitune.unitune, x, "", finetune_lr=LR, strengths=(0.6, 0.9, 0.9),
                       interpolations=(0.0, 0.0, 0.5))
    for k in range(2):  # at each strength, the token prompt alone
        err = _mse(out["edited"][:, k], x)
        assert np.all(err[:2] < err[2:]), (k, err)
    # The interpolation blends the input's latent into the sample.
    z0 = np.asarray(pipe.encode_images(params, x))
    np.testing.assert_allclose(out["latents"][:, 2], 0.5 * z0 + 0.5 * out["latents"][:, 1],
                               atol=1e-4)
    # New etas / strengths / blends / learning rates / start: Imagic's compiled program.
    assert world["program"]._cache_size() == 1


def test_batch_rows_are_independent(world):
    """A row is edited as if alone: permuting the rows (each keeps its sample index, which
    picks its noise, and its learning rate) permutes the results."""
    x, c, out = world["images"], world["captions"], world["tuned"]
    perm = [3, 2, 1, 0]
    swapped = world["run"](imagic.imagic, x[perm], [c[i] for i in perm], index=INDEX[perm],
                           etas=(0.0, 0.5, 1.0), finetune_lr=LR[perm], embedding_lr=EMB_LR)
    np.testing.assert_allclose(swapped["edited"], out["edited"][perm], atol=2e-5)
    assert world["program"]._cache_size() == 1
