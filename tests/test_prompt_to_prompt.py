"""Prompt-to-Prompt controller: defining properties on a tiny random pipeline."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff.editing import alignment, inversion as inv, prompt_to_prompt as p2p
from jaxdiff.samplers.ddim import ddim_tables

STEPS = 6
SRC = ["a red ball", "a big cat"]
TGT = ["a blue ball", "a big dog"]


@pytest.fixture(scope="module")
def setup(tiny_pipe_dir):
    pipe, params = jaxdiff.load_pipeline(tiny_pipe_dir)
    den = lambda x, t, c, ctrl=None: pipe.unet.apply({"params": params["unet"]}, x, t, c,
                                                     control=ctrl)
    enc = lambda ps: pipe.encode_text(params, pipe.tokenize(ps, warn=False))
    nulls = jnp.broadcast_to(enc(["", ""]), (STEPS, 2, pipe.max_length, 32))
    z_T = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    return pipe, den, enc, nulls, z_T, ddim_tables(pipe.scheduler, STEPS)


def _run(setup, src, tgt, first=0, **kw):
    """Edits pairs ``first, first+1, ...`` (their start noise is ``z_T[first:]``)."""
    pipe, den, enc, nulls, z_T, tab = setup
    ctrl = p2p.make_control(pipe, src, tgt, STEPS, **kw)
    rows = slice(first, first + len(src))
    return p2p.edit_loop(den, tab, z_T[rows], enc(src), enc(tgt), nulls[:, rows], 5.0, ctrl,
                         pipe.scheduler.prediction_type)[:2]


def test_zero_replace_steps_equal_plain_target_sampling(setup):
    pipe, den, enc, nulls, z_T, tab = setup
    _, tgt = _run(setup, SRC, TGT, cross_replace_steps=0.0, self_replace_steps=0.0)
    plain = inv.ddim_sample(lambda x, t, c: den(x, t, c), tab, z_T, enc(TGT), nulls, 5.0,
                            pipe.scheduler.prediction_type)
    np.testing.assert_allclose(np.asarray(tgt), np.asarray(plain), atol=1e-4)


def test_source_branch_is_never_edited_and_target_is(setup):
    src0, tgt0 = _run(setup, SRC, TGT, cross_replace_steps=0.0, self_replace_steps=0.0)
    src1, tgt1 = _run(setup, SRC, TGT, cross_replace_steps=0.8, self_replace_steps=0.4)
    np.testing.assert_array_equal(np.asarray(src0), np.asarray(src1))
    assert float(jnp.abs(tgt1 - tgt0).max()) > 1e-2


def test_full_injection_of_the_same_prompt_reproduces_the_source(setup):
    src, tgt = _run(setup, SRC, SRC, cross_replace_steps=1.0, self_replace_steps=1.0)
    np.testing.assert_allclose(np.asarray(tgt), np.asarray(src), atol=1e-5)


@pytest.mark.parametrize("kw", [dict(mode="replace"), dict(mode="refine"),
                                dict(mode="reweight", reweight={"ball": 2.0})])
def test_batch_equals_single_pair(setup, kw):
    tgts = TGT if kw["mode"] != "refine" else ["a red shiny ball", "a big fat cat"]
    tgts = SRC if kw["mode"] == "reweight" else tgts
    _, both = _run(setup, SRC, tgts, **kw)
    _, one = _run(setup, SRC[1:], tgts[1:], first=1, **kw)
    np.testing.assert_allclose(np.asarray(one[0]), np.asarray(both[1]), atol=1e-4)


def test_reweight_by_one_is_a_no_op_of_injection(setup):
    a = _run(setup, SRC, SRC, mode="reweight", reweight={"ball": 1.0})[1]
    b = _run(setup, SRC, SRC, mode="reweight", reweight={"ball": 3.0})[1]
    plain = _run(setup, SRC, SRC, mode="reweight")[1]
    np.testing.assert_allclose(np.asarray(a), np.asarray(plain), atol=1e-6)
    assert float(jnp.abs(b - a).max()) > 1e-3


class _WordTokenizer:
    """One token per word (BOS 1, EOS 2): alignment tests by hand."""

    def encode(self, text):
        return [1] + [5 + ord(w[0]) for w in text.split()] + [2]


def test_alignment_of_refine_prompts():
    pairs = alignment.global_alignment([1, 5, 6, 2], [1, 5, 9, 6, 2])
    assert pairs == [(0, 0), (1, 1), (2, 3), (3, 4)]
    mapper, alphas = alignment.refinement_mapper(_WordTokenizer(), "a ball", "a red ball", 7)
    # [BOS a red ball EOS pad pad]: "red" is new; positions past the end map to themselves.
    assert alphas.tolist() == [1, 1, 0, 1, 1, 1, 1]
    assert [mapper[j] for j in (0, 1, 3, 4, 5, 6)] == [0, 1, 2, 3, 5, 6]


def test_word_alphas_per_word_steps(setup):
    pipe = setup[0]
    a = p2p.word_alphas(pipe.tokenizer, "a blue ball", 10, pipe.max_length,
                        {"default_": 0.5, "blue": 0.2})
    pos = alignment.word_token_indices(pipe.tokenizer, "a blue ball")
    assert a[:5, 0].all() and not a[5:, 0].any()
    assert a[:2, pos[1]].all() and not a[2:, pos[1]].any()
    with pytest.raises(ValueError, match="same number of words"):
        alignment.replacement_mapper(pipe.tokenizer, "a ball", "a red ball", pipe.max_length)
