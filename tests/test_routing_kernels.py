"""The Triton routing kernels against jaxmoe.reference (CPU: Triton's interpreter).

CPU cases keep M small (the interpreter is slow); the ``gpu``-marked sweeps run the
shapes of issue 4 on a CUDA/ROCm GPU and are skipped, visibly, elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe import backends, reference
from jaxmoe.backends import aot
from jaxmoe.ops.routing import triton as routing_triton

BF16, F32 = jnp.bfloat16, jnp.float32
EK_CASES = [(8, 2), (64, 6), (128, 8), (256, 8), (384, 8), (512, 16)]


def _logits(rng, m, e, dtype, scale=2.0):
    return jnp.asarray(scale * rng.standard_normal((m, e)), F32).astype(dtype)


def _bias(rng, e, dtype=F32):
    return jnp.asarray(0.1 * rng.standard_normal(e), F32).astype(dtype)


def _run(fn, logits, k, bias=None, **kw):
    """``fn`` under jax.jit, traced with poisoned outputs (unwritten elements show up)."""
    with backends.poisoned_outputs():
        f = jax.jit(lambda x, b: fn(x, k, correction_bias=b, **kw))
        out = f(logits, bias)
    return jax.device_get(out)


def _check(logits, k, bias=None, **kw):
    got_w, got_ids = _run(routing_triton.route, logits, k, bias, **kw)
    want_w, want_ids = _run(reference.route, logits, k, bias, **kw)
    assert got_ids.dtype == np.int32 and got_w.dtype == np.float32
    assert got_ids.shape == want_ids.shape == (logits.shape[0], k)
    e = logits.shape[1]
    assert ((got_ids >= 0) & (got_ids < e)).all(), "out-of-range expert id"
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got_w, want_w, rtol=1e-5, atol=1e-30, equal_nan=True)
    return got_w, got_ids


# ----------------------------------------------------------------------------- CPU (interpreter)


@pytest.mark.parametrize("e,k", EK_CASES)
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_topk_matches_reference(rng, e, k, scoring):
    for m, dtype in ((1, F32), (19, BF16)):
        _check(_logits(rng, m, e, dtype), k, scoring=scoring, renormalize=True)


@pytest.mark.parametrize("dtype", [F32, BF16, jnp.float16])
def test_topk_no_renormalize_and_scale(rng, dtype):
    _check(_logits(rng, 33, 64, dtype), 6, scoring="softmax", renormalize=False, routed_scaling_factor=1.5)
    _check(_logits(rng, 17, 60, dtype), 4, scoring="sigmoid", renormalize=False)


def test_odd_sizes(rng):
    # E not a power of two, k = E, k = 1, M not a multiple of the block.
    _check(_logits(rng, 37, 6, F32), 3)
    _check(_logits(rng, 5, 6, F32), 6)
    _check(_logits(rng, 9, 3, BF16), 1, scoring="sigmoid", renormalize=False)
    _check(_logits(rng, 3, 1, F32), 1)


GROUPED = {
    # DeepSeek-V3: sigmoid, bias, groups scored by their top-2 biased scores.
    "deepseek-v3": dict(e=256, k=8, num_expert_group=8, topk_group=4, scoring="sigmoid", bias=True,
                        routed_scaling_factor=2.5),
    # DeepSeek-V2: softmax, groups scored by their best expert, no renormalization.
    "deepseek-v2": dict(e=160, k=6, num_expert_group=8, topk_group=3, scoring="softmax", renormalize=False,
                        routed_scaling_factor=16.0),
    "v3-small": dict(e=64, k=4, num_expert_group=4, topk_group=2, scoring="sigmoid", bias=True),
    "softmax-biased": dict(e=96, k=6, num_expert_group=6, topk_group=2, scoring="softmax", bias=True),
    "group-of-one": dict(e=8, k=2, num_expert_group=8, topk_group=3, scoring="sigmoid", bias=True),
    "all-groups": dict(e=32, k=4, num_expert_group=4, topk_group=4, scoring="softmax"),
    "one-group-kept": dict(e=64, k=8, num_expert_group=4, topk_group=1, scoring="sigmoid", bias=True),
}


def _grouped_case(rng, m, dtype, case, bias_dtype=F32):
    kw = dict(GROUPED[case])
    e, k = kw.pop("e"), kw.pop("k")
    bias = _bias(rng, e, bias_dtype) if kw.pop("bias", False) else None
    return _logits(rng, m, e, dtype), k, bias, kw


@pytest.mark.parametrize("case", sorted(GROUPED))
def test_grouped_matches_reference(rng, case):
    logits, k, bias, kw = _grouped_case(rng, 24, BF16, case)
    _check(logits, k, bias, **kw)
    logits, k, bias, kw = _grouped_case(rng, 1, F32, case)
    _check(logits, k, bias, **kw)


def test_biased_ungrouped_and_bf16_bias(rng):
    _check(_logits(rng, 21, 128, F32), 8, _bias(rng, 128), scoring="sigmoid", renormalize=True)
    _check(_logits(rng, 21, 128, BF16), 8, _bias(rng, 128, BF16), scoring="softmax", renormalize=False)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_ties_pick_lower_id(rng, scoring):
    # Integer logits in a tiny range: most rows hold many equal scores.
    for e, k in ((8, 4), (64, 8), (256, 8)):
        logits = jnp.asarray(rng.integers(-2, 3, (16, e)), F32)
        _, ids = _check(logits, k, scoring=scoring)
        # And the rule itself, independently of the reference: descending score, then ascending id.
        x = np.asarray(logits)
        for row in range(x.shape[0]):
            order = sorted(range(e), key=lambda j: (-x[row, j], j))[:k]
            np.testing.assert_array_equal(ids[row], order)
    # Equal biased scores across groups: lower group ids win too.
    logits = jnp.zeros((4, 256), F32)
    bias = jnp.asarray(rng.integers(0, 2, 256) * 0.5, F32)
    _check(logits, 8, bias, scoring=scoring, num_expert_group=8, topk_group=4)
    _check(jnp.zeros((3, 256), BF16), 8, jnp.zeros(256, F32), scoring=scoring, num_expert_group=8, topk_group=4)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter, on NaN rows
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_nan_and_inf_logits(rng, scoring):
    e, k = 64, 6
    x = np.asarray(2.0 * rng.standard_normal((8, e)), np.float32)
    x[0, 3] = np.nan
    x[1, :] = np.nan
    x[2, :] = -np.inf
    x[3, 10] = np.inf
    x[4, :40] = np.nan
    x[5, 7] = -np.inf
    x[6, ::2] = np.inf
    for dtype in (F32, BF16):
        logits = jnp.asarray(x).astype(dtype)
        _, ids = _check(logits, k, scoring=scoring)
        assert ((ids >= 0) & (ids < e)).all()
        _check(logits, k, _bias(rng, e), scoring=scoring, num_expert_group=8, topk_group=2)
        _check(logits, k, None, scoring=scoring, num_expert_group=8, topk_group=3)
    # A NaN bias or a bias of -inf must not produce an out-of-range id either.
    bias = np.array(_bias(rng, e))
    bias[:5] = np.nan
    bias[5:9] = -np.inf
    _check(jnp.asarray(x), k, jnp.asarray(bias), scoring=scoring, num_expert_group=4, topk_group=2)


def test_public_route_uses_kernel(rng):
    import jaxmoe

    logits = _logits(rng, 12, 256, BF16)
    bias = _bias(rng, 256)
    kw = dict(scoring="sigmoid", num_expert_group=8, topk_group=4, correction_bias=bias, routed_scaling_factor=2.5)
    with backends.poisoned_outputs():
        got = jax.jit(lambda x: jaxmoe.route(x, 8, implementation="triton", **kw))(logits)
    want = jax.jit(lambda x: jaxmoe.route(x, 8, implementation="reference", **kw))(logits)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)


def test_traced_scaling_factor(rng):
    logits = _logits(rng, 5, 16, F32)
    got = jax.jit(lambda x, s: routing_triton.route(x, 2, routed_scaling_factor=s))(logits, jnp.float32(2.5))
    want = reference.route(logits, 2, routed_scaling_factor=2.5)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)


def test_one_launch_per_call():
    for kw in (dict(), dict(scoring="sigmoid", num_expert_group=8, topk_group=4,
                            correction_bias=jnp.zeros(256, F32), routed_scaling_factor=2.5)):
        hlo = jax.jit(lambda x: routing_triton.route(x, 8, **kw)).lower(jnp.zeros((64, 256), BF16)).as_text()
        assert hlo.count("custom_call") == 1, hlo


# ----------------------------------------------------------------------------- fused sigmoid top-1


def _top1_numpy(x, w, shared_expert):
    """Independent float64 check: sigmoid(x @ w), first max (NaN never wins)."""
    logits = np.asarray(jnp.asarray(x, F32), np.float64) @ np.asarray(jnp.asarray(w, F32), np.float64)
    scores = 1.0 / (1.0 + np.exp(-logits))
    sel = np.where(np.isnan(scores), -np.inf, scores)
    ids = sel.argmax(axis=1)
    weights = scores[np.arange(len(ids)), ids]
    if shared_expert:
        return (np.stack([weights, np.ones_like(weights)], 1),
                np.stack([ids, np.full_like(ids, w.shape[1])], 1), sel)
    return weights[:, None], ids[:, None], sel


def _check_top1(x, w, shared_expert):
    with backends.poisoned_outputs():
        got_w, got_ids = jax.jit(lambda a, b: routing_triton.router_sigmoid_top1(a, b, shared_expert=shared_expert))(x, w)
    got_w, got_ids = np.asarray(got_w), np.asarray(got_ids)
    want_w, want_ids, sel = _top1_numpy(x, w, shared_expert)
    cols = 2 if shared_expert else 1
    assert got_w.shape == got_ids.shape == (x.shape[0], cols)
    assert got_ids.dtype == np.int32 and got_w.dtype == np.float32
    # The fp32 accumulation order differs from float64: where the best two experts are
    # within rounding of each other either may be picked, anywhere else the id is exact.
    srt = np.sort(sel, axis=1)
    clear = (srt[:, -1] - srt[:, -2]) > 1e-5 if sel.shape[1] > 1 else np.ones(len(sel), bool)
    np.testing.assert_array_equal(got_ids[clear], want_ids[clear])
    picked = sel[np.arange(len(sel)), got_ids[:, 0]]
    np.testing.assert_allclose(picked, srt[:, -1], rtol=0, atol=2e-5)
    np.testing.assert_allclose(got_w[:, 0], np.take_along_axis(
        1.0 / (1.0 + np.exp(-(np.asarray(jnp.asarray(x, F32), np.float64) @ np.asarray(jnp.asarray(w, F32), np.float64)))),
        got_ids[:, :1], 1)[:, 0], rtol=1e-5)
    if shared_expert:
        np.testing.assert_array_equal(got_ids[:, 1], w.shape[1])
        np.testing.assert_array_equal(got_w[:, 1], 1.0)
    if hasattr(reference, "router_sigmoid_top1"):
        ref_w, ref_ids = jax.jit(lambda a, b: reference.router_sigmoid_top1(a, b, shared_expert=shared_expert))(x, w)
        np.testing.assert_array_equal(got_ids[clear], np.asarray(ref_ids)[clear])
        np.testing.assert_allclose(got_w[clear], np.asarray(ref_w)[clear], rtol=1e-5)


@pytest.mark.parametrize("shared_expert", [False, True])
@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("m,d,e", [(1, 64, 16), (37, 96, 6), (20, 256, 128)])
def test_sigmoid_top1_fused(rng, m, d, e, dtype, shared_expert):
    x = jnp.asarray(rng.standard_normal((m, d)), F32).astype(dtype)
    w = jnp.asarray(rng.standard_normal((d, e)) / np.sqrt(d) * 3, F32).astype(dtype)
    _check_top1(x, w, shared_expert)


def test_sigmoid_top1_ties_and_mixed_dtypes(rng):
    x = jnp.asarray(rng.standard_normal((16, 32)), F32)
    w = jnp.zeros((32, 8), F32)  # every score is 0.5: expert 0 everywhere
    with backends.poisoned_outputs():
        got_w, got_ids = jax.jit(routing_triton.router_sigmoid_top1)(x, w)
    np.testing.assert_array_equal(np.asarray(got_ids), 0)
    np.testing.assert_array_equal(np.asarray(got_w), 0.5)
    _check_top1(x.astype(BF16), jnp.asarray(rng.standard_normal((32, 8)), F32), False)


# ----------------------------------------------------------------------------- ahead of time


@pytest.mark.parametrize("target", ["sm_90", "gfx942", "gfx950"])
def test_routing_launches_compile_aot(target):
    specs = routing_triton.aot_launches(ms=(1, 4096), dtypes=(BF16,))
    assert {s.name for s in specs} == {"topk_route_kernel", "topk_route_biased_kernel", "sigmoid_top1_kernel"}
    for spec in specs:
        compiled = aot.compile_aot(spec, target)
        assert compiled.asm, spec


# ----------------------------------------------------------------------------- GPU sweeps

GPU_MS = (1, 7, 64, 1000, 4096, 8192)  # each M is a fresh Triton compile (sizes are constexprs)


@pytest.mark.gpu
@pytest.mark.parametrize("e,k", EK_CASES)
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", [BF16, F32])
def test_gpu_topk_sweep(rng, e, k, scoring, dtype):
    for m in GPU_MS:
        _check(_logits(rng, m, e, dtype), k, scoring=scoring, renormalize=True)
    _check(_logits(rng, 4096, e, dtype), k, scoring=scoring, renormalize=False, routed_scaling_factor=2.5)
    _check(_logits(rng, 1000, e, dtype), k, _bias(rng, e), scoring=scoring)


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(GROUPED))
@pytest.mark.parametrize("dtype", [BF16, F32])
def test_gpu_grouped_sweep(rng, case, dtype):
    for m in GPU_MS:
        logits, k, bias, kw = _grouped_case(rng, m, dtype, case)
        _check(logits, k, bias, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_gpu_ties_and_nan(rng, scoring):
    for m, e, k in ((8192, 256, 8), (4096, 512, 16), (64, 8, 2)):
        _check(jnp.asarray(rng.integers(-2, 3, (m, e)), F32), k, scoring=scoring)
        x = np.asarray(2.0 * rng.standard_normal((m, e)), np.float32)
        x[rng.random((m, e)) < 0.05] = np.nan
        x[::7] = np.nan
        x[3::11] = -np.inf
        x[5::13, ::3] = np.inf
        _check(jnp.asarray(x), k, scoring=scoring)
        _check(jnp.asarray(x).astype(BF16), k, scoring=scoring)
    x = np.asarray(rng.integers(-2, 3, (4096, 256)), np.float32)
    x[::5, ::9] = np.nan
    _check(jnp.asarray(x), 8, _bias(rng, 256), scoring=scoring, num_expert_group=8, topk_group=4,
           routed_scaling_factor=2.5)


@pytest.mark.gpu
@pytest.mark.parametrize("shared_expert", [False, True])
@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("m", [1, 64, 4096])
@pytest.mark.parametrize("d,e", [(5120, 16), (5120, 128), (7168, 256)])
def test_gpu_sigmoid_top1_sweep(rng, m, d, e, dtype, shared_expert):
    x = jnp.asarray(rng.standard_normal((m, d)), F32).astype(dtype)
    w = jnp.asarray(rng.standard_normal((d, e)) / np.sqrt(d) * 3, F32).astype(dtype)
    _check_top1(x, w, shared_expert)


def test_public_router_sigmoid_top1(rng):
    from jaxmoe import ops

    x = jnp.asarray(rng.standard_normal((9, 48)), F32).astype(BF16)
    w = jnp.asarray(rng.standard_normal((48, 12)) / 4, F32).astype(BF16)
    for shared in (False, True):
        got = jax.jit(lambda a, b: ops.router_sigmoid_top1(a, b, shared_expert=shared, implementation="triton"))(x, w)
        want = jax.jit(lambda a, b: ops.router_sigmoid_top1(a, b, shared_expert=shared, implementation="reference"))(x, w)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    with pytest.raises(ValueError, match="disagree on D"):
        ops.router_sigmoid_top1(x, w[:40])
    with pytest.raises(TypeError, match="x must"):
        ops.router_sigmoid_top1(x.astype(jnp.int32), w)


def test_beyond_kernel_limits_the_reference_serves(rng, monkeypatch):
    """Past what the kernels hold in registers, "triton" alone refuses with the reason and
    a sequence ending in "reference" falls back to it."""
    import jaxmoe
    from jaxmoe import ops

    monkeypatch.setattr(routing_triton, "MAX_EXPERTS", 16)
    monkeypatch.setattr(routing_triton, "MAX_TOP1_EXPERTS", 16)
    logits = _logits(rng, 4, 32, F32)
    with pytest.raises(NotImplementedError, match="at most 16 experts"):
        jaxmoe.route(logits, 3, implementation="triton")
    got = jax.jit(lambda x: jaxmoe.route(x, 3, implementation=("triton", "reference")))(logits)
    want = reference.route(logits, 3)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    x, w = _logits(rng, 4, 8, F32), _logits(rng, 8, 32, F32)
    with pytest.raises(NotImplementedError, match="at most 16 experts"):
        ops.router_sigmoid_top1(x, w, implementation="triton")
    got = ops.router_sigmoid_top1(x, w, shared_expert=True, implementation=("triton", "reference"))
    want = reference.router_sigmoid_top1(x, w, shared_expert=True)
    np.testing.assert_array_equal(got[1], want[1])
