"""The fused MoE: ``jaxmoe.fused_moe``, each implementation against the float64 oracle
(the fp32 reference where the oracle's loops would take too long), then the kernels' own
configs, tile splits, launch payloads and the errors.

The interpreter class keeps the shapes small; the GPU class adds vLLM's and aiter's test
shapes and is skipped, visibly, without a GPU.
"""

from __future__ import annotations

import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmoe
import oracle
from conftest import moe_inputs, rel_err, to_f64, tolerance
from jaxmoe import backends, ops, reference
from jaxmoe.ops.gemm import config as _config
from jaxmoe.ops.gemm.config import GemmTile, MoEConfig
from jaxmoe.ops.moe import triton as moe_triton
from op_base import BF16, F16, F32, OpTests, cases, ids_with_counts, with_invalid_ids

# Past this many multiply-adds (M * k * D * I) the oracle's Python loops are too slow, and
# the expected output is the reference on fp32 copies of the inputs.
ORACLE_MACS = 2**26


def fp32_reference(x, w1, w2, topk_weights, topk_ids, activation="silu"):
    f32 = [a.astype(F32) for a in (x, w1, w2)]
    return reference.fused_moe(*f32, topk_weights, topk_ids, activation=activation)


def expected(x, w1, w2, topk_weights, topk_ids, activation="silu"):
    m, d = x.shape
    if m * topk_ids.shape[1] * d * w2.shape[2] <= ORACLE_MACS:
        return oracle.fused_moe(to_f64(x), to_f64(w1), to_f64(w2), topk_weights, topk_ids, activation)
    return fp32_reference(x, w1, w2, topk_weights, topk_ids, activation)


def _named(shapes, dtypes):
    return {f"{'-'.join(map(str, s[:5]))}-{jnp.dtype(dt).name}": (*s, dt) for s in shapes for dt in dtypes}


# (M, D, I, E, k, expert pool or None) by name, each with its dtype
FUSED_CASES = {
    **_named([(1, 128, 64, 8, 1, None),  # M = 1
              (37, 96, 80, 6, 3, None),  # odd sizes
              (16, 64, 32, 4, 4, None)],  # k = E
             (BF16, F16, F32)),
    **_named([(32, 512, 1024, 8, 2, None)], (BF16,)),  # the seed's first shape (M, K=D, N=I)
    **_named([(1, 64, 32, 8, 2, None),  # M = 1, k = 2
              (9, 32, 48, 4, 4, None),  # k = E, I > D
              (23, 64, 64, 8, 1, None),  # k = 1
              (30, 64, 32, 16, 2, (0, 3, 4, 9, 15))],  # 11 empty experts
             (F32, BF16)),
}
SEED_SHAPES = [  # (M, D=K, I=N, E, top_k): vLLM's and aiter's test shapes
    (32, 512, 1024, 8, 2),
    (128, 2048, 4096, 64, 2),
    (1, 8192, 1280, 8, 1),
    (64, 4096, 14336, 8, 2),
    (16, 128, 14336, 1, 1),
    (1, 16384, 1024, 2, 1),
    (2048, 2048, 1024, 64, 6),
]
# (M, D, I, E, k, expert pool): few experts used, three ids invalid
INVALID_CASES = {"24-64-48-16-2": (24, 64, 48, 16, 2, (1, 5, 6))}


class FusedMoeTests(OpTests):
    """Routed tokens through their experts' gated MLPs, summed over the k slots."""

    FUSED_CASES = FUSED_CASES
    INVALID_CASES = INVALID_CASES

    def fused(self, x, w1, w2, tw, ids, activation="silu"):
        return self.jit(lambda *a: jaxmoe.fused_moe(*a, activation=activation, **self.impl), x, w1, w2, tw, ids)

    def check(self, x, w1, w2, tw, ids, activation="silu", tol=None):
        out = self.fused(x, w1, w2, tw, ids, activation)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert np.isfinite(np.asarray(out, np.float32)).all()  # poisoned: every row written
        assert rel_err(out, expected(x, w1, w2, tw, ids, activation)) <= (tol or tolerance(x.dtype))
        return out

    @cases("FUSED_CASES", "m,d,i,e,k,pool,dtype")
    def test_matches_oracle(self, rng, m, d, i, e, k, pool, dtype):
        self.check(*moe_inputs(rng, m, d, i, e, k, dtype, None if pool is None else list(pool)))

    @pytest.mark.parametrize("activation", ["silu", "gelu"])
    @cases("INVALID_CASES", "m,d,i,e,k,pool")
    def test_invalid_ids_and_empty_experts(self, rng, m, d, i, e, k, pool, activation):
        x, w1, w2, tw, ids = moe_inputs(rng, m, d, i, e, k, BF16, experts=list(pool))
        self.check(x, w1, w2, tw, with_invalid_ids(ids, e), activation, tol=1e-2)

    @pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=["fp32", "bf16", "fp16"])
    def test_gelu(self, rng, dtype):
        """The activation argument is used: gelu matches the oracle's gelu, not its silu."""
        x, w1, w2, tw, ti = moe_inputs(rng, 13, 48, 40, 5, 2, dtype)
        self.check(x, w1, w2, tw, ti, "gelu")
        silu = self.fused(x, w1, w2, tw, ti, "silu")
        assert rel_err(silu, expected(x, w1, w2, tw, ti, "gelu")) > 10 * tolerance(dtype)

    def test_invalid_ids_contribute_nothing(self, rng):
        """An id outside [0, E) adds nothing; a token whose ids are all invalid gets zeros."""
        x, w1, w2, tw, ti = moe_inputs(rng, 11, 32, 16, 4, 2, F32)
        ti = np.array(ti)
        ti[0, 0], ti[5, 1], ti[7, :] = -1, 4, [-2, 99]
        ti = jnp.asarray(ti, jnp.int64 if jax.config.jax_enable_x64 else jnp.int32)
        out = self.check(x, w1, w2, tw, ti, tol=1e-4)
        assert (out[7] == 0).all()

    @pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
    def test_equals_its_two_stage_decomposition(self, rng, dtype):
        """align -> moe_gemm(act) -> moe_gemm(weights) -> sum over k: the kernels' data flow."""
        m, d, i, e, k, bs = 21, 64, 48, 8, 2, 16
        x, w1, w2, tw, ti = moe_inputs(rng, m, d, i, e, k, dtype, [0, 1, 2, 6])

        def two_stage(x, w1, w2, tw, ti):
            layout = ops.moe_align_block_size(ti, e, bs, **self.impl)
            h = ops.moe_gemm(x, w1, *layout, top_k=k, num_rows=m * k, block_size=bs, activation="silu", **self.impl)
            rows = ops.moe_gemm(h, w2, *layout, top_k=1, num_rows=m * k, block_size=bs, topk_weights=tw,
                                **self.impl)
            return rows.reshape(m, k, d).astype(F32).sum(axis=1).astype(dtype)

        got = self.check(x, w1, w2, tw, ti)
        assert rel_err(got, self.jit(two_stage, x, w1, w2, tw, ti)) <= (1e-6 if dtype == F32 else 4e-3)

    def test_no_tokens(self, rng):
        """M = 0: an empty [0, D] result in the input dtype."""
        x, w1, w2, tw, ids = moe_inputs(rng, 0, 64, 32, 4, 2, BF16)
        out = self.fused(x, w1, w2, tw, ids)
        assert out.shape == (0, 64) and out.dtype == BF16


class TestFusedMoeReference(FusedMoeTests):
    implementation = "reference"


class TestFusedMoeTritonInterpreter(FusedMoeTests):
    implementation = "triton"


@pytest.mark.gpu
class TestFusedMoeTritonGPU(FusedMoeTests):
    implementation, gpu = "triton", True
    FUSED_CASES = {**FUSED_CASES, **_named([(*s, None) for s in SEED_SHAPES], (BF16, F16, F32))}
    INVALID_CASES = {**INVALID_CASES, "200-1024-512-64-4": (200, 1024, 512, 64, 4, tuple(range(0, 64, 5)))}

    @pytest.mark.xdist_group("big-memory")  # tens of GB each: one at a time on the card
    def test_offsets_past_int32(self, rng):
        """Stage 2 reads h[f] at f * I and writes y[f] at f * D: here both pass 2^31 elements."""
        m, d, i, e, k = (1 << 21) + 4096, 128, 128, 8, 8
        assert m * k * i > 2**31
        x, w1, w2, tw, ids = moe_inputs(rng, m, d, i, e, k, BF16)
        out = jax.jit(lambda *a: jaxmoe.fused_moe(*a, **self.impl))(x, w1, w2, tw, ids)
        for rows in (slice(m - 4096, m), slice(0, 4096)):  # the tail: the rows whose offsets pass 2^31
            assert rel_err(out[rows], fp32_reference(x[rows], w1, w2, tw[rows], ids[rows])) <= 1e-2


# ----------------------------------------------------------------------------- the kernels' own configs


def _fused_with(config, *args):
    with backends.poisoned_outputs():
        return jax.jit(lambda *a: moe_triton.fused_moe(*a, config=config))(*args)


def test_small_explicit_config(rng):
    """Tiles smaller than the problem in every direction, GROUP_SIZE_M > 1."""
    x, w1, w2, tw, ids = moe_inputs(rng, 40, 64, 64, 3, 3, BF16)
    config = MoEConfig(16, GemmTile(32, 32, 2, 4, 2), GemmTile(32, 32, 3, 4, 2))
    assert rel_err(_fused_with(config, x, w1, w2, tw, ids), expected(x, w1, w2, tw, ids)) <= 1e-2


def test_tile_too_big_for_shared_memory_is_refused():
    """A tile whose pipeline cannot fit is a clear ValueError, not a launch failure on the card."""
    big = MoEConfig(64, GemmTile(128, 128, 8, 8, 3), GemmTile(128, 64, 8, 8, 3))  # stage 1: 240 KB
    with pytest.raises(ValueError, match="shared memory"):
        moe_triton.plan_fused_moe(1024, 8, 256, 7168, 2048, BF16, "sm90", config=big)
    fits = MoEConfig(128, GemmTile(128, 64, 8, 8, 4), GemmTile(256, 64, 8, 8, 4))  # 192 KB each
    assert len(moe_triton.plan_fused_moe(1024, 8, 256, 7168, 2048, BF16, "sm90", config=fits)) >= 3


# Rows per expert chosen so that expert tails land in each tile height: with BLOCK_M = 128,
# 130 leaves 2 rows in the last block (quarter tile), 298 leaves 42 (half), 230 leaves 102
# (full), 276 leaves 20 (quarter); with 64: 198 -> 6 (half), 228 -> 36 (full), 192 -> 64
# (full), 207 -> 15 (half). Means >= SPLIT_TAIL_MIN_ROWS, so the split is on.
TAIL_CASES = [(128, (130, 298, 230, 276)), (64, (198, 228, 192, 207))]


def test_split_tail_only_where_compute_bound():
    assert _config.split_tail(8 * 256, 8, 128) == 2  # Mixtral-8x7B M=1024: 256 rows per expert
    assert _config.split_tail(8 * 256, 8, 64) == 1
    assert _config.split_tail(8 * 256, 8, 32) == 0
    assert _config.split_tail(32768, 256, 128) == 0  # DeepSeek-V3 M=4096: 128 rows per expert
    assert _config.split_tail(300, 8, 128) == 0
    assert _config.split_tail(8 * 2048, 8, 128) == 0  # Mixtral M=8192: 16 blocks per expert


@pytest.mark.parametrize("block,counts", TAIL_CASES)
def test_mostly_padding_blocks_split(rng, block, counts):
    """Blocks whose rows fit a half or a quarter tile run that smaller tile; every row is still written."""
    config = MoEConfig(block, GemmTile(32, 32, 2, 4, 2), GemmTile(32, 32, 1, 4, 2))
    plan = moe_triton.plan_fused_moe(sum(counts), 1, len(counts), 64, 32, BF16, "sm90", config=config)
    assert [dict(s.constexprs)["SPLIT_TAIL"] for s in plan[-2:]] == [_config.SPLIT_TAIL[block]] * 2 != [0, 0]
    x, w1, w2, tw, _ = moe_inputs(rng, sum(counts), 64, 32, len(counts), 1, BF16)
    ids = ids_with_counts(rng, counts)
    assert rel_err(_fused_with(config, x, w1, w2, tw, ids), expected(x, w1, w2, tw, ids)) <= 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("block,counts", TAIL_CASES)
@pytest.mark.parametrize("stage2", [GemmTile(256, 64, 8, 8, 4), GemmTile(128, 64, 8, 8, 3)])
def test_gpu_mostly_padding_blocks_split(rng, block, counts, stage2):
    """Tail tiles on the card, with the 8-warp tiles of the large-M configs (stage 2 as wide as stage 1, or half)."""
    x, w1, w2, tw, _ = moe_inputs(rng, sum(counts), 1024, 512, len(counts), 1, BF16)
    ids = ids_with_counts(rng, counts)
    config = MoEConfig(block, GemmTile(128, 64, 8, 8, 4), stage2)
    assert rel_err(_fused_with(config, x, w1, w2, tw, ids), fp32_reference(x, w1, w2, tw, ids)) <= 1e-2


@pytest.mark.gpu
def test_gpu_every_heuristic_bucket(rng):
    """Each BLOCK_M the heuristic can pick, on one shape."""
    d, i, e, k = 256, 512, 8, 2
    for m in (1, 40, 200, 2000):
        config = _config.heuristic_config(m, k, e, d, i, BF16)
        x, w1, w2, tw, ids = moe_inputs(rng, m, d, i, e, k, BF16)
        assert rel_err(_fused_with(config, x, w1, w2, tw, ids), fp32_reference(x, w1, w2, tw, ids)) <= 1e-2, \
            (m, config)


@pytest.mark.gpu
def test_gpu_every_config_of_this_gpus_table(rng):
    """Every distinct config of the package's table this GPU reads (its own, else its arch's)
    on the layer shape it was tuned for (D, I; at most 8 experts, 256 tokens), against the
    fp32 reference."""
    arch = moe_triton.current_arch()
    names = _config.table_names(arch, _config.current_device(arch))
    path = next(p for p in (_config.PACKAGE_CONFIGS / n for n in names) if p.exists())
    checked = 0
    for key, buckets in _config._load(str(path)).items():
        e, d, i = (int(part.split("=")[1]) for part in key.split(",")[:3])
        dtype = jnp.dtype(key.split("dtype=")[1].split(",")[0])
        if ",w=" in key:
            continue  # quantized entries: tests/test_quant.py
        configs = {_config.MoEConfig.from_json(entry) for entry in buckets.values()}
        e_small = min(e, 8)
        k = 2 if e_small == e else 4
        x, w1, w2, tw, ids = moe_inputs(rng, 256, d, i, e_small, k, dtype)
        want = fp32_reference(x, w1, w2, tw, ids)
        for config in sorted(configs, key=str):
            assert rel_err(_fused_with(config, x, w1, w2, tw, ids), want) <= 1e-2, (path.name, key, config)
            checked += 1
        del x, w1, w2, want
    assert checked > 0, path


def _custom_call_payloads(lowered) -> list[bytes]:
    """The decompressed opaques of the Triton custom calls in a lowered jit."""
    from jax._src.lib.mlir import ir

    payloads = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    if inner.operation.name == "stablehlo.custom_call" and "backend_config" in inner.attributes:
                        try:
                            config = ir.StringAttr(inner.attributes["backend_config"]).value_bytes
                        except (TypeError, ValueError):  # a dictionary backend config: not jax-triton's
                            continue
                        payloads.append(zlib.decompress(config))
                    walk(inner.operation)

    walk(lowered.compiler_ir("stablehlo").operation)
    return payloads


@pytest.mark.gpu
def test_gpu_launch_payload_is_slim(rng):
    """jax-triton 0.3.x: the seam drops the TTIR and the PTX line info from each custom
    call (jaxlib hashes the whole payload on every launch); the kernel still computes right."""
    import jax_triton

    if not jax_triton.__version__.startswith("0.3."):
        pytest.skip(f"jax-triton {jax_triton.__version__} lowers to another custom call")
    x, w1, w2, tw, ids = moe_inputs(rng, 37, 256, 128, 8, 2, BF16)
    fn = jax.jit(lambda *a: moe_triton.fused_moe(*a))
    payloads = _custom_call_payloads(fn.lower(x, w1, w2, tw, ids))
    assert len(payloads) >= 3  # align, stage 1, stage 2
    for payload in payloads:
        assert b".version" in payload  # the PTX is there
        assert b"tt.func" not in payload, "TTIR left in the launch payload"
        assert not re.search(rb"^\s*\.loc\s", payload, re.M), "line info left in the PTX"
        assert b".debug_info" not in payload
    assert rel_err(_fused_with(None, x, w1, w2, tw, ids), fp32_reference(x, w1, w2, tw, ids)) <= 1e-2


# ----------------------------------------------------------------------------- bad input


def _fused_moe_errors(rng):
    x, w1, w2, tw, ti = moe_inputs(rng, 4, 16, 8, 4, 2, F32)
    return [
        ("x-ndim", (x[None], w1, w2, tw, ti), {}, ValueError, "hidden_states"),
        ("x-int", (x.astype(jnp.int32), w1, w2, tw, ti), {}, TypeError, "hidden_states"),
        ("w1-dtype", (x, w1.astype(BF16), w2, tw, ti), {}, TypeError, "w1"),
        ("w2-dtype", (x, w1, w2.astype(BF16), tw, ti), {}, TypeError, "w2"),
        ("w1-D", (x, w1[:, :, :8], w2, tw, ti), {}, ValueError, "w1"),
        ("w1-odd", (x, w1[:, :15], w2, tw, ti), {}, ValueError, "w1"),
        ("w2-shape", (x, w1, w2[:, :, :4], tw, ti), {}, ValueError, "w2"),
        ("w2-E", (x, w1, w2[:3], tw, ti), {}, ValueError, "w2"),
        ("ids-float", (x, w1, w2, tw, tw), {}, TypeError, "topk_ids"),
        ("ids-bool", (x, w1, w2, tw, ti > 0), {}, TypeError, "topk_ids"),
        ("weights-int", (x, w1, w2, ti, ti), {}, TypeError, "topk_weights"),
        ("ids-shape", (x, w1, w2, tw, ti[:, :1]), {}, ValueError, "topk_ids"),
        ("weights-M", (x, w1, w2, tw[:3], ti[:3]), {}, ValueError, "topk_weights"),
        ("k>E", (x, w1, w2, jnp.ones((4, 5)), jnp.zeros((4, 5), jnp.int32)), {}, ValueError, "top_k"),
        ("activation", (x, w1, w2, tw, ti), {"activation": "relu"}, ValueError, "activation"),
        ("implementation", (x, w1, w2, tw, ti), {"implementation": "gpu"}, ValueError, "implementation"),
    ]


@pytest.mark.parametrize("case", range(16))
def test_fused_moe_errors(case, rng):
    label, args, kwargs, exc, name = _fused_moe_errors(rng)[case]
    with pytest.raises(exc, match=name):
        jaxmoe.fused_moe(*args, **kwargs)
    if "implementation" not in kwargs:
        with pytest.raises(exc, match=name):
            reference.fused_moe(*args, **kwargs)


def test_fused_moe_errors_are_raised_before_tracing(rng):
    x, w1, w2, tw, ti = moe_inputs(rng, 4, 16, 8, 4, 2, F32)
    with pytest.raises(TypeError, match="w1"):
        jax.jit(jaxmoe.fused_moe)(x, w1.astype(BF16), w2, tw, ti)


@pytest.mark.parametrize("m", [5, 700])  # the one-launch alignment and the chunked one
def test_fused_moe_outside_jit(rng, m):
    """Called eagerly the runtime sizes reach the kernels as scalars (on a CPU, Triton's
    interpreter uses them as Python indices: see jaxmoe._compat.triton_interpreter)."""
    x, w1, w2, tw, ids = moe_inputs(rng, m, 32, 16, 4, 2, jnp.float32)
    out = moe_triton.fused_moe(x, w1, w2, tw, ids)
    assert rel_err(out, reference.fused_moe(x, w1, w2, tw, ids)) <= 1e-4
