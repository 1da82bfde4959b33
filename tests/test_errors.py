"""Bad arguments to the public entry points: a one-line ValueError/TypeError naming the
argument, raised before anything is traced, the same on every implementation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmoe
from conftest import moe_inputs, random_ids
from jaxmoe import ops, reference
from jaxmoe.backends.platform import triton_available
from jaxmoe.ops.gemm import GemmTile

F32, BF16 = jnp.float32, jnp.bfloat16
IMPLEMENTATIONS = [None, "reference"] + (["triton"] if triton_available() else [])


def _raises(exc, name, fn, *args, **kwargs):
    with pytest.raises(exc, match=name) as err:
        fn(*args, **kwargs)
    assert "\n" not in str(err.value), str(err.value)
    return err


@functools.cache
def _params():
    rng = np.random.default_rng(0)
    return {"router": jnp.asarray(rng.standard_normal((16, 4)), F32),
            "w1": jnp.asarray(rng.standard_normal((4, 16, 16)) / 4, F32),
            "w2": jnp.asarray(rng.standard_normal((4, 16, 8)) / 3, F32)}


LAYER_PARAMS = {
    "w2 with fewer experts": (lambda p: {"w2": p["w2"][:2]}, ValueError, r"params\['w2'\]"),
    "w2 with more experts": (lambda p: {"w2": jnp.concatenate([p["w2"], p["w2"]])}, ValueError, r"params\['w2'\]"),
    "w2 wrong D": (lambda p: {"w2": p["w2"][:, :8]}, ValueError, r"params\['w2'\]"),
    "w2 wrong I": (lambda p: {"w2": p["w2"][:, :, :4]}, ValueError, r"params\['w2'\]"),
    "w2 2-D": (lambda p: {"w2": p["w2"][0]}, ValueError, r"params\['w2'\]"),
    "w2 dtype": (lambda p: {"w2": p["w2"].astype(BF16)}, TypeError, r"params\['w2'\]"),
    "w2 not an array": (lambda p: {"w2": [1.0]}, TypeError, r"params\['w2'\]"),
    "w1 odd rows": (lambda p: {"w1": p["w1"][:, :15]}, ValueError, r"params\['w1'\]"),
    "router empty": (lambda p: {"router": jnp.zeros((16, 0), F32)}, ValueError, r"params\['router'\]"),
}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", sorted(LAYER_PARAMS))
def test_moe_layer_checks_w1_and_w2(case, implementation):
    change, exc, name = LAYER_PARAMS[case]
    p = _params()
    bad = {**p, **change(p)}
    x = jnp.ones((3, 16), F32)
    layer = functools.partial(jaxmoe.moe_layer, top_k=2, implementation=implementation)
    _raises(exc, name, layer, bad, x)
    _raises(exc, name, jax.jit(layer), bad, x)  # before tracing: the same error under jit
    if implementation is None:
        _raises(exc, name, reference.moe_layer, bad, x, top_k=2)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_fused_moe_with_no_hidden_features_is_refused_everywhere(implementation, rng):
    x, w1, w2, tw, ti = moe_inputs(rng, 4, 16, 8, 4, 2, F32)
    x0, w10, w20 = x[:, :0], w1[:, :, :0], w2[:, :0]
    fn = functools.partial(jaxmoe.fused_moe, implementation=implementation)
    err = _raises(ValueError, "hidden_states", fn, x0, w10, w20, tw, ti)
    assert "D >= 1" in str(err.value)
    _raises(ValueError, "hidden_states", reference.fused_moe, x0, w10, w20, tw, ti)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_moe_gemm_with_no_output_columns_is_refused(implementation, rng):
    ids = random_ids(rng, 4, 2, 4)
    align = reference.moe_align_block_size(ids, 4, 16)
    a, b = jnp.ones((4, 16), F32), jnp.ones((4, 0, 16), F32)
    _raises(ValueError, "b must be", ops.moe_gemm, a, b, *align, top_k=2, num_rows=8, block_size=16,
            implementation=implementation)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_grouped_gemm_errors(implementation, rng):
    ids = random_ids(rng, 4, 2, 4)
    routing = ops.align(ids, 4, 16, implementation="reference")
    a, b = jnp.ones((4, 16), F32), jnp.ones((4, 32, 16), F32)
    gemm = functools.partial(ops.grouped_gemm, implementation=implementation)
    _raises(TypeError, "a must be an array", gemm, np.ones((4, 16)).tolist(), b, routing)
    _raises(ValueError, "a must be", gemm, a[0], b, routing)
    _raises(TypeError, "tile", gemm, a, b, routing, tile="big")
    _raises(TypeError, "tile", gemm, a, b, routing, tile=(64, 64))
    _raises(ValueError, "routing was aligned for 4 experts", gemm, a, b[:2], routing)
    _raises(TypeError, "routing", gemm, a, b, tuple(routing.sorted_token_ids))
    gemm(a, b, routing, tile=GemmTile(block_n=32, block_k=16))  # a real tile is fine


def test_routed_layer_op_checks_its_experts(rng):
    """The op behind moe_layer on the kernel path checks the experts itself."""
    from jaxmoe.ops.moe import ROUTED_MOE

    x, w1, w2, _, _ = moe_inputs(rng, 4, 16, 8, 4, 2, F32)
    logits = jnp.zeros((4, 4), F32)
    _raises(ValueError, "w2", ROUTED_MOE, x, w1, w2[:2], logits, 2, implementation="reference")
    _raises(ValueError, "logits", ROUTED_MOE, x, w1, w2, logits[:3], 2, implementation="reference")
    _raises(ValueError, "logits", ROUTED_MOE, x, w1, w2, jnp.zeros((4, 5), F32), 2, implementation="reference")


INIT_ERRORS = [
    (dict(key=0), TypeError, "key"),
    (dict(key=np.int32(3)), TypeError, "key"),
    (dict(key=jnp.zeros((2,), jnp.int32)), TypeError, "key"),
    (dict(key=jnp.zeros((3,), jnp.uint32)), ValueError, "key"),
    (dict(key=jax.random.split(jax.random.key(0), 2)), ValueError, "key"),
    (dict(hidden=0), ValueError, "hidden"),
    (dict(intermediate=-1), ValueError, "intermediate"),
    (dict(experts=2.0), ValueError, "experts"),
    (dict(hidden=True), ValueError, "hidden"),
    (dict(dtype=jnp.int32), TypeError, "dtype"),
    (dict(dtype=jnp.float64), TypeError, "dtype"),
    (dict(dtype="bogus"), TypeError, "dtype"),
]


@pytest.mark.parametrize("case", range(len(INIT_ERRORS)), ids=[f"{e[2]}-{i}" for i, e in enumerate(INIT_ERRORS)])
def test_init_moe_params_errors(case):
    changes, exc, name = INIT_ERRORS[case]
    kwargs = dict(key=jax.random.key(0), hidden=8, intermediate=8, experts=2, **{})
    kwargs.update(changes)
    key = kwargs.pop("key")
    _raises(exc, name, jaxmoe.init_moe_params, key, **kwargs)


def test_init_moe_params_accepts_both_key_kinds():
    typed = jaxmoe.init_moe_params(jax.random.key(0), hidden=8, intermediate=4, experts=2, dtype=F32)
    legacy = jaxmoe.init_moe_params(jax.random.PRNGKey(0), hidden=8, intermediate=4, experts=2, dtype=F32)
    for name in typed:
        np.testing.assert_array_equal(np.asarray(typed[name], np.float32), np.asarray(legacy[name], np.float32))
