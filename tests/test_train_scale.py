"""Training at scale: FSDP rule table, multi-host data slices, gradient accumulation,
rematerialisation, bf16 compute, and 8 forced devices (data parallel and FSDP) == 1 device."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

import train_problem as tp
from jaxdiff import parallel
from jaxdiff.training import batching

HERE = os.path.dirname(__file__)


def test_host_slices_partition_the_global_batch():
    idx = batching.batch_indices(1000, 24, step=5, seed=1)
    for n in (1, 2, 3, 8):
        parts = [batching.host_slice(idx, n, p) for p in range(n)]
        assert all(len(x) == 24 // n for x in parts)
        np.testing.assert_array_equal(np.concatenate(parts), idx)  # disjoint, in order
    with pytest.raises(ValueError, match="not divisible by the 5 processes"):
        batching.host_slice(idx, 5, 0)
    # Hosts of a multi-host job each read only their rows of the same global batch.
    full = tp.global_batch(3, 8)
    halves = [tp.host_batch_fn(8, process_count=2, process_index=p)(3) for p in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([h["x0"] for h in halves]), full["x0"])


def test_fsdp_rule_shards_largest_divisible_dim():
    assert parallel.fsdp_spec((3, 3, 320, 640), 4) == P(None, None, None, "fsdp")
    assert parallel.fsdp_spec((768, 320), 4) == P("fsdp", None)
    assert parallel.fsdp_spec((6, 10), 4) == P()                       # nothing divisible
    assert parallel.fsdp_spec((10, 6), 2) == P("fsdp", None)            # largest first
    assert parallel.fsdp_spec((1024,), 4, min_size=4096) == P()        # too small
    assert parallel.fsdp_spec((1024,), 1) == P()                       # no fsdp axis


def test_rule_table_is_matched_on_state_paths():
    state, _ = tp.setup()
    mesh = AbstractMesh((2, 4), (parallel.DATA, parallel.FSDP))
    rules = [("^(step|rng)$", "replicate"), ("time_embedding", "replicate"), (".*", "fsdp")]
    sh = parallel.tree_shardings(state, mesh, rules)
    unet = sh.params
    assert unet["time_embedding"]["linear_1"]["kernel"].spec == P()
    assert unet["conv_in"]["kernel"].spec == P(None, None, None, "fsdp")   # [3,3,4,8]
    assert unet["conv_out"]["kernel"].spec == P(None, None, "fsdp", None)  # [3,3,8,4]
    assert sh.opt_state[1][0].mu["conv_in"]["kernel"].spec == unet["conv_in"]["kernel"].spec
    assert sh.step.spec == P() and sh.rng.spec == P()
    one_dev = parallel.tree_shardings(state, AbstractMesh((8,), (parallel.DATA,)), rules)
    assert all(s.spec == P() for s in jax.tree.leaves(one_dev))        # no fsdp axis
    with pytest.raises(ValueError, match="strategy one of"):
        parallel.tree_shardings(state, mesh, [(".*", "tensor")])


def test_remat_gives_the_same_gradients_and_bf16_is_close():
    batch = tp.global_batch(0, 4)
    params = tp.init_params(tp.make_unet())

    def grads(**kw):
        return jax.jit(jax.grad(tp.make_loss(tp.make_unet(**kw))))(params, batch, None)

    plain, remat = grads(), grads(remat=True)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert jax.tree.structure(plain) == jax.tree.structure(remat)  # same param names
    bf16 = grads(remat=True, dtype=jnp.bfloat16)
    flat = lambda g: jnp.concatenate([x.ravel() for x in jax.tree.leaves(g)])
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf16))  # params stay fp32
    rel = float(jnp.linalg.norm(flat(bf16) - flat(plain)) / jnp.linalg.norm(flat(plain)))
    assert rel < 0.05, rel


def test_remat_is_in_the_program():
    """The rematerialised UNet recomputes its blocks in the backward pass."""
    batch = tp.global_batch(0, 2)
    params = tp.init_params(tp.make_unet())
    jaxpr = lambda **kw: str(jax.make_jaxpr(jax.grad(tp.make_loss(tp.make_unet(**kw))))(
        params, batch, None))
    # 1 down + 2 up resnets and transformers, mid block 2 resnets + 1 transformer.
    assert jaxpr(remat=True).count("remat") >= 9 and "remat" not in jaxpr()


def test_eight_devices_equal_one_device(tmp_path):
    """2 train steps through the real loop (``train_loop``) with the same global batch of 8:
    1 device == 8-way data parallel == 2x4 FSDP == 4-way FSDP with gradient accumulation
    over 2 micro-batches of 4 (so accumulation 2 x 4 == batch 8 is checked here too)."""
    script = textwrap.dedent(f"""
        import os, sys
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_force_host_platform_device_count=8")
        sys.path.insert(0, {HERE!r})
        import jax, numpy as np
        import train_problem as tp
        from jaxdiff import parallel
        from jaxdiff.training.loop import train_loop
        assert jax.device_count() == 8

        def run(name, mesh, accum=1):
            state, step = tp.setup(accum_steps=accum)
            return train_loop(step, state, tp.host_batch_fn(8), 2, os.path.join({str(tmp_path)!r}, name),
                              log_every=1, ckpt_every=100, desc=name, mesh=mesh,
                              accum_steps=accum, async_save=False)

        one = run("one", parallel.make_mesh(jax.devices()[:1]))
        runs = dict(dp=run("dp", parallel.make_mesh()),
                    fsdp=run("fsdp", parallel.make_mesh(fsdp=4)),
                    # 4-way FSDP only: micro-batches of 4 cannot be split 8 ways.
                    fsdp_accum=run("fsdp_accum", parallel.make_mesh(jax.devices()[:4], fsdp=4),
                                   accum=2))
        ref = jax.tree.leaves(jax.device_get((one.params, one.opt_state, one.ema_params)))
        for name, st in runs.items():
            got = jax.tree.leaves(jax.device_get((st.params, st.opt_state, st.ema_params)))
            for a, b in zip(ref, got):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5, err_msg=name)
        sharded = [x for x in jax.tree.leaves(runs["fsdp"].params)
                   if x.sharding.spec != jax.sharding.PartitionSpec()]
        assert len(sharded) > len(jax.tree.leaves(one.params)) // 2, len(sharded)
        x = sharded[0]
        assert x.addressable_shards[0].data.size * 4 == x.size      # 1/4 per device
        mu = runs["fsdp"].opt_state[1][0].mu
        assert sum(l.sharding.spec != jax.sharding.PartitionSpec()
                   for l in jax.tree.leaves(mu)) == len(sharded)    # Adam state sharded too
        assert all(l.sharding.spec == jax.sharding.PartitionSpec()
                   for l in jax.tree.leaves(runs["dp"].params))     # data parallel: replicated
        print("OK", len(sharded), len(jax.tree.leaves(one.params)))
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_two_hosts_equal_one_device(tmp_path):
    """A real 2-process job (``jax.distributed`` over gloo, 4 CPU devices each, started
    through ``parallel.maybe_initialize_distributed``): each process feeds only its half of
    every global batch, the state is FSDP-sharded across both, Orbax saves from both; 2
    steps equal 2 plain steps on one device."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = textwrap.dedent(f"""
        import os, sys
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_force_host_platform_device_count=4")
        sys.path.insert(0, {HERE!r})
        import jax, numpy as np
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        from jaxdiff import parallel
        assert parallel.maybe_initialize_distributed()
        assert jax.process_count() == 2 and jax.device_count() == 8
        import train_problem as tp
        from jaxdiff.training.loop import train_loop

        state, step = tp.setup()
        reads = []
        host_batch = tp.host_batch_fn(8)
        def batch_fn(s):
            b = host_batch(s)
            reads.append(len(b["x0"]))
            return b
        out = train_loop(step, state, batch_fn, 2, {str(tmp_path)!r}, log_every=1,
                         ckpt_every=1, desc="mh", mesh=parallel.make_mesh(fsdp=4))
        assert reads == [4, 4], reads  # this process read only its half
        assert not out.params["conv_in"]["kernel"].is_fully_addressable  # spans both hosts
        got = parallel.gather((out.params, out.opt_state))  # collective: both processes
        if jax.process_index() == 0:
            np.savez({str(tmp_path / "got.npz")!r}, *jax.tree.leaves(got))
        print("OK", jax.process_index())
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, JAX_PLATFORMS="cpu",
                                       JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                       JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)))
             for i in range(2)]
    try:  # meanwhile, the reference here: one device, the whole global batch, plain jit
        ref, step = tp.setup()
        for s in range(2):
            ref, _ = jax.jit(step)(ref, tp.global_batch(s, 8))
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"OK {i}" in out, err[-3000:]
    with np.load(tmp_path / "got.npz") as z:
        got = [z[f"arr_{i}"] for i in range(len(z.files))]
    want = jax.tree.leaves(jax.device_get((ref.params, ref.opt_state)))
    assert len(got) == len(want)
    for a, b in zip(want, got):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5)
    steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert steps == [1, 2]


def test_cpu_devices_splits_the_cpu_before_jax_starts():
    """``config.cpu_devices`` (``parallel.set_cpu_devices``) gives that many XLA CPU devices,
    also over an XLA_FLAGS device count; too late (backends started) is a one-line error."""
    script = textwrap.dedent("""
        import jax
        from jaxdiff import parallel
        parallel.set_cpu_devices(3)
        assert len(jax.devices("cpu")) == 3, jax.devices("cpu")
        try:
            parallel.set_cpu_devices(2)
        except ValueError as e:
            assert "before JAX starts" in str(e) and "\\n" not in str(e), e
        else:
            raise AssertionError("no error after the backends started")
        print("OK")
    """)
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
