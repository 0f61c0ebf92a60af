"""Prompt-to-Prompt controller data == the reference's own builders, from the same prompts.

``torchref.p2p_control`` ports google/prompt-to-prompt's ``seq_aligner`` /
``ptp_utils`` / ``get_equalizer`` / ``LocalBlend`` word masks; jaxdiff's
``make_control`` / ``make_local_blend`` must produce the same matrices. The tiny test
tokenizer is character-level, so swapped words have different token counts ("red" 3,
"blue" 4): the uneven case the reference spreads as 1 / len(target tokens).
"""
import numpy as np
import pytest

import jaxdiff
from jaxdiff.editing import local_blend as lb
from jaxdiff.editing import prompt_to_prompt as p2p
from torchref import p2p_control as pc

STEPS = 6
REPLACE = [("a red ball", "a blue ball"), ("a big cat", "a big dog"),
           ("a blue ball", "a red ball"), ("a red ball", "a bluish cube")]
REFINE = [("a red ball", "a shiny red ball"), ("a big cat", "a big fat cat"),
          ("a cat", "a cat on a mat")]
CROSS_STEPS = [0.8, 0.5, 1.0, {"default_": 0.8, "blue": 0.5}, {"default_": 0.3, "dog": 1.0}]


@pytest.fixture(scope="module")
def pipe(tiny_pipe_dir):
    return jaxdiff.load_pipeline(tiny_pipe_dir)[0]


def _ref(pipe):
    return pipe.tokenizer, pipe.max_length


@pytest.mark.parametrize("source,target", REPLACE)
def test_replacement_mapper(pipe, source, target):
    """Equal to the reference, except where the reference misaligns the tokens after a
    swap that changes the token count (``mapper[j, j]``; see ``pc.replacement_mapper``):
    there jaxdiff keeps them aligned, and the test says so."""
    control = p2p.make_control(pipe, [source], [target], STEPS, mode="replace")
    got = np.asarray(control.cross_mapper[0])
    reference = pc.replacement_mapper(source, target, *_ref(pipe))
    aligned = pc.replacement_mapper(source, target, *_ref(pipe), tail="aligned")
    np.testing.assert_allclose(got, aligned, atol=1e-7)
    uneven = any(len(a) != len(b) for a, b in zip(source.split(), target.split()))
    if uneven:  # the uneven case really occurs: fractional rows, and the reference's tail
        assert np.any((aligned > 0) & (aligned < 1))
        assert not np.array_equal(reference, aligned)
    else:
        np.testing.assert_array_equal(got, reference)


@pytest.mark.parametrize("source,target", REFINE)
def test_refinement_mapper(pipe, source, target):
    control = p2p.make_control(pipe, [source], [target], STEPS, mode="refine")
    index, alpha = pc.refinement_mapper(source, target, *_ref(pipe))
    np.testing.assert_array_equal(np.asarray(control.refine_alpha[0]), alpha)
    aligned = alpha > 0  # the index of an unaligned token is never used (alpha 0)
    np.testing.assert_array_equal(np.asarray(control.refine_index[0])[aligned], index[aligned])
    assert not aligned.all()


@pytest.mark.parametrize("cross", CROSS_STEPS, ids=str)
def test_time_word_alphas(pipe, cross):
    source, target = "a big red cat", "a big blue dog"
    control = p2p.make_control(pipe, [source], [target], STEPS, cross_replace_steps=cross)
    want = pc.time_words_alpha(target, STEPS, cross, *_ref(pipe))
    # The loop reads rows 0 .. S-1 (the reference's table has one more, never read).
    np.testing.assert_array_equal(np.asarray(control.cross_alpha[:, 0]), want[:STEPS])


@pytest.mark.parametrize("fraction", [0.0, 0.4, 0.5, 1.0])
def test_self_replace_steps(pipe, fraction):
    control = p2p.make_control(pipe, ["a red ball"], ["a blue ball"], STEPS,
                               self_replace_steps=fraction)
    assert pc.self_replace_range(STEPS, fraction) == (0, int(control.self_steps))


def test_equalizer(pipe):
    target = "a big blue dog"
    reweight = {"blue": 2.0, "dog": 0.5}
    control = p2p.make_control(pipe, ["a big red cat"], [target], STEPS, reweight=reweight)
    want = pc.equalizer(target, list(reweight), list(reweight.values()), *_ref(pipe))
    np.testing.assert_array_equal(np.asarray(control.equalizer[0]), want)
    assert sorted(set(want.tolist())) == [0.5, 1.0, 2.0]


def test_local_blend_word_masks(pipe):
    pairs = [("a red ball", "a blue ball"), ("a big cat", "a big dog")]
    words = [["red", "blue"], ["cat", "dog"]]
    blend = lb.make_local_blend(pipe, [s for s, _ in pairs], [t for _, t in pairs], STEPS,
                                words, threshold=0.3, start_fraction=0.2)
    got = np.asarray(blend.words)
    for k, ((s, t), (ws, wt)) in enumerate(zip(pairs, words)):
        np.testing.assert_array_equal(got[k], pc.blend_word_mask(s, [ws], *_ref(pipe)))
        np.testing.assert_array_equal(got[len(pairs) + k],
                                      pc.blend_word_mask(t, [wt], *_ref(pipe)))
    assert int(blend.start) == int(0.2 * STEPS)
