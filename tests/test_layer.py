"""The MoE layer: ``jaxmoe.moe_layer``, each implementation against the float64 oracle
(router matmul, routing and experts all in float64), then its errors and launch count."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
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

    def test_return_routing(self, rng):
        """(y, routing): the layer's own logits, ids and weights, and the same y as without."""
        d, i, e, k = 32, 16, 16, 4
        params = init_moe_params(jax.random.key(5), hidden=d, intermediate=i, experts=e, dtype=BF16)
        kw = dict(top_k=k, scoring="sigmoid", num_expert_group=4, topk_group=2, correction_bias=bias(rng, e),
                  group_scoring="top2_sum")
        x = randn(rng, (2, 3, d), BF16)
        y, routing = self.jit(lambda p, x: jaxmoe.moe_layer(p, x, **kw, **self.impl, return_routing=True), params, x)
        assert y.shape == x.shape and set(routing) == {"logits", "topk_ids", "topk_weights"}
        assert routing["logits"].shape == (6, e) and routing["logits"].dtype == F32
        assert routing["topk_ids"].shape == routing["topk_weights"].shape == (6, k)
        want_logits = to_f64(x).reshape(6, d) @ to_f64(params["router"])
        assert rel_err(routing["logits"], want_logits) <= 1e-6
        rkw = {n: v for n, v in kw.items() if n != "top_k"}
        want_w, want_ids = oracle.route(want_logits, k, **{**rkw, "correction_bias": to_f64(kw["correction_bias"])})
        assert (routing["topk_ids"] == want_ids).all()
        assert rel_err(routing["topk_weights"], want_w) <= 1e-5
        assert rel_err(y, self.layer(params, x, **kw)) == 0.0

    @pytest.mark.parametrize("gated", [False, True], ids=["shared", "shared-gated"])
    def test_shared_experts(self, rng, gated):
        """Shared experts added to every token (Qwen2-MoE's sigmoid gate when ``gated``)."""
        d, i, e, k, s, i_s = 32, 16, 8, 2, 2, 24
        params = init_moe_params(jax.random.key(7), hidden=d, intermediate=i, experts=e, dtype=F32)
        params["shared"] = {"w1": randn(rng, (s, 2 * i_s, d), F32, d ** -0.5),
                            "w2": randn(rng, (s, d, i_s), F32, i_s ** -0.5)}
        if gated:
            params["shared_gate"] = randn(rng, (d, 1), F32, d ** -0.5)
        x = randn(rng, (5, d), F32)
        want = oracle_layer(params, x, k)
        x64 = to_f64(x)
        shared = oracle.fused_moe(x64, to_f64(params["shared"]["w1"]), to_f64(params["shared"]["w2"]),
                                  np.ones((5, s)), np.tile(np.arange(s), (5, 1)))
        if gated:
            shared = shared / (1.0 + np.exp(-(x64 @ to_f64(params["shared_gate"]))))
        assert rel_err(self.layer(params, x, top_k=k), want + shared) <= 1e-5


    @pytest.mark.parametrize("m,gated", [(5, False), (5, True), (260, True)], ids=["M5", "M5-gated", "M260-gated"])
    def test_stacked_shared_experts(self, rng, m, gated):
        """Shared experts stacked after the routed ones (split to the routed width: 2 of
        width 2I become 4 of width I), as more slots of the routed launches, against the
        oracle of the unstacked layer; gradients against the reference's. M = 260 routes and
        aligns in launches of their own (1560 ids), M = 5 in one."""
        from jaxmoe.models import stack_shared_experts, unstack_shared_experts

        d, i, e, k, s = 32, 16, 8, 2, 2
        params = init_moe_params(jax.random.key(9), hidden=d, intermediate=i, experts=e, dtype=F32)
        params["shared"] = {"w1": randn(rng, (s, 4 * i, d), F32, d ** -0.5),
                            "w2": randn(rng, (s, d, 2 * i), F32, (2 * i) ** -0.5)}
        if gated:
            params["shared_gate"] = randn(rng, (d, 1), F32, d ** -0.5)
        stacked, n = stack_shared_experts(params)
        assert n == 4 and stacked["w1"].shape == (e + 4, 2 * i, d) and "shared" not in stacked
        x = randn(rng, (m, d), F32)
        x64 = to_f64(x)
        shared = oracle.fused_moe(x64, to_f64(params["shared"]["w1"]), to_f64(params["shared"]["w2"]),
                                  np.ones((m, s)), np.tile(np.arange(s), (m, 1)))
        if gated:
            shared = shared / (1.0 + np.exp(-(x64 @ to_f64(params["shared_gate"]))))
        want = oracle_layer(params, x, k) + shared
        y, routing = self.jit(lambda p, x: jaxmoe.moe_layer(p, x, top_k=k, shared_experts=n, return_routing=True,
                                                           **self.impl), stacked, x)
        assert rel_err(y, want) <= 1e-5
        assert routing["topk_ids"].shape == (m, k) and int(routing["topk_ids"].max()) < e  # the routed slots only
        # back to params["shared"]: the same layer
        back = unstack_shared_experts(stacked, n)
        assert rel_err(self.layer(back, x, top_k=k), want) <= 1e-5
        c = jnp.asarray(rng.standard_normal((m, d)), F32)

        def loss(impl):
            return lambda p, x: jnp.sum(jaxmoe.moe_layer(p, x, top_k=k, shared_experts=n, implementation=impl) * c)

        got = self.jit(jax.grad(loss(self.implementation), argnums=(0, 1)), stacked, x)
        ref = jax.jit(jax.grad(loss("reference"), argnums=(0, 1)))(stacked, x)
        for name in stacked:
            assert rel_err(got[0][name], ref[0][name]) <= 1e-4, name
            assert np.linalg.norm(np.asarray(got[0][name][e:] if name != "router" else got[0][name])) > 0, name
        assert rel_err(got[1], ref[1]) <= 1e-4


class TestMoeLayerReference(MoeLayerTests):
    implementation = "reference"


class TestMoeLayerTritonInterpreter(MoeLayerTests):
    implementation = "triton"


@pytest.mark.gpu
class TestMoeLayerTritonGPU(MoeLayerTests):
    implementation, gpu = "triton", True


@pytest.mark.gpu
@pytest.mark.parametrize("m,decode,launches", [(1, "1", 2), (1, "auto", 3), (64, "auto", 3)])
def test_gpu_moe_layer_launch_count(m, decode, launches, monkeypatch):
    """Router matmul aside, the layer is two Triton launches on the decode path (M = 1,
    JAXMOE_DECODE=1) and three on the aligned path (route+align, two GEMMs), as its plan says."""
    from jaxmoe.ops.moe import triton as moe_triton

    monkeypatch.setenv("JAXMOE_DECODE", decode)
    params = init_moe_params(jax.random.key(0), hidden=64, intermediate=32, experts=8, dtype=BF16)
    x = jnp.ones((m, 64), BF16)
    hlo = jax.jit(lambda p, x: jaxmoe.moe_layer(p, x, top_k=2, implementation="triton")).lower(params, x).as_text()
    plan = moe_triton.plan_routed_moe(m, 2, 8, 64, 32, BF16, moe_triton.current_arch())
    assert len(plan) == launches
    assert hlo.count("@triton_kernel_call") == launches


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16])
def test_gpu_stacked_shared_experts_add_no_launch(m):
    """Stacked shared experts and a router bias ride in the routed launches: route+align and
    the two GEMMs, as without them."""
    from jaxmoe.models import stack_shared_experts
    from jaxmoe.ops.moe import triton as moe_triton

    params = init_moe_params(jax.random.key(0), hidden=64, intermediate=32, experts=8, dtype=BF16)
    shared = init_moe_params(jax.random.key(1), hidden=64, intermediate=32, experts=1, dtype=BF16)
    params = {**params, "shared": {"w1": shared["w1"], "w2": shared["w2"]}, "router_bias": jnp.ones((8,), BF16)}
    stacked, n = stack_shared_experts(params)
    x = jnp.ones((m, 64), BF16)
    hlo = jax.jit(lambda p, x: jaxmoe.moe_layer(p, x, top_k=2, shared_experts=n, implementation="triton")
                  ).lower(stacked, x).as_text()
    plan = moe_triton.plan_routed_moe(m, 2, 8, 64, 32, BF16, moe_triton.current_arch(), logit_bias_dtype=BF16,
                                      shared_experts=n)
    assert len(plan) == 3 and dict(plan[0].constexprs)["SHARED"] == 1
    assert hlo.count("@triton_kernel_call") == 3


@pytest.mark.parametrize("case", ["count-type", "count-range", "both-forms", "router-shape", "weights-shape",
                                  "unsplittable", "mesh"])
def test_stacked_shared_expert_errors(rng, case):
    from jaxmoe.models import stack_shared_experts

    p = init_moe_params(jax.random.key(0), hidden=16, intermediate=8, experts=4, dtype=F32)
    extra = init_moe_params(jax.random.key(1), hidden=16, intermediate=8, experts=2, dtype=F32)
    stacked = {**p, "w1": jnp.concatenate([p["w1"], extra["w1"]]), "w2": jnp.concatenate([p["w2"], extra["w2"]])}
    x = randn(rng, (3, 16), F32)
    error, match = {
        "count-type": (TypeError, "shared_experts must be an int"),
        "count-range": (ValueError, r"shared_experts must be in \[0, 6\)"),
        "both-forms": (ValueError, "either stacked"),
        "router-shape": (ValueError, "say so with shared_experts=2"),
        "weights-shape": (ValueError, r"E=4 \+ 1 shared = 5"),
        "unsplittable": (ValueError, "not a multiple of the routed experts' I=8"),
        "mesh": (NotImplementedError, r"params\['shared'\]"),
    }[case]
    with pytest.raises(error, match=match):
        if case == "count-type":
            jaxmoe.moe_layer(stacked, x, top_k=2, shared_experts=2.0)
        elif case == "count-range":
            jaxmoe.moe_layer(stacked, x, top_k=2, shared_experts=6)
        elif case == "both-forms":
            jaxmoe.moe_layer({**stacked, "shared": {"w1": extra["w1"], "w2": extra["w2"]}}, x, top_k=2,
                             shared_experts=2)
        elif case == "router-shape":
            jaxmoe.moe_layer(stacked, x, top_k=2)
        elif case == "weights-shape":
            jaxmoe.moe_layer(stacked, x, top_k=2, shared_experts=1)
        elif case == "unsplittable":
            odd = init_moe_params(jax.random.key(2), hidden=16, intermediate=12, experts=1, dtype=F32)
            stack_shared_experts({**p, "shared": {"w1": odd["w1"], "w2": odd["w2"]}})
        else:
            mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("ep",))
            jaxmoe.moe_layer(stacked, x, top_k=2, shared_experts=2, mesh=mesh, expert_axis="ep")


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


def test_shared_expert_errors(rng):
    p = init_moe_params(jax.random.key(0), hidden=16, intermediate=8, experts=4, dtype=F32)
    x = randn(rng, (3, 16), F32)
    good = {"w1": randn(rng, (1, 12, 16), F32), "w2": randn(rng, (1, 16, 6), F32)}
    with pytest.raises(ValueError, match="shared_gate.*needs"):
        jaxmoe.moe_layer({**p, "shared_gate": randn(rng, (16, 1), F32)}, x, top_k=2)
    with pytest.raises(TypeError, match=r"shared'\] must be a dict"):
        jaxmoe.moe_layer({**p, "shared": good["w1"]}, x, top_k=2)
    with pytest.raises(ValueError, match=r"\['w2'\] must be \[S, D, Is\]"):
        jaxmoe.moe_layer({**p, "shared": {**good, "w2": randn(rng, (1, 16, 5), F32)}}, x, top_k=2)
    with pytest.raises(TypeError, match="dtype"):
        jaxmoe.moe_layer({**p, "shared": {**good, "w1": good["w1"].astype(BF16)}}, x, top_k=2)
    with pytest.raises(ValueError, match=r"shared_gate'\] must be \[D, 1\]"):
        jaxmoe.moe_layer({**p, "shared": good, "shared_gate": randn(rng, (1, 16), F32)}, x, top_k=2)
    with pytest.raises(TypeError, match="return_routing"):
        jaxmoe.moe_layer(p, x, top_k=2, return_routing=1)
    with pytest.raises(ValueError, match="group_scoring"):
        jaxmoe.moe_layer(p, x, top_k=2, group_scoring="sum")
