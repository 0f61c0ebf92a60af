"""RePaint: the jump schedule and the whole resampling loop equal diffusers'
RePaintScheduler (same noise); the known region ends exactly at the original."""
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff.editing import repaint as rp
from jaxdiff.schedules import SchedulerConfig


@pytest.mark.parametrize("steps,jl,jn", [(50, 5, 3), (250, 10, 10), (20, 3, 3), (10, 10, 2)])
def test_jump_schedule_matches_diffusers(steps, jl, jn):
    from diffusers import RePaintScheduler
    sch = RePaintScheduler(num_train_timesteps=1000)
    sch.set_timesteps(steps, jump_length=jl, jump_n_sample=jn)
    np.testing.assert_array_equal(rp.jump_schedule(steps, jl, jn, 1000), sch.timesteps.numpy())


def test_loop_matches_diffusers_repaint_scheduler(torch):
    """20 train steps, 20 inference steps: an undo is one diffusers noising step, so the
    noise of every schedule entry is one draw and the whole loop can be compared."""
    from diffusers import RePaintScheduler
    kw = dict(num_train_timesteps=20, beta_start=0.01, beta_end=0.3, beta_schedule="linear")
    sch = RePaintScheduler(**kw, eta=0.5, clip_sample=False)
    sch.set_timesteps(20, jump_length=3, jump_n_sample=3)
    stub = lambda x, t: 0.4 * x + 0.01 * float(t)  # any smooth "noise prediction"
    rng = np.random.default_rng(0)
    orig = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    keep = (rng.random((2, 1, 4, 4)) < 0.5).astype(np.float32)  # diffusers: 1 = known
    x = torch.tensor(rng.standard_normal((2, 3, 4, 4)).astype(np.float32))
    x_T = x.numpy().copy()
    g, noises, t_last = torch.Generator().manual_seed(0), [], sch.timesteps[0] + 1
    for t in sch.timesteps:
        state = g.get_state()
        noises.append(torch.randn(x.shape, generator=g).numpy())
        g.set_state(state)
        if t < t_last:
            x = sch.step(stub(x, t), t, x, torch.tensor(orig), torch.tensor(keep), g).prev_sample
        else:
            x = sch.undo_step(x, t_last, g)
        t_last = t
    nhwc = lambda a: jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))
    cfg = SchedulerConfig(**kw)
    tables = rp.repaint_tables(cfg, rp.jump_schedule(20, 3, 3, 20), 20)
    noise = jnp.stack([nhwc(n) for n in noises])
    got = rp.repaint_latents(lambda v, t: 0.4 * v + 0.01 * t, tables, nhwc(orig), 1 - nhwc(keep),
                             nhwc(x_T), lambda k: noise[k], 0.5, "epsilon")
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), x.numpy(), atol=2e-5,
                               rtol=1e-5)
    assert int((~np.asarray(tables.down)).sum()) > 0  # undo steps were exercised


@pytest.fixture(scope="module")
def loaded(tiny_pipe_dir):
    return jaxdiff.load_pipeline(tiny_pipe_dir)


def test_known_region_is_the_original_and_traced_values(loaded, monkeypatch):
    pipe, params = loaded
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    masks = np.zeros((2, 16, 16), np.float32)
    masks[0, 4:12, 4:12] = 1
    masks[1, :, 8:] = 1
    rp._compiled.cache_clear()
    traces = []
    real = rp.repaint_latents
    monkeypatch.setattr(rp, "repaint_latents", lambda *a, **k: traces.append(1) or real(*a, **k))
    outs = [rp.repaint(pipe, params, images, masks, "red dot", steps=10, jump_length=2,
                       jump_n_sample=2, guidance_scale=g, eta=eta, seed=s)
            for g, eta, s in [(5.0, 0.0, 0), (2.0, 1.0, 1)]]
    assert len(traces) == 1
    z0 = np.asarray(pipe.encode_images(params, jnp.asarray(images)))
    for out in outs:
        m = np.asarray(out["latent_mask"])[..., None]
        lat = np.asarray(out["latents"])
        np.testing.assert_allclose(lat * (1 - m), z0 * (1 - m), atol=1e-5)
        assert np.abs((lat - z0) * m).max() > 0.1  # the hole was filled with something new
    assert not np.allclose(outs[0]["latents"], outs[1]["latents"])
