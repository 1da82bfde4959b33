"""The op model: how an op picks its implementation, and the typed pytrees."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import moe_inputs, randn, rel_err

import jaxmoe
from jaxmoe import ops
from jaxmoe.backends import platform
from jaxmoe.ops.base import Implementation, Op
from jaxmoe.ops.routing import triton as routing_triton

ON_CPU_ONLY = not any(platform._devices_of(p) for p in platform.GPU_PLATFORMS)


def test_every_op_lists_the_reference_and_the_kernels():
    assert set(ops.OPS) == {"route", "router_sigmoid_top1", "moe_align_block_size", "grouped_gemm", "fused_moe",
                            "routed_moe"}
    for op in ops.OPS.values():
        assert list(op.implementations) == ["triton", "reference"]
        with pytest.raises(TypeError):
            op.implementations["cuda"] = op.implementations["triton"]  # an immutable mapping


def test_default_follows_the_default_device(rng):
    """None picks for the device jax places the computation on: the reference on a CPU
    (also under ``jax.default_device(cpu)`` on a GPU machine), the kernels on a GPU."""
    x, w1, w2, tw, ids = moe_inputs(rng, 4, 16, 8, 4, 2, jnp.float32)
    with jax.default_device(jax.devices("cpu")[0]):
        assert [i.name for i in ops.OPS["fused_moe"].resolve(None, x, w1, w2, tw, ids)] == ["reference"]
        y = jaxmoe.fused_moe(x, w1, w2, tw, ids)
    assert rel_err(y, jaxmoe.fused_moe(x, w1, w2, tw, ids, implementation="reference")) == 0.0
    want = "reference" if ON_CPU_ONLY else "triton"
    assert [i.name for i in ops.OPS["fused_moe"].resolve(None, x, w1, w2, tw, ids)] == [want]


def test_a_sequence_means_the_first_that_serves(rng, monkeypatch):
    logits = randn(rng, (5, 40), jnp.float32)
    monkeypatch.setattr(routing_triton, "MAX_EXPERTS", 16)  # the kernel no longer serves 40 experts
    with pytest.raises(NotImplementedError, match="at most 16 experts.*falls back"):
        jaxmoe.route(logits, 3, implementation="triton")
    got = jaxmoe.route(logits, 3, implementation=("triton", "reference"))
    want = jaxmoe.route(logits, 3, implementation="reference")
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    # within the kernel's range the sequence runs the kernel, which agrees with the reference
    monkeypatch.setattr(routing_triton, "MAX_EXPERTS", 4096)
    assert ops.OPS["route"].resolve(("triton", "reference"), logits, 3)[0].name == "triton"


@pytest.mark.parametrize("bad", ["cuda", "", (), ("triton", "nope"), 3])
def test_unknown_implementations_are_refused_before_tracing(bad, rng):
    with pytest.raises(ValueError, match="implementation must be"):
        jaxmoe.route(randn(rng, (2, 4), jnp.float32), 1, implementation=bad)


def test_arguments_are_checked_once_before_any_implementation_runs():
    calls = []
    op = Op("double", check=lambda x: (_ for _ in ()).throw(ValueError("x is bad")) if x is None else None,
            reference=lambda x: calls.append("reference") or 2 * x,
            implementations=[Implementation("fast", lambda x: calls.append("fast") or 2 * x,
                                            supports=lambda x: None if x < 10 else "too big")])
    assert op(3, implementation="fast") == 6 and calls == ["fast"]
    assert op(30, implementation=("fast", "reference")) == 60 and calls[-1] == "reference"
    with pytest.raises(ValueError, match="x is bad"):
        op(None, implementation="reference")
    with pytest.raises(NotImplementedError, match="fast: too big"):
        op(30, implementation="fast")


def test_routing_data_is_a_pytree_that_align_produces(rng):
    ids = jnp.asarray(rng.integers(0, 6, size=(7, 2)), jnp.int32)
    weights = jnp.asarray(rng.uniform(size=(7, 2)), jnp.float32)
    routing = ops.align(ids, 6, 16, topk_weights=weights, implementation="reference")
    assert isinstance(routing, jaxmoe.RoutingData)
    assert (routing.block_size, routing.num_experts, routing.top_k, routing.num_rows) == (16, 6, 2, 14)
    leaves, tree = jax.tree_util.tree_flatten(routing)
    assert len(leaves) == 5
    again = jax.jit(lambda r: r)(routing)
    assert jax.tree_util.tree_structure(again) == tree
    np.testing.assert_array_equal(np.asarray(again.sorted_token_ids), np.asarray(routing.sorted_token_ids))
    triple = ops.moe_align_block_size(ids, 6, 16, implementation="reference")
    for a, b in zip(routing.layout(), triple):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("implementation", ["reference", "triton"])
def test_grouped_gemm_takes_routing_data(rng, implementation):
    x, w1, w2, tw, ids = moe_inputs(rng, 9, 32, 16, 4, 2, jnp.float32)
    routing = ops.align(ids, 4, 16, topk_weights=tw)
    h = ops.grouped_gemm(x, w1, routing, activation="silu", implementation=implementation)
    y = ops.grouped_gemm(h, w2, routing, topk_weights=tw, implementation=implementation)
    out = y.reshape(9, 2, 32).sum(axis=1)
    assert rel_err(out, jaxmoe.fused_moe(x, w1, w2, tw, ids, implementation="reference")) <= 1e-4


def test_quantized_weights_are_a_validated_pytree(rng):
    w = randn(rng, (2, 8, 4), jnp.bfloat16)
    q = jaxmoe.QuantizedWeights(values=w)
    assert q.scheme == "none" and q.shape == (2, 8, 4)
    np.testing.assert_array_equal(np.asarray(q.dequantize()), np.asarray(w.astype(jnp.float32)))
    assert jax.tree_util.tree_leaves(q)[0] is w
    with pytest.raises(ValueError, match="unknown weight scheme"):
        jaxmoe.QuantizedWeights(values=w, scheme="fp7")
    with pytest.raises(ValueError, match="no scales"):
        jaxmoe.QuantizedWeights(values=w, scales=jnp.ones((2, 8)))
    with pytest.raises(TypeError, match="stores"):
        jaxmoe.QuantizedWeights(values=w.astype(jnp.int8))
    with pytest.raises(ValueError, match="3-D"):
        jaxmoe.QuantizedWeights(values=w[0])


@pytest.mark.parametrize("implementation", ["reference", "triton"])
def test_fused_moe_takes_unquantized_weights_in_the_weights_type(rng, implementation):
    x, w1, w2, tw, ids = moe_inputs(rng, 5, 32, 16, 4, 2, jnp.bfloat16)
    want = jaxmoe.fused_moe(x, w1, w2, tw, ids, implementation=implementation)
    q1, q2 = jaxmoe.QuantizedWeights(w1), jaxmoe.QuantizedWeights(w2)
    got = jax.jit(lambda *a: jaxmoe.fused_moe(*a, implementation=implementation))(x, q1, q2, tw, ids)
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))


def test_numerics_names_the_rounding_and_refuses_what_does_not_exist():
    n = jaxmoe.Numerics(compute_dtype="bfloat16")
    assert n.compute_dtype == jnp.bfloat16 and n.accum_dtype == jnp.float32 and n.weights == "none"
    assert jaxmoe.Numerics(weights="fp8_block", act_quant="fp8").act_quant == "fp8"
    with pytest.raises(ValueError, match="act_quant"):
        jaxmoe.Numerics(act_quant="fp4")
    with pytest.raises(ValueError, match="unknown weight scheme"):
        jaxmoe.Numerics(weights="int3")


def test_int64_ids_outside_int32_are_invalid_not_wrapped(rng):
    """2**32 + 1 must not become expert 1 (nor -2**32 expert 0): it contributes nothing."""
    x, w1, w2, tw, ids = moe_inputs(rng, 4, 32, 16, 4, 2, jnp.float32)
    bad = np.array(ids, np.int64)
    bad[0, 0] = 2**32 + 1
    bad[1, 1] = -(2**32)
    clean = np.array(bad)
    clean[0, 0] = -1
    clean[1, 1] = -1
    for implementation in ("reference", "triton"):
        got = jaxmoe.fused_moe(x, w1, w2, tw, bad, implementation=implementation)
        want = jaxmoe.fused_moe(x, w1, w2, tw, jnp.asarray(clean, jnp.int32), implementation=implementation)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        layout = ops.moe_align_block_size(bad, 4, 16, implementation=implementation)
        assert int(layout[2][0]) == int(ops.moe_align_block_size(clean.astype(np.int32), 4, 16)[2][0])


def test_cpu_launch_switch(monkeypatch):
    """JAXMOE_CPU_LAUNCH picks the interpreter (unset/'interpreter') or the compiled kernels on
    the local GPU ('gpu', for memory checking); anything else is refused by name."""
    from jaxmoe.backends import cuda_host

    for value, want in (("", False), ("interpreter", False), ("gpu", True), (" GPU ", True)):
        monkeypatch.setenv("JAXMOE_CPU_LAUNCH", value)
        assert cuda_host.enabled() is want, value
    monkeypatch.setenv("JAXMOE_CPU_LAUNCH", "cuda0")
    with pytest.raises(ValueError, match="JAXMOE_CPU_LAUNCH='cuda0'"):
        cuda_host.enabled()


def test_cpu_launch_switch_routes_launches(monkeypatch):
    """With JAXMOE_CPU_LAUNCH=gpu every CPU launch goes to the compiled-kernel launcher (here
    replaced by a stand-in that records the kernel), none to the interpreter."""
    from jaxmoe.backends import cuda_host, interpreter

    seen = []

    def fake(spec, args, poison):
        seen.append(spec.name)
        return tuple(jnp.zeros(o.shape, o.dtype) for o in spec.outs)

    def refuse(*a, **k):
        raise AssertionError("the interpreter ran")

    monkeypatch.setenv("JAXMOE_CPU_LAUNCH", "gpu")
    monkeypatch.setattr(cuda_host, "launch", fake)
    monkeypatch.setattr(interpreter, "launch", refuse)
    jaxmoe.route(jnp.ones((3, 8), jnp.float32), 2, implementation="triton")
    assert seen, "no launch reached the compiled-kernel launcher"


def test_cpu_launch_gives_triton_its_scratch(monkeypatch):
    """Kernels that build tensor descriptors on the device (B by TMA) need Triton's global
    scratch: the compiled-kernel launcher allocates each one on the device (a stand-in torch
    here), at least one byte, and refuses an alignment an allocation cannot give."""
    import sys
    import types

    from jaxmoe.backends import cuda_host

    made = []

    def empty(n, dtype, device):
        made.append((n, dtype, device))
        return ("buffer", n)

    fake_torch = types.SimpleNamespace(empty=empty, int8="int8")
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    assert cuda_host._scratch(4096, 128, None) == ("buffer", 4096)
    assert cuda_host._scratch(0, 1, None) == ("buffer", 1)
    assert made == [(4096, "int8", "cuda"), (1, "int8", "cuda")]
    with pytest.raises(RuntimeError, match="aligned to 1024 bytes"):
        cuda_host._scratch(64, 1024, None)
