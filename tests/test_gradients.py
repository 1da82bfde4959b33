"""Gradients through the reference: a NaN or Inf in one token reaches only the gradients
of the experts that token is routed to, and leaves the other tokens' outputs alone."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import moe_inputs
from jaxmoe import ops, reference

M, D, I, E, K = 8, 16, 8, 6, 2
BAD = 3  # the token whose hidden state is broken


def _inputs(rng, dtype):
    x, w1, w2, tw, _ = moe_inputs(rng, M, D, I, E, K, dtype)
    # every expert serves some healthy token; the bad one goes to experts 1 and 4
    ids = np.array([[0, 1], [2, 3], [4, 5], [1, 4], [5, 0], [3, 2], [1, 5], [4, 2]], np.int32)
    return x, w1, w2, tw, jnp.asarray(ids)


def _finite_per_expert(g) -> np.ndarray:
    g = np.asarray(g.astype(jnp.float32))
    return np.isfinite(g).reshape(E, -1).all(axis=1)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_moe_gradient_stays_in_the_bad_tokens_experts(bad_value, dtype, rng):
    x, w1, w2, tw, ids = _inputs(rng, dtype)
    x_bad = x.at[BAD, 5].set(bad_value)

    def loss(w1, w2, x):
        return reference.fused_moe(x, w1, w2, tw, ids).astype(jnp.float32).sum()

    g1, g2 = jax.grad(loss, argnums=(0, 1))(w1, w2, x_bad)
    routed = np.zeros(E, bool)
    routed[np.asarray(ids[BAD])] = True
    for g in (g1, g2):
        finite = _finite_per_expert(g)
        assert finite[~routed].all(), finite  # every expert the bad token does not use
        assert not finite[routed].all()  # the bad value did reach its own experts
    # the healthy experts' gradients are those of the same loss without the bad token
    clean_g1, clean_g2 = jax.grad(loss, argnums=(0, 1))(w1, w2, x.at[BAD].set(0))
    for g, clean in ((g1, clean_g1), (g2, clean_g2)):
        np.testing.assert_array_equal(np.asarray(g[~routed], np.float32), np.asarray(clean[~routed], np.float32))

    # forward: the other tokens' outputs do not change
    y_bad = np.asarray(reference.fused_moe(x_bad, w1, w2, tw, ids).astype(jnp.float32))
    y = np.asarray(reference.fused_moe(x, w1, w2, tw, ids).astype(jnp.float32))
    others = np.arange(M) != BAD
    np.testing.assert_array_equal(y_bad[others], y[others])
    assert not np.isfinite(y_bad[BAD]).all()


def test_moe_gemm_gradient_stays_in_the_bad_rows_expert(rng):
    x, w1, _, tw, ids = _inputs(rng, jnp.float32)
    align = reference.moe_align_block_size(ids, E, 16)
    x_bad = x.at[BAD, 0].set(np.nan)

    def loss(b, a):
        return ops.moe_gemm(a, b, *align, top_k=K, num_rows=M * K, block_size=16, activation="silu",
                            topk_weights=tw, implementation="reference").sum()

    finite = _finite_per_expert(jax.grad(loss)(w1, x_bad))
    routed = np.isin(np.arange(E), np.asarray(ids[BAD]))
    assert finite[~routed].all() and not finite[routed].all(), finite
    # stage 2: one bad (token, slot) row reaches only its own expert
    h = ops.moe_gemm(x, w1, *align, top_k=K, num_rows=M * K, block_size=16, activation="silu",
                     implementation="reference")
    row = BAD * K + 1
    h_bad = h.at[row, 0].set(np.nan)

    def loss2(b, a):
        return ops.moe_gemm(a, b, *align, top_k=1, num_rows=M * K, block_size=16, topk_weights=tw,
                            implementation="reference").sum()

    w2 = jnp.asarray(rng.standard_normal((E, D, I)), jnp.float32)
    finite = _finite_per_expert(jax.grad(loss2)(w2, h_bad))
    assert finite.sum() == E - 1 and not finite[int(ids[BAD, 1])]


def test_moe_layer_gradient_with_a_nan_token(rng):
    """Through the whole reference layer: the NaN token's logits are NaN, so its routing
    weights are too; the experts it is routed to are the only ones it can spoil."""
    x, w1, w2, _, _ = _inputs(rng, jnp.float32)
    router = jnp.asarray(rng.standard_normal((D, E)), jnp.float32)
    x_bad = x.at[BAD, 2].set(np.nan)
    params = {"router": router, "w1": w1, "w2": w2}

    def loss(w1, w2):
        return reference.moe_layer({**params, "w1": w1, "w2": w2}, x_bad, top_k=K).sum()

    _, ids = reference.route(jnp.dot(x_bad, router, precision=jax.lax.Precision.HIGHEST), K)
    routed = np.isin(np.arange(E), np.asarray(ids[BAD]))
    for g in jax.grad(loss, argnums=(0, 1))(w1, w2):
        finite = _finite_per_expert(g)
        assert finite[~routed].all(), finite
