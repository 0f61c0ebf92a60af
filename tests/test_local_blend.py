"""LocalBlend: defining properties on the tiny random pipeline, maps checked by hand."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff.editing import local_blend as lb, prompt_to_prompt as p2p
from jaxdiff.samplers.ddim import ddim_tables

STEPS = 6
SRC = ["a red ball", "a big cat"]
TGT = ["a blue ball", "a big dog"]
WORDS = [["red", "blue"], ["cat", "dog"]]


@pytest.fixture(scope="module")
def setup(tiny_pipe_dir):
    pipe, params = jaxdiff.load_pipeline(tiny_pipe_dir)
    enc = lambda ps: pipe.encode_text(params, pipe.tokenize(ps, warn=False))
    side = pipe.unet.config.sample_size
    z_T = jax.random.normal(jax.random.key(1), (2, side, side, 4))
    nulls = jnp.broadcast_to(enc(["", ""]), (STEPS, 2) + enc([""]).shape[1:])
    return pipe, params, enc, nulls, z_T, ddim_tables(pipe.scheduler, STEPS)


@pytest.fixture(scope="module")
def free(setup):
    """The same P2P edit without LocalBlend."""
    pipe, params, enc, nulls, z_T, tab = setup
    den = lambda x, t, c, ctrl: pipe.unet.apply({"params": params["unet"]}, x, t, c,
                                                control=ctrl)
    ctrl = p2p.make_control(pipe, SRC, TGT, STEPS, cross_replace_steps=0.8,
                            self_replace_steps=0.4)
    free = p2p.edit_loop(den, tab, z_T, enc(SRC), enc(TGT), nulls, 5.0, ctrl,
                         pipe.scheduler.prediction_type)
    return free


def _edit(setup, rows=slice(0, 2), threshold=0.3, start=0.2, words=WORDS, trace=None):
    pipe, params, enc, nulls, z_T, tab = setup
    src, tgt = SRC[rows], TGT[rows]
    ctrl = p2p.make_control(pipe, src, tgt, STEPS, cross_replace_steps=0.8,
                            self_replace_steps=0.4)
    blend = lb.make_local_blend(pipe, src, tgt, STEPS, words[rows], threshold=threshold,
                                start_fraction=start)
    den = lb.capturing_denoiser(pipe, params["unet"], blend.res)
    return _jit_loop(den, tab, z_T[rows], enc(src), enc(tgt), nulls[:, rows], ctrl, blend,
                     pipe.scheduler.prediction_type, trace)


def _jit_loop(den, tab, z, cs, ct, nulls, ctrl, blend, pt, trace):
    @jax.jit
    def run(z, cs, ct, nulls, ctrl, blend):
        if trace is not None:
            trace.append(1)
        return p2p.edit_loop(den, tab, z, cs, ct, nulls, 5.0, ctrl, pt, blend=blend)
    return run(z, cs, ct, nulls, ctrl, blend)


def test_target_equals_source_outside_the_mask(setup, free):
    out = _edit(setup, threshold=0.99)  # random weights: near-uniform maps
    m = np.asarray(out.mask[..., 0]) > 0
    assert 0.0 < m.mean() < 1.0  # a real partition, so both claims below are tested
    src, tgt = np.asarray(out.source), np.asarray(out.target)
    # Equal to float32 rounding (x_src + 0 * (...)); not bit for bit, as XLA may compute the
    # source latents in two fusions that round differently (1-2 ulp with the suite's flags).
    np.testing.assert_allclose(tgt[~m], src[~m], rtol=1e-6, atol=1e-6)
    assert np.abs(tgt[m] - src[m]).max() > 1e-3  # inside, the edit is kept
    # without LocalBlend the target differs from the source everywhere
    assert np.abs(np.asarray(free.target) - src)[~m].min() > 0
    assert np.asarray(free.mask).all()
    np.testing.assert_allclose(np.asarray(free.source), src, rtol=1e-5, atol=1e-4)  # untouched


def test_start_after_last_step_is_no_blend_and_no_retrace(setup, free):
    trace = []
    late = _edit(setup, start=1.0, trace=trace)
    np.testing.assert_allclose(np.asarray(late.target), np.asarray(free.target), rtol=1e-5,
                               atol=1e-4)
    pipe = setup[0]
    # threshold and start are traced: a new value reuses the program (one trace for both
    # calls of this jitted function would need the same closure, so count via jax's cache)
    f = jax.jit(lambda blend: lb.blend_mask(blend, jnp.ones((4, blend.res, blend.res)),
                                            (8, 8)))
    blend = lb.make_local_blend(pipe, SRC, TGT, STEPS, WORDS)
    f(blend)
    f(blend.replace(threshold=jnp.float32(0.7), start=jnp.int32(3)))
    assert f._cache_size() == 1


def test_batch_equals_single(setup):
    both = _edit(setup)
    one = _edit(setup, rows=slice(1, 2))
    np.testing.assert_allclose(np.asarray(one.target[0]), np.asarray(both.target[1]),
                               atol=1e-4)
    np.testing.assert_array_equal(np.asarray(one.mask[0]), np.asarray(both.mask[1]))


def test_captured_maps_equal_diffusers_attention_probabilities(setup, tiny_pipe_dir, torch):
    """The maps equal the cross-attention probs of the diffusers UNet on the same weights
    (recorded by an attention processor), averaged over heads and the 8x8 layers, mid
    block excluded."""
    from diffusers import UNet2DConditionModel
    pipe, params, enc, nulls, z_T, tab = setup
    res = lb.blend_resolution(pipe.unet.config.sample_size)
    seen = []

    class Record:
        def __init__(self, keep):
            self.keep = keep

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, **kw):
            ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            q = attn.head_to_batch_dim(attn.to_q(hidden_states))
            k, v = attn.head_to_batch_dim(attn.to_k(ctx)), attn.head_to_batch_dim(attn.to_v(ctx))
            probs = attn.get_attention_scores(q, k, None)
            if self.keep and hidden_states.shape[1] == res * res:
                b = hidden_states.shape[0]
                seen.append(probs.reshape(b, -1, *probs.shape[1:]).mean(1).detach().numpy())
            out = attn.batch_to_head_dim(torch.bmm(probs, v))
            return attn.to_out[1](attn.to_out[0](out))

    unet = UNet2DConditionModel.from_pretrained(tiny_pipe_dir, subfolder="unet").eval()
    unet.set_attn_processor({name: Record(name.endswith("attn2.processor")
                                          and not name.startswith("mid_block"))
                             for name in unet.attn_processors})
    ctx = enc(SRC)
    with torch.no_grad():
        unet(torch.from_numpy(np.array(z_T)).permute(0, 3, 1, 2), 10,
             torch.from_numpy(np.array(ctx)))
    _, maps = jax.jit(lb.capturing_denoiser(pipe, params["unet"], res))(z_T, 10, ctx)
    assert len(seen) >= 2, "the tiny UNet must have cross-attention at the latent resolution"
    want = np.mean(seen, axis=0).reshape(maps.shape)
    np.testing.assert_allclose(np.asarray(maps), want, atol=1e-5)


def test_mask_pipeline_by_hand():
    """max-pool 3x3, nearest up-sampling, max-normalisation, threshold, source|target."""
    res = 4
    summed = np.zeros((2, res, res), np.float32)
    summed[0, 0, 0] = 1.0  # source map: one hot corner
    summed[1, 3, 3] = 2.0  # target map: the opposite corner
    summed[1, 0, 3] = 0.5  # below threshold after normalising by 2
    blend = lb.LocalBlend(words=jnp.zeros((2, 3)), threshold=jnp.float32(0.3),
                          start=jnp.int32(0), res=res)
    m = np.asarray(lb.blend_mask(blend, jnp.asarray(summed), (8, 8)))[0, ..., 0]
    want4 = np.zeros((4, 4), bool)
    want4[:2, :2] = True  # pooled source corner
    want4[2:, 2:] = True  # pooled target corner
    np.testing.assert_array_equal(m, np.kron(want4, np.ones((2, 2))).astype(np.float32))


def test_blend_words_must_occur(setup):
    pipe = setup[0]
    with pytest.raises(ValueError, match="occur in neither"):
        lb.make_local_blend(pipe, SRC, TGT, STEPS, ["zebra"])
    assert lb.blend_resolution(64) == 16 and lb.blend_resolution(8) == 8
