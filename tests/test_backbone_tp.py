"""Tensor parallelism of the transformer backbones (issue #18, point 5): with
``parallel.TRANSFORMER_TP_RULES`` on a (data 2, fsdp 2, model 2) mesh of 8 forced host
devices, the attention / MLP weights are split over ``model`` and the DiT and PixArt
forward, a DiT loss gradient and a DiT sampling run equal one device."""
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # one 8-device subprocess

SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8")
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from jaxdiff import dit_sampling, parallel
    from jaxdiff.models.dit import DiTConfig, DiTTransformer2DModel
    from jaxdiff.models.pixart import PixArtConfig, PixArtTransformer2DModel
    from jaxdiff.models.vae import AutoencoderKL, VAEConfig
    from jaxdiff.schedules import SchedulerConfig
    from jaxdiff.weights.backbones import DiTPipeline, TRANSFORMERS
    assert jax.device_count() == 8
    mesh = parallel.make_mesh(fsdp=2, model=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "model": 2}
    rows = parallel.train_batch_sharding(mesh)
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (4, 8, 8, 4))
    t = jnp.array([3.0, 500.0, 999.0, 10.0])
    dit = DiTTransformer2DModel(DiTConfig(num_attention_heads=2, attention_head_dim=8,
        num_layers=2, sample_size=8, out_channels=8, num_embeds_ada_norm=10))
    pix = PixArtTransformer2DModel(PixArtConfig(num_attention_heads=2, attention_head_dim=12,
        num_layers=2, sample_size=8, cross_attention_dim=24, caption_channels=16,
        use_additional_conditions=False))
    labels = jnp.array([0, 3, 9, 10])
    ctx = jax.random.normal(k[1], (4, 5, 16))

    def check(model, cond):
        dummy = TRANSFORMERS[type(model).__name__][2](model)
        params = model.init(k[2], *dummy)["params"]
        params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(k[3], p.shape), params)
        f = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))
        one = f(params, x, t, cond)
        sh = parallel.tree_shardings(params, mesh, parallel.TRANSFORMER_TP_RULES)
        blk = sh["transformer_blocks_0"]
        assert blk["attn1"]["to_q"]["kernel"].spec == P("fsdp", "model")
        assert blk["attn1"]["to_out_0"]["kernel"].spec == P("model", "fsdp")
        assert blk["ff"]["net_0"]["proj"]["kernel"].spec == P("fsdp", "model")
        assert blk["ff"]["net_2"]["kernel"].spec == P("model", "fsdp")
        sp = jax.device_put(params, sh)
        args = jax.device_put((x, t, cond), rows)
        compiled = f.lower(sp, *args).compile()
        hlo = compiled.as_text()
        assert "all-reduce" in hlo or "reduce-scatter" in hlo
        many = compiled(sp, *args)
        err = float(jnp.abs(many - one).max())
        assert err < 1e-5, err
        return params, sp, err

    p_dit, sp_dit, e1 = check(dit, labels)
    _, _, e2 = check(pix, ctx)
    loss = lambda p, x, t, c: jnp.mean(dit.apply({"params": p}, x, t, c) ** 2)
    g1 = jax.jit(jax.grad(loss))(p_dit, x, t, labels)
    gn = jax.jit(jax.grad(loss))(sp_dit, *jax.device_put((x, t, labels), rows))
    scale = max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g1))
    e3 = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g1),
                                                         jax.tree.leaves(gn))) / scale
    assert e3 < 1e-5, e3   # relative to the largest gradient entry
    vae = AutoencoderKL(VAEConfig(block_out_channels=(8,), norm_num_groups=4,
                                  down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",)))
    pipe = DiTPipeline(dit, vae, SchedulerConfig())
    run = lambda p: dit_sampling.generate_classes(pipe, {"transformer": p}, [1, 2, 3, 4],
                                                   steps=2, output="latents")
    one = run(p_dit)
    e4 = float(jnp.abs(run(sp_dit) - one).max() / jnp.abs(one).max())
    assert e4 < 1e-5, e4   # relative to the latents' largest entry
    print("OK", e1, e2, e3, e4)
""")


def test_tensor_parallel_transformers_equal_one_device():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout
