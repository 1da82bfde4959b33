"""The MoE layer: ``jaxmoe.moe_layer``, each implementation against the float64 oracle
(router matmul, routing and experts all in float64), then its errors and launch count."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import jaxmoe
import oracle
from conftest import randn, rel_err, to_f64, tolerance
from jaxmoe.layer import init_moe_params
from op_base import BF16, F32, OpTests, bias


def oracle_layer(params, x, top_k, correction_bias=None, **routing):
    x2d = to_f64(x).reshape(-1, x.shape[-1])
    tw, ti = oracle.route(x2d @ to_f64(params["router"]), top_k, **routing,
                          correction_bias=None if correction_bias is None else to_f64(correction_bias))
    return oracle.fused_moe(x2d, to_f64(params["w1"]), to_f64(params["w2"]), tw, ti).reshape(x.shape)


class MoeLayerTests(OpTests):
    """Router matmul, routing, alignment and both GEMMs as one layer."""

    def layer(self, params, x, **kw):
        return self.jit(lambda p, x: jaxmoe.moe_layer(p, x, **kw, **self.impl), params, x)

    @pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
    def test_batch_dims(self, rng, dtype):
        """Leading dims are flattened into tokens and restored; the dtype is kept."""
        d, i, e, k = 64, 32, 8, 2
        params = init_moe_params(jax.random.key(int(rng.integers(1 << 30))), hidden=d, intermediate=i, experts=e,
                                 dtype=dtype)
        x = randn(rng, (2, 3, d), dtype)
        got = self.layer(params, x, top_k=k)
        assert got.shape == x.shape and got.dtype == dtype
        assert rel_err(got, oracle_layer(params, x, k)) <= tolerance(dtype)

    def test_deepseek_routing(self, rng):
        """Sigmoid scoring, expert groups, a correction bias and a scale, through the layer."""
        d, i, e, k = 32, 16, 32, 4
        params = init_moe_params(jax.random.key(3), hidden=d, intermediate=i, experts=e, dtype=F32)
        kw = dict(correction_bias=randn(rng, (e,), F32, 0.1), scoring="sigmoid", num_expert_group=4, topk_group=2,
                  routed_scaling_factor=2.5)
        x = randn(rng, (7, d), F32)
        assert rel_err(self.layer(params, x, top_k=k, **kw), oracle_layer(params, x, k, **kw)) <= 1e-4

    @pytest.mark.parametrize("m", [1, 80])
    def test_decode_and_prefill(self, rng, m):
        """fp32, so the comparison is tight. On the kernels m=1 routes and aligns in one launch;
        at m=80 (E=64: three row blocks of 32) they are launches of their own."""
        params = init_moe_params(jax.random.key(m), hidden=64, intermediate=32, experts=64, dtype=F32)
        x = jnp.asarray(rng.standard_normal((m, 64)), F32)
        kw = dict(scoring="sigmoid", num_expert_group=8, topk_group=4, correction_bias=bias(rng, 64),
                  routed_scaling_factor=2.5)
        assert rel_err(self.layer(params, x, top_k=6, **kw), oracle_layer(params, x, 6, **kw)) <= 1e-5


class TestMoeLayerReference(MoeLayerTests):
    implementation = "reference"


class TestMoeLayerTritonInterpreter(MoeLayerTests):
    implementation = "triton"


@pytest.mark.gpu
class TestMoeLayerTritonGPU(MoeLayerTests):
    implementation, gpu = "triton", True


@pytest.mark.gpu
def test_gpu_moe_layer_launch_count():
    """Decode: router matmul aside, the layer is three Triton launches (route+align, two GEMMs)."""
    params = init_moe_params(jax.random.key(0), hidden=64, intermediate=32, experts=8, dtype=BF16)
    x = jnp.ones((1, 64), BF16)
    hlo = jax.jit(lambda p, x: jaxmoe.moe_layer(p, x, top_k=2, implementation="triton")).lower(params, x).as_text()
    assert hlo.count("@triton_kernel_call") == 3


def test_moe_layer_errors(rng):
    p = init_moe_params(jax.random.key(0), hidden=16, intermediate=8, experts=4, dtype=F32)
    x = randn(rng, (3, 16), F32)
    with pytest.raises(ValueError, match="x"):
        jaxmoe.moe_layer(p, randn(rng, (3, 15), F32), top_k=2)
    with pytest.raises(TypeError, match="x"):
        jaxmoe.moe_layer(p, x.astype(BF16), top_k=2)
    with pytest.raises(ValueError, match="top_k"):
        jaxmoe.moe_layer(p, x, top_k=5)
    with pytest.raises(TypeError, match="params"):
        jaxmoe.moe_layer({"w1": p["w1"]}, x, top_k=2)
    with pytest.raises(ValueError, match="implementation"):
        jaxmoe.moe_layer(p, x, top_k=2, implementation="nope")
    with pytest.raises(ValueError, match="scoring"):
        jaxmoe.moe_layer(p, x, top_k=2, scoring="max")
    with pytest.raises(ValueError, match="activation"):
        jaxmoe.moe_layer(p, x, top_k=2, activation="relu")
