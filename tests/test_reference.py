"""jaxmoe.reference against the independent float64 oracle (tests/oracle.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracle
from conftest import moe_inputs, randn, random_ids, rel_err, to_f64, tolerance
from jaxmoe import reference
from jaxmoe.ops import max_padded_rows

BF16, F32 = jnp.bfloat16, jnp.float32

# ----------------------------------------------------------------------------- route

ROUTE_CASES = {
    "softmax-renorm": dict(m=37, e=8, k=2, scoring="softmax", renormalize=True),
    "softmax-plain": dict(m=16, e=6, k=3, scoring="softmax", renormalize=False),
    "sigmoid-top1": dict(m=16, e=8, k=1, scoring="sigmoid", renormalize=False),
    "sigmoid-renorm": dict(m=9, e=16, k=4, scoring="sigmoid", renormalize=True),
    "k=E": dict(m=5, e=6, k=6, scoring="softmax", renormalize=True),
    "M=1": dict(m=1, e=64, k=6, scoring="softmax", renormalize=True),
    "grouped-v2": dict(m=21, e=16, k=3, scoring="softmax", renormalize=False, num_expert_group=4, topk_group=2),
    "grouped-v3": dict(m=33, e=32, k=4, scoring="sigmoid", renormalize=True, num_expert_group=4, topk_group=2,
                       bias=True, routed_scaling_factor=2.5),
    "grouped-v3-deepseek": dict(m=8, e=256, k=8, scoring="sigmoid", renormalize=True, num_expert_group=8,
                                topk_group=4, bias=True, routed_scaling_factor=2.5),
    "biased-ungrouped": dict(m=12, e=16, k=2, scoring="sigmoid", renormalize=True, bias=True),
}


def _route_both(logits, k, **kw):
    got_w, got_ids = reference.route(logits, k, **kw)
    bias = kw.get("correction_bias")
    want_w, want_ids = oracle.route(
        to_f64(logits), k, **{**kw, "correction_bias": None if bias is None else to_f64(bias)}
    )
    return got_w, got_ids, want_w, want_ids


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(ROUTE_CASES))
def test_route_matches_oracle(case, dtype, rng):
    c = dict(ROUTE_CASES[case])
    m, e, k = c.pop("m"), c.pop("e"), c.pop("k")
    if c.pop("bias", False):
        c["correction_bias"] = randn(rng, (e,), F32, scale=0.1)
    logits = randn(rng, (m, e), dtype, scale=2.0)
    got_w, got_ids, want_w, want_ids = _route_both(logits, k, **c)
    assert got_w.dtype == jnp.float32 and got_ids.dtype == jnp.int32
    assert got_ids.shape == got_w.shape == (m, k)
    np.testing.assert_array_equal(np.asarray(got_ids), want_ids)
    np.testing.assert_allclose(np.asarray(got_w), want_w, rtol=1e-5, atol=1e-6)


def test_route_ties_pick_lower_id():
    logits = jnp.array([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0], [5.0, 1.0, 5.0, 1.0, 1.0]])
    w, ids = reference.route(logits, 3)
    np.testing.assert_array_equal(np.asarray(ids), [[1, 2, 4], [0, 1, 2], [0, 2, 1]])
    np.testing.assert_allclose(np.asarray(w)[1], [1 / 3] * 3, rtol=1e-6)


@pytest.mark.parametrize("bias", [False, True], ids=["v2", "v3"])
def test_route_group_ties_pick_lower_group(bias, rng):
    # 4 groups of 4 with identical scores: groups 0 and 1 must win, experts by ascending id.
    e, m = 16, 6
    base = np.tile(np.round(rng.standard_normal(4), 1), 4)
    logits = jnp.asarray(np.tile(base, (m, 1)), F32)
    kw = dict(scoring="sigmoid", num_expert_group=4, topk_group=2)
    if bias:
        kw["correction_bias"] = jnp.zeros(e, F32)
    got_w, got_ids, want_w, want_ids = _route_both(logits, 4, **kw)
    np.testing.assert_array_equal(np.asarray(got_ids), want_ids)
    assert set(np.asarray(got_ids).reshape(-1)) <= set(range(8))
    np.testing.assert_allclose(np.asarray(got_w), want_w, rtol=1e-5)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("grouped", [False, True])
def test_route_nan_logits_give_valid_ids(scoring, grouped, rng):
    e, k, m = 16, 4, 10
    logits = np.asarray(rng.standard_normal((m, e)), np.float32)
    logits[0, 3] = np.nan
    logits[1, :] = np.nan
    logits[2, 5:] = np.nan
    kw = dict(scoring=scoring)
    if grouped:
        kw.update(num_expert_group=4, topk_group=2, correction_bias=randn(rng, (e,), F32, 0.1))
    got_w, got_ids, want_w, want_ids = _route_both(jnp.asarray(logits), k, **kw)
    ids = np.asarray(got_ids)
    assert ids.min() >= 0 and ids.max() < e
    np.testing.assert_array_equal(ids, want_ids)
    finite = np.isfinite(want_w).all(axis=1)
    np.testing.assert_allclose(np.asarray(got_w)[finite], want_w[finite], rtol=1e-5, atol=1e-6)
    if scoring == "sigmoid":
        assert 3 not in ids[0]  # only that expert is lost
        np.testing.assert_array_equal(ids[1], np.arange(k))  # nothing usable: lowest ids


# ----------------------------------------------------------------------------- align

ALIGN_CASES = {
    "M=1,k=1": (1, 1, 4, 16, None),
    "odd": (37, 3, 6, 16, None),
    "k=E": (5, 8, 8, 16, None),
    "empty-experts": (40, 2, 16, 32, [1, 5, 6, 12]),
    "one-expert": (50, 1, 4, 16, [2]),
    "many-blocks": (300, 2, 8, 64, None),
}


@pytest.mark.parametrize("case", list(ALIGN_CASES))
def test_align_matches_oracle(case, rng):
    m, k, e, bs, pool = ALIGN_CASES[case]
    ids = random_ids(rng, m, k, e if pool is None else pool)
    _check_align(ids, e, bs)


def test_align_drops_invalid_ids(rng):
    ids = np.array(random_ids(rng, 20, 3, 8))
    ids[0, 0], ids[3, 2], ids[7, 1], ids[19, 0] = -1, 8, -100, 1000
    sorted_ids, _, _ = _check_align(jnp.asarray(ids), 8, 16)
    placed = set(np.asarray(sorted_ids).tolist())
    for f in (0, 11, 22, 57):
        assert f not in placed


def test_align_all_invalid():
    sorted_ids, expert_ids, ntpp = reference.moe_align_block_size(jnp.full((3, 2), -1, jnp.int32), 4, 16)
    assert int(ntpp[0]) == 0 and (np.asarray(sorted_ids) == 6).all() and (np.asarray(expert_ids) == -1).all()


def test_align_empty():
    out = reference.moe_align_block_size(jnp.zeros((0, 2), jnp.int32), 4, 16)
    assert [o.shape for o in out] == [(0,), (0,), (1,)] and int(out[2][0]) == 0


def _check_align(ids, e, bs):
    sorted_ids, expert_ids, ntpp = reference.moe_align_block_size(ids, e, bs)
    want_sorted, want_experts, want_ntpp = oracle.moe_align_block_size(np.asarray(ids), e, bs)
    t = ids.size
    p = max_padded_rows(t, e, bs)
    assert sorted_ids.shape == (p,) and expert_ids.shape == (p // bs,) and ntpp.shape == (1,)
    assert sorted_ids.dtype == expert_ids.dtype == ntpp.dtype == jnp.int32
    assert int(ntpp[0]) == want_ntpp <= p
    np.testing.assert_array_equal(np.asarray(sorted_ids)[:want_ntpp], want_sorted)
    assert (np.asarray(sorted_ids)[want_ntpp:] == t).all()
    np.testing.assert_array_equal(np.asarray(expert_ids)[: want_ntpp // bs], want_experts)
    assert (np.asarray(expert_ids)[want_ntpp // bs:] == -1).all()
    return sorted_ids, expert_ids, ntpp


@pytest.mark.parametrize("t,e,bs", [(1, 8, 16), (16, 8, 16), (17, 256, 16), (4096 * 8, 256, 64), (7, 3, 128)])
def test_max_padded_rows_is_an_upper_bound(t, e, bs):
    blocks = max_padded_rows(t, e, bs) // bs
    # worst case: min(E, T) experts, one row each except one that takes the rest
    used = min(e, t)
    worst = used - 1 + -(-(t - used + 1) // bs)
    assert blocks >= worst
    assert blocks <= t


# ----------------------------------------------------------------------------- moe_gemm


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "stage", ["stage1-silu", "stage1-gelu", "stage2-weighted", "plain"]
)
def test_moe_gemm_matches_oracle(stage, dtype, rng):
    m, k, e, bs = 19, 3, 6, 16
    ids = np.array(random_ids(rng, m, k, [0, 2, 3, 5]))  # experts 1 and 4 get nothing
    ids[2, 1], ids[10, 0] = -3, e  # invalid ids: their rows stay 0
    topk_weights = jnp.asarray(rng.uniform(0.1, 1, (m, k)), F32)
    sorted_ids, expert_ids, ntpp = reference.moe_align_block_size(jnp.asarray(ids), e, bs)
    if stage.startswith("stage1"):
        act = stage.split("-")[1]
        a, b, top_k, kw = randn(rng, (m, 48), dtype), randn(rng, (e, 2 * 40, 48), dtype, 48**-0.5), k, dict(activation=act)
    elif stage == "stage2-weighted":
        a, b, top_k, kw = randn(rng, (m * k, 40), dtype), randn(rng, (e, 24, 40), dtype, 40**-0.5), 1, dict(topk_weights=topk_weights)
    else:
        a, b, top_k, kw = randn(rng, (m, 40), dtype), randn(rng, (e, 33, 40), dtype, 40**-0.5), k, {}
    got = reference.moe_gemm(a, b, sorted_ids, expert_ids, ntpp, top_k=top_k, num_rows=m * k, block_size=bs, **kw)
    want = oracle.moe_gemm(
        to_f64(a), to_f64(b), sorted_ids, expert_ids, ntpp, top_k=top_k, num_rows=m * k, block_size=bs,
        topk_weights=kw.get("topk_weights"), activation_name=kw.get("activation"),
    )
    assert got.dtype == dtype and got.shape == want.shape
    assert rel_err(got, want) <= tolerance(dtype)
    got = np.asarray(got.astype(F32))
    assert (got[2 * k + 1] == 0).all() and (got[10 * k] == 0).all()


# ----------------------------------------------------------------------------- fused_moe

FUSED_CASES = {
    # name: (M, D, I, E, k, expert pool)
    "M=1": (1, 64, 32, 8, 2, None),
    "odd": (37, 96, 80, 6, 3, None),
    "k=E": (9, 32, 48, 4, 4, None),
    "k=1": (23, 64, 64, 8, 1, None),
    "empty-experts": (30, 64, 32, 16, 2, [0, 3, 4, 9, 15]),
}


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_fused_moe_matches_oracle(case, dtype, rng):
    m, d, i, e, k, pool = FUSED_CASES[case]
    x, w1, w2, tw, ti = moe_inputs(rng, m, d, i, e, k, dtype, pool)
    got = reference.fused_moe(x, w1, w2, tw, ti)
    want = oracle.fused_moe(to_f64(x), to_f64(w1), to_f64(w2), tw, ti, "silu")
    assert got.dtype == dtype and got.shape == (m, d)
    assert rel_err(got, want) <= tolerance(dtype)


@pytest.mark.parametrize("dtype", [F32, BF16, jnp.float16], ids=["fp32", "bf16", "fp16"])
def test_fused_moe_gelu(dtype, rng):
    x, w1, w2, tw, ti = moe_inputs(rng, 13, 48, 40, 5, 2, dtype)
    got = reference.fused_moe(x, w1, w2, tw, ti, activation="gelu")
    want = oracle.fused_moe(to_f64(x), to_f64(w1), to_f64(w2), tw, ti, "gelu")
    assert got.dtype == dtype
    assert rel_err(got, want) <= tolerance(dtype)
    silu = reference.fused_moe(x, w1, w2, tw, ti, activation="silu")
    assert rel_err(silu, want) > 10 * tolerance(dtype)  # the activation argument matters


def test_fused_moe_invalid_ids_contribute_nothing(rng):
    x, w1, w2, tw, ti = moe_inputs(rng, 11, 32, 16, 4, 2, F32)
    ti = np.array(ti)
    ti[0, 0], ti[5, 1], ti[7, :] = -1, 4, [-2, 99]
    ti = jnp.asarray(ti, jnp.int64 if jax.config.jax_enable_x64 else jnp.int32)
    got = reference.fused_moe(x, w1, w2, tw, ti)
    want = oracle.fused_moe(to_f64(x), to_f64(w1), to_f64(w2), tw, ti, "silu")
    assert rel_err(got, want) <= 1e-4
    assert (np.asarray(got)[7] == 0).all()


def test_fused_moe_empty_batch(rng):
    x, w1, w2, tw, ti = moe_inputs(rng, 0, 32, 16, 4, 2, BF16)
    got = reference.fused_moe(x, w1, w2, tw, ti)
    assert got.shape == (0, 32) and got.dtype == BF16


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_fused_moe_equals_its_two_stage_decomposition(dtype, rng):
    """align -> moe_gemm(act) -> moe_gemm(weights) -> sum over k: the kernels' data flow."""
    m, d, i, e, k, bs = 21, 64, 48, 8, 2, 16
    x, w1, w2, tw, ti = moe_inputs(rng, m, d, i, e, k, dtype, [0, 1, 2, 6])
    sorted_ids, expert_ids, ntpp = reference.moe_align_block_size(ti, e, bs)
    h = reference.moe_gemm(x, w1, sorted_ids, expert_ids, ntpp, top_k=k, num_rows=m * k, block_size=bs, activation="silu")
    rows = reference.moe_gemm(h, w2, sorted_ids, expert_ids, ntpp, top_k=1, num_rows=m * k, block_size=bs, topk_weights=tw)
    two_stage = rows.reshape(m, k, d).astype(F32).sum(axis=1).astype(dtype)
    got = reference.fused_moe(x, w1, w2, tw, ti)
    assert rel_err(got, two_stage) <= (1e-6 if dtype == F32 else 4e-3)


# ----------------------------------------------------------------------------- moe_layer


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_moe_layer_matches_oracle_with_batch_dims(dtype, rng):
    import jaxmoe

    d, i, e, k = 64, 32, 8, 2
    params = jaxmoe.init_moe_params(jax.random.key(int(rng.integers(1 << 30))), hidden=d, intermediate=i, experts=e, dtype=dtype)
    x = randn(rng, (2, 3, d), dtype)
    got = reference.moe_layer(params, x, top_k=k)
    assert got.shape == x.shape and got.dtype == dtype
    x2d = to_f64(x).reshape(-1, d)
    logits = x2d @ to_f64(params["router"])
    tw, ti = oracle.route(logits, k)
    want = oracle.fused_moe(x2d, to_f64(params["w1"]), to_f64(params["w2"]), tw, ti).reshape(2, 3, d)
    assert rel_err(got, want) <= tolerance(dtype)


def test_moe_layer_deepseek_routing(rng):
    import jaxmoe

    d, i, e, k = 32, 16, 32, 4
    params = jaxmoe.init_moe_params(jax.random.key(3), hidden=d, intermediate=i, experts=e, dtype=F32)
    bias = randn(rng, (e,), F32, 0.1)
    kw = dict(scoring="sigmoid", num_expert_group=4, topk_group=2, routed_scaling_factor=2.5)
    x = randn(rng, (7, d), F32)
    got = reference.moe_layer(params, x, top_k=k, correction_bias=bias, **kw)
    tw, ti = oracle.route(to_f64(x) @ to_f64(params["router"]), k, correction_bias=to_f64(bias), **kw)
    want = oracle.fused_moe(to_f64(x), to_f64(params["w1"]), to_f64(params["w2"]), tw, ti)
    assert rel_err(got, want) <= 1e-4
