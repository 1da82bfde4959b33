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


# ----------------------------------------------------------------------------- the kernel path, CPU and GPU


class KernelTransformTests:
    """vmap, scan, shard_map and repeatability on the kernel path (``implementation="triton"``),
    against a Python loop / the plain call; the interpreter class keeps shapes tiny."""

    D, I, E, K, M = 32, 16, 4, 2, 8
    LAYERS = 4

    def params(self, seed=0, layers=None):
        def one(s):
            return jaxmoe.init_moe_params(jax.random.key(s), hidden=self.D, intermediate=self.I, experts=self.E,
                                          dtype=F32)
        if layers is None:
            return one(seed)
        ps = [one(seed + i) for i in range(layers)]
        return jax.tree.map(lambda *a: jnp.stack(a), *ps)

    def x(self, *lead, seed=1):
        return jax.random.normal(jax.random.key(seed), (*lead, self.M, self.D), F32)

    def layer(self, p, x):
        return jaxmoe.moe_layer(p, x, top_k=self.K, implementation="triton")

    def test_vmap_over_inputs_and_stacked_params_matches_a_loop(self):
        p, xs = self.params(), self.x(3)
        got = jax.jit(jax.vmap(self.layer, in_axes=(None, 0)))(p, xs)
        want = jnp.stack([jax.jit(self.layer)(p, x) for x in xs])
        assert rel_err(got, want) <= 1e-6 and float(jnp.abs(want).sum()) > 0
        ps = self.params(layers=3)
        got = jax.jit(jax.vmap(self.layer))(ps, xs)
        want = jnp.stack([jax.jit(self.layer)(jax.tree.map(lambda a: a[i], ps), xs[i]) for i in range(3)])
        assert rel_err(got, want) <= 1e-6

    def test_vmap_of_grad_matches_a_loop(self):
        p, xs = self.params(), self.x(2)
        grad = jax.grad(lambda p, x: jnp.sum(self.layer(p, x) ** 2), argnums=(0, 1))
        got = jax.jit(jax.vmap(grad, in_axes=(None, 0)))(p, xs)
        for i in range(2):
            want = jax.jit(grad)(p, xs[i])
            for name in ("router", "w1", "w2"):
                assert rel_err(got[0][name][i], want[0][name]) <= 1e-5, name
            assert rel_err(got[1][i], want[1]) <= 1e-5

    def test_scan_over_stacked_layers_matches_a_loop(self):
        """Forward and gradient of LAYERS residual layers under lax.scan, as a Python loop."""
        ps, x = self.params(layers=self.LAYERS), self.x()

        def scanned(ps, x):
            y, _ = jax.lax.scan(lambda h, p: (h + self.layer(p, h), None), x, ps)
            return jnp.sum(y ** 2)

        def looped(ps, x):
            for i in range(self.LAYERS):
                x = x + self.layer(jax.tree.map(lambda a: a[i], ps), x)
            return jnp.sum(x ** 2)

        (v1, g1), (v2, g2) = (jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(ps, x) for f in (scanned, looped))
        assert float(v1) == pytest.approx(float(v2), rel=1e-6)
        for name in ("router", "w1", "w2"):
            assert np.isfinite(np.asarray(g1[0][name])).all() and rel_err(g1[0][name], g2[0][name]) <= 1e-5, name
        assert rel_err(g1[1], g2[1]) <= 1e-5

    def test_shard_map_on_one_device_mesh(self):
        """Forward and gradient inside shard_map over a 1-device mesh equal the plain call."""
        p, x = self.params(), self.x()
        mesh = jax.make_mesh((1,), ("tokens",), axis_types=(jax.sharding.AxisType.Auto,))

        def loss(p, x):
            f = jax.shard_map(lambda xb: self.layer(p, xb), mesh=mesh, in_specs=P("tokens"), out_specs=P("tokens"))
            return jnp.sum(f(x) ** 2)

        plain = lambda p, x: jnp.sum(self.layer(p, x) ** 2)  # noqa: E731
        (v1, g1), (v2, g2) = (jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(p, x) for f in (loss, plain))
        assert float(v1) == pytest.approx(float(v2), rel=1e-6)
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
            assert rel_err(a, b) <= 1e-6

    def test_layer_gradients_bitwise_identical_across_runs(self):
        p = jax.tree.map(lambda a: a.astype(jnp.bfloat16), self.params())
        x = self.x().astype(jnp.bfloat16)
        grad = jax.jit(jax.grad(lambda p, x: jnp.sum(self.layer(p, x).astype(F32) ** 2), argnums=(0, 1)))
        first, second = jax.device_get(grad(p, x)), jax.device_get(grad(p, x))
        for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
            assert np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


@pytest.mark.skipif(not triton_available(), reason="needs the triton package")
@CPU_ONLY
class TestKernelTransformsInterpreter(KernelTransformTests):
    pass


@pytest.mark.gpu
class TestKernelTransformsGPU(KernelTransformTests):
    D, I, E, K, M = 1024, 512, 16, 4, 512
