"""Quantized experts: ``jaxmoe.quantize_weights`` and ``QuantizedWeights`` (round trips,
grids, zero groups, checkpoint layouts, validation), then ``fused_moe`` with every weight
scheme and activation quantization, each implementation against a float64 oracle that
rounds where the kernels round (activations per token, h to the input dtype, each
(token, slot) row, the sum).

Tolerances (norm-wise relative error against the oracle) and why:

* weight-only (w8a16, w4a16): 1e-2 for bf16/fp16, 1e-4 for fp32, as unquantized weights:
  the kernels multiply exactly represented values (8-bit values, 4-bit integers, e2m1
  times 2^e are exact in bf16/fp16) and apply the scales to fp32 sums, so only the
  rounding model's bf16/fp16 roundings differ from float64.
* w8a8 (``act_quant``): 2e-2. The oracle rounds h from float64, the kernels from an fp32
  sum: where the two h differ by one bf16 ulp the next quantization step (1/16 relative
  for e4m3, 1/127 of the row's absmax for int8) can round one element differently. On a
  GPU the fp8 MMA also accumulates with fewer than fp32's bits.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxmoe
from conftest import moe_inputs, pack_words, randn, rel_err, tolerance
from jaxmoe import quantize
from jaxmoe.ops.gemm.reference import round_to
from jaxmoe.types import FP8_MAX, WEIGHT_SCHEMES, QuantizedWeights
from op_base import BF16, F16, F32, OpTests, cases, with_invalid_ids

EIGHT_BIT = ("fp8", "fp8_tensor", "fp8_block", "int8")
FOUR_BIT = ("int4", "int4_zp", "mxfp4")
ACT_FOR = {"fp8": "fp8", "fp8_tensor": "fp8", "fp8_block": "fp8", "int8": "int8"}


# ----------------------------------------------------------------------------- the oracle


def _np_bf16(v: np.ndarray, dtype) -> np.ndarray:
    """float64 -> the input dtype (through fp32 for bf16, as the kernels' fp32 -> bf16) -> float64."""
    if jnp.dtype(dtype) == F32:
        return v.astype(np.float32).astype(np.float64)
    target = ml_dtypes.bfloat16 if jnp.dtype(dtype) == BF16 else np.float16
    return v.astype(np.float32).astype(target).astype(np.float64)


def _np_quant(v: np.ndarray, act_quant: str, group: int | None) -> np.ndarray:
    """Independent numpy version of the per-token (per-group) activation rounding, in fp32."""
    v32 = v.astype(np.float32)
    out = np.empty_like(v32)
    size = group or v32.shape[0]
    qmax = np.float32(FP8_MAX["float8_e4m3fn"] if act_quant == "fp8" else 127.0)
    for g0 in range(0, v32.shape[0], size):
        seg = v32[g0:g0 + size]
        if not np.isfinite(seg).all():
            out[g0:g0 + size] = np.nan
            continue
        amax = np.float32(np.abs(seg).max())
        inv = np.float32(qmax / amax) if amax > 0 else np.float32(0)
        y = seg * inv
        if act_quant == "fp8":
            q = np.clip(y, -qmax, qmax).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
        else:
            q = np.clip(np.floor(y + np.float32(0.5)), -qmax, qmax)
        out[g0:g0 + size] = q * (amax / qmax)
    return out.astype(np.float64)


def oracle(x, q1, q2, topk_weights, topk_ids, activation="silu", act_quant=None):
    """float64 loops over tokens and slots on the dequantized weights, rounding as the kernels."""
    x64 = np.asarray(jnp.asarray(x).astype(F32), np.float64)
    w1 = np.asarray(q1.dequantize(), np.float64)
    w2 = np.asarray(q2.dequantize(), np.float64)
    tw, ids = np.asarray(topk_weights, np.float64), np.asarray(topk_ids)
    m, d = x64.shape
    e, two_i, _ = w1.shape
    i = two_i // 2
    groups = [128 if q.scheme == "fp8_block" else None for q in (q1, q2)]
    out = np.zeros((m, d))
    for t in range(m):
        xt = _np_quant(x64[t], act_quant, groups[0]) if act_quant else x64[t]
        for j in range(ids.shape[1]):
            ex = int(ids[t, j])
            if not 0 <= ex < e:
                continue
            gu = w1[ex] @ xt
            g = gu[:i]
            act = g / (1 + np.exp(-g)) if activation == "silu" else 0.5 * g * (1 + _erf(g / np.sqrt(2)))
            h = _np_bf16(act * gu[i:], x.dtype)
            h = _np_quant(h, act_quant, groups[1]) if act_quant else h
            out[t] += _np_bf16((w2[ex] @ h) * tw[t, j], x.dtype)
    return _np_bf16(out, x.dtype)


def _erf(v):
    from math import erf

    return np.vectorize(erf)(v)


def _split_k_table(tmp_path, monkeypatch, e, d, i, scheme, split):
    """A config table for every arch naming stage 2 with ``split_k`` = ``split``."""
    import json

    from jaxmoe.ops.gemm import config as _config

    k_tile = 64 if scheme == "mxfp4" else 32
    tile = {"block_m": 16, "stage1": {"block_n": 32, "block_k": k_tile},
            "stage2": {"block_n": 32, "block_k": k_tile, "split_k": split}}
    table = {_config.shape_key(e, d, i, BF16, scheme): {"1": tile}}
    for arch in _config.ARCHS:
        (tmp_path / f"{arch}.json").write_text(json.dumps(table))
    monkeypatch.setenv("JAXMOE_CONFIG_DIR", str(tmp_path))
    assert _config.select_config(5, 2, e, d, i, BF16, "sm90", scheme).stage2.split_k == split


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
def test_split_k_bf16_with_bias_matches_reference(rng, tmp_path, monkeypatch, request, tma):
    """Unquantized weights through a split stage 2 with an expert bias (added by split 0
    alone), on the interpreter, against the reference; also with B read through tensor
    descriptors (each split's K range from its own offset)."""
    if tma:
        request.getfixturevalue("tma_views")
    _split_k_table(tmp_path, monkeypatch, 6, 160, 80, "none", 3)
    x, w1, w2, tw, ids = moe_inputs(rng, 5, 160, 80, 6, 2, BF16)
    b1, b2 = randn(rng, (6, 160), BF16), randn(rng, (6, 160), BF16)
    ids = with_invalid_ids(ids, 6)
    got = jaxmoe.fused_moe(x, w1, w2, tw, ids, b1=b1, b2=b2, implementation="triton")
    want = jaxmoe.fused_moe(x, w1, w2, tw, ids, b1=b1, b2=b2, implementation="reference")
    assert np.isfinite(np.asarray(got, np.float32)).all()
    assert rel_err(got, want) <= 1e-2


def test_split_k_is_refused_where_a_gemm_needs_all_of_k(tmp_path):
    """A table naming split_k for stage 1 is refused as it is read; a plan that splits a GEMM
    with an activation or with act_quant raises, naming why."""
    import json

    from jaxmoe.ops.gemm import config as _config
    from jaxmoe.ops.gemm import triton as gemm_triton
    from jaxmoe.ops.gemm.config import GemmTile

    path = tmp_path / "sm90.json"
    tile = {"block_m": 16, "stage1": {"block_n": 32, "block_k": 32, "split_k": 2},
            "stage2": {"block_n": 32, "block_k": 32}}
    path.write_text(json.dumps({_config.shape_key(6, 160, 80, BF16): {"1": tile}}))
    with pytest.raises(ValueError, match="split_k applies to stage 2 only"):
        _config.check_table(str(path), json.loads(path.read_text()))
    common = dict(dtype=BF16, num_rows=10, top_k=2, block_m=16, num_blocks=4, mul_routed_weight=False)
    with pytest.raises(ValueError, match="need all of K"):
        gemm_triton.plan_gemm(a_shape=(5, 160), b_shape=(6, 160, 160), tile=GemmTile(32, 32, split_k=2),
                              activation="silu", **common)
    with pytest.raises(ValueError, match="need all of K"):
        gemm_triton.plan_gemm(a_shape=(10, 80), b_shape=(6, 160, 80), tile=GemmTile(32, 32, split_k=2),
                              activation=None, w_scheme="int8", b_dtype=jnp.int8, act_quant="int8", **common)


def _prequant_table(tmp_path, monkeypatch, e, d, i, scheme, act_quant, prequant=True):
    """A config table for every arch whose stages take A rounded before the GEMM
    (``prequant_a``; or not, ``prequant=False``), with small tiles the interpreter runs quickly."""
    import json

    from jaxmoe.ops.gemm import config as _config

    k_tile = 128 if scheme == "fp8_block" else 32
    stage = {"block_n": 32, "block_k": k_tile, "prequant_a": prequant}
    table = {_config.shape_key(e, d, i, BF16, scheme, act_quant): {"1": {"block_m": 16, "stage1": stage,
                                                                          "stage2": stage}}}
    tmp_path.mkdir(parents=True, exist_ok=True)
    for arch in _config.ARCHS:
        (tmp_path / f"{arch}.json").write_text(json.dumps(table))
    monkeypatch.setenv("JAXMOE_CONFIG_DIR", str(tmp_path))
    picked = _config.select_config(5, 2, e, d, i, BF16, "sm90", scheme, act_quant)
    assert picked.stage1.prequant_a == picked.stage2.prequant_a == prequant


def test_prequant_a_is_refused_without_act_quant(tmp_path):
    """A table naming prequant_a for a layer without act_quant is refused as it is read; a
    plan asking for it without act_quant raises; the flag must be a boolean."""
    import json

    from jaxmoe.ops.gemm import config as _config
    from jaxmoe.ops.gemm import triton as gemm_triton
    from jaxmoe.ops.gemm.config import GemmTile

    path = tmp_path / "sm90.json"
    stage = {"block_n": 32, "block_k": 32, "prequant_a": True}
    entry = {"block_m": 16, "stage1": stage, "stage2": stage}
    with pytest.raises(ValueError, match="prequant_a applies to layers with act_quant only"):
        _config.check_table(str(path), {_config.shape_key(6, 160, 80, BF16, "int8"): {"1": entry}})
    _config.check_table(str(path), {_config.shape_key(6, 160, 80, BF16, "int8", "int8"): {"1": entry}})
    bad = {"block_m": 16, "stage1": {**stage, "prequant_a": 1}, "stage2": stage}
    with pytest.raises(ValueError, match="prequant_a must be true or false"):
        _config.check_table(str(path), {_config.shape_key(6, 160, 80, BF16, "int8", "int8"): {"1": bad}})
    with pytest.raises(ValueError, match="prequant_a needs act_quant"):
        gemm_triton.plan_gemm(a_shape=(10, 80), b_shape=(6, 160, 80), tile=GemmTile(32, 32, prequant_a=True),
                              activation=None, dtype=BF16, num_rows=10, top_k=1, block_m=16, num_blocks=4,
                              mul_routed_weight=False, w_scheme="int8", b_dtype=jnp.int8)
    assert json.loads(json.dumps(_config.MoEConfig(16, GemmTile(32, 32), GemmTile(32, 32)).to_json())) == {
        "block_m": 16, "stage1": {"block_n": 32, "block_k": 32, "group_size_m": 1, "num_warps": 4, "num_stages": 3},
        "stage2": {"block_n": 32, "block_k": 32, "group_size_m": 1, "num_warps": 4, "num_stages": 3}}


def _check_quantize_rows(rng):
    """The rounding pass before a prequant_a GEMM against the numpy rounding: per token and
    per 128 channels, fp8 and int8; K = 200 ends in a partial group, 13 rows a partial
    program; a zero row (scale 0, values 0), a row with a NaN and one with an Inf (NaN
    scales, in their row or group only)."""
    from jaxmoe.backends.platform import fp8_dtype
    from jaxmoe.ops.gemm import triton as gemm_triton

    v = np.asarray(randn(rng, (13, 200), F32)) * np.float32(3.0)
    v[4] = 0
    v[7, 150] = np.nan
    v[9, 3] = np.inf
    a = jnp.asarray(v, BF16)
    h = np.asarray(a.astype(F32), np.float64)
    for a_scheme, act_quant, group in (("fp8_token", "fp8", None), ("fp8_group", "fp8", 128),
                                       ("int8_token", "int8", None)):
        q_dtype = fp8_dtype() if act_quant == "fp8" else jnp.int8
        q, scales = jax.jit(lambda a: gemm_triton.quantize_rows(a, a_scheme, q_dtype))(a)
        q, scales = np.asarray(q.astype(F32), np.float64), np.asarray(scales, np.float64)
        assert q.shape == (13, 200) and scales.shape == ((13, 2) if group else (13,))
        per_value = np.repeat(scales, 128, axis=1)[:, :200] if group else scales[:, None]
        got = q * per_value
        qmax = FP8_MAX[jnp.dtype(q_dtype).name] if act_quant == "fp8" else 127.0
        want = np.stack([_np_quant(row, act_quant, group) for row in h])
        if act_quant == "fp8" and qmax != FP8_MAX["float8_e4m3fn"]:  # MI300's e4m3fnuz: its own grid
            want = np.where(np.isfinite(want), got, want)
        assert (got[4] == 0).all() and np.isfinite(scales[4]).all()
        bad = ~np.isfinite(want)
        assert (np.isnan(per_value) == bad).all(), a_scheme  # NaN scales exactly where a NaN or Inf sits
        close = np.isclose(got[~bad], want[~bad], rtol=3e-7, atol=0)
        assert close.mean() >= 0.99, (a_scheme, close.mean())
        assert np.isclose(got[~bad], h[~bad], rtol=1e-9, atol=0).mean() < 0.5  # the rounding did something


def test_quantize_rows(rng):
    _check_quantize_rows(rng)


@pytest.mark.gpu
def test_gpu_quantize_rows(rng):
    _check_quantize_rows(rng)


def quantized_inputs(rng, m, d, i, e, k, dtype, scheme, pool=None):
    x, w1, w2, tw, ids = moe_inputs(rng, m, d, i, e, k, dtype, pool)
    return x, jaxmoe.quantize_weights(w1, scheme), jaxmoe.quantize_weights(w2, scheme), tw, ids


def _cases(shapes, combos):
    return {f"{s}-{a or 'w'}-{'-'.join(map(str, shp))}": (*shp, s, a) for shp in shapes for s, a in combos}


ALL_COMBOS = [(s, None) for s in EIGHT_BIT + FOUR_BIT] + [(s, ACT_FOR[s]) for s in EIGHT_BIT]
# (M, D, I, E, k): D = 160 and I = 80 leave partial 128-blocks (fp8_block), groups (int4,
# K = 160 and 80) and 32-groups (mxfp4, K = 80); N = 2I = 160 a partial block row.
QUANT_CASES = {
    **_cases([(9, 64, 48, 4, 2)], ALL_COMBOS),
    **_cases([(13, 160, 80, 5, 2)], [("fp8_block", None), ("fp8_block", "fp8"), ("int4", None), ("int4_zp", None),
                                     ("mxfp4", None), ("int8", "int8")]),
    **_cases([(1, 128, 64, 8, 2)], [("fp8", "fp8"), ("int4_zp", None), ("mxfp4", None)]),  # M = 1
}
DTYPE_CASES = {"fp8-fp16": ("fp8", None, F16), "int4-fp32": ("int4", None, F32), "int8-fp16": ("int8", "int8", F16),
               "mxfp4-fp32": ("mxfp4", None, F32)}


class QuantMoeTests(OpTests):
    """fused_moe with quantized w1/w2 (and act_quant) against the float64 rounding oracle."""

    QUANT_CASES = QUANT_CASES
    DTYPE_CASES = DTYPE_CASES
    EMPTY_CASES = {"fp8_block-fp8": ("fp8_block", "fp8"), "int4_zp": ("int4_zp", None), "int8-int8": ("int8", "int8")}
    NAN_CASES = {"fp8-fp8": ("fp8", "fp8"), "fp8_block-fp8": ("fp8_block", "fp8"), "int8-int8": ("int8", "int8"),
                 "mxfp4": ("mxfp4", None)}

    def fused(self, x, q1, q2, tw, ids, act_quant=None, activation="silu"):
        return self.jit(lambda *a: jaxmoe.fused_moe(*a, act_quant=act_quant, activation=activation, **self.impl),
                        x, q1, q2, tw, ids)

    def check(self, x, q1, q2, tw, ids, act_quant=None, activation="silu"):
        out = self.fused(x, q1, q2, tw, ids, act_quant, activation)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert np.isfinite(np.asarray(out, np.float32)).all()  # poisoned: every row written
        tol = 2e-2 if act_quant else tolerance(x.dtype)
        err = rel_err(out, oracle(x, q1, q2, tw, ids, activation, act_quant))
        assert err <= tol, err
        return out

    @cases("QUANT_CASES", "m,d,i,e,k,scheme,act_quant")
    def test_matches_oracle(self, rng, m, d, i, e, k, scheme, act_quant):
        x, q1, q2, tw, ids = quantized_inputs(rng, m, d, i, e, k, BF16, scheme)
        self.check(x, q1, q2, tw, ids, act_quant)

    @cases("DTYPE_CASES", "scheme,act_quant,dtype")
    def test_other_activation_dtypes(self, rng, scheme, act_quant, dtype):
        x, q1, q2, tw, ids = quantized_inputs(rng, 7, 64, 32, 4, 2, dtype, scheme)
        self.check(x, q1, q2, tw, ids, act_quant, "gelu")

    @cases("EMPTY_CASES", "scheme,act_quant")
    def test_invalid_ids_and_empty_experts(self, rng, scheme, act_quant):
        x, q1, q2, tw, ids = quantized_inputs(rng, 12, 64, 48, 16, 2, BF16, scheme, pool=[1, 5, 6])
        self.check(x, q1, q2, tw, with_invalid_ids(ids, 16), act_quant)

    @cases("NAN_CASES", "scheme,act_quant")
    def test_nan_and_inf_stay_in_their_token(self, rng, scheme, act_quant):
        x, q1, q2, tw, ids = quantized_inputs(rng, 6, 64, 48, 4, 2, BF16, scheme)
        x = np.array(x.astype(F32))
        x[1, 3], x[4, 0] = np.nan, np.inf
        x = jnp.asarray(x, BF16)
        out = np.asarray(self.fused(x, q1, q2, tw, ids, act_quant), np.float32)
        clean = [0, 2, 3, 5]
        assert not np.isfinite(out[1]).all() and not np.isfinite(out[4]).all()
        assert np.isfinite(out[clean]).all()
        want = oracle(x[jnp.asarray(clean)], q1, q2, tw[jnp.asarray(clean)], ids[jnp.asarray(clean)],
                      act_quant=act_quant)
        assert rel_err(out[clean], want) <= (2e-2 if act_quant else 1e-2)

    def test_mxfp4_k_tiles_of_several_scale_groups(self, rng, tmp_path, monkeypatch):
        """mxfp4 through a tuned table's K tiles of 64 and 128 values (two and four
        exponents per column a step); K = 160 and 80 end in a partial tile and group."""
        import json

        from jaxmoe.ops.gemm import config as _config

        tile = {"block_m": 16, "stage1": {"block_n": 32, "block_k": 64}, "stage2": {"block_n": 64, "block_k": 128}}
        table = {_config.shape_key(5, 160, 80, BF16, "mxfp4"): {"1": tile}}
        for arch in _config.ARCHS:
            (tmp_path / f"{arch}.json").write_text(json.dumps(table))
        monkeypatch.setenv("JAXMOE_CONFIG_DIR", str(tmp_path))
        picked = _config.select_config(13, 2, 5, 160, 80, BF16, "sm90", "mxfp4")
        assert (picked.stage1.block_k, picked.stage2.block_k) == (64, 128)
        x, q1, q2, tw, ids = quantized_inputs(rng, 13, 160, 80, 5, 2, BF16, "mxfp4")
        self.check(x, q1, q2, tw, with_invalid_ids(ids, 5))

    @pytest.mark.parametrize("scheme,split", [("int4", 3), ("int4_zp", 4), ("mxfp4", 2), ("int8", 4)])
    def test_stage2_split_k(self, rng, tmp_path, monkeypatch, scheme, split):
        """Stage 2 with its K split over ``split`` programs a tile (fp32 partial sums added
        after the launch): K = 80 ends in a partial tile, and with 4 splits of 32 the last
        split has no K at all; invalid ids, empty experts."""
        _split_k_table(tmp_path, monkeypatch, 6, 160, 80, scheme, split)
        x, q1, q2, tw, ids = quantized_inputs(rng, 5, 160, 80, 6, 2, BF16, scheme, pool=[0, 2, 3, 5])
        self.check(x, q1, q2, tw, with_invalid_ids(ids, 6))

    @pytest.mark.parametrize("scheme,act_quant", [("fp8", "fp8"), ("fp8_tensor", "fp8"), ("fp8_block", "fp8"),
                                                  ("int8", "int8")])
    def test_activations_rounded_before_the_gemm(self, rng, tmp_path, monkeypatch, scheme, act_quant):
        """Both stages reading A rounded by the pass before them (``prequant_a``): K = 160
        and 80 end in partial tiles and groups; invalid ids, empty experts; a NaN and an Inf
        token stay in their rows. On the interpreter the result is bit for bit the in-tile
        rounding's."""
        x, q1, q2, tw, ids = quantized_inputs(rng, 13, 160, 80, 6, 2, BF16, scheme, pool=[0, 2, 3, 5])
        ids = with_invalid_ids(ids, 6)
        tile_rounded = None
        if not self.gpu:  # the same tiles, each program rounding its own A tiles
            _prequant_table(tmp_path / "in-tile", monkeypatch, 6, 160, 80, scheme, act_quant, prequant=False)
            tile_rounded = np.asarray(self.fused(x, q1, q2, tw, ids, act_quant), np.float32)
        _prequant_table(tmp_path, monkeypatch, 6, 160, 80, scheme, act_quant)
        out = np.asarray(self.check(x, q1, q2, tw, ids, act_quant), np.float32)
        if tile_rounded is not None:
            np.testing.assert_array_equal(out, tile_rounded)
        poisoned = np.array(x.astype(F32))
        poisoned[1, 3], poisoned[4, 0] = np.nan, np.inf
        out = np.asarray(self.fused(jnp.asarray(poisoned, BF16), q1, q2, tw, ids, act_quant), np.float32)
        clean = [r for r in range(13) if r not in (1, 4)]
        assert np.isfinite(out[clean]).all()
        assert not np.isfinite(out[1]).all() and not np.isfinite(out[4]).all()
        want = oracle(jnp.asarray(poisoned[clean], BF16), q1, q2, tw[jnp.asarray(clean)], ids[jnp.asarray(clean)],
                      act_quant=act_quant)
        assert rel_err(out[clean], want) <= 2e-2

    @pytest.mark.parametrize("scheme,prequant", [("fp8", True), ("fp8_tensor", False)])
    def test_fp8_sum_over_k_in_the_mma(self, rng, monkeypatch, scheme, prequant):
        """fp8 activations against per-channel / per-tensor fp8 weights with the sum over K
        kept in the MMA's accumulator (``JAXMOE_FP8_FAST_ACCUM=1``), A rounded before the GEMM
        (32 rows per expert: the heuristic's pick, which these layers take whatever the
        tables say) or in its tiles: the oracle's layer; invalid ids and empty experts."""
        from jaxmoe.ops.gemm import config as _config

        monkeypatch.setenv("JAXMOE_FP8_FAST_ACCUM", "1")
        m = 6 * _config.PREQUANT_MIN_ROWS // 2 if prequant else 13
        picked = _config.select_config(m, 2, 6, 160, 80, BF16, "sm90", scheme, "fp8")
        assert picked.stage1.prequant_a == picked.stage2.prequant_a == prequant
        x, q1, q2, tw, ids = quantized_inputs(rng, m, 160, 80, 6, 2, BF16, scheme, pool=[0, 2, 3, 5])
        self.check(x, q1, q2, tw, with_invalid_ids(ids, 6), "fp8")

    def test_all_zero_tokens_and_weight_rows(self, rng):
        """Zero activations (a zero absmax) and zero weight rows: zeros out, no 0/0."""
        x, w1, w2, tw, ids = moe_inputs(rng, 5, 64, 48, 4, 2, BF16)
        x = x.at[2].set(0)
        w1 = w1.at[:, 7].set(0)
        for scheme, aq in (("fp8", "fp8"), ("int8", "int8"), ("int4_zp", None), ("mxfp4", None)):
            q1, q2 = jaxmoe.quantize_weights(w1, scheme), jaxmoe.quantize_weights(w2, scheme)
            out = self.check(x, q1, q2, tw, ids, aq)
            assert (np.asarray(out[2], np.float32) == 0).all()


def _package_quantized_entries() -> dict:
    """Every quantized entry of the package's tables: ``{id: (scheme, act_quant, entry)}``."""
    import json

    from jaxmoe.ops.gemm import config as _config

    out = {}
    for path in sorted(_config.PACKAGE_CONFIGS.glob("*.json")):
        for key, buckets in json.loads(path.read_text()).items():
            fields = dict(part.split("=") for part in key.split(",")) if not key.startswith("_") else {}
            if "w" in fields:
                for m, entry in buckets.items():
                    out[f"{path.stem}-{fields['w']}-{fields.get('a', 'w')}-E{fields['E']}-M{m}"] = (
                        fields["w"], fields.get("a"), entry)
    return out


PACKAGE_QUANTIZED_ENTRIES = _package_quantized_entries()


def _package_table_tiles(self, rng, tmp_path, monkeypatch, scheme, act_quant, entry):
    """A quantized entry of the package's tables (its tiles, on a small layer of the same
    scheme: K = 256 and 160, N = 320 and 256 leave partial blocks and tiles) against the
    oracle; invalid ids and empty experts."""
    import json

    from jaxmoe.ops.gemm import config as _config

    table = {_config.shape_key(6, 256, 160, BF16, scheme, act_quant): {"1": entry}}
    for arch in _config.ARCHS:
        (tmp_path / f"{arch}.json").write_text(json.dumps(table))
    monkeypatch.setenv("JAXMOE_CONFIG_DIR", str(tmp_path))
    monkeypatch.delenv("JAXMOE_FP8_FAST_ACCUM", raising=False)
    assert _config.select_config(70, 2, 6, 256, 160, BF16, "sm90", scheme, act_quant) == \
        _config.MoEConfig.from_json(entry)
    x, q1, q2, tw, ids = quantized_inputs(rng, 70, 256, 160, 6, 2, BF16, scheme, pool=[0, 2, 3, 5])
    self.check(x, q1, q2, tw, with_invalid_ids(ids, 6), act_quant)


class TestQuantMoeReference(QuantMoeTests):
    """The reference against the oracle: every scheme x act_quant once, the partial blocks
    once (CI time: the kernels' class below takes every case)."""

    implementation = "reference"
    QUANT_CASES = {**_cases([(9, 64, 48, 4, 2)], ALL_COMBOS),
                   **_cases([(13, 160, 80, 5, 2)], [("fp8_block", "fp8"), ("int4_zp", None)])}
    DTYPE_CASES = {"int8-fp16": DTYPE_CASES["int8-fp16"]}
    EMPTY_CASES = {"int4_zp": ("int4_zp", None)}
    NAN_CASES = {"fp8_block-fp8": ("fp8_block", "fp8"), "int8-int8": ("int8", "int8")}


class TestQuantMoeTritonInterpreter(QuantMoeTests):
    implementation = "triton"
    PACKAGE_QUANTIZED_ENTRIES = PACKAGE_QUANTIZED_ENTRIES
    test_package_table_tiles = cases("PACKAGE_QUANTIZED_ENTRIES", "scheme,act_quant,entry")(_package_table_tiles)


class TestQuantMoeTritonInterpreterTMA(QuantMoeTests):
    """The 8-bit schemes with B read through tensor descriptors (``JAXMOE_TMA=1``): weight-only
    and w8a8, whole and partial K tiles (the other methods run their own schemes)."""

    implementation = "triton"
    QUANT_CASES = {**_cases([(9, 64, 48, 4, 2)], [c for c in ALL_COMBOS if c[0] in ("fp8", "fp8_tensor", "fp8_block",
                                                                                     "int8")]),
                   **_cases([(13, 160, 80, 5, 2)], [("fp8_block", "fp8"), ("int8", None)])}
    DTYPE_CASES = {"int8-fp16": DTYPE_CASES["int8-fp16"]}
    EMPTY_CASES = {"int8-int8": ("int8", "int8")}
    NAN_CASES = {"fp8-fp8": ("fp8", "fp8")}

    @pytest.fixture(autouse=True)
    def _tma(self, tma_views):
        yield
        assert tma_views, "no GEMM was planned: the descriptor check would hold vacuously"


# int4 cases whose K tiles are whole (D = 256, I = 128), M = 1 among them
INT4_SPLIT_CASES = {**_cases([(9, 256, 128, 4, 2), (1, 256, 128, 8, 2)], [("int4", None), ("int4_zp", None)])}


class TestQuantMoeTritonInterpreterInt4Split(QuantMoeTests):
    """int4 and int4_zp with ``JAXMOE_INT4_SPLIT=1``: A's K tiles read as even columns then
    odd ones (x reordered before stage 1, h written so by stage 1), each nibble half
    multiplied by its half of A."""

    implementation = "triton"
    QUANT_CASES = INT4_SPLIT_CASES
    DTYPE_CASES = {"int4-fp32": ("int4", None, F32)}
    EMPTY_CASES = {"int4": ("int4", None), "int4_zp": ("int4_zp", None)}
    NAN_CASES = {"int4_zp": ("int4_zp", None)}

    @pytest.fixture(autouse=True)
    def _split(self, int4_splits, request):
        yield
        if "partial" not in request.node.name:
            assert any(split for *_, split in int4_splits), "no GEMM read its A split: the test checked nothing new"

    @pytest.mark.parametrize("scheme", ["int4", "int4_zp"])
    def test_partial_k_tiles_read_as_stored(self, rng, int4_splits, scheme):
        """K = 160 and 80 end in a partial tile: with the variable set, A is read as stored."""
        x, q1, q2, tw, ids = quantized_inputs(rng, 13, 160, 80, 5, 2, BF16, scheme)
        self.check(x, q1, q2, tw, with_invalid_ids(ids, 5))
        assert int4_splits and not any(split for *_, split in int4_splits), int4_splits

    # not collected here: their K tiles are partial or their schemes are not int4 (nothing splits)
    test_nan_and_inf_stay_in_their_token = None
    test_mxfp4_k_tiles_of_several_scale_groups = None
    test_activations_rounded_before_the_gemm = None
    test_fp8_sum_over_k_in_the_mma = None
    test_all_zero_tokens_and_weight_rows = None

    @cases("EMPTY_CASES", "scheme,act_quant")
    def test_invalid_ids_and_empty_experts(self, rng, scheme, act_quant):
        x, q1, q2, tw, ids = quantized_inputs(rng, 12, 256, 128, 16, 2, BF16, scheme, pool=[1, 5, 6])
        self.check(x, q1, q2, tw, with_invalid_ids(ids, 16), act_quant)

    @cases("DTYPE_CASES", "scheme,act_quant,dtype")
    def test_other_activation_dtypes(self, rng, scheme, act_quant, dtype):
        x, q1, q2, tw, ids = quantized_inputs(rng, 7, 256, 128, 4, 2, dtype, scheme)
        self.check(x, q1, q2, tw, ids, act_quant, "gelu")

    @pytest.mark.parametrize("scheme", ["int4", "int4_zp"])
    def test_nan_and_inf_stay_in_their_token_split(self, rng, scheme):
        x, q1, q2, tw, ids = quantized_inputs(rng, 6, 256, 128, 4, 2, BF16, scheme)
        x = np.array(x.astype(F32))
        x[1, 3], x[4, 0] = np.nan, np.inf
        x = jnp.asarray(x, BF16)
        out = np.asarray(self.fused(x, q1, q2, tw, ids), np.float32)
        clean = [0, 2, 3, 5]
        assert not np.isfinite(out[1]).all() and not np.isfinite(out[4]).all()
        want = oracle(x[jnp.asarray(clean)], q1, q2, tw[jnp.asarray(clean)], ids[jnp.asarray(clean)])
        assert rel_err(out[clean], want) <= 1e-2

    @pytest.mark.parametrize("scheme,split", [("int4", 2), ("int4_zp", 4)])
    def test_stage2_split_k(self, rng, tmp_path, monkeypatch, scheme, split):
        """The split A with stage 2's K split over programs (each starting on a whole tile)."""
        _split_k_table(tmp_path, monkeypatch, 6, 256, 128, scheme, split)
        x, q1, q2, tw, ids = quantized_inputs(rng, 5, 256, 128, 6, 2, BF16, scheme, pool=[0, 2, 3, 5])
        self.check(x, q1, q2, tw, with_invalid_ids(ids, 6))


@pytest.mark.gpu
class TestQuantMoeTritonGPUInt4Split(TestQuantMoeTritonInterpreterInt4Split):
    """The split activation tiles on the GPU (inline-PTX conversion), with Mixtral-8x7B's
    and Qwen3-30B-A3B's expert shapes beside the small ones (gpt-oss-120b's K = 2880 is no
    multiple of its 128-wide K tiles: it reads A as stored)."""

    gpu = True
    QUANT_CASES = {**INT4_SPLIT_CASES,
                   **_cases([(16, 4096, 14336, 8, 2), (8, 2048, 768, 128, 8)], [("int4", None), ("int4_zp", None)])}


@pytest.mark.gpu
class TestQuantMoeTritonGPU(QuantMoeTests):
    implementation, gpu = "triton", True
    QUANT_CASES = {
        **QUANT_CASES,
        **_cases([(32, 512, 1024, 8, 2), (200, 1024, 512, 64, 4), (1024, 1024, 384, 8, 2)], ALL_COMBOS),
    }
    MODEL_CASES = {  # real models' expert shapes, the reference on the experts the ids use
        **_cases([(16, 4096, 14336, 8, 2)], [("fp8", None), ("fp8", "fp8"), ("int8", "int8"), ("int4", None),
                                             ("mxfp4", None)]),  # Mixtral-8x7B
        **_cases([(64, 7168, 2048, 256, 8)], [("fp8_block", None), ("fp8_block", "fp8")]),  # DeepSeek-V3
        **_cases([(8, 2880, 2880, 128, 4)], [("mxfp4", None), ("int4_zp", None)]),  # gpt-oss-120b
    }

    PACKAGE_QUANTIZED_ENTRIES = PACKAGE_QUANTIZED_ENTRIES
    test_package_table_tiles = cases("PACKAGE_QUANTIZED_ENTRIES", "scheme,act_quant,entry")(_package_table_tiles)

    @pytest.mark.xdist_group("big-memory")  # tens of GB each: one at a time on the card
    @cases("MODEL_CASES", "m,d,i,e,k,scheme,act_quant")
    def test_model_shapes_match_oracle(self, rng, m, d, i, e, k, scheme, act_quant):
        # DeepSeek-V3's 256 experts: ids from 16 of them, the last included (its weights sit
        # past 2^31 bytes), so that the fp32 reference weights fit an 80 GB card
        pool = np.linspace(0, e - 1, 16).astype(int).tolist() if e > 128 else None
        x, q1, q2, tw, ids = quantized_inputs(rng, m, d, i, e, k, BF16, scheme, pool=pool)
        self.check(x, q1, q2, tw, ids, act_quant)

    @pytest.mark.xdist_group("big-memory")
    @pytest.mark.parametrize("scheme,act_quant", [("fp8", "fp8"), ("int8", "int8")])
    def test_offsets_past_int32(self, rng, scheme, act_quant):
        """w8a8 past decode sizes: the pass before stage 2 rounds h [M*k, I] and stage 2
        reads it at f * I, both past 2^31 elements here; the first and last rows against
        the reference on those rows."""
        from jaxmoe.ops.gemm import config as _config

        m, d, i, e, k = (1 << 21) + 4096, 128, 128, 8, 8
        assert m * k * i > 2**31
        assert _config.select_config(m, k, e, d, i, BF16, "sm90", scheme, act_quant).stage2.prequant_a
        x, q1, q2, tw, ids = quantized_inputs(rng, m, d, i, e, k, BF16, scheme)
        out = self.fused(x, q1, q2, tw, ids, act_quant)
        for rows in (slice(m - 4096, m), slice(0, 4096)):  # the tail: the rows whose offsets pass 2^31
            want = jaxmoe.fused_moe(x[rows], q1, q2, tw[rows], ids[rows], act_quant=act_quant,
                                    implementation="reference")
            assert np.isfinite(np.asarray(out[rows], np.float32)).all()
            assert rel_err(out[rows], want) <= 2e-2

    def check(self, x, q1, q2, tw, ids, act_quant=None, activation="silu"):
        if x.shape[0] * x.shape[1] * q2.shape[2] * ids.shape[1] <= 2**24:
            return super().check(x, q1, q2, tw, ids, act_quant, activation)
        # past the oracle's loops: the fp32 rounding-model reference, on the experts the ids
        # use (the kernels read all E)
        out = self.fused(x, q1, q2, tw, ids, act_quant, activation)
        assert np.isfinite(np.asarray(out, np.float32)).all()
        e = q1.values.shape[0]
        ids_np = np.asarray(ids)
        valid = (ids_np >= 0) & (ids_np < e)
        used = np.unique(ids_np[valid])
        if used.size < e:
            lut = np.full(e, used.size, np.int32)
            lut[used] = np.arange(used.size, dtype=np.int32)
            ids = jnp.asarray(np.where(valid, lut[np.clip(ids_np, 0, e - 1)], used.size), jnp.int32)
            q1, q2 = (jax.tree.map(lambda a: a[used], q) for q in (q1, q2))
        want = jaxmoe.fused_moe(x, q1, q2, tw, ids, act_quant=act_quant, activation=activation,
                                implementation="reference")
        assert rel_err(out, want) <= (2e-2 if act_quant else 1e-2)
        return out


# ----------------------------------------------------------------------------- gradients and errors


@pytest.mark.parametrize("scheme", [*EIGHT_BIT, *FOUR_BIT])
def test_grads_around_frozen_quantized_weights(rng, scheme):
    """Gradients through the kernels with quantized (frozen) weights reach x, the router (via
    the routing weights) and the expert biases: equal to the reference's autodiff through
    dequantize() (fp32: 1e-5; bf16: 2e-2, the backward's weights rounded once to bf16), and
    finite. Invalid ids get zero gradient rows."""
    for dtype, tol in ((F32, 1e-5), (BF16, 2e-2)):
        params = jaxmoe.init_moe_params(jax.random.key(int(rng.integers(1 << 30))), hidden=128, intermediate=128,
                                        experts=8, dtype=dtype)
        q = {**params, "w1": jaxmoe.quantize_weights(params["w1"], scheme),
             "w2": jaxmoe.quantize_weights(params["w2"], scheme),
             "b1": randn(rng, (8, 256), dtype, 0.1), "b2": randn(rng, (8, 128), dtype, 0.1)}
        x = randn(rng, (12, 128), dtype)
        c = randn(rng, (12, 128), F32)

        def grads(implementation):
            def loss(router, b1, b2, x):
                y = jaxmoe.moe_layer({**q, "router": router, "b1": b1, "b2": b2}, x, top_k=2,
                                     implementation=implementation)
                return jnp.sum(y.astype(F32) * c)
            return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q["router"], q["b1"], q["b2"], x)

        got, want = grads("triton"), grads("reference")
        for name, g, w in zip(("router", "b1", "b2", "x"), got, want):
            assert np.isfinite(np.asarray(g, np.float32)).all(), (scheme, name)
            assert rel_err(g, w) <= tol, (scheme, dtype, name, rel_err(g, w))
    x, q1, q2, tw, ids = quantized_inputs(rng, 6, 128, 128, 4, 2, F32, scheme)
    ids = ids.at[1, 0].set(-1).at[4].set(9)  # invalid ids: no rows, no gradient
    gx = jax.grad(lambda x: jaxmoe.fused_moe(x, q1, q2, tw, ids, implementation="triton").sum())(x)
    assert not np.asarray(gx[4]).any() and np.asarray(gx[1]).any()


def test_grads_around_frozen_quantized_weights_under_scan_and_vmap(rng):
    """x's gradient through int4 layers stacked under jax.lax.scan, and per example under
    jax.vmap, equals the reference's (fp32)."""
    layers = [jaxmoe.init_moe_params(jax.random.key(int(rng.integers(1 << 30))), hidden=128, intermediate=128,
                                     experts=4, dtype=F32) for _ in range(2)]
    qs = [{**p, "w1": jaxmoe.quantize_weights(p["w1"], "int4"), "w2": jaxmoe.quantize_weights(p["w2"], "int4")}
          for p in layers]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *qs)
    x = randn(rng, (5, 128), F32)
    xs = randn(rng, (3, 5, 128), F32)

    def model(x, impl):
        h, _ = jax.lax.scan(lambda h, p: (h + jaxmoe.moe_layer(p, h, top_k=2, implementation=impl), None), x, stacked)
        return jnp.sum(jnp.sin(h))

    def one(x, impl):
        return jnp.sum(jnp.sin(jaxmoe.moe_layer(qs[0], x, top_k=2, implementation=impl)))

    for f, arg in ((lambda impl: jax.grad(lambda x: model(x, impl)), x),
                   (lambda impl: jax.vmap(jax.grad(lambda x: one(x, impl))), xs)):
        got, want = jax.jit(f("triton"))(arg), jax.jit(f("reference"))(arg)
        assert rel_err(got, want) <= 1e-5 and np.isfinite(np.asarray(got)).all()


def test_grads_of_quantized_weights_and_act_quant_are_refused_with_the_way_out(rng):
    x, q1, q2, tw, ids = quantized_inputs(rng, 4, 32, 16, 4, 2, BF16, "fp8")
    with pytest.raises(NotImplementedError, match="with respect to quantized weights.*implementation='reference'"):
        jax.grad(lambda q: jaxmoe.fused_moe(x, q, q2, tw, ids, implementation="triton").astype(F32).sum())(q1)
    with pytest.raises(NotImplementedError, match="through act_quant='fp8'.*implementation='reference'"):
        jax.grad(lambda x: jaxmoe.fused_moe(x, q1, q2, tw, ids, act_quant="fp8",
                                            implementation="triton").astype(F32).sum())(x)
    ref = lambda x: jaxmoe.fused_moe(x, q1, q2, tw, ids, act_quant="fp8", implementation="reference").astype(F32).sum()
    assert np.isfinite(np.asarray(jax.grad(ref)(x), np.float32)).all()


def test_fused_moe_quant_errors(rng):
    x, w1, w2, tw, ids = moe_inputs(rng, 4, 64, 32, 4, 2, BF16)
    f1, f2 = jaxmoe.quantize_weights(w1, "fp8"), jaxmoe.quantize_weights(w2, "fp8")
    i1, i2 = jaxmoe.quantize_weights(w1, "int4"), jaxmoe.quantize_weights(w2, "int4")
    m1, m2 = jaxmoe.quantize_weights(w1, "mxfp4"), jaxmoe.quantize_weights(w2, "mxfp4")
    for impl in ("reference", "triton"):
        with pytest.raises(ValueError, match="act_quant"):
            jaxmoe.fused_moe(x, f1, f2, tw, ids, act_quant="fp4", implementation=impl)
        with pytest.raises(ValueError, match="act_quant='int8' needs w1"):
            jaxmoe.fused_moe(x, f1, f2, tw, ids, act_quant="int8", implementation=impl)
        with pytest.raises(ValueError, match="act_quant='fp8' needs w1"):
            jaxmoe.fused_moe(x, i1, i2, tw, ids, act_quant="fp8", implementation=impl)
        with pytest.raises(ValueError, match="act_quant='fp8' needs w1"):
            jaxmoe.fused_moe(x, w1, w2, tw, ids, act_quant="fp8", implementation=impl)
        with pytest.raises(TypeError, match="hidden_states"):
            jaxmoe.fused_moe(x.astype(F16), m1, m2, tw, ids, implementation=impl)
        with pytest.raises(ValueError, match="w2"):
            jaxmoe.fused_moe(x, f1, jaxmoe.quantize_weights(w2[:, :, :16], "fp8"), tw, ids, implementation=impl)


def test_moe_layer_with_quantized_params(rng):
    params = jaxmoe.init_moe_params(jax.random.key(0), hidden=64, intermediate=32, experts=4)
    x = randn(rng, (2, 5, 64), BF16)
    q = {**params, "w1": jaxmoe.quantize_weights(params["w1"], "fp8"),
         "w2": jaxmoe.quantize_weights(params["w2"], "fp8")}
    got = jax.jit(lambda p, x: jaxmoe.moe_layer(p, x, top_k=2, act_quant="fp8", implementation="triton"))(q, x)
    want = jaxmoe.moe_layer(q, x, top_k=2, act_quant="fp8", implementation="reference")
    assert got.shape == x.shape and rel_err(got, want) <= 2e-2
    plain = jaxmoe.moe_layer(params, x, top_k=2, implementation="reference")
    assert rel_err(want, plain) <= 0.1  # fp8 weights and activations: a few per cent
    with pytest.raises(ValueError, match="act_quant"):
        jaxmoe.moe_layer(params, x, top_k=2, act_quant="fp8")


@pytest.mark.parametrize("scheme,act_quant", [("int4_zp", None), ("fp8_block", "fp8"), ("int8", "int8")])
def test_stacked_quantized_layers_under_vmap_and_scan(rng, scheme, act_quant):
    """Quantized layers stacked along a leading axis (``jax.tree.map(jnp.stack, ...)``, or
    quantize_weights of the stacked floats) run under ``jax.vmap`` and ``jax.lax.scan`` over
    layers through the kernels, each layer exactly as alone; fused_moe given the stack
    itself says how to map over it."""
    layers = [jaxmoe.init_moe_params(jax.random.key(int(rng.integers(1 << 30))), hidden=256, intermediate=128,
                                     experts=4) for _ in range(3)]
    qs = [{**p, "w1": jaxmoe.quantize_weights(p["w1"], scheme), "w2": jaxmoe.quantize_weights(p["w2"], scheme)}
          for p in layers]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *qs)
    assert stacked["w1"].shape == (3, 4, 256, 256) and stacked["w1"].scheme == scheme
    both = jaxmoe.quantize_weights(jnp.stack([p["w1"] for p in layers]), scheme)
    for a, b in zip(jax.tree.leaves(both), jax.tree.leaves(stacked["w1"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(stacked["w1"].dequantize()),
                                  np.stack([np.asarray(q["w1"].dequantize()) for q in qs]))

    def layer(p, x):
        return jaxmoe.moe_layer(p, x, top_k=2, act_quant=act_quant, implementation="triton")

    x = randn(rng, (5, 256), BF16)
    alone = np.stack([np.asarray(jax.jit(layer)(q, x)) for q in qs])
    np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(layer, in_axes=(0, None)))(stacked, x)), alone)
    h = x
    for q in qs:
        h = jax.jit(lambda p, h: h + layer(p, h))(q, h)
    scanned, _ = jax.jit(lambda s, x: jax.lax.scan(lambda h, p: (h + layer(p, h), None), x, s))(stacked, x)
    np.testing.assert_array_equal(np.asarray(scanned), np.asarray(h))
    assert np.isfinite(np.asarray(h, np.float32)).all() and float(jnp.abs(h - x).max()) > 0
    with pytest.raises(ValueError, match="map over the leading axis"):
        jaxmoe.fused_moe(x, stacked["w1"], stacked["w2"], jnp.ones((5, 2)), jnp.zeros((5, 2), jnp.int32),
                         act_quant=act_quant)
    with pytest.raises(ValueError, match="scales of shape"):  # the stack's scales must stack too
        QuantizedWeights(values=stacked["w1"].values, scales=qs[0]["w1"].scales, scheme=scheme,
                         zero_points=stacked["w1"].zero_points)


# ----------------------------------------------------------------------------- quantize_weights


def _w(rng, shape=(3, 160, 200)):
    return randn(rng, shape, F32, scale=0.05)


def _elementwise_bound(w, q):
    """The per-element error bound quantize_weights states for q's scheme."""
    w = np.asarray(w, np.float64)
    e, n, k = w.shape
    if q.scheme in ("fp8", "fp8_tensor", "fp8_block"):
        s = np.asarray(quantize.dequantize(QuantizedWeights(jnp.ones(q.values.shape, q.values.dtype), q.scales,
                                                            q.scheme)), np.float64)
        return 2.0**-4 * np.abs(w) + s * 2.0**-10
    if q.scheme == "int8":
        return np.asarray(q.scales, np.float64)[:, :, None] / 2 * np.ones_like(w)
    s = np.repeat(np.asarray(q.scales, np.float64), 128 if q.scheme != "mxfp4" else 32, axis=2)[:, :, :k]
    if q.scheme == "mxfp4":
        return 2.0 ** (s - 127)
    return s / 2


def _check_activation_rounding_under_jit(rng):
    """quantize_activations inside a jit, on h rounded to bf16 just before (``round_to``, as
    the reference rounds h), equals the numpy rounding: XLA on a GPU folds f32 -> bf16 -> f32
    and f32 -> fp8 -> f32 convert pairs into excess precision unless something stops it."""
    v = np.asarray(randn(rng, (6, 384), F32)) * np.float32(3.0)
    for act_quant, group in (("fp8", None), ("fp8", 128), ("int8", None)):
        got = jax.jit(lambda a: quantize.quantize_activations(round_to(a * 1.5, BF16), act_quant, group=group))(v)
        h = (v * np.float32(1.5)).astype(ml_dtypes.bfloat16).astype(np.float64)
        want = np.stack([_np_quant(row, act_quant, group) for row in h])
        got = np.asarray(got, np.float64)
        # Equal to an fp32 ulp of q * scale, but for rare ties: GPU division (QMAX / amax)
        # may differ from numpy's by an ulp, and a value then exactly halfway between two
        # grid points rounds the other way, one grid step (<= 1/8 relative for e4m3, the
        # row's max / 127 for int8). A skipped rounding (XLA's excess precision) moves
        # nearly every element instead: got would equal h.
        close = np.isclose(got, want, rtol=3e-7, atol=0)
        assert close.mean() >= 0.99, (act_quant, group, close.mean())
        amax = np.abs(h).max(axis=1, keepdims=True) + 0 * h
        step = np.maximum(np.abs(want), np.abs(got)) / 8 + amax / 448 * 2.0**-9 if act_quant == "fp8" else amax / 127
        assert (np.abs(got - want)[~close] <= 1.001 * step[~close] + 1e-30).all()
        assert np.isclose(got, h, rtol=1e-9, atol=0).mean() < 0.5  # the rounding did something


def test_activation_rounding_under_jit(rng):
    _check_activation_rounding_under_jit(rng)


@pytest.mark.gpu
def test_gpu_activation_rounding_under_jit(rng):
    _check_activation_rounding_under_jit(rng)


@pytest.mark.parametrize("scheme", EIGHT_BIT + FOUR_BIT)
def test_round_trip_error_is_bounded(rng, scheme):
    w = _w(rng)
    q = jaxmoe.quantize_weights(w, scheme)
    assert q.shape == w.shape and q.scheme == scheme
    err = np.abs(np.asarray(q.dequantize(), np.float64) - np.asarray(w, np.float64))
    # slack: the fp32 roundings of w / s and q * s, a few ulps of |w|
    assert (err <= _elementwise_bound(w, q) + 2.0**-21 * np.abs(np.asarray(w, np.float64))).all()
    # and it is a quantization, not a copy: the norm-wise error is what the format costs
    rel = rel_err(q.dequantize(), w)
    assert {"int8": 0 < rel < 0.01, "int4": 0.02 < rel < 0.2, "int4_zp": 0.02 < rel < 0.2,
            "mxfp4": 0.02 < rel < 0.25}.get(scheme, 0 < rel < 0.05), rel


def test_values_on_the_grid_round_trip_exactly(rng):
    e, n, k = 2, 8, 256
    q = rng.integers(-7, 8, (e, n, k)).astype(np.float64)
    q[..., ::128] = 7  # each group's max is the grid's end
    s = 2.0 ** rng.integers(-8, 0, (e, n, 2))  # powers of two: s * 7 / 7 == s exactly
    w = jnp.asarray(q * np.repeat(s, 128, axis=2), F32)
    np.testing.assert_array_equal(np.asarray(jaxmoe.quantize_weights(w, "int4").dequantize()), np.asarray(w))
    u = rng.integers(0, 16, (e, n, k))  # int4_zp: (u - z) * s, each group reaching both ends 0 and 15
    u[..., ::128], u[..., 1::128] = 0, 15
    z = np.repeat(rng.integers(0, 16, (e, n, 2)), 128, axis=2)
    w = jnp.asarray((u - z) * np.repeat(s, 128, axis=2), F32)
    np.testing.assert_array_equal(np.asarray(jaxmoe.quantize_weights(w, "int4_zp").dequantize()), np.asarray(w))
    grid = np.asarray(quantize.E2M1_VALUES)
    v = grid[rng.integers(0, 16, (e, n, k))]
    v[..., ::32] = 6.0
    w = jnp.asarray(v * np.repeat(2.0 ** rng.integers(-10, 4, (e, n, k // 32)), 32, axis=2), F32)
    np.testing.assert_array_equal(np.asarray(jaxmoe.quantize_weights(w, "mxfp4").dequantize()), np.asarray(w))
    q8 = rng.integers(-127, 128, (e, n, k)).astype(np.float64)
    q8[..., 0] = 127
    w = jnp.asarray(q8 * 2.0 ** rng.integers(-8, 0, (e, n, 1)), F32)
    np.testing.assert_array_equal(np.asarray(jaxmoe.quantize_weights(w, "int8").dequantize()), np.asarray(w))


@pytest.mark.parametrize("scheme", EIGHT_BIT + FOUR_BIT)
def test_all_zero_rows_and_groups(rng, scheme):
    w = np.array(_w(rng, (2, 130, 256)))
    w[0] = 0
    w[1, 5] = 0
    w[1, 9, 128:] = 0
    q = jaxmoe.quantize_weights(jnp.asarray(w), scheme)
    for leaf in jax.tree_util.tree_leaves(q):
        assert np.isfinite(np.asarray(leaf, np.float32)).all()
    back = np.asarray(q.dequantize())
    assert (back[0] == 0).all() and (back[1, 5] == 0).all() and (back[1, 9, 128:] == 0).all()


def test_fp8_dtype_conversion_is_exact(rng):
    w = _w(rng)
    for scheme in ("fp8", "fp8_block", "fp8_tensor"):
        fn = jaxmoe.quantize_weights(w, scheme, fp8_dtype=jnp.float8_e4m3fn)
        fnuz = quantize.with_fp8_dtype(fn, jnp.float8_e4m3fnuz)
        assert fnuz.values.dtype == jnp.float8_e4m3fnuz
        np.testing.assert_array_equal(np.asarray(fnuz.dequantize()), np.asarray(fn.dequantize()))
        native = jaxmoe.quantize_weights(w, scheme, fp8_dtype=jnp.float8_e4m3fnuz)
        assert float(jnp.max(jnp.abs(native.values.astype(F32)))) <= 240
        back = quantize.with_fp8_dtype(native, jnp.float8_e4m3fn)
        # exact but below 2^-6, where e4m3fn is subnormal (steps of 2^-9, rounded to nearest)
        q = np.asarray(native.values.astype(F32))
        np.testing.assert_array_equal(np.asarray(back.values.astype(F32))[np.abs(q) >= 2.0**-6],
                                      q[np.abs(q) >= 2.0**-6])
        assert np.abs(np.asarray(back.values.astype(F32)) - q).max() <= 2.0**-10


def test_fnuz_weights_run_on_the_kernels(rng):
    """Weights in the other fp8 type are converted to the platform's, exactly, with a warning
    that says the conversion runs in every call and how to make it once."""
    from jaxmoe.ops.gemm.triton import FP8ConversionWarning

    x, w1, w2, tw, ids = moe_inputs(rng, 5, 64, 32, 4, 2, BF16)
    q1, q2 = (jaxmoe.quantize_weights(w, "fp8", fp8_dtype=jnp.float8_e4m3fnuz) for w in (w1, w2))
    with pytest.warns(FP8ConversionWarning, match=r"float8_e4m3fnuz are converted to float8_e4m3fn.*with_fp8_dtype"):
        got = jax.jit(lambda *a: jaxmoe.fused_moe(*a, implementation="triton"))(x, q1, q2, tw, ids)
    assert rel_err(got, oracle(x, q1, q2, tw, ids)) <= 1e-2
    # converted once, they run without the warning
    from jaxmoe.backends.platform import fp8_dtype

    n1, n2 = (quantize.with_fp8_dtype(q, fp8_dtype()) for q in (q1, q2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FP8ConversionWarning)
        again = jax.jit(lambda *a: jaxmoe.fused_moe(*a, implementation="triton"))(x, n1, n2, tw, ids)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(got))


# ----------------------------------------------------------------------------- checkpoint layouts


def test_mxfp4_from_gpt_oss_blocks(rng):
    e, n, k = 2, 6, 64
    blocks = jnp.asarray(rng.integers(0, 256, (e, n, k // 32, 16)), jnp.uint8)
    scales = jnp.asarray(rng.integers(120, 130, (e, n, k // 32)), jnp.uint8)
    q = quantize.from_mxfp4(blocks, scales)
    assert q.shape == (e, n, k) and q.scheme == "mxfp4"
    b = np.asarray(blocks)
    lut = np.asarray(quantize.E2M1_VALUES)
    vals = np.stack([lut[b & 15], lut[b >> 4]], axis=-1).reshape(e, n, k // 32, 32)  # element 2j low
    want = (vals * 2.0 ** (np.asarray(scales, np.float64)[..., None] - 127)).reshape(e, n, k)
    np.testing.assert_array_equal(np.asarray(q.dequantize()), want.astype(np.float32))
    with pytest.raises(ValueError, match="blocks"):
        quantize.from_mxfp4(blocks[..., :8], scales)
    with pytest.raises(ValueError, match="scales"):
        quantize.from_mxfp4(blocks, scales[:, :3])


@pytest.mark.parametrize("layout", ["gptq", "awq"])
def test_gptq_and_awq_layouts(rng, layout):
    e, k, n = 2, 256, 16
    q = rng.integers(0, 16, (e, k, n))  # [E, K, N] as the checkpoints ([in, out])
    z = rng.integers(0, 16, (e, k // 128, n))
    s = rng.uniform(0.01, 0.1, (e, k // 128, n)).astype(np.float16)
    if layout == "gptq":
        qw = quantize.from_gptq(pack_words(q, 1), s, pack_words(np.maximum(z - 1, 0), 2))
        z = np.maximum(z - 1, 0) + 1
    else:
        qw = quantize.from_awq(pack_words(q, 2, quantize.AWQ_ORDER), s, pack_words(z, 2, quantize.AWQ_ORDER))
    want = (q - np.repeat(z, 128, axis=1)) * np.repeat(s.astype(np.float32), 128, axis=1)  # [E, K, N]
    assert qw.scheme == "int4_zp" and qw.shape == (e, n, k)
    np.testing.assert_allclose(np.asarray(qw.dequantize()), np.swapaxes(want, 1, 2), rtol=1e-6)
    with pytest.raises(ValueError, match="group_size"):
        quantize.from_awq(pack_words(q, 2), s, pack_words(z, 2), group_size=64)


def test_constructor_validates_checkpoint_arrays():
    v8 = jnp.zeros((2, 256, 300), jnp.float8_e4m3fn)
    QuantizedWeights(values=v8, scales=jnp.ones((2, 2, 3)), scheme="fp8_block")  # DeepSeek-V3's blocks
    with pytest.raises(ValueError, match=r"scales of shape \[2, 2, 3\]"):
        QuantizedWeights(values=v8, scales=jnp.ones((2, 256)), scheme="fp8_block")
    with pytest.raises(ValueError, match="needs scales"):
        QuantizedWeights(values=v8, scheme="fp8")
    with pytest.raises(TypeError, match="stores values"):
        QuantizedWeights(values=v8.astype(jnp.int8), scales=jnp.ones((2, 256)), scheme="fp8")
    with pytest.raises(TypeError, match="stores scales"):
        QuantizedWeights(values=v8, scales=jnp.ones((2, 256), jnp.int32), scheme="fp8")
    p = jnp.zeros((2, 8, 100), jnp.uint8)  # K = 200: two groups of 128 along K
    q = QuantizedWeights(values=p, scales=jnp.ones((2, 8, 2)), scheme="int4_zp", zero_points=jnp.zeros((2, 8, 2),
                                                                                                        jnp.uint8))
    assert q.shape == (2, 8, 200)
    with pytest.raises(ValueError, match="needs zero_points"):
        QuantizedWeights(values=p, scales=jnp.ones((2, 8, 2)), scheme="int4_zp")
    with pytest.raises(ValueError, match="has no zero_points"):
        QuantizedWeights(values=p, scales=jnp.ones((2, 8, 2)), scheme="int4", zero_points=jnp.zeros((2, 8, 2)))
    with pytest.raises(TypeError, match="stores zero_points"):
        QuantizedWeights(values=p, scales=jnp.ones((2, 8, 2)), scheme="int4_zp",
                         zero_points=jnp.zeros((2, 8, 2), jnp.int32))
    with pytest.raises(TypeError, match="stores scales"):
        QuantizedWeights(values=p, scales=jnp.ones((2, 8, 7)), scheme="mxfp4")
    with pytest.raises(ValueError, match="even"):
        jaxmoe.quantize_weights(jnp.ones((2, 8, 7)), "int4")
    with pytest.raises(ValueError, match="scheme"):
        jaxmoe.quantize_weights(jnp.ones((2, 8, 8)), "fp4")
    assert set(WEIGHT_SCHEMES) == {"none", *EIGHT_BIT, *FOUR_BIT}


# ----------------------------------------------------------------------------- configs


def test_configs_key_on_the_scheme(tmp_path, monkeypatch):
    """A tuned entry for one scheme is used for it alone; K tiles fit the schemes."""
    import json

    from jaxmoe.ops.gemm import config as _config

    key = _config.shape_key(8, 4096, 14336, BF16, "fp8_block", "fp8")
    assert key == "E=8,D=4096,I=14336,dtype=bfloat16,w=fp8_block,a=fp8"
    entry = {"block_m": 32, "stage1": {"block_n": 64, "block_k": 64}, "stage2": {"block_n": 32, "block_k": 256}}
    (tmp_path / "sm90.json").write_text(json.dumps({key: {"1": entry}}))
    monkeypatch.setenv("JAXMOE_CONFIG_DIR", str(tmp_path))
    picked = _config.select_config(4, 2, 8, 4096, 14336, BF16, "sm90", "fp8_block", "fp8")
    assert picked.block_m == 32 and picked.stage1.block_k == picked.stage2.block_k == 128  # one 128-group a step
    other = _config.select_config(4, 2, 8, 4096, 14336, BF16, "sm90", "fp8", "fp8")
    assert other == _config.heuristic_config(4, 2, 8, 4096, 14336, BF16, "sm90", "fp8", "fp8")  # not that entry
    plain = _config.select_config(4, 2, 8, 4096, 14336, BF16, "sm90")  # unquantized: the package's own table
    assert plain == _config.select_config(4, 2, 8, 4096, 14336, BF16, "sm90", "none", None) != picked
    for weights, act, ok in (("int4", None, lambda k: k <= 128), ("mxfp4", None, lambda k: k >= 16),
                             ("int8", "int8", lambda k: k >= 32)):
        for m in (1, 4096):
            c = _config.select_config(m, 2, 8, 4096, 14336, BF16, "gfx942", weights, act)
            assert ok(c.stage1.block_k) and ok(c.stage2.block_k), (weights, m, c)


@pytest.mark.parametrize("scheme,act_quant", [("fp8", "fp8"), ("int4_zp", None), ("mxfp4", None)])
def test_with_biases_clamped_swiglu_and_interleaved_gate_up(rng, scheme, act_quant):
    """gpt-oss's features on quantized weights: biases on the dequantized accumulators, the
    clamped SwiGLU, gate/up rows interleaved (each row its own scales); kernels against the
    reference, and the reference against the same layer on the dequantized weights."""
    x, w1, w2, tw, ids = moe_inputs(rng, 9, 64, 32, 4, 2, BF16)
    b1 = randn(rng, (4, 64), F32, 0.5)
    b2 = randn(rng, (4, 64), F32, 0.5)
    q1, q2 = jaxmoe.quantize_weights(w1, scheme), jaxmoe.quantize_weights(w2, scheme)
    kw = dict(b1=b1, b2=b2, layout="out_in_interleaved", activation="clamped_swiglu", act_quant=act_quant)
    got = jax.jit(lambda *a: jaxmoe.fused_moe(*a, **kw, implementation="triton"))(x, q1, q2, tw, ids)
    ref = jaxmoe.fused_moe(x, q1, q2, tw, ids, **kw, implementation="reference")
    assert np.isfinite(np.asarray(got, np.float32)).all()
    assert rel_err(got, ref) <= (2e-2 if act_quant else 1e-2)
    if act_quant is None:  # weight-only: the dequantized weights in fp32 are the same layer
        plain = jaxmoe.fused_moe(x.astype(F32), q1.dequantize(), q2.dequantize(), tw, ids, **kw,
                                 implementation="reference")
        assert rel_err(ref, plain) <= 1e-2
    with pytest.raises(ValueError, match="out_in"):
        jaxmoe.fused_moe(x, q1, q2, tw, ids, layout="in_out", implementation="reference")


def test_bench_times_the_quantized_layer_against_its_bytes(tmp_path, capsys, monkeypatch):
    """``bench --quant``: the quantized layer is one more row, its roofline at the stored bytes
    (the timing loop itself is test_cli's; here each layer runs once, for its output)."""
    import json

    from jaxmoe.__main__ import main
    from jaxmoe.models import PRESETS
    from jaxmoe.tools import bench

    if jax.default_backend() != "cpu":
        pytest.skip("CPU behaviour")
    ran = []

    def once(fn, params, xs, reps):
        y = jax.jit(fn)(params, xs[0])
        ran.append(bool(np.isfinite(np.asarray(y, np.float32)).all()))
        return 1e-3, 0.0

    monkeypatch.setattr(bench, "time_layer_detail", once)
    out = str(tmp_path / "b")
    assert main(["bench", "--model", "tiny", "--m", "2", "--reps", "1", "--impl", "jaxmoe", "--quant", "int4",
                 "--out", out]) == 0
    rows = {r["impl"]: r for r in json.loads((tmp_path / "b.json").read_text())}
    assert set(rows) == {"jaxmoe", "jaxmoe:int4"} and ran == [True, True]
    assert rows["jaxmoe:int4"]["bandwidth_gbs"] < 0.6 * rows["jaxmoe"]["bandwidth_gbs"]  # same time, fewer bytes
    p = PRESETS["mixtral-8x7b"]
    full = bench.roofline(p, 1, 8.0, 2)[0]
    four = bench.quant_roofline(p, 1, 8.0, 2, "int4", None)[0]
    eight = bench.quant_roofline(p, 1, 8.0, 2, "fp8", "fp8")[0]
    assert 0.26 < four / full < 0.27 and 0.5 < eight / full < 0.51  # 0.5 + 4/128 and 1 + 4/D bytes a weight
    capsys.readouterr()
    assert main(["bench", "--quant", "int4", "--act-quant", "fp8", "--out", out]) == 2
    assert "--act-quant fp8 needs --quant" in capsys.readouterr().err
    # a run with fp8 fast accumulation says so in its header
    monkeypatch.setenv("JAXMOE_FP8_FAST_ACCUM", "1")
    fp8 = ["bench", "--model", "tiny", "--m", "2", "--reps", "1", "--impl", "jaxmoe", "--quant", "fp8", "--out", out]
    assert main([*fp8, "--act-quant", "fp8"]) == 0
    assert "JAXMOE_FP8_FAST_ACCUM=1: the fp8 GEMMs sum over K inside the fp8 MMA" in capsys.readouterr().out
    assert main(fp8) == 0  # weight-only: not affected, not said
    assert "FAST_ACCUM" not in capsys.readouterr().out
    # tables serve both settings: tune refuses to pick tiles with fast accumulation on
    assert main(["tune", "--model", "tiny", "--quant", "fp8", "--act-quant", "fp8", "--out", str(tmp_path)]) == 2
    assert "tune with JAXMOE_FP8_FAST_ACCUM unset" in capsys.readouterr().err
