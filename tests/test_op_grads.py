"""Gradients of the ops used alone, not only through the fused layer: ``jaxmoe.route`` in
the logits, ``ops.grouped_gemm`` and ``ops.moe_gemm`` in their operands and weights, each
implementation's ``jax.grad`` against that of the reference on fp32 copies (fp32: 1e-4
relative, the kernels' fp32 products exact; bf16: 2e-2, operands and the cotangent's use
rounded to bf16 as the kernels round them)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmoe
from conftest import moe_inputs, randn, rel_err
from jaxmoe import ops
from jaxmoe.ops.routing import reference as routing_reference
from op_base import BF16, F32, OpTests, bias, cases, logits

GRAD_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}

ROUTE_CASES = {
    "softmax-renorm": (9, 8, 2, {}),
    "softmax-plain-kE": (5, 4, 4, {"renormalize": False}),
    "sigmoid-plain-M1": (1, 16, 3, {"scoring": "sigmoid", "renormalize": False}),
    "sigmoid-scaled": (12, 16, 4, {"scoring": "sigmoid", "routed_scaling_factor": 2.5}),
    "grouped-bias": (10, 16, 4, {"scoring": "sigmoid", "num_expert_group": 4, "topk_group": 2,
                                 "routed_scaling_factor": 2.5, "bias": True}),
}

# (M, K, N, E, top_k, stage, activation, with weights, dtype): stage 1 reads a[f // top_k]
# (the tokens), stage 2 a[f] (the M * k rows)
GEMM_CASES = {
    "stage1-silu-fp32": (7, 40, 48, 4, 2, 1, "silu", False, F32),
    "stage1-gelu-weighted-fp32": (6, 32, 32, 5, 3, 1, "gelu", True, F32),
    "stage2-weighted-fp32": (9, 24, 40, 6, 2, 2, None, True, F32),
    "stage1-plain-bf16": (8, 32, 48, 4, 2, 1, None, False, BF16),
    "stage2-weighted-bf16-empty": (11, 32, 32, 8, 2, 2, None, True, BF16),
}


def _layout(ids, e, block):
    return ops.moe_align_block_size(ids, e, block, implementation="reference")


class OpGradTests(OpTests):
    ROUTE_CASES = ROUTE_CASES
    GEMM_CASES = GEMM_CASES

    @cases("ROUTE_CASES", "m,e,k,options")
    def test_route_gradient(self, rng, m, e, k, options):
        options = dict(options)
        if options.pop("bias", False):
            options["correction_bias"] = bias(rng, e)
        lg = logits(rng, m, e)
        c = jnp.asarray(rng.standard_normal((m, k)), F32)

        def grad(implementation):
            def loss(lg):
                w, ids = jaxmoe.route(lg, k, **options, implementation=implementation)
                return jnp.sum(w * c), ids
            return self.jit(jax.grad(loss, has_aux=True), lg)

        got, ids = grad(self.implementation)
        _, want_ids = grad("reference")
        # a kernel may break an fp32 tie of scores differently from XLA (rarely): the contract
        # is the derivative of the weights at the ids it chose
        assert np.mean(np.all(np.asarray(ids) == np.asarray(want_ids), axis=1)) >= 0.999
        scale = options.get("routed_scaling_factor", 1.0)
        want = jax.grad(lambda lg: jnp.sum(routing_reference.weights_at(
            lg, ids, scoring=options.get("scoring", "softmax"), renormalize=options.get("renormalize", True),
            routed_scaling_factor=scale) * c))(lg)
        assert np.isfinite(got).all() and np.linalg.norm(want) > 0
        assert rel_err(got, want) <= 1e-5
        # only the chosen experts' logits (all of them with softmax) carry a gradient
        if options.get("scoring") == "sigmoid":
            chosen = np.zeros((m, e), bool)
            np.put_along_axis(chosen, np.asarray(ids), True, axis=1)
            assert not np.asarray(got)[~chosen].any()

    def test_route_bias_gets_no_gradient(self, rng):
        e = 16
        lg, b = logits(rng, 8, e), bias(rng, e)

        def loss(lg, b):
            return jaxmoe.route(lg, 4, scoring="sigmoid", num_expert_group=4, topk_group=2, correction_bias=b,
                                implementation=self.implementation)[0].sum()

        g_logits, g_bias = self.jit(jax.grad(loss, argnums=(0, 1)), lg, b)
        assert not np.asarray(g_bias).any() and np.linalg.norm(g_logits) > 0

    @cases("GEMM_CASES", "m,kd,n,e,top_k,stage,activation,weighted,dtype")
    def test_grouped_gemm_gradient(self, rng, m, kd, n, e, top_k, stage, activation, weighted, dtype):
        pool = None if e < 8 else [0, 2, 3, 7]  # four experts without rows
        _, _, _, tw, ids = moe_inputs(rng, m, 8, 8, e, top_k, F32, pool)
        a_rows = m if stage == 1 else m * top_k
        a = randn(rng, (a_rows, kd), dtype)
        b = randn(rng, (e, n, kd), dtype, scale=kd**-0.5)
        routing = ops.align(ids, e, 16, implementation="reference")
        n_out = n // 2 if activation else n
        c = jnp.asarray(rng.standard_normal((m * top_k, n_out)), F32)
        argnums = (0, 1, 2) if weighted else (0, 1)

        def grads(implementation, a, b, tw):
            def loss(a, b, tw):
                y = ops.grouped_gemm(a, b, routing, topk_weights=tw if weighted else None, activation=activation,
                                     implementation=implementation)
                return jnp.sum(y.astype(F32) * c)
            return self.jit(jax.grad(loss, argnums=argnums), a, b, tw)

        got = grads(self.implementation, a, b, tw)
        want = grads("reference", a.astype(F32), b.astype(F32), tw)
        for name, g, w, arg in zip(("a", "b", "topk_weights"), got, want, (a, b, tw)):
            assert g.shape == arg.shape and g.dtype == arg.dtype, name
            assert np.isfinite(np.asarray(g, F32)).all(), name
            assert np.linalg.norm(np.asarray(w)) > 0, name
            assert rel_err(g, w) <= GRAD_TOLERANCE[jnp.dtype(dtype).name], name
        if pool is not None:
            empty = np.setdiff1d(np.arange(e), pool)
            assert not np.asarray(got[1][empty], F32).any()

    def test_moe_gemm_gradient(self, rng):
        """The seed's entry point: stage 1 with the activation, then stage 2 with the weights."""
        m, d, i, e, k = 10, 32, 24, 4, 2
        x, w1, w2, tw, ids = moe_inputs(rng, m, d, i, e, k, F32)
        sorted_ids, expert_ids, padded = _layout(ids, e, 16)
        c = jnp.asarray(rng.standard_normal((m * k, d)), F32)

        def grads(implementation):
            def loss(x, w1, w2, tw):
                h = ops.moe_gemm(x, w1, sorted_ids, expert_ids, padded, top_k=k, num_rows=m * k, block_size=16,
                                 activation="silu", implementation=implementation)
                y = ops.moe_gemm(h, w2, sorted_ids, expert_ids, padded, top_k=1, num_rows=m * k, block_size=16,
                                 topk_weights=tw, implementation=implementation)
                return jnp.sum(y * c)
            return self.jit(jax.grad(loss, argnums=(0, 1, 2, 3)), x, w1, w2, tw)

        for g, w in zip(grads(self.implementation), grads("reference")):
            assert np.linalg.norm(np.asarray(w)) > 0 and rel_err(g, w) <= 1e-4


class TestOpGradReference(OpGradTests):
    implementation = "reference"
    ROUTE_CASES = {"grouped-bias": ROUTE_CASES["grouped-bias"]}  # against itself: the shape of the checks
    GEMM_CASES = {"stage2-weighted-fp32": GEMM_CASES["stage2-weighted-fp32"]}


class TestOpGradTritonInterpreter(OpGradTests):
    implementation = "triton"


@pytest.mark.gpu
class TestOpGradTritonGPU(OpGradTests):
    implementation, gpu = "triton", True
    ROUTE_CASES = {**ROUTE_CASES, "softmax-E256-k8": (4096, 256, 8, {}),
                   "deepseek-M4096": (4096, 256, 8, {"scoring": "sigmoid", "num_expert_group": 8, "topk_group": 4,
                                                     "routed_scaling_factor": 2.5, "bias": True})}
    GEMM_CASES = {**GEMM_CASES,
                  "stage1-silu-large-bf16": (1024, 1024, 1024, 16, 4, 1, "silu", False, BF16),
                  "stage2-weighted-large-bf16": (1024, 512, 1024, 16, 4, 2, None, True, BF16)}


@pytest.mark.parametrize("arch", ["sm90", "gfx942"])
def test_weight_grad_tiles_by_arch(rng, arch):
    """The weight gradient with the tile each arch gets at BLOCK_M = 64 (NVIDIA: 128 x 256
    over 64 rows a step; AMD: 64 x 64 over 32), against its definition in jnp (fp32: 1e-5,
    exact fp32 products in both)."""
    from jaxmoe.ops.gemm import config as _config
    from jaxmoe.ops.gemm import triton as gemm_triton

    m, k, e, n, kd = 40, 2, 3, 72, 40
    ids = jnp.asarray(np.stack([rng.choice(e, size=k, replace=False) for _ in range(m)]), jnp.int32)
    routing = ops.align(ids, e, 64, implementation="reference")
    g = randn(rng, (m * k, n), F32)
    a = randn(rng, (m, kd), F32)
    tw = jnp.asarray(rng.uniform(0.1, 1.0, (m, k)), F32)
    assert _config.weight_grad_tile(64, F32, arch)[4] == (64 if arch == "sm90" else 32)
    got = jax.jit(lambda g, a, tw: gemm_triton.weight_grad(g, a, routing, out_dtype=F32, topk_weights=tw,
                                                           arch=arch))(g, a, tw)
    rows_a = np.repeat(np.asarray(a), k, axis=0)
    want = np.zeros((e, n, kd))
    for f, ex in enumerate(np.asarray(ids).reshape(-1)):
        want[ex] += np.asarray(tw).reshape(-1)[f] * np.outer(np.asarray(g)[f], rows_a[f])
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("k_group", [1, 2, 3, 8])
def test_weight_grad_k_groups(rng, k_group):
    """Programs that run several output tiles along K in one loop (``k_group``): 16-row
    steps, experts with 0, 1 and several steps of rows, an invalid id, K = 72 (five 16-wide
    tiles, the last partial; groups of 2 and 3 end partial), against the definition in jnp
    (fp32: 1e-5) and bitwise equal to one tile per program (the same sums in the same order)."""
    from jaxmoe.ops.gemm import triton as gemm_triton

    m, k, e, n, kd = 37, 2, 5, 40, 72
    ids = np.stack([rng.choice(4, size=k, replace=False) for _ in range(m)])  # expert 4 gets no rows
    ids[:20, 0] = 0  # expert 0: 20+ rows, two steps or more
    ids[:20, 1] = rng.choice([1, 2, 3], size=20)
    ids[5, 1] = 7  # out of range: no expert's gradient
    ids = jnp.asarray(ids, jnp.int32)
    routing = ops.align(ids, e, 16, implementation="reference")
    g = randn(rng, (m * k, n), F32)
    a = randn(rng, (m, kd), F32)
    tile = (32, 16, 4, 2, 16)

    def run(kg):
        return jax.jit(lambda g, a: gemm_triton.weight_grad(g, a, routing, out_dtype=F32, tile=tile,
                                                            k_group=kg))(g, a)

    got = run(k_group)
    rows_a = np.repeat(np.asarray(a), k, axis=0)
    want = np.zeros((e, n, kd))
    for f, ex in enumerate(np.asarray(ids).reshape(-1)):
        if 0 <= ex < e:
            want[ex] += np.outer(np.asarray(g)[f], rows_a[f])
    assert np.abs(want[0]).max() > 0 and not np.asarray(got[4]).any()
    assert rel_err(got, want) <= 1e-5
    if k_group > 1:
        np.testing.assert_array_equal(np.asarray(got), np.asarray(run(1)))
