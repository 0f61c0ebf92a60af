"""The Diffusion Classifier (jaxdiff.eval.diffusion_classifier) and ``jaxdiff classify``.

Truth: the authors' timestep schedule (their ``eval_prob_adaptive.py`` loop, transcribed
below), and images the embedded model generated from known prompts.
"""
import numpy as np
import pytest

import jaxdiff
from jaxdiff.cli import main
from jaxdiff.eval import diffusion_classifier as dc

PROMPTS = ("a red circle", "a blue circle", "a green circle", "a yellow circle",
           "a purple circle", "a cyan circle")


def _authors_schedule(T, n_samples, n_trials):
    """The loop of eval_prob_adaptive.py (diffusion-classifier/diffusion-classifier) that
    picks the timesteps and noise indices of each stage, for a single prompt."""
    max_n_samples = max(n_samples)
    t_evaluated = set()
    start = T // max_n_samples // 2
    t_to_eval = list(range(start, T, T // max_n_samples))[:max_n_samples]
    out = []
    for n in n_samples:
        ts, noise_idxs = [], []
        curr_t_to_eval = t_to_eval[len(t_to_eval) // n // 2::len(t_to_eval) // n][:n]
        curr_t_to_eval = [t for t in curr_t_to_eval if t not in t_evaluated]
        for t_idx, t in enumerate(curr_t_to_eval, start=len(t_evaluated)):
            ts.extend([t] * n_trials)
            noise_idxs.extend(list(range(n_trials * t_idx, n_trials * (t_idx + 1))))
        t_evaluated.update(curr_t_to_eval)
        out.append((ts, noise_idxs))
    return out


@pytest.mark.parametrize("samples,trials", [((20, 50, 100, 500), 1), ((50, 500), 1),
                                            ((8, 16, 64), 2), ((64,), 1)])
def test_stage_plan_is_the_authors_schedule(samples, trials):
    plan = dc.stage_plan(1000, samples, [4] * (len(samples) - 1) + [1], trials)
    want = _authors_schedule(1000, samples, trials)
    assert [(s.timesteps.tolist(), s.noise_index.tolist()) for s in plan] == want


@pytest.fixture(scope="module")
def generated(embedded):
    """Six images the embedded model drew from six prompts differing in colour only."""
    pipe, params = embedded
    images = jaxdiff.generate(pipe, params, list(PROMPTS), sampler="ddim", steps=10,
                              guidance_scale=5.0, seed=0)
    return pipe, params, images


def test_picks_the_prompt_an_image_was_generated_from(generated):
    pipe, params, images = generated
    r = dc.classify(pipe, params, images, PROMPTS, samples=(8, 16), keep=(3, 1), chunk=8)
    # chance is 1/6; the embedded model's own images are read back nearly always
    assert (r.prediction == np.arange(len(PROMPTS))).mean() >= 5 / 6
    # adaptive elimination: three candidates per image got all 16 samples, the rest 8
    assert sorted(r.samples[0].tolist()) == [8, 8, 8, 16, 16, 16]
    assert r.ranking[:, 0].tolist() == r.prediction.tolist()


def test_batch_equals_single(generated):
    pipe, params, images = generated
    kw = dict(samples=(8,), keep=(1,), chunk=8)  # the program of the first stage above
    batch = dc.classify(pipe, params, images, PROMPTS, **kw)
    single = dc.classify(pipe, params, images[1:2], PROMPTS, **kw)
    np.testing.assert_allclose(single.errors[0], batch.errors[1], rtol=1e-5)
    assert single.prediction[0] == batch.prediction[1]


def test_traced_sample_count_pads_without_changing_errors(generated):
    """Five samples padded to a bucket of eight give the errors of those five alone."""
    pipe, params, images = generated
    five = dc.classify(pipe, params, images, PROMPTS[:3], samples=(5,), keep=(1,), chunk=8)
    assert five.samples.tolist() == [[5, 5, 5]] * len(images)
    eight = dc.classify(pipe, params, images, PROMPTS[:3], samples=(8,), keep=(1,), chunk=8)
    assert not np.allclose(five.errors, eight.errors)  # other timesteps: other errors


@pytest.mark.parametrize("argv,message", [
    (["--image", "/nonexistent.png", "--candidates", "a", "b"], "no such file or folder"),
    (["--image", ".", "--candidates", "a", "a"], "same prompt twice"),
    (["--image", ".", "--candidates", "a", "b", "--samples", "8", "--keep", "2"],
     "end with 1"),
    (["--image", ".", "--candidates", "a", "b", "--samples", "8", "16", "--keep", "1"],
     "same length"),
])
def test_classify_command_bad_input_is_one_line(argv, message, capsys):
    assert main(["classify"] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
