"""The fused MoE's model features: expert biases (``b1`` before the activation, ``b2``
before the routing weight), gpt-oss's clamped SwiGLU, the four weight layouts, router bias
and top-k-then-softmax routing: forward against the float64 oracle
(:func:`oracle.fused_moe_with`), gradients against ``jax.grad`` of the reference, on every
implementation; then what only the kernels promise (NaN isolation, repeatable gradients).

Kernel outputs are poisoned (an element no kernel writes comes back NaN). Inputs are
scaled so that about a quarter of the clamped SwiGLU's pre-activations pass its clamps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmoe
import oracle
from conftest import randn, random_ids, rel_err, to_f64, tolerance
from jaxmoe.ops import checks
from op_base import BF16, F32, OpTests, cases, with_invalid_ids

LIMIT = 7.0
GPT_OSS = jaxmoe.ClampedSwiGLU(alpha=1.702, limit=LIMIT)


def feature_inputs(rng, m, d, i, e, k, dtype, layout, biases, clamp_scale=6.0, pool=None):
    """(x, w1, w2, b1, b2, topk_weights, topk_ids): w1 scaled so gate/up have a std of about
    ``clamp_scale`` (the clamp at 7 is passed often), stored in ``layout``."""
    s1, s2 = checks.layout_shapes(layout, e, d, i)
    x = randn(rng, (m, d), dtype)
    w1 = randn(rng, s1, dtype, scale=clamp_scale * d**-0.5)
    w2 = randn(rng, s2, dtype, scale=i**-0.5)
    b1 = randn(rng, (e, 2 * i), F32) if biases else None
    b2 = randn(rng, (e, d), BF16) if biases else None  # any float dtype: used in fp32
    tw = jnp.asarray(rng.uniform(0.1, 1.0, (m, k)), F32)
    ids = random_ids(rng, m, k, e if pool is None else pool)
    return x, w1, w2, b1, b2, tw, ids


def want(x, w1, w2, b1, b2, tw, ids, layout, activation):
    name = "clamped_swiglu" if isinstance(activation, jaxmoe.ClampedSwiGLU) else activation
    return oracle.fused_moe_with(to_f64(x), to_f64(w1), to_f64(w2), tw, ids, layout=layout,
                                 b1=None if b1 is None else to_f64(b1), b2=None if b2 is None else to_f64(b2),
                                 activation_name=name, limit=LIMIT)


# (M, D, I, E, k, layout, activation, biases, dtype) by name
FEATURE_CASES = {
    f"{layout}-{act if isinstance(act, str) else 'gptoss'}-{'bias' if biases else 'nobias'}-{jnp.dtype(dt).name}":
        (m, 48, 40, 6, 2, layout, act, biases, dt)
    for layout, act, biases, dt, m in [
        ("out_in", "silu", True, F32, 7), ("out_in", GPT_OSS, True, BF16, 1), ("out_in", GPT_OSS, False, F32, 9),
        ("out_in_interleaved", GPT_OSS, True, F32, 13), ("out_in_interleaved", "gelu", False, BF16, 5),
        ("in_out", "silu", True, BF16, 11), ("in_out", GPT_OSS, True, F32, 1),
        ("in_out_interleaved", GPT_OSS, True, BF16, 17), ("in_out_interleaved", GPT_OSS, True, F32, 6),
        ("in_out_interleaved", "clamped_swiglu", False, BF16, 3),
    ]
}
GRAD_CASES = {name: case for name, case in FEATURE_CASES.items() if name.endswith(
    ("out_in-silu-bias-float32", "out_in_interleaved-gptoss-bias-float32", "in_out-gptoss-bias-float32",
     "in_out_interleaved-gptoss-bias-bfloat16", "in_out_interleaved-gptoss-bias-float32"))}
GRAD_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}


class FeatureTests(OpTests):
    FEATURE_CASES = FEATURE_CASES
    GRAD_CASES = GRAD_CASES

    def fused(self, layout, activation):
        return lambda x, w1, w2, b1, b2, tw, ids: jaxmoe.fused_moe(x, w1, w2, tw, ids, activation=activation, b1=b1,
                                                                  b2=b2, layout=layout, **self.impl)

    @cases("FEATURE_CASES", "m,d,i,e,k,layout,activation,biases,dtype")
    def test_matches_oracle(self, rng, m, d, i, e, k, layout, activation, biases, dtype):
        args = feature_inputs(rng, m, d, i, e, k, dtype, layout, biases)
        y = self.jit(self.fused(layout, activation), *args)
        assert y.shape == (m, d) and y.dtype == jnp.dtype(dtype)
        assert rel_err(y, want(*args, layout, activation)) <= tolerance(dtype)

    def test_invalid_ids_and_empty_experts_with_biases(self, rng):
        """With biases, an out-of-range id still contributes nothing (no b2 row appears) and a
        token whose ids are all invalid gets zeros; experts without rows change nothing."""
        m, d, i, e, k, layout = 12, 32, 16, 8, 2, "in_out_interleaved"
        x, w1, w2, b1, b2, tw, ids = feature_inputs(rng, m, d, i, e, k, F32, layout, True, pool=[1, 2, 6])
        ids = np.array(with_invalid_ids(ids, e))
        ids[5] = [-7, e + 1]
        ids = jnp.asarray(ids)
        y = self.jit(self.fused(layout, GPT_OSS), x, w1, w2, b1, b2, tw, ids)
        assert not np.asarray(y[5]).any()
        assert rel_err(y, want(x, w1, w2, b1, b2, tw, ids, layout, GPT_OSS)) <= 1e-4

    def test_nan_in_one_token_stays_in_its_row(self, rng):
        m, d, i, e, k, layout = 10, 32, 16, 4, 2, "out_in_interleaved"
        x, w1, w2, b1, b2, tw, ids = feature_inputs(rng, m, d, i, e, k, F32, layout, True)
        x = x.at[4, 3].set(jnp.nan)
        y = np.asarray(self.jit(self.fused(layout, GPT_OSS), x, w1, w2, b1, b2, tw, ids))
        assert np.isnan(y[4]).all() and np.isfinite(np.delete(y, 4, axis=0)).all()

    @cases("GRAD_CASES", "m,d,i,e,k,layout,activation,biases,dtype")
    def test_grad_matches_reference(self, rng, m, d, i, e, k, layout, activation, biases, dtype):
        """jax.grad in x, w1, w2, b1, b2 and topk_weights against the reference's on fp32 copies."""
        x, w1, w2, b1, b2, tw, ids = feature_inputs(rng, m, d, i, e, k, dtype, layout, biases)
        c = jnp.asarray(rng.standard_normal((m, d)), F32)

        def loss(fn):
            return lambda x, w1, w2, b1, b2, tw: jnp.sum(fn(x, w1, w2, b1, b2, tw, ids).astype(F32) * c)

        got = self.jit(jax.grad(loss(self.fused(layout, activation)), argnums=range(6)), x, w1, w2, b1, b2, tw)
        ref = lambda *a: jaxmoe.fused_moe(*a[:3], a[5], a[6], activation=activation, b1=a[3], b2=a[4], layout=layout,
                                          implementation="reference")
        f32 = [a.astype(F32) for a in (x, w1, w2, b1, b2)]
        expect = jax.jit(jax.grad(loss(ref), argnums=range(6)))(*f32, tw)
        for name, g, w_, arg in zip(("x", "w1", "w2", "b1", "b2", "topk_weights"), got, expect,
                                    (x, w1, w2, b1, b2, tw)):
            assert g.shape == arg.shape and g.dtype == arg.dtype, name
            assert np.isfinite(to_f64(g)).all(), name
            # each gradient is rounded to its argument's dtype (b2 is bf16 in every case)
            tol = max(GRAD_TOLERANCE[jnp.dtype(dtype).name], GRAD_TOLERANCE[jnp.dtype(arg.dtype).name])
            assert rel_err(g, w_) <= tol, name


class TestFeaturesReference(FeatureTests):
    implementation = "reference"


class KernelFeatureTests(FeatureTests):
    def test_bias_grads_stay_in_their_experts_and_repeat(self, rng):
        """A NaN in one token reaches only its own experts' b1/b2 gradients; two runs give
        bitwise equal gradients (the bias gradients are the weight-gradient kernel's)."""
        m, d, i, e, k, layout = 10, 32, 16, 6, 2, "in_out_interleaved"
        x, w1, w2, b1, b2, tw, ids = feature_inputs(rng, m, d, i, e, k, F32, layout, True, clamp_scale=1.0)
        c = jnp.asarray(rng.standard_normal((m, d)), F32)
        fn = self.fused(layout, GPT_OSS)
        grad = jax.grad(lambda x, w1, w2, b1, b2: jnp.sum(fn(x, w1, w2, b1, b2, tw, ids) * c), argnums=range(5))
        first = self.jit(grad, x, w1, w2, b1, b2)
        second = self.jit(grad, x, w1, w2, b1, b2)
        for a, b in zip(first, second):
            assert np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
        got = self.jit(grad, x.at[3, 5].set(jnp.nan), w1, w2, b1, b2)
        own = set(np.asarray(ids)[3].tolist())
        for ex in range(e):
            for g in got[1:4]:  # w1, w2, b1 (b2's gradient, sum of w * dy, never sees x: finite)
                assert np.isfinite(np.asarray(g[ex], np.float64)).all() == (ex not in own), ex
        assert np.isfinite(np.asarray(got[4], np.float64)).all()


class TestFeaturesTritonInterpreter(KernelFeatureTests):
    implementation = "triton"


class TestFeaturesTritonInterpreterTMA(KernelFeatureTests):
    """Every layout with B read through tensor descriptors (``JAXMOE_TMA=1``): the four
    views, gate/up concatenated or interleaved, stored out-in or in-out (read transposed),
    forward and backward."""

    implementation = "triton"
    FEATURE_CASES = {name: case for name, case in FEATURE_CASES.items() if name.endswith("bfloat16")}
    GRAD_CASES = {name: FEATURE_CASES[name] for name in (
        "out_in-gptoss-bias-bfloat16", "in_out-silu-bias-bfloat16", "in_out_interleaved-gptoss-bias-bfloat16")}

    @pytest.fixture(autouse=True)
    def _tma(self, tma_views):
        yield
        assert tma_views, "no GEMM was planned: the descriptor check would hold vacuously"


@pytest.mark.gpu
class TestFeaturesTritonGPU(KernelFeatureTests):
    implementation, gpu = "triton", True
    FEATURE_CASES = {**FEATURE_CASES, **{
        f"large-{layout}-gptoss-bf16-M{m}": (m, 1024, 768, 32, 4, layout, GPT_OSS, True, BF16)
        for layout in checks.LAYOUTS for m in (1, 700)}}
    GRAD_CASES = {**GRAD_CASES, **{
        f"large-{layout}-gptoss-bf16": (600, 512, 384, 16, 4, layout, GPT_OSS, True, BF16)
        for layout in ("out_in", "in_out_interleaved")}}

    @pytest.mark.xdist_group("big-memory")  # tens of GB each: one at a time on the card
    def test_offsets_past_int32_in_out_interleaved(self, rng):
        """Rows whose h and y offsets pass 2^31 elements, with gpt-oss's layout and biases."""
        m, d, i, e, k, layout = (1 << 21) + 4096, 128, 128, 8, 8, "in_out_interleaved"
        assert m * k * i > 2**31
        x, w1, w2, b1, b2, tw, ids = feature_inputs(rng, m, d, i, e, k, BF16, layout, True)
        y = jax.jit(self.fused(layout, GPT_OSS))(x, w1, w2, b1, b2, tw, ids)
        for rows in (slice(m - 4096, m), slice(0, 4096)):
            ref = jaxmoe.fused_moe(x[rows].astype(F32), w1.astype(F32), w2.astype(F32), tw[rows], ids[rows],
                                   activation=GPT_OSS, b1=b1, b2=b2, layout=layout, implementation="reference")
            assert rel_err(y[rows], ref) <= 1e-2


# ----------------------------------------------------------------------------- routing and the layer


@pytest.mark.parametrize("implementation", ["reference", "triton"])
@pytest.mark.parametrize("m", [1, 37])
def test_topk_softmax_routing(rng, implementation, m):
    """scoring="topk_softmax": the top-k logits, then a softmax over them (gpt-oss)."""
    e, k = 32, 4
    logits = jnp.asarray(2.0 * rng.standard_normal((m, e)), F32)
    weights, ids = jax.jit(lambda lg: jaxmoe.route(lg, k, scoring="topk_softmax", implementation=implementation))(logits)
    lg = to_f64(logits)
    want_ids = np.argsort(-lg, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(lg, want_ids, axis=1)
    want_w = np.exp(top - top.max(axis=1, keepdims=True))
    want_w /= want_w.sum(axis=1, keepdims=True)
    np.testing.assert_array_equal(np.asarray(ids), want_ids)
    np.testing.assert_allclose(np.asarray(weights), want_w, rtol=1e-5, atol=1e-7)


LAYER_MODES = {"M1": 1, "M40": 40}


class LayerFeatureTests(OpTests):
    """moe_layer with gpt-oss's whole block: router bias, topk_softmax, biases, clamped
    SwiGLU, layout in_out_interleaved; forward and gradients against the reference."""

    LAYER_MODES = LAYER_MODES
    D, I, E, K = 32, 16, 8, 4

    def params(self, rng):
        layout = "in_out_interleaved"
        s1, s2 = checks.layout_shapes(layout, self.E, self.D, self.I)
        return {"router": randn(rng, (self.D, self.E), F32), "router_bias": randn(rng, (self.E,), F32),
                "w1": randn(rng, s1, F32, scale=6 * self.D**-0.5), "w2": randn(rng, s2, F32, scale=self.I**-0.5),
                "b1": randn(rng, (self.E, 2 * self.I), F32), "b2": randn(rng, (self.E, self.D), F32)}

    def layer(self, implementation):
        return lambda p, x: jaxmoe.moe_layer(p, x, top_k=self.K, scoring="topk_softmax", activation=GPT_OSS,
                                             layout="in_out_interleaved", implementation=implementation,
                                             return_routing=True)

    @cases("LAYER_MODES", "m")
    def test_forward_and_grad(self, rng, m):
        params, x = self.params(rng), randn(rng, (m, self.D), F32)
        y, info = self.jit(self.layer(self.implementation), params, x)
        p = {k: to_f64(v) for k, v in params.items()}
        want_y, want_ids = oracle.gpt_oss_moe(to_f64(x), p["router"].T, p["router_bias"], p["w1"], p["b1"], p["w2"],
                                              p["b2"], self.K, limit=LIMIT)
        np.testing.assert_array_equal(info["topk_ids"], want_ids)
        assert rel_err(y, want_y) <= 1e-4
        c = jnp.asarray(rng.standard_normal((m, self.D)), F32)

        def loss(implementation):
            return lambda p, x: jnp.sum(self.layer(implementation)(p, x)[0] * c)

        got = self.jit(jax.grad(loss(self.implementation), argnums=(0, 1)), params, x)
        ref = jax.jit(jax.grad(loss("reference"), argnums=(0, 1)))(params, x)
        for name in params:
            assert rel_err(got[0][name], ref[0][name]) <= 1e-4, name
        assert np.linalg.norm(got[0]["router_bias"]) > 0  # the router bias moves the weights: a gradient
        assert rel_err(got[1], ref[1]) <= 1e-4


class TestLayerFeaturesReference(LayerFeatureTests):
    implementation = "reference"


class TestLayerFeaturesTritonInterpreter(LayerFeatureTests):
    implementation = "triton"


@pytest.mark.gpu
class TestLayerFeaturesTritonGPU(LayerFeatureTests):
    implementation, gpu = "triton", True
    LAYER_MODES = {**LAYER_MODES, "M1024": 1024}


# ----------------------------------------------------------------------------- errors


def _args(rng, layout="out_in"):
    return feature_inputs(rng, 4, 32, 16, 4, 2, F32, layout, True)


@pytest.mark.parametrize("case", ["b1-shape", "b2-shape", "b1-int", "layout-name", "layout-shape", "activation",
                                  "clamp-limit", "topk-softmax-norm", "topk-softmax-bias", "router-bias", "mesh"])
def test_feature_errors(rng, case):
    x, w1, w2, b1, b2, tw, ids = _args(rng)
    call = dict(activation="silu", b1=b1, b2=b2, layout="out_in")
    match = {"b1-shape": r"b1 must be \[E, 2I\] = \[4, 32\]", "b2-shape": r"b2 must be \[E, D\] = \[4, 32\]",
             "b1-int": "b1 must have a floating dtype", "layout-name": "layout must be one of",
             "layout-shape": r"w2 must be \[E, I, D\] = \[4, 16, 32\] \(layout='in_out'\)", "activation": "activation must be one of",
             "clamp-limit": "ClampedSwiGLU.limit must be > 0", "topk-softmax-norm": "renormalize=False has no meaning",
             "topk-softmax-bias": "topk_softmax' takes neither", "router-bias": r"params\['router_bias'\] must be \[E\]",
             "mesh": r"moe_layer\(mesh=...\) takes only layout='out_in'"}[case]
    error = TypeError if case == "b1-int" else NotImplementedError if case == "mesh" else ValueError
    with pytest.raises(error, match=match):
        if case == "b1-shape":
            call["b1"] = b1[:, :-2]
        elif case == "b2-shape":
            call["b2"] = b2[:-1]
        elif case == "b1-int":
            call["b1"] = b1.astype(jnp.int32)
        elif case == "layout-name":
            call["layout"] = "gate_up"
        elif case == "layout-shape":
            call["layout"] = "in_out"
        elif case == "activation":
            call["activation"] = "swiglu"
        elif case == "clamp-limit":
            call["activation"] = jaxmoe.ClampedSwiGLU(limit=-1.0)
        if case.startswith("topk-softmax"):
            extra = {"renormalize": False} if case.endswith("norm") else {"correction_bias": jnp.zeros(8)}
            jaxmoe.route(jnp.zeros((2, 8)), 2, scoring="topk_softmax", **extra)
        elif case in ("router-bias", "mesh"):
            params = {"router": jnp.zeros((32, 4)), "w1": w1, "w2": w2, "router_bias": jnp.zeros(3 if case == "router-bias" else 4)}
            mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("ep",)) if case == "mesh" else None
            jaxmoe.moe_layer(params, x, top_k=2, mesh=mesh, expert_axis="ep" if mesh else None,
                             layout="in_out" if mesh else "out_in")
        else:
            jaxmoe.fused_moe(x, w1, w2, tw, ids, **call)
