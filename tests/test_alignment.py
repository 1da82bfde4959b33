"""Alignment: ``jaxmoe.ops.moe_align_block_size`` and ``jaxmoe.ops.align``, each
implementation against the float64 oracle, element for element, padding included."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jaxmoe
import oracle
from conftest import random_ids
from jaxmoe import ops
from jaxmoe.ops import max_padded_rows
from op_base import F32, OpTests, cases

# id: (M, k, E, block, ids): ids "invalid" draws from [-2, E + 2) with repeats (ids outside
# [0, E) included), None draws distinct valid ids, a list distinct ids from those experts.
ALIGN_CASES = {
    "1-1-8-16": (1, 1, 8, 16, "invalid"),
    "1-8-256-16": (1, 8, 256, 16, "invalid"),
    "5-3-6-16": (5, 3, 6, 16, "invalid"),
    "37-3-6-32": (37, 3, 6, 32, "invalid"),
    "k=E": (64, 4, 4, 16, "invalid"),
    "many-empty-experts": (300, 2, 64, 64, "invalid"),
    "three-launches": (700, 2, 8, 16, "invalid"),  # more than one chunk of ids
    "M=1,k=1": (1, 1, 4, 16, None),
    "odd": (37, 3, 6, 16, None),
    "k=E-distinct": (5, 8, 8, 16, None),
    "empty-experts": (40, 2, 16, 32, [1, 5, 6, 12]),
    "one-expert": (50, 1, 4, 16, [2]),
    "many-blocks": (300, 2, 8, 64, None),
}


def _ids(rng, m, k, e, kind):
    if kind == "invalid":
        return jnp.asarray(rng.integers(-2, e + 2, size=(m, k)), jnp.int32)
    return random_ids(rng, m, k, e if kind is None else kind)


class AlignTests(OpTests):
    """Rows grouped by expert, each expert padded to the block, unused blocks at the end."""

    ALIGN_CASES = ALIGN_CASES

    def align(self, ids, e, bs):
        return self.jit(lambda i: ops.moe_align_block_size(i, e, bs, **self.impl), ids)

    def check(self, ids, e, bs):
        """Shapes, dtypes, every used position, and the sentinel/-1 padding after them."""
        sorted_ids, expert_ids, ntpp = self.align(ids, e, bs)
        want_sorted, want_experts, want_ntpp = oracle.moe_align_block_size(np.asarray(ids), e, bs)
        t = ids.size
        p = max_padded_rows(t, e, bs)
        assert sorted_ids.shape == (p,) and expert_ids.shape == (p // bs,) and ntpp.shape == (1,)
        assert sorted_ids.dtype == expert_ids.dtype == ntpp.dtype == np.int32
        assert int(ntpp[0]) == want_ntpp <= p
        np.testing.assert_array_equal(sorted_ids[:want_ntpp], want_sorted)
        assert (sorted_ids[want_ntpp:] == t).all()
        np.testing.assert_array_equal(expert_ids[: want_ntpp // bs], want_experts)
        assert (expert_ids[want_ntpp // bs:] == -1).all()
        return sorted_ids, expert_ids, ntpp

    @cases("ALIGN_CASES", "m,k,e,block,kind")
    def test_matches_oracle(self, rng, m, k, e, block, kind):
        self.check(_ids(rng, m, k, e, kind), e, block)

    def test_drops_invalid_ids(self, rng):
        """Rows whose id is outside [0, E) are placed nowhere."""
        ids = np.array(random_ids(rng, 20, 3, 8))
        ids[0, 0], ids[3, 2], ids[7, 1], ids[19, 0] = -1, 8, -100, 1000
        sorted_ids, _, _ = self.check(jnp.asarray(ids), 8, 16)
        placed = set(sorted_ids.tolist())
        for f in (0, 11, 22, 57):
            assert f not in placed

    def test_all_invalid(self):
        sorted_ids, expert_ids, ntpp = self.align(jnp.full((3, 2), -1, jnp.int32), 4, 16)
        assert int(ntpp[0]) == 0 and (sorted_ids == 6).all() and (expert_ids == -1).all()

    def test_no_tokens(self):
        """M = 0: empty layouts and a count of 0."""
        out = self.align(jnp.zeros((0, 2), jnp.int32), 4, 16)
        assert [o.shape for o in out] == [(0,), (0,), (1,)] and int(out[2][0]) == 0

    def test_align_gives_routing_data(self, rng):
        """``ops.align`` is the same layout as a RoutingData, with the weights in fp32."""
        ids = random_ids(rng, 7, 2, 6)
        weights = jnp.asarray(rng.uniform(size=(7, 2)), jnp.bfloat16)
        routing = self.jit(lambda i, w: ops.align(i, 6, 16, topk_weights=w, **self.impl), ids, weights)
        assert isinstance(routing, jaxmoe.RoutingData)
        assert (routing.block_size, routing.num_experts, routing.top_k, routing.num_rows) == (16, 6, 2, 14)
        for got, want in zip(routing.layout(), self.check(ids, 6, 16)):
            np.testing.assert_array_equal(np.asarray(got), want)
        assert routing.topk_weights.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(routing.topk_weights), np.asarray(weights, np.float32))


class TestAlignReference(AlignTests):
    implementation = "reference"


class TestAlignTritonInterpreter(AlignTests):
    implementation = "triton"


@pytest.mark.gpu
class TestAlignTritonGPU(AlignTests):
    implementation, gpu = "triton", True
    ALIGN_CASES = {**ALIGN_CASES, "8192-8-256-64": (8192, 8, 256, 64, "invalid"),
                   "4096-2-8-128": (4096, 2, 8, 128, "invalid")}


@pytest.mark.parametrize("t,e,bs", [(1, 8, 16), (16, 8, 16), (17, 256, 16), (4096 * 8, 256, 64), (7, 3, 128)])
def test_max_padded_rows_is_an_upper_bound(t, e, bs):
    blocks = max_padded_rows(t, e, bs) // bs
    # worst case: min(E, T) experts, one row each except one that takes the rest
    used = min(e, t)
    worst = used - 1 + -(-(t - used + 1) // bs)
    assert blocks >= worst
    assert blocks <= t


def test_align_errors(rng):
    ids = random_ids(rng, 6, 2, 4)
    with pytest.raises(ValueError, match="block_size"):
        ops.moe_align_block_size(ids, 4, 24)
    with pytest.raises(ValueError, match="block_size"):
        ops.moe_align_block_size(ids, 4, 8)
    with pytest.raises(TypeError, match="topk_ids"):
        ops.moe_align_block_size(ids.astype(F32), 4, 16)
    with pytest.raises(ValueError, match="topk_ids"):
        ops.moe_align_block_size(ids.reshape(-1), 4, 16)
    with pytest.raises(ValueError, match="num_experts"):
        ops.moe_align_block_size(ids, 0, 16)
    with pytest.raises(TypeError, match="num_experts"):
        ops.moe_align_block_size(ids, 4.0, 16)
    with pytest.raises(ValueError, match="implementation"):
        ops.moe_align_block_size(ids, 4, 16, implementation="x")
