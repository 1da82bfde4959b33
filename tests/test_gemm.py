"""The grouped GEMM: ``jaxmoe.ops.moe_gemm`` (and through it ``grouped_gemm``), each
implementation against the float64 oracle."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import oracle
from conftest import randn, random_ids, rel_err, to_f64, tolerance
from jaxmoe import ops, reference
from jaxmoe.ops.gemm import config as _config
from op_base import BF16, F32, OpTests, ids_with_counts, with_invalid_ids


class GemmTests(OpTests):
    """One grouped GEMM over expert-sorted rows: both MoE stages, the epilogues, invalid ids."""

    def gemm(self, a, b, layout, **kw):
        return self.jit(lambda a, b, *l: ops.moe_gemm(a, b, *l, **kw, **self.impl), a, b, *layout)

    def check(self, a, b, layout, tol, **kw):
        got = self.gemm(a, b, layout, **kw)
        want = oracle.moe_gemm(to_f64(a), to_f64(b), *layout, top_k=kw["top_k"], num_rows=kw["num_rows"],
                               block_size=kw["block_size"], topk_weights=kw.get("topk_weights"),
                               activation_name=kw.get("activation"))
        assert got.shape == want.shape and got.dtype == a.dtype
        assert rel_err(got, want) <= tol
        return np.asarray(got.astype(np.float32))

    @pytest.mark.parametrize("activation,weighted", [(None, False), (None, True), ("silu", False), ("gelu", True)])
    @pytest.mark.parametrize("dtype", [BF16, F32])
    def test_epilogues(self, rng, activation, weighted, dtype):
        """Stage-1 rows with each epilogue; K and N not multiples of the tiles; invalid ids."""
        m, k, e, kdim, n, block = 13, 2, 5, 72, 96, 16
        a = randn(rng, (m, kdim), dtype)
        b = randn(rng, (e, n, kdim), dtype, scale=kdim**-0.5)
        ids = with_invalid_ids(jnp.asarray(rng.integers(0, e, size=(m, k)), jnp.int32), e)
        weights = jnp.asarray(rng.uniform(0.1, 1, (m, k)), F32) if weighted else None
        layout = reference.moe_align_block_size(ids, e, block)
        self.check(a, b, layout, tolerance(dtype), top_k=k, num_rows=m * k, block_size=block, topk_weights=weights,
                   activation=activation)

    @pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
    @pytest.mark.parametrize("stage", ["stage1-silu", "stage1-gelu", "stage2-weighted", "plain"])
    def test_stages(self, rng, stage, dtype):
        """Stage 1 (rows read a[f // k]), stage 2 (rows read a[f], weighted), an odd N; the rows
        of invalid ids and of experts without rows stay 0."""
        m, k, e, bs = 19, 3, 6, 16
        ids = np.array(random_ids(rng, m, k, [0, 2, 3, 5]))  # experts 1 and 4 get nothing
        ids[2, 1], ids[10, 0] = -3, e
        topk_weights = jnp.asarray(rng.uniform(0.1, 1, (m, k)), F32)
        layout = reference.moe_align_block_size(jnp.asarray(ids), e, bs)
        if stage.startswith("stage1"):
            a, b, top_k = randn(rng, (m, 48), dtype), randn(rng, (e, 2 * 40, 48), dtype, 48**-0.5), k
            kw = dict(activation=stage.split("-")[1])
        elif stage == "stage2-weighted":
            a, b, top_k = randn(rng, (m * k, 40), dtype), randn(rng, (e, 24, 40), dtype, 40**-0.5), 1
            kw = dict(topk_weights=topk_weights)
        else:
            a, b, top_k, kw = randn(rng, (m, 40), dtype), randn(rng, (e, 33, 40), dtype, 40**-0.5), k, {}
        got = self.check(a, b, layout, tolerance(dtype), top_k=top_k, num_rows=m * k, block_size=bs, **kw)
        assert (got[2 * k + 1] == 0).all() and (got[10 * k] == 0).all()

    def test_padding_anywhere_in_a_block(self, rng):
        """A block's valid rows need not come first: the kernels size a block's tile from its
        last valid position, not from the padding being last."""
        counts, block = (130, 276), 128  # tail blocks 1 (2 rows) and 4 (20 rows)
        assert _config.split_tail(sum(counts), len(counts), block) == 2
        a = randn(rng, (sum(counts), 64), BF16)
        b = randn(rng, (2, 48, 64), BF16, scale=0.125)
        sorted_ids, expert_ids, padded = reference.moe_align_block_size(ids_with_counts(rng, counts), 2, block)
        s = np.array(sorted_ids)
        for blk in (1, 4):  # move one valid row of each tail block to the block's last position
            lo = blk * block
            assert s[lo] < sum(counts) <= s[lo + block - 1]
            s[[lo, lo + block - 1]] = s[[lo + block - 1, lo]]
        self.check(a, b, (jnp.asarray(s), expert_ids, padded), 1e-2, top_k=1, num_rows=sum(counts),
                   block_size=block)

    def test_no_tokens(self, rng):
        """M = 0: an empty result of the right shape and dtype."""
        x = randn(rng, (0, 64), BF16)
        w1 = randn(rng, (4, 64, 64), BF16)
        layout = ops.moe_align_block_size(jnp.zeros((0, 2), jnp.int32), 4, 16, **self.impl)
        c = ops.moe_gemm(x, w1, *layout, top_k=2, num_rows=0, block_size=16, activation="silu", **self.impl)
        assert c.shape == (0, 32) and c.dtype == BF16


class TestGemmReference(GemmTests):
    implementation = "reference"


class TestGemmTritonInterpreter(GemmTests):
    implementation = "triton"


@pytest.mark.gpu
class TestGemmTritonGPU(GemmTests):
    implementation, gpu = "triton", True


def test_moe_gemm_errors(rng):
    m, k, e, bs = 6, 2, 4, 16
    ids = random_ids(rng, m, k, e)
    align = reference.moe_align_block_size(ids, e, bs)
    a, b = randn(rng, (m, 16), F32), randn(rng, (e, 10, 16), F32)
    ok = dict(top_k=k, num_rows=m * k, block_size=bs)
    ops.moe_gemm(a, b, *align, **ok)
    bad = [
        ((a, b.astype(BF16), *align), ok, TypeError, "b"),
        ((a.astype(jnp.int32), b, *align), ok, TypeError, "a"),
        ((a, b[:, :, :8], *align), ok, ValueError, "b"),
        ((a, b, align[0].astype(F32), *align[1:]), ok, TypeError, "sorted_token_ids"),
        ((a, b, align[0][:-1], *align[1:]), ok, ValueError, "sorted_token_ids"),
        ((a, b, align[0], align[1][:-1], align[2]), ok, ValueError, "expert_ids"),
        ((a, b, *align[:2], align[2].reshape(())), ok, ValueError, "num_tokens_post_padded"),
        ((a, b, *align), {**ok, "num_rows": m * k + 1}, ValueError, "num_rows"),
        ((a, b, *align), {**ok, "top_k": 0}, ValueError, "top_k"),
        ((a, b, *align), {**ok, "block_size": 32}, ValueError, "sorted_token_ids|expert_ids"),
        ((a, b[:, :9], *align), {**ok, "activation": "silu"}, ValueError, "even"),
        ((a, b, *align), {**ok, "activation": "tanh"}, ValueError, "activation"),
        ((a, b, *align), {**ok, "topk_weights": jnp.ones((m, 3))}, ValueError, "topk_weights"),
        ((a, b, *align), {**ok, "topk_weights": jnp.ones((m, k), jnp.int32)}, TypeError, "topk_weights"),
        ((a, b, *align), {**ok, "implementation": "fast"}, ValueError, "implementation"),
    ]
    for args, kwargs, exc, name in bad:
        with pytest.raises(exc, match=name):
            ops.moe_gemm(*args, **kwargs)


class TestGemmTritonInterpreterTMA(GemmTests):
    """The same cases with B's tiles read through tensor descriptors (``JAXMOE_TMA=1``)."""

    implementation = "triton"

    @pytest.fixture(autouse=True)
    def _tma(self, tma_views, request):
        yield
        # every case plans a GEMM (M = 0 none), and the fp32 ones keep pointer loads
        assert tma_views or request.node.name == "test_no_tokens"


@pytest.mark.gpu
class TestGemmTritonGPUTMA(TestGemmTritonInterpreterTMA):
    implementation, gpu = "triton", True
