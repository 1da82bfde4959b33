"""What composes with what (the README's table): jit, grad, vmap and shard_map per implementation on a CPU."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxmoe
from conftest import rel_err
from jaxmoe import reference
from jaxmoe.backends.platform import triton_available

F32 = jnp.float32
CPU_ONLY = pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU behaviour (the GPU kernels differ)")
IMPLEMENTATIONS = [None, "reference"] + (["triton"] if triton_available() else [])


@functools.cache
def _setup():
    rng = np.random.default_rng(7)
    params = {"router": jnp.asarray(rng.standard_normal((32, 4)), F32),
              "w1": jnp.asarray(rng.standard_normal((4, 32, 32)) / 6, F32),
              "w2": jnp.asarray(rng.standard_normal((4, 32, 16)) / 4, F32)}
    x = jnp.asarray(rng.standard_normal((8, 32)), F32)
    return params, x, reference.moe_layer(params, x, top_k=2)


def _layer(implementation):
    return functools.partial(jaxmoe.moe_layer, top_k=2, implementation=implementation)


@CPU_ONLY
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_jit_and_vmap(implementation):
    params, x, want = _setup()
    layer = _layer(implementation)
    assert rel_err(jax.jit(layer)(params, x), want) <= 1e-4
    got = jax.vmap(lambda xb: layer(params, xb))(x.reshape(2, 4, 32))  # the CPU kernels: one call per batch
    assert rel_err(got.reshape(8, 32), want) <= 1e-4


@CPU_ONLY
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_shard_map_over_tokens(implementation):
    params, x, want = _setup()
    mesh = jax.make_mesh((1,), ("tokens",), axis_types=(jax.sharding.AxisType.Auto,))
    f = jax.shard_map(lambda xb: _layer(implementation)(params, xb), mesh=mesh, in_specs=P("tokens"),
                      out_specs=P("tokens"))
    assert rel_err(jax.jit(f)(x), want) <= 1e-4


@CPU_ONLY
@pytest.mark.parametrize("implementation", [None, "reference"])
def test_grad_through_the_reference(implementation):
    params, x, _ = _setup()
    g = jax.grad(lambda w1: _layer(implementation)({**params, "w1": w1}, x).sum())(params["w1"])
    gr = jax.grad(lambda w1: reference.moe_layer({**params, "w1": w1}, x, top_k=2).sum())(params["w1"])
    assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).sum()) > 0
    np.testing.assert_allclose(np.asarray(g), np.asarray(gr), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not triton_available(), reason="needs the triton package")
def test_grad_through_the_kernels():
    """The kernel path has its own backward (a custom_vjp with Triton backward kernels)."""
    params, x, _ = _setup()
    g = jax.grad(lambda w1: _layer("triton")({**params, "w1": w1}, x).sum())(params["w1"])
    gr = jax.grad(lambda w1: reference.moe_layer({**params, "w1": w1}, x, top_k=2).sum())(params["w1"])
    assert rel_err(g, gr) <= 1e-4 and float(jnp.abs(gr).sum()) > 0


SHARDED = """
import functools, jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
import jaxmoe
rng = np.random.default_rng(0)
params = {"router": jnp.asarray(rng.standard_normal((32, 4)), jnp.float32),
          "w1": jnp.asarray(rng.standard_normal((4, 32, 32)) / 6, jnp.float32),
          "w2": jnp.asarray(rng.standard_normal((4, 32, 16)) / 4, jnp.float32)}
x = jnp.asarray(rng.standard_normal((8, 32)), jnp.float32)
want = np.asarray(jaxmoe.reference.moe_layer(params, x, top_k=2))
mesh = jax.make_mesh((2,), ("tokens",), axis_types=(jax.sharding.AxisType.Auto,))
for impl in IMPLS:
    f = jax.shard_map(lambda xb: jaxmoe.moe_layer(params, xb, top_k=2, implementation=impl), mesh=mesh,
                      in_specs=P("tokens"), out_specs=P("tokens"))
    np.testing.assert_allclose(np.asarray(jax.jit(f)(x)), want, rtol=1e-4, atol=1e-5)
    print("ok", impl)
"""


@CPU_ONLY
def test_shard_map_over_two_cpu_devices():
    impls = ["reference"] + (["triton"] if triton_available() else [])
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", SHARDED.replace("IMPLS", repr(impls))], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [w for impl in impls for w in ("ok", impl)]
