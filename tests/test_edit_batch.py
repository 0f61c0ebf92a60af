"""Batch == single for the mask-based editing programs (DiffEdit, blended, RePaint, ILVR).

Each method's jitted program is a pure function of per-image inputs (image, mask, prompt
ids, PRNG key, per-image traced values): editing two images in one call must equal
editing each alone with its own key (the public functions derive key i as
``fold_in(key(seed), i)``, so image 1 alone is fed key 1). SDEdit and Prompt-to-Prompt
have their own batch tests (test_sdedit.py, test_prompt_to_prompt.py,
test_local_blend.py)."""
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff.editing import blended as bl
from jaxdiff.editing import diffedit as de
from jaxdiff.editing import ilvr
from jaxdiff.editing import batch_inputs
from jaxdiff.editing import repaint as rp
from jaxdiff.sampling import sample_keys

STEPS = 10


@pytest.fixture(scope="module")
def inputs(tiny_pipe_dir):
    pipe, params = jaxdiff.load_pipeline(tiny_pipe_dir)
    rng = np.random.default_rng(5)
    images = jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32))
    masks = np.zeros((2, 16, 16), np.float32)
    masks[0, 4:12, 4:12], masks[1, :, 8:] = 1, 1
    ids, neg = batch_inputs.tokenize_pair(pipe, ["red dot", "blue sq"], None, 2)
    keys = sample_keys(7, 2)
    return pipe, params, images, jnp.asarray(masks), ids, neg, keys


def _check(run, params, batched: dict, **shared):
    """``run(params, **batched, **shared)`` on the batch vs on each image alone."""
    both = run(params, **batched, **shared)
    for i in range(2):
        one = run(params, **{k: v[i:i + 1] for k, v in batched.items()}, **shared)
        for k in ("latents", "latent_mask") if "latent_mask" in both else ("latents",):
            np.testing.assert_allclose(np.asarray(one[k])[0], np.asarray(both[k])[i],
                                       atol=1e-4, rtol=1e-5, err_msg=f"{k}, image {i}")
    assert not np.allclose(both["latents"][0], both["latents"][1])
    return both


def test_diffedit_batch_equals_single(inputs):
    pipe, params, images, masks, ids, neg, keys = inputs
    both = _check(de._compiled(pipe, STEPS, 2), params, dict(
        images=images, src_ids=ids, tgt_ids=pipe.tokenize(["blue sq", "red dot"]),
        neg_ids=neg, keys=keys, masks=masks,
        use_given=jnp.asarray([False, True]),     # image 0: automatic mask; image 1: given
        strength=jnp.asarray([0.8, 0.5])),
        guidance=jnp.float32(5.0), mask_strength=jnp.float32(0.5),
        threshold_ratio=jnp.float32(3.0))
    assert set(np.unique(both["latent_mask"])) <= {0.0, 1.0}


def test_blended_batch_equals_single(inputs):
    pipe, params, images, masks, ids, neg, keys = inputs
    _check(bl._compiled(pipe, "ddim", STEPS), params, dict(
        images=images, masks=masks, ids=ids, neg_ids=neg, keys=keys,
        percentage=jnp.asarray([0.25, 0.5])), guidance=jnp.float32(5.0), eta=jnp.float32(0.0))


def test_repaint_batch_equals_single(inputs):
    pipe, params, images, masks, ids, neg, keys = inputs
    _check(rp._compiled(pipe, STEPS, 2, 2), params, dict(
        images=images, masks=masks, ids=ids, neg_ids=neg, keys=keys),
        guidance=jnp.float32(5.0), eta=jnp.float32(1.0))


def test_ilvr_batch_equals_single(inputs):
    pipe, params, images, masks, ids, neg, keys = inputs
    _check(ilvr._compiled(pipe, "ddim", STEPS, 2), params, dict(
        images=images, ids=ids, neg_ids=neg, keys=keys,
        fraction=jnp.asarray([1.0, 0.5])), guidance=jnp.float32(5.0),
        eta=jnp.float32(0.0))
