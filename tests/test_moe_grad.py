"""Gradients of the fused MoE and of the layer: each implementation's ``jax.grad`` against
that of the reference on fp32 copies of the inputs (the reference's own against central
finite differences of the float64 oracle), then what only the kernels promise: zero
gradients for invalid ids and empty experts, a NaN token kept to its experts, bitwise
repeatable gradients, remat, and the transforms composing.

The interpreter class keeps the shapes tiny (Triton's interpreter runs every launch of
the backward too); the GPU class adds larger shapes and is skipped, visibly, without a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmoe
import oracle
from conftest import moe_inputs, randn, rel_err, to_f64
from jaxmoe.layer import init_moe_params
from jaxmoe.ops.moe import triton as moe_triton
from op_base import BF16, F32, OpTests, bias, cases, with_invalid_ids

GRAD_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
ARGS = ("x", "w1", "w2", "topk_weights")


def cotangent(rng, shape) -> jax.Array:
    """A fixed random output cotangent: the loss is ``sum(y * c)``, so grad is the VJP with c."""
    return jnp.asarray(rng.standard_normal(shape), F32)


def moe_loss(fn, c):
    return lambda x, w1, w2, tw, ids: jnp.sum(fn(x, w1, w2, tw, ids).astype(F32) * c)


def reference_grads(x, w1, w2, tw, ids, c, activation="silu"):
    """jax.grad of the reference on fp32 copies of x, w1 and w2."""
    f32 = [a.astype(F32) for a in (x, w1, w2)]
    loss = moe_loss(lambda *a: jaxmoe.fused_moe(*a, activation=activation, implementation="reference"), c)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*f32, tw, ids)


# (M, D, I, E, k, expert pool or None, activation, dtype) by name
GRAD_CASES = {
    "M1-fp32-silu": (1, 32, 16, 4, 2, None, "silu", F32),
    "odd-kE-fp32-gelu": (7, 40, 24, 5, 5, None, "gelu", F32),  # k = E; D, I not multiples of a tile
    "empty-fp32-silu": (11, 32, 16, 8, 2, (0, 3, 4), "silu", F32),  # five empty experts
    "odd-bf16-silu": (9, 40, 24, 6, 2, None, "silu", BF16),
    "empty-bf16-gelu": (12, 32, 16, 8, 3, (1, 2, 5, 6), "gelu", BF16),
}


class FusedMoeGradTests(OpTests):
    """``jax.grad`` of ``jaxmoe.fused_moe`` in x, w1, w2 and topk_weights."""

    GRAD_CASES = GRAD_CASES

    def fused(self, activation="silu"):
        return lambda x, w1, w2, tw, ids: jaxmoe.fused_moe(x, w1, w2, tw, ids, activation=activation, **self.impl)

    def grads(self, x, w1, w2, tw, ids, c, activation="silu"):
        loss = moe_loss(self.fused(activation), c)
        return self.jit(jax.grad(loss, argnums=(0, 1, 2, 3)), x, w1, w2, tw, ids)

    @cases("GRAD_CASES", "m,d,i,e,k,pool,activation,dtype")
    def test_matches_reference(self, rng, m, d, i, e, k, pool, activation, dtype):
        x, w1, w2, tw, ids = moe_inputs(rng, m, d, i, e, k, dtype, None if pool is None else list(pool))
        c = cotangent(rng, (m, d))
        got = self.grads(x, w1, w2, tw, ids, c, activation)
        want = reference_grads(x, w1, w2, tw, ids, c, activation)
        for name, g, w, arg in zip(ARGS, got, want, (x, w1, w2, tw)):
            assert g.shape == arg.shape and g.dtype == arg.dtype, name
            assert np.isfinite(to_f64(g)).all(), name  # poisoned outputs: nothing unwritten is read
            assert rel_err(g, w) <= GRAD_TOLERANCE[jnp.dtype(dtype).name], name
        if pool is not None:  # experts without rows: zero weight gradients, exactly
            empty = np.setdiff1d(np.arange(e), pool)
            assert not np.asarray(got[1][empty], F32).any() and not np.asarray(got[2][empty], F32).any()

    def test_invalid_ids_get_zero_gradients(self, rng):
        """A slot with an id outside [0, E) contributes nothing, so its weight and, for a
        token whose ids are all invalid, its x row get zero gradients."""
        m, d, i, e, k = 9, 32, 16, 6, 2
        x, w1, w2, tw, ids = moe_inputs(rng, m, d, i, e, k, F32)
        ids = np.array(with_invalid_ids(ids, e))
        ids[4] = [-3, e]
        ids = jnp.asarray(ids)
        c = cotangent(rng, (m, d))
        got = self.grads(x, w1, w2, tw, ids, c)
        invalid = (np.asarray(ids) < 0) | (np.asarray(ids) >= e)
        assert not np.asarray(got[3])[invalid].any() and np.asarray(got[3])[~invalid].all()
        assert not np.asarray(got[0][4]).any()
        for g, w in zip(got, reference_grads(x, w1, w2, tw, ids, c)):
            assert rel_err(g, w) <= 1e-4

    def test_value_and_grad_and_checkpoint_compose(self, rng):
        """jax.value_and_grad returns the forward's value; jax.checkpoint changes no gradient."""
        m, d, i, e, k = 6, 32, 16, 4, 2
        x, w1, w2, tw, ids = moe_inputs(rng, m, d, i, e, k, F32)
        c = cotangent(rng, (m, d))
        loss = moe_loss(self.fused(), c)
        value, grads = self.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)), x, w1, w2, tw, ids)
        assert value == pytest.approx(float(self.jit(loss, x, w1, w2, tw, ids)), rel=1e-6)
        remat = self.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2, 3)), x, w1, w2, tw, ids)
        for g, r in zip(grads, remat):
            assert rel_err(r, g) <= 1e-6


class TestFusedMoeGradReference(FusedMoeGradTests):
    implementation = "reference"

    def test_matches_finite_differences(self, rng):
        """The reference's autodiff against central differences of the float64 oracle."""
        m, d, i, e, k = 3, 8, 4, 4, 2
        x, w1, w2, tw, ids = moe_inputs(rng, m, d, i, e, k, F32)
        c = np.asarray(cotangent(rng, (m, d)), np.float64)
        got = self.grads(x, w1, w2, tw, ids, jnp.asarray(c))
        args = [to_f64(a) for a in (x, w1, w2, tw)]

        def loss(*a):
            return float(np.sum(oracle.fused_moe(*a, np.asarray(ids)) * c))

        eps = 1e-6
        for n, (g, a) in enumerate(zip(got, args)):
            fd = np.zeros_like(a)
            for idx in np.ndindex(a.shape):
                up, down = [v.copy() for v in args], [v.copy() for v in args]
                up[n][idx] += eps
                down[n][idx] -= eps
                fd[idx] = (loss(*up) - loss(*down)) / (2 * eps)
            assert rel_err(g, fd) <= 1e-4, ARGS[n]


class KernelGradTests(FusedMoeGradTests):
    """What the Triton backward promises beyond matching the reference."""

    def test_nan_token_stays_in_its_experts(self, rng):
        """A NaN in one token's x reaches the weight gradients of its own experts only, and
        the x gradients of no other token (the reference, dense over experts, spreads it)."""
        m, d, i, e, k = 10, 32, 16, 6, 2
        x, w1, w2, tw, ids = moe_inputs(rng, m, d, i, e, k, F32)
        x = x.at[3, 5].set(jnp.nan)
        got = self.grads(x, w1, w2, tw, ids, cotangent(rng, (m, d)))
        own = set(np.asarray(ids)[3].tolist())
        for ex in range(e):
            for dw in got[1:3]:
                assert np.isfinite(np.asarray(dw[ex])).all() == (ex not in own), ex
        assert np.isfinite(np.delete(np.asarray(got[0]), 3, axis=0)).all()

    def test_bitwise_repeatable(self, rng):
        """Two runs give the same gradients to the bit (no atomics, a fixed order)."""
        m, d, i, e, k = 13, 32, 16, 4, 3
        x, w1, w2, tw, ids = moe_inputs(rng, m, d, i, e, k, BF16)
        c = cotangent(rng, (m, d))
        first = self.grads(x, w1, w2, tw, ids, c)
        second = self.grads(x, w1, w2, tw, ids, c)
        for a, b in zip(first, second):
            assert np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))

    def test_remat_gives_the_same_gradients(self, rng):
        """remat=True recomputes stage 1's output in the backward: bitwise the same gradients."""
        m, d, i, e, k = 8, 32, 16, 4, 2
        x, w1, w2, tw, ids = moe_inputs(rng, m, d, i, e, k, BF16)
        c = cotangent(rng, (m, d))

        def grads(remat):
            loss = moe_loss(lambda *a: moe_triton.fused_moe(*a, remat=remat), c)
            return self.jit(jax.grad(loss, argnums=(0, 1, 2, 3)), x, w1, w2, tw, ids)

        for a, b in zip(grads(False), grads(True)):
            assert np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


    @pytest.mark.parametrize("name", ["odd-kE-fp32-gelu", "empty-bf16-gelu", "odd-bf16-silu"])
    def test_save_gate_up_matches_reference(self, rng, monkeypatch, name):
        """``JAXMOE_SAVE_GATE_UP=1``: stage 1's pre-activation is saved and the backward takes
        the activation's derivative at it in jnp, launching no stage-1 GEMM. The output and
        the gradients against the reference's (invalid ids and empty experts included; the
        dtype's tolerance: the pre-activation is rounded to it before the activation)."""
        from jaxmoe.ops.gemm import triton as gemm_triton
        from jaxmoe.ops.moe import backward

        m, d, i, e, k, pool, activation, dtype = GRAD_CASES[name]
        x, w1, w2, tw, ids = moe_inputs(rng, m, d, i, e, k, dtype, None if pool is None else list(pool))
        ids = with_invalid_ids(ids, e)
        c = cotangent(rng, (m, d))
        monkeypatch.setenv(backward.SAVE_GATE_UP_ENV, "1")
        launched = []
        act_backward = gemm_triton.act_backward
        monkeypatch.setattr(gemm_triton, "act_backward", lambda *a, **kw: launched.append(1) or act_backward(*a, **kw))
        y = self.jit(self.fused(activation), x, w1, w2, tw, ids)
        got = self.grads(x, w1, w2, tw, ids, c, activation)
        assert not launched
        f32 = [a.astype(F32) for a in (x, w1, w2)]
        y_want = jaxmoe.fused_moe(*f32, tw, ids, activation=activation, implementation="reference")
        assert rel_err(y, y_want) <= (1e-5 if dtype == F32 else 1e-2)
        invalid = (np.asarray(ids) < 0) | (np.asarray(ids) >= e)
        assert not np.asarray(got[3])[invalid].any()
        for arg_name, g, w, arg in zip(ARGS, got, reference_grads(x, w1, w2, tw, ids, c, activation),
                                       (x, w1, w2, tw)):
            assert g.shape == arg.shape and g.dtype == arg.dtype, arg_name
            assert np.isfinite(to_f64(g)).all(), arg_name
            assert rel_err(g, w) <= GRAD_TOLERANCE[jnp.dtype(dtype).name], arg_name
        if pool is not None:
            empty = np.setdiff1d(np.arange(e), pool)
            assert not np.asarray(got[1][empty], F32).any() and not np.asarray(got[2][empty], F32).any()

    def test_save_gate_up_with_biases_clamped_swiglu_in_out_interleaved(self, rng):
        """save_gate_up with gpt-oss's features (biases, clamped SwiGLU, w1 ``[E, D, 2I]`` with
        gate/up interleaved): in fp32 the same gradients as the default backward (1e-5:
        the activation in jnp against the kernel's epilogue), biases' gradients included."""
        from jaxmoe.types import ClampedSwiGLU

        m, d, i, e, k = 10, 40, 24, 5, 2
        x, _, _, tw, ids = moe_inputs(rng, m, d, i, e, k, F32)
        ids = with_invalid_ids(ids, e)
        w1 = randn(rng, (e, d, 2 * i), F32, scale=d**-0.5)
        w2 = randn(rng, (e, i, d), F32, scale=i**-0.5)
        b1, b2 = randn(rng, (e, 2 * i), F32, scale=0.1), randn(rng, (e, d), F32, scale=0.1)
        c = cotangent(rng, (m, d))
        act = ClampedSwiGLU(limit=1.5)  # a limit the pre-activations cross

        def grads(save):
            def loss(x, w1, w2, tw, b1, b2):
                y = moe_triton.fused_moe(x, w1, w2, tw, ids, activation=act, b1=b1, b2=b2,
                                         layout="in_out_interleaved", save_gate_up=save)
                return jnp.sum(y.astype(F32) * c)
            return self.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5)), x, w1, w2, tw, b1, b2)

        for name, a, b in zip(("x", "w1", "w2", "topk_weights", "b1", "b2"), grads(False), grads(True)):
            assert np.isfinite(np.asarray(b)).all(), name
            assert rel_err(b, a) <= 1e-5, name

    def test_save_gate_up_refuses_remat_and_bad_values(self, rng, monkeypatch):
        from jaxmoe.ops.moe import backward

        m, d, i, e, k = 4, 32, 16, 4, 2
        x, w1, w2, tw, ids = moe_inputs(rng, m, d, i, e, k, F32)
        monkeypatch.setenv(backward.SAVE_GATE_UP_ENV, "1")
        with pytest.raises(ValueError, match="choose one"):
            moe_triton.fused_moe(x, w1, w2, tw, ids, remat=True)
        monkeypatch.setenv(backward.SAVE_GATE_UP_ENV, "maybe")
        with pytest.raises(ValueError, match="JAXMOE_SAVE_GATE_UP must be unset, 1 or 0"):
            moe_triton.fused_moe(x, w1, w2, tw, ids)


    def test_save_gate_up_leaves_quantized_layers_alone(self, rng, monkeypatch):
        """Quantized weights' backward recomputes stage 1 from the dequantized weights:
        ``JAXMOE_SAVE_GATE_UP=1`` leaves their forward exactly as without it (w8a8 still
        rounds x in stage 1), and ``save_gate_up=True`` is refused."""
        from jaxmoe.ops.moe import backward

        m, d, i, e, k = 6, 64, 32, 4, 2
        x, w1, w2, tw, ids = moe_inputs(rng, m, d, i, e, k, BF16)
        w1q, w2q = jaxmoe.quantize_weights(w1, "int8"), jaxmoe.quantize_weights(w2, "int8")

        def run():
            return np.asarray(self.jit(lambda x, tw: moe_triton.fused_moe(x, w1q, w2q, tw, ids, act_quant="int8"),
                                       x, tw), F32)

        plain = run()
        monkeypatch.setenv(backward.SAVE_GATE_UP_ENV, "1")
        assert np.array_equal(run(), plain)
        with pytest.raises(ValueError, match="with quantized weights the backward recomputes stage 1"):
            moe_triton.fused_moe(x, w1q, w2q, tw, ids, act_quant="int8", save_gate_up=True)


class TestFusedMoeGradTritonInterpreter(KernelGradTests):
    implementation = "triton"


@pytest.mark.gpu
class TestFusedMoeGradTritonGPU(KernelGradTests):
    implementation, gpu = "triton", True
    GRAD_CASES = {**GRAD_CASES,
                  "large-bf16-silu": (512, 1024, 512, 16, 4, None, "silu", BF16),
                  "large-fp32-gelu": (300, 512, 384, 8, 2, None, "gelu", F32)}

    @pytest.mark.xdist_group("big-memory")  # tens of GB each: one at a time on the card
    def test_backward_offsets_past_int32(self, rng):
        """The backward's row offsets pass 2^31 elements: g and h at f * I, d gate_up at
        f * 2I, the weight gradient's rows likewise (M * k * I > 2^31). The cotangent is
        zero but on the last 4096 tokens, whose offsets are the largest: every gradient is
        then that of those tokens alone, compared with the fp32 reference on them; the
        other tokens' x gradients are exactly zero (no stray writes)."""
        m, d, i, e, k, tail = (1 << 21) + 4096, 128, 128, 8, 8, 4096
        assert m * k * i > 2**31
        x, w1, w2, tw, ids = moe_inputs(rng, m, d, i, e, k, BF16)
        c = jnp.zeros((m, d), F32).at[m - tail:].set(cotangent(rng, (tail, d)))
        got = jax.jit(jax.grad(moe_loss(self.fused(), c), argnums=(0, 1, 2, 3)))(x, w1, w2, tw, ids)
        rows = slice(m - tail, m)
        want = reference_grads(x[rows], w1, w2, tw[rows], ids[rows], c[rows])
        for name, g, w in zip(ARGS, (got[0][rows], got[1], got[2], got[3][rows]), want):
            assert np.isfinite(np.asarray(g, F32)).all(), name
            assert rel_err(g, w) <= GRAD_TOLERANCE["bfloat16"], name
        assert not np.asarray(got[0][: m - tail], F32).any()


# ----------------------------------------------------------------------------- the layer

# routing options by name: softmax, sigmoid without renormalization, DeepSeek-V3 style
def _routing(rng, e):
    return {
        "softmax": {},
        "sigmoid-plain": {"scoring": "sigmoid", "renormalize": False},
        "grouped-bias": {"scoring": "sigmoid", "num_expert_group": 4, "topk_group": 2,
                         "correction_bias": bias(rng, e), "routed_scaling_factor": 2.5},
    }


LAYER_CASES = {f"{mode}-M{m}": (mode, m) for mode in ("softmax", "sigmoid-plain", "grouped-bias") for m in (1, 24)}


class MoeLayerGradTests(OpTests):
    """``jax.grad`` of ``jaxmoe.moe_layer`` in its params and x, routing included."""

    LAYER_CASES = LAYER_CASES
    D, I, E, K = 32, 16, 16, 4

    def layer_grads(self, params, x, c, routing, implementation):
        def loss(p, x, bias):
            y = jaxmoe.moe_layer(p, x, top_k=self.K, **routing, correction_bias=bias, implementation=implementation)
            return jnp.sum(y.astype(F32) * c)

        bias_arg = routing.pop("correction_bias", None)
        return self.jit(jax.grad(loss, argnums=(0, 1, 2)), params, x, bias_arg)

    @cases("LAYER_CASES", "mode,m")
    def test_matches_reference(self, rng, mode, m):
        """At M = 1 the kernels route and align in one launch, at M = 24 in two."""
        params = init_moe_params(jax.random.key(m), hidden=self.D, intermediate=self.I, experts=self.E, dtype=F32)
        x = randn(rng, (m, self.D), F32)
        c = cotangent(rng, (m, self.D))
        routing = _routing(rng, self.E)[mode]
        got = self.layer_grads(params, x, c, dict(routing), self.implementation)
        want = self.layer_grads(params, x, c, dict(routing), "reference")
        for name in ("router", "w1", "w2"):
            assert np.isfinite(got[0][name]).all() and rel_err(got[0][name], want[0][name]) <= 1e-4, name
        assert rel_err(got[1], want[1]) <= 1e-4
        assert np.linalg.norm(got[0]["router"]) > 0  # the routing weights carry a gradient to the router
        if got[2] is not None:
            assert not np.asarray(got[2]).any()  # the correction bias only picks experts: no gradient


class TestMoeLayerGradReference(MoeLayerGradTests):
    implementation = "reference"
    LAYER_CASES = {"grouped-bias-M24": ("grouped-bias", 24)}  # against itself: only the bias's zero gradient

    def test_router_matches_finite_differences(self, rng):
        """The router's gradient through the routing weights, against central differences
        of the float64 oracle layer (ids stay put for so small a step)."""
        d, i, e, k, m = 8, 4, 8, self.K, 3
        params = init_moe_params(jax.random.key(0), hidden=d, intermediate=i, experts=e, dtype=F32)
        x = randn(rng, (m, d), F32)
        c = np.asarray(cotangent(rng, (m, d)), np.float64)
        got = self.layer_grads(params, x, jnp.asarray(c), {"scoring": "sigmoid", "renormalize": True}, "reference")
        router, w1, w2, x64 = (to_f64(a) for a in (params["router"], params["w1"], params["w2"], x))

        def loss(r):
            tw, ti = oracle.route(x64 @ r, k, scoring="sigmoid")
            return float(np.sum(oracle.fused_moe(x64, w1, w2, tw, ti) * c))

        eps = 1e-6
        fd = np.zeros_like(router)
        for idx in np.ndindex(router.shape):
            up, down = router.copy(), router.copy()
            up[idx] += eps
            down[idx] -= eps
            fd[idx] = (loss(up) - loss(down)) / (2 * eps)
        assert rel_err(got[0]["router"], fd) <= 1e-4


class TestMoeLayerGradTritonInterpreter(MoeLayerGradTests):
    implementation = "triton"


@pytest.mark.gpu
class TestMoeLayerGradTritonGPU(MoeLayerGradTests):
    implementation, gpu = "triton", True
    LAYER_CASES = {**LAYER_CASES, **{f"{mode}-M512": (mode, 512) for mode in ("softmax", "grouped-bias")}}
