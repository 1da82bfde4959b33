"""Routing: ``jaxmoe.route`` and ``jaxmoe.ops.router_sigmoid_top1``, each implementation
against a float64 oracle (so the kernels and the reference agree with each other too),
then the kernels' own limits, launches and errors.

The interpreter classes keep M small (it is slow); the GPU classes sweep the batch sizes
of real models and are skipped, visibly, without a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmoe
import oracle
from conftest import randn, to_f64
from jaxmoe import ops, reference
from jaxmoe.backends import aot
from jaxmoe.ops.routing import triton as routing_triton
from op_base import BF16, F16, F32, OpTests, bias, cases, logits

EK_CASES = [(8, 2), (64, 6), (128, 8), (256, 8), (384, 8), (512, 16)]
GPU_MS = (1, 7, 64, 1000, 4096, 8192)  # each M is a fresh Triton compile (sizes are constexprs)

# Routing options by name (M, E, k and whether a correction bias is drawn are part of each).
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


def _grouped_case(rng, m, dtype, case):
    kw = dict(GROUPED[case])
    e, k = kw.pop("e"), kw.pop("k")
    b = bias(rng, e) if kw.pop("bias", False) else None
    return logits(rng, m, e, dtype), k, b, kw


# ----------------------------------------------------------------------------- route


class RouteTests(OpTests):
    """``jaxmoe.route`` over softmax/sigmoid scoring, grouping, bias, ties and NaN/inf."""

    # (M, logits dtype) each top-k case runs with
    TOPK_ROWS = {"m1-fp32": (1, F32), "m19-bf16": (19, BF16)}
    GROUPED_ROWS = {"m24-bf16": (24, BF16), "m1-fp32": (1, F32)}

    def route(self, x, k, b=None, **kw):
        return self.jit(lambda x, b: jaxmoe.route(x, k, correction_bias=b, **kw, **self.impl), x, b)

    def check(self, x, k, b=None, **kw):
        """Ids equal to the oracle's; weights to fp32 rounding, NaN exactly where the oracle's are
        (a row without a usable score).

        Scores are fp32 by contract, and two experts whose scores are equal in fp32 but not in
        float64 (sigmoid saturates) go to the lower id: at large M a few rows then order two
        ids differently from the float64 oracle. So a kernel's ids must equal the fp32
        reference's (jitted, as the kernels run), and the oracle's, in all but at most 0.1 % of
        the rows, and those rows must pick the same scores to fp32 rounding.
        """
        got_w, got_ids = self.route(x, k, b, **kw)
        m, e = x.shape
        assert got_ids.dtype == np.int32 and got_w.dtype == np.float32
        assert got_ids.shape == got_w.shape == (m, k)
        assert ((got_ids >= 0) & (got_ids < e)).all(), "out-of-range expert id"
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf rows in float64
            want_w, want_ids = oracle.route(to_f64(x), k, **kw, correction_bias=None if b is None else to_f64(b))
        if self.implementation != "reference":
            # under jit as the kernel runs: an eager reference rounds its fp32 softmax unfused
            ref_w, ref_ids = jax.jit(lambda x, b: jaxmoe.route(x, k, correction_bias=b, **kw,
                                                               implementation="reference"))(x, b)
            ref_w, ref_ids = np.asarray(ref_w), np.asarray(ref_ids)
            # Triton's and XLA's fp32 sigmoid/softmax differ in the last bit, so two scores tied in
            # one may not be tied in the other: such a row picks the same scores (to fp32 rounding)
            # in another order or from another of the tied experts. Allowed in <= 0.1 % of rows.
            moved = (got_ids != ref_ids).any(axis=1)
            assert moved.mean() <= 1e-3, f"{moved.sum()} of {m} rows route differently from the fp32 reference"
            if m * k <= 4096:
                assert not moved.any(), np.flatnonzero(moved)[:10]
            np.testing.assert_allclose(np.sort(got_w[moved], axis=1), np.sort(ref_w[moved], axis=1),
                                       rtol=1e-5, atol=1e-30, equal_nan=True)
            np.testing.assert_allclose(got_w[~moved], ref_w[~moved], rtol=1e-5, atol=1e-30, equal_nan=True)
        same = (got_ids == want_ids).all(axis=1)
        if m * k <= 4096:  # small cases: no fp32 tie is expected, the oracle must agree everywhere
            assert same.all(), np.flatnonzero(~same)[:10]
        assert same.mean() >= 0.999, f"{(~same).sum()} of {m} rows route differently from the oracle"
        np.testing.assert_allclose(got_w[same], want_w[same], rtol=1e-5, atol=1e-30, equal_nan=True)
        return got_w, got_ids

    @pytest.mark.parametrize("e,k", EK_CASES)
    @pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
    def test_topk(self, rng, e, k, scoring):
        """Plain top-k over the expert counts of real models."""
        for m, dtype in self.TOPK_ROWS.values():
            self.check(logits(rng, m, e, dtype), k, scoring=scoring, renormalize=True)

    @pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
    @pytest.mark.parametrize("case", list(ROUTE_CASES))
    def test_options(self, rng, case, dtype):
        """Each combination of scoring, renormalization, grouping, bias and scale."""
        c = dict(ROUTE_CASES[case])
        m, e, k = c.pop("m"), c.pop("e"), c.pop("k")
        b = randn(rng, (e,), F32, scale=0.1) if c.pop("bias", False) else None
        self.check(randn(rng, (m, e), dtype, scale=2.0), k, b, **c)

    @pytest.mark.parametrize("dtype", [F32, BF16, F16])
    def test_no_renormalize_and_scale(self, rng, dtype):
        self.check(logits(rng, 33, 64, dtype), 6, scoring="softmax", renormalize=False, routed_scaling_factor=1.5)
        self.check(logits(rng, 17, 60, dtype), 4, scoring="sigmoid", renormalize=False)

    def test_odd_sizes(self, rng):
        """E not a power of two, k = E, k = 1, M not a multiple of the block."""
        self.check(logits(rng, 37, 6), 3)
        self.check(logits(rng, 5, 6), 6)
        self.check(logits(rng, 9, 3, BF16), 1, scoring="sigmoid", renormalize=False)
        self.check(logits(rng, 3, 1), 1)

    @pytest.mark.parametrize("case", sorted(GROUPED))
    def test_grouped(self, rng, case):
        """Grouped routing (DeepSeek-V2/V3 and edge cases of the group counts)."""
        for m, dtype in self.GROUPED_ROWS.values():
            x, k, b, kw = _grouped_case(rng, m, dtype, case)
            self.check(x, k, b, **kw)

    @pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
    @pytest.mark.parametrize("group_scoring", ["max", "top2_sum"])
    def test_group_scoring(self, rng, group_scoring, with_bias):
        """An explicit group rule, with and without a bias (both rules against the default's
        opposite); the two rules must pick different experts somewhere, or the test proves nothing."""
        for e, groups, dtype in ((16, 4, F32), (24, 6, BF16)):  # 24/6: groups not a power of two
            x = logits(rng, 16, e, dtype)
            b = bias(rng, e) if with_bias else None
            kw = dict(scoring="sigmoid", num_expert_group=groups, topk_group=2, routed_scaling_factor=2.5)
            _, ids = self.check(x, 4, b, **kw, group_scoring=group_scoring)
            other = {"max": "top2_sum", "top2_sum": "max"}[group_scoring]
            _, other_ids = oracle.route(to_f64(x), 4, **kw, group_scoring=other,
                                        correction_bias=None if b is None else to_f64(b))
            assert (ids != other_ids).any(), "the two group rules chose the same experts"

    def test_biased_ungrouped_and_bf16_bias(self, rng):
        self.check(logits(rng, 21, 128), 8, bias(rng, 128), scoring="sigmoid", renormalize=True)
        self.check(logits(rng, 21, 128, BF16), 8, bias(rng, 128, BF16), scoring="softmax", renormalize=False)

    @pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
    def test_ties_pick_lower_id(self, rng, scoring):
        """Of equal scores the lower id wins, within a row and across groups."""
        # Integer logits in a tiny range: most rows hold many equal scores.
        for e, k in ((8, 4), (64, 8), (256, 8)):
            x = jnp.asarray(rng.integers(-2, 3, (16, e)), F32)
            _, ids = self.check(x, k, scoring=scoring)
            # And the rule itself, written out: descending score, then ascending id.
            xs = np.asarray(x)
            for row in range(xs.shape[0]):
                np.testing.assert_array_equal(ids[row], sorted(range(e), key=lambda j: (-xs[row, j], j))[:k])
        # Equal biased scores across groups: lower group ids win too.
        b = jnp.asarray(rng.integers(0, 2, 256) * 0.5, F32)
        self.check(jnp.zeros((4, 256), F32), 8, b, scoring=scoring, num_expert_group=8, topk_group=4)
        self.check(jnp.zeros((3, 256), BF16), 8, jnp.zeros(256, F32), scoring=scoring, num_expert_group=8,
                   topk_group=4)

    def test_ties_written_out(self):
        """Hand-made ties: the ids and the equal weights, spelled out."""
        x = jnp.array([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0], [5.0, 1.0, 5.0, 1.0, 1.0]])
        w, ids = self.route(x, 3)
        np.testing.assert_array_equal(ids, [[1, 2, 4], [0, 1, 2], [0, 2, 1]])
        np.testing.assert_allclose(w[1], [1 / 3] * 3, rtol=1e-6)

    @pytest.mark.parametrize("with_bias", [False, True], ids=["v2", "v3"])
    def test_group_ties_pick_lower_group(self, rng, with_bias):
        """4 groups of 4 with identical scores: groups 0 and 1 win, experts by ascending id."""
        e, m = 16, 6
        base = np.tile(np.round(rng.standard_normal(4), 1), 4)
        x = jnp.asarray(np.tile(base, (m, 1)), F32)
        b = jnp.zeros(e, F32) if with_bias else None
        _, ids = self.check(x, 4, b, scoring="sigmoid", num_expert_group=4, topk_group=2)
        assert set(ids.reshape(-1)) <= set(range(8))

    @pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter, on NaN rows
    @pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
    def test_nan_and_inf_logits(self, rng, scoring):
        """NaN and inf logits or biases never give an out-of-range id."""
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
            xd = jnp.asarray(x).astype(dtype)
            self.check(xd, k, scoring=scoring)
            self.check(xd, k, bias(rng, e), scoring=scoring, num_expert_group=8, topk_group=2)
            self.check(xd, k, None, scoring=scoring, num_expert_group=8, topk_group=3)
        # A NaN bias or a bias of -inf must not produce an out-of-range id either.
        b = np.array(bias(rng, e))
        b[:5] = np.nan
        b[5:9] = -np.inf
        self.check(jnp.asarray(x), k, jnp.asarray(b), scoring=scoring, num_expert_group=4, topk_group=2)

    @pytest.mark.filterwarnings("ignore::RuntimeWarning")
    @pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
    @pytest.mark.parametrize("grouped", [False, True])
    def test_nan_logits_lose_only_their_expert(self, rng, scoring, grouped):
        """A NaN logit costs its expert only (sigmoid); a row of NaN falls back to the lowest ids."""
        e, k, m = 16, 4, 10
        x = np.asarray(rng.standard_normal((m, e)), np.float32)
        x[0, 3] = np.nan
        x[1, :] = np.nan
        x[2, 5:] = np.nan
        kw = dict(scoring=scoring)
        b = None
        if grouped:
            kw.update(num_expert_group=4, topk_group=2)
            b = randn(rng, (e,), F32, 0.1)
        _, ids = self.check(jnp.asarray(x), k, b, **kw)
        if scoring == "sigmoid":
            assert 3 not in ids[0]
            np.testing.assert_array_equal(ids[1], np.arange(k))

    def test_traced_scaling_factor(self, rng):
        """The scale may be a traced scalar: the weights are scaled by its value."""
        x = logits(rng, 5, 16)
        w, ids = jax.jit(lambda x, s: jaxmoe.route(x, 2, routed_scaling_factor=s, **self.impl))(x, jnp.float32(2.5))
        want_w, want_ids = oracle.route(to_f64(x), 2, routed_scaling_factor=2.5)
        np.testing.assert_array_equal(np.asarray(ids), want_ids)
        np.testing.assert_allclose(np.asarray(w), want_w, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(w).sum(axis=1), 2.5, rtol=1e-6)


class TestRouteReference(RouteTests):
    implementation = "reference"


class TestRouteTritonInterpreter(RouteTests):
    implementation = "triton"


@pytest.mark.gpu
class TestRouteTritonGPU(RouteTests):
    implementation, gpu = "triton", True
    TOPK_ROWS = {f"m{m}-{jnp.dtype(d).name}": (m, d) for d in (BF16, F32) for m in GPU_MS}
    GROUPED_ROWS = TOPK_ROWS

    @pytest.mark.parametrize("e,k", EK_CASES)
    @pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
    @pytest.mark.parametrize("dtype", [BF16, F32])
    def test_topk_large_batches(self, rng, e, k, scoring, dtype):
        self.check(logits(rng, 4096, e, dtype), k, scoring=scoring, renormalize=False, routed_scaling_factor=2.5)
        self.check(logits(rng, 1000, e, dtype), k, bias(rng, e), scoring=scoring)

    @pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
    def test_ties_and_nan_at_scale(self, rng, scoring):
        for m, e, k in ((8192, 256, 8), (4096, 512, 16), (64, 8, 2)):
            self.check(jnp.asarray(rng.integers(-2, 3, (m, e)), F32), k, scoring=scoring)
            x = np.asarray(2.0 * rng.standard_normal((m, e)), np.float32)
            x[rng.random((m, e)) < 0.05] = np.nan
            x[::7] = np.nan
            x[3::11] = -np.inf
            x[5::13, ::3] = np.inf
            self.check(jnp.asarray(x), k, scoring=scoring)
            self.check(jnp.asarray(x).astype(BF16), k, scoring=scoring)
        x = np.asarray(rng.integers(-2, 3, (4096, 256)), np.float32)
        x[::5, ::9] = np.nan
        self.check(jnp.asarray(x), 8, bias(rng, 256), scoring=scoring, num_expert_group=8, topk_group=4,
                   routed_scaling_factor=2.5)


# ----------------------------------------------------------------------------- fused sigmoid top-1


def _top1_numpy(x, w, shared_expert):
    """Independent float64 check: sigmoid(x @ w), first max (NaN never wins)."""
    logits64 = to_f64(x) @ to_f64(w)
    scores = 1.0 / (1.0 + np.exp(-logits64))
    sel = np.where(np.isnan(scores), -np.inf, scores)
    ids = sel.argmax(axis=1)
    weights = scores[np.arange(len(ids)), ids]
    if shared_expert:
        return (np.stack([weights, np.ones_like(weights)], 1),
                np.stack([ids, np.full_like(ids, w.shape[1])], 1), sel, scores)
    return weights[:, None], ids[:, None], sel, scores


class SigmoidTop1Tests(OpTests):
    """``jaxmoe.ops.router_sigmoid_top1``: the router matmul, sigmoid and top-1 in one op."""

    TOP1_SHAPES = {f"{m}-{d}-{e}": (m, d, e) for m, d, e in [(1, 64, 16), (37, 96, 6), (20, 256, 128)]}

    def top1(self, x, w, shared_expert=False):
        return self.jit(lambda a, b: ops.router_sigmoid_top1(a, b, shared_expert=shared_expert, **self.impl), x, w)

    def check(self, x, w, shared_expert):
        got_w, got_ids = self.top1(x, w, shared_expert)
        want_w, want_ids, sel, scores = _top1_numpy(x, w, shared_expert)
        assert got_w.shape == got_ids.shape == (x.shape[0], 2 if shared_expert else 1)
        assert got_ids.dtype == np.int32 and got_w.dtype == np.float32
        # The fp32 accumulation order differs from float64: where the best two experts are
        # within rounding of each other either may be picked, anywhere else the id is exact.
        srt = np.sort(sel, axis=1)
        clear = (srt[:, -1] - srt[:, -2]) > 1e-5 if sel.shape[1] > 1 else np.ones(len(sel), bool)
        np.testing.assert_array_equal(got_ids[clear], want_ids[clear])
        np.testing.assert_allclose(sel[np.arange(len(sel)), got_ids[:, 0]], srt[:, -1], rtol=0, atol=2e-5)
        np.testing.assert_allclose(got_w[:, 0], np.take_along_axis(scores, got_ids[:, :1], 1)[:, 0], rtol=1e-5)
        if shared_expert:
            np.testing.assert_array_equal(got_ids[:, 1], w.shape[1])
            np.testing.assert_array_equal(got_w[:, 1], 1.0)

    @pytest.mark.parametrize("shared_expert", [False, True])
    @pytest.mark.parametrize("dtype", [BF16, F32])
    @cases("TOP1_SHAPES", "m,d,e")
    def test_matches_oracle(self, rng, m, d, e, dtype, shared_expert):
        x = jnp.asarray(rng.standard_normal((m, d)), F32).astype(dtype)
        w = jnp.asarray(rng.standard_normal((d, e)) / np.sqrt(d) * 3, F32).astype(dtype)
        self.check(x, w, shared_expert)

    def test_ties_and_mixed_dtypes(self, rng):
        """Every score 0.5: expert 0 everywhere; bf16 x with an fp32 router."""
        x = jnp.asarray(rng.standard_normal((16, 32)), F32)
        got_w, got_ids = self.top1(x, jnp.zeros((32, 8), F32))
        np.testing.assert_array_equal(got_ids, 0)
        np.testing.assert_array_equal(got_w, 0.5)
        self.check(x.astype(BF16), jnp.asarray(rng.standard_normal((32, 8)), F32), False)


class TestSigmoidTop1Reference(SigmoidTop1Tests):
    implementation = "reference"


class TestSigmoidTop1TritonInterpreter(SigmoidTop1Tests):
    implementation = "triton"


@pytest.mark.gpu
class TestSigmoidTop1TritonGPU(SigmoidTop1Tests):
    implementation, gpu = "triton", True
    TOP1_SHAPES = {f"{m}-{d}-{e}": (m, d, e) for m in (1, 64, 4096) for d, e in [(5120, 16), (5120, 128), (7168, 256)]}


# ----------------------------------------------------------------------------- the kernels' own


def test_one_launch_per_call():
    """Routing, grouped and biased included, is one Triton launch."""
    for kw in (dict(), dict(scoring="sigmoid", num_expert_group=8, topk_group=4,
                            correction_bias=jnp.zeros(256, F32), routed_scaling_factor=2.5)):
        hlo = jax.jit(lambda x: routing_triton.route(x, 8, **kw)).lower(jnp.zeros((64, 256), BF16)).as_text()
        assert hlo.count("custom_call") == 1, hlo


@pytest.mark.parametrize("target", ["sm_90", "gfx942", "gfx950"])
def test_routing_launches_compile_aot(target):
    specs = routing_triton.aot_launches(ms=(1, 4096), dtypes=(BF16,))
    assert {s.name for s in specs} == {"topk_route_kernel", "topk_route_biased_kernel", "sigmoid_top1_kernel"}
    for spec in specs:
        compiled = aot.compile_aot(spec, target)
        assert compiled.asm, spec


def test_public_router_sigmoid_top1(rng):
    """The kernel equals the reference on every row of a small bf16 case; bad shapes and dtypes are refused."""
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
    monkeypatch.setattr(routing_triton, "MAX_EXPERTS", 16)
    monkeypatch.setattr(routing_triton, "MAX_TOP1_EXPERTS", 16)
    x = logits(rng, 4, 32)
    with pytest.raises(NotImplementedError, match="at most 16 experts"):
        jaxmoe.route(x, 3, implementation="triton")
    got = jax.jit(lambda x: jaxmoe.route(x, 3, implementation=("triton", "reference")))(x)
    want = reference.route(x, 3)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    x, w = logits(rng, 4, 8), logits(rng, 8, 32)
    with pytest.raises(NotImplementedError, match="at most 16 experts"):
        ops.router_sigmoid_top1(x, w, implementation="triton")
    got = ops.router_sigmoid_top1(x, w, shared_expert=True, implementation=("triton", "reference"))
    want = reference.router_sigmoid_top1(x, w, shared_expert=True)
    np.testing.assert_array_equal(got[1], want[1])


# ----------------------------------------------------------------------------- bad input

ROUTE_ERRORS = [
    (dict(top_k=0), ValueError, "top_k"),
    (dict(top_k=9), ValueError, "top_k"),
    (dict(top_k=2.0), TypeError, "top_k"),
    (dict(scoring="relu"), ValueError, "scoring"),
    (dict(renormalize="yes"), TypeError, "renormalize"),
    (dict(num_expert_group=4), ValueError, "topk_group"),
    (dict(num_expert_group=3, topk_group=1), ValueError, "num_expert_group"),
    (dict(num_expert_group=4, topk_group=5), ValueError, "topk_group"),
    (dict(num_expert_group=4, topk_group=1, top_k=3), ValueError, "top_k"),
    (dict(correction_bias=jnp.zeros(7)), ValueError, "correction_bias"),
    (dict(correction_bias=jnp.zeros(8, jnp.int32)), TypeError, "correction_bias"),
    (dict(routed_scaling_factor="2"), TypeError, "routed_scaling_factor"),
    (dict(implementation="cuda"), ValueError, "implementation"),
]


@pytest.mark.parametrize("kwargs,exc,name", ROUTE_ERRORS, ids=[f"{e[2]}-{i}" for i, e in enumerate(ROUTE_ERRORS)])
def test_route_errors(kwargs, exc, name, rng):
    kwargs = {"top_k": 2, **kwargs}
    top_k = kwargs.pop("top_k")
    x = randn(rng, (5, 8), F32)
    for fn in (jaxmoe.route, reference.route):
        if fn is reference.route and "implementation" in kwargs:
            continue
        with pytest.raises(exc, match=name):
            fn(x, top_k, **kwargs)


def test_route_logits_errors():
    with pytest.raises(TypeError, match="logits"):
        jaxmoe.route(jnp.zeros((4, 8), jnp.int32), 2)
    with pytest.raises(ValueError, match="logits"):
        jaxmoe.route(jnp.zeros((4, 2, 8)), 2)
    with pytest.raises(TypeError, match="logits"):
        jaxmoe.route([[1.0, 2.0]], 1)


def test_grouped_routing_warns_when_it_falls_to_the_v2_rule():
    """Grouped routing without group_scoring and without a bias takes DeepSeek-V2's "max"
    rule, and says so; an explicit rule, or a bias (DeepSeek-V3's "top2_sum"), does not warn."""
    import warnings

    from jaxmoe.ops.checks import GroupScoringWarning

    logits = jnp.asarray(np.random.default_rng(0).standard_normal((3, 32)), F32)
    kw = dict(scoring="sigmoid", num_expert_group=8, topk_group=2, implementation="reference")
    with pytest.warns(GroupScoringWarning, match="group_scoring='top2_sum' or 'max'"):
        jaxmoe.route(logits, 4, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GroupScoringWarning)
        jaxmoe.route(logits, 4, **kw, group_scoring="max")
        jaxmoe.route(logits, 4, **kw, correction_bias=jnp.zeros(32, F32))
        jaxmoe.route(logits, 4, scoring="sigmoid", num_expert_group=8, topk_group=8, implementation="reference")
