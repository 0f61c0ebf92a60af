"""Classifier guidance: guidance.classifier / classifier_grad, the noisy classifier model and
its files, and guided_sampling.generate_guided on the embedded model.

Truth: the plain sampler (``jaxdiff.generate``) for scale 0, central finite differences of
the classifier's log-probability for the gradient, and the samplers' own x0/eps algebra
(``samplers.base.x0_eps_vp``) for the prediction-type conversions.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff import guidance, parallel
from jaxdiff.guided_sampling import _compiled, generate_guided, label_log_prob
from jaxdiff.models.noisy_classifier import (NoisyClassifier, NoisyClassifierConfig,
                                             load_classifier, save_classifier)
from jaxdiff.samplers.base import x0_eps_vp

CONFIG = NoisyClassifierConfig(block_out_channels=(8, 16), norm_num_groups=4,
                               heads=(("colour", 9), ("shape", 5)))
AC = jnp.linspace(0.999, 0.01, 1000)


@pytest.fixture(scope="module")
def clf():
    """A tiny random noisy classifier on 8x8x4 latents and a fixed noisy batch."""
    model = NoisyClassifier(CONFIG)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
    params = jax.jit(model.init)(jax.random.key(0), x, jnp.zeros((2,)))["params"]
    return model, params, x


def _stub(x, t, cond):
    """An analytic denoiser (the output depends on x, t and cond)."""
    return 0.3 * x + 0.001 * t.reshape(-1, 1, 1, 1) + cond


def test_guidance_gradient_equals_finite_differences(clf):
    model, params, x = clf
    labels = {"colour": jnp.array([0, 3]), "shape": jnp.array([-1, 2])}
    log_p = jax.jit(label_log_prob(model, params, labels))
    t, s = jnp.array([700, 700]), 2.5
    guided = guidance.classifier(_stub, guidance.classifier_grad(log_p), s, AC)
    delta = jax.jit(lambda x: guided(x, t, 0.0) - _stub(x, t, 0.0))(x)
    grad = delta / (-s * jnp.sqrt(1.0 - AC[700]))        # the gradient the loop used
    v = jax.random.normal(jax.random.key(2), x.shape)
    h = 1e-2
    fd = (log_p(x + h * v, t) - log_p(x - h * v, t)) / (2 * h)   # per sample
    np.testing.assert_allclose(jnp.sum(grad * v, axis=(1, 2, 3)), fd, rtol=2e-2, atol=1e-4)
    assert float(jnp.abs(fd).min()) > 1e-3  # the check is not vacuous


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_prediction_types_move_the_noise_estimate_alike(clf, prediction_type):
    """Whatever the model predicts, the implied eps moves by -s sqrt(1 - abar) grad."""
    model, params, x = clf
    grad = jax.jit(guidance.classifier_grad(
        label_log_prob(model, params, {"colour": jnp.array([1, 1])})))
    t, s = jnp.array([400, 400]), 4.0
    a = AC[400]
    to_eps = lambda out: x0_eps_vp(prediction_type)(out, x, jnp.sqrt(a), jnp.sqrt(1 - a))[1]
    guided = guidance.classifier(_stub, grad, s, AC, prediction_type)
    moved = to_eps(jax.jit(guided)(x, t, 0.0)) - to_eps(_stub(x, t, 0.0))
    np.testing.assert_allclose(moved, -s * jnp.sqrt(1 - a) * grad(x, t), rtol=1e-3, atol=1e-5)


def test_classifier_folder_round_trip(clf, tmp_path):
    model, params, x = clf
    folder = save_classifier(str(tmp_path / "clf"), CONFIG, params)
    model2, params2 = load_classifier(folder)
    assert model2.config == CONFIG
    t = jnp.array([10, 900])
    out, out2 = model.apply({"params": params}, x, t), model2.apply({"params": params2}, x, t)
    for h in out:
        np.testing.assert_array_equal(out[h], out2[h])
    shipped, _ = load_classifier(None)  # jaxdiff/assets/shapes_classifier
    assert dict(shipped.config.heads) == {"colour": 9, "shape": 5}
    cfg = NoisyClassifierConfig(block_out_channels=(8, 8), norm_num_groups=4)
    save_classifier(str(tmp_path / "bad"), cfg, params)   # weights of another config
    with pytest.raises(ValueError, match="does not fit config.json"):
        load_classifier(str(tmp_path / "bad"))


def test_scale_zero_is_the_plain_sampler_and_scale_is_traced(embedded, clf):
    pipe, params = embedded
    model, cparams, _ = clf
    prompts = ["a red circle", "a blue star"]
    kw = dict(sampler="ddim", steps=4, seed=3, output="latents")
    plain = jaxdiff.generate(pipe, params, prompts, guidance_scale=3.0, **kw)
    labels = {"colour": [2, 0]}
    zero = generate_guided(pipe, params, model, cparams, labels, prompts, classifier_scale=0.0,
                           guidance_scale=3.0, **kw)
    np.testing.assert_allclose(zero, plain, rtol=0, atol=1e-6)
    program = _compiled(pipe, model, "ddim", 4, False, True, parallel.make_mesh())
    before = program._cache_size()
    strong = generate_guided(pipe, params, model, cparams, labels, prompts,
                             classifier_scale=50.0, guidance_scale=3.0, **kw)
    assert program._cache_size() == before          # a new scale is not a new program
    assert np.abs(strong - plain).max() > 1e-2       # and it steers the samples


def test_bad_labels_are_one_line_errors(embedded, clf):
    pipe, params = embedded
    model, cparams, _ = clf
    with pytest.raises(ValueError, match="unknown classifier heads"):
        generate_guided(pipe, params, model, cparams, {"size": [0]})
    with pytest.raises(ValueError, match="has class 9"):
        generate_guided(pipe, params, model, cparams, {"colour": [9]})
