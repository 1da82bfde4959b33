"""The decode path of the fused MoE (``jaxmoe.ops.moe.decode``): two launches per layer.

Each case forces the path (``decode=True``) and compares it with the float64 oracle (or
the fp32 reference past the oracle's size) on fresh random inputs, under ``jax.jit``,
outputs poisoned first; routed calls are also held to the aligned path's routing,
bitwise (the same routing code). Tolerances: bf16/fp16 1e-2 (``conftest.TOLERANCE``):
the path rounds where the aligned path rounds (h, each (token, slot) row, the sum).

The interpreter class keeps shapes tiny; the GPU class runs real layer shapes and the
int64 expert offsets, and is skipped, visibly, without a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmoe
from conftest import moe_inputs, rel_err, tolerance
from jaxmoe.ops.moe import decode
from jaxmoe.ops.moe import triton as moe_triton
from op_base import BF16, F16, F32, OpTests, cases, with_invalid_ids
from test_moe import expected, fp32_reference

# (M, D, I, E, k, expert pool or None): M = 1, odd sizes (D and I not multiples of the
# tiles), k = E, empty experts, k = 1, a k that is not a power of two
FUSED = {
    "1-64-32-8-2": (1, 64, 32, 8, 2, None),
    "3-96-80-6-3": (3, 96, 80, 6, 3, None),
    "2-32-48-4-4-k=E": (2, 32, 48, 4, 4, None),
    "5-64-32-16-2-empty": (5, 64, 32, 16, 2, (0, 3, 9)),
    "4-48-24-8-1": (4, 48, 24, 8, 1, None),
}
# (M, D, I, E, k, routing options)
ROUTED = {
    "softmax": (3, 64, 32, 16, 4, {}),
    "softmax-no-renorm-M=1": (1, 64, 32, 8, 2, {"renormalize": False}),
    "sigmoid-groups-bias-scale": (2, 32, 16, 16, 4, {"scoring": "sigmoid", "num_expert_group": 4, "topk_group": 2,
                                                     "bias": True, "routed_scaling_factor": 2.5,
                                                     "group_scoring": "top2_sum"}),
    "k=E": (2, 32, 16, 4, 4, {}),
}


def _routing(rng, e, opts):
    opts = dict(opts)
    if opts.pop("bias", False):
        opts["correction_bias"] = jnp.asarray(0.1 * rng.standard_normal(e), F32)
    return opts


class DecodeTests(OpTests):
    implementation = "triton"
    FUSED = FUSED
    ROUTED = ROUTED
    DTYPES = (BF16, F16)

    def fused(self, x, w1, w2, tw, ids, activation="silu", decode_=True):
        return self.jit(lambda *a: moe_triton.fused_moe(*a, activation=activation, decode=decode_), x, w1, w2, tw, ids)

    def routed(self, x, w1, w2, logits, k, decode_=True, activation="silu", **opts):
        return self.jit(lambda x, w1, w2, lg: moe_triton.routed_moe(x, w1, w2, lg, k, activation=activation,
                                                                    decode=decode_, return_routing=True, **opts),
                        x, w1, w2, logits)

    @pytest.mark.parametrize("activation", ["silu", "gelu"])
    @cases("FUSED", "m,d,i,e,k,pool")
    def test_fused_matches_oracle(self, rng, m, d, i, e, k, pool, activation):
        for dtype in self.DTYPES:
            x, w1, w2, tw, ids = moe_inputs(rng, m, d, i, e, k, dtype, None if pool is None else list(pool))
            out = self.fused(x, w1, w2, tw, ids, activation)
            assert out.shape == x.shape and out.dtype == x.dtype
            assert np.isfinite(np.asarray(out, np.float32)).all()  # poisoned: every element written
            assert rel_err(out, expected(x, w1, w2, tw, ids, activation)) <= tolerance(dtype)

    @cases("ROUTED", "m,d,i,e,k,opts")
    def test_routed_matches_aligned_path_and_oracle(self, rng, m, d, i, e, k, opts):
        opts = _routing(rng, e, opts)
        x, w1, w2, _, _ = moe_inputs(rng, m, d, i, e, k, BF16)
        logits = jnp.asarray(2.0 * rng.standard_normal((m, e)), F32)
        y, weights, ids = self.routed(x, w1, w2, logits, k, **opts)
        y_al, weights_al, ids_al = self.routed(x, w1, w2, logits, k, decode_=False, **opts)
        # the same routing code runs in both, inside different kernels: ids agree exactly,
        # weights to a few fp32 roundings (sigmoid, bias, the normalising division and the
        # scale, compiled into two kernels: on the H200 they differ by up to 2 ulp)
        np.testing.assert_array_equal(ids, ids_al)
        np.testing.assert_allclose(weights, weights_al, rtol=5e-7, atol=0)
        ref_w, ref_ids = jaxmoe.route(logits, k, implementation="reference", **opts)
        np.testing.assert_array_equal(ids, ref_ids)
        assert np.isfinite(np.asarray(y, np.float32)).all()
        assert rel_err(y, expected(x, w1, w2, weights, ids)) <= tolerance(BF16)
        assert rel_err(y, y_al) <= tolerance(BF16)

    def test_invalid_ids_contribute_nothing(self, rng):
        """Ids outside [0, E) (negative, past E, the most negative int32) add nothing; a
        token whose ids are all invalid gets zeros."""
        m, d, i, e, k = 6, 64, 32, 8, 2
        x, w1, w2, tw, ids = moe_inputs(rng, m, d, i, e, k, BF16)
        ids = np.array(with_invalid_ids(ids, e))
        ids[4] = [-7, e]
        out = self.fused(x, w1, w2, tw, jnp.asarray(ids))
        assert np.isfinite(np.asarray(out, np.float32)).all()
        assert (np.asarray(out[4], np.float32) == 0).all()
        assert rel_err(out, expected(x, w1, w2, tw, jnp.asarray(ids))) <= tolerance(BF16)

    def test_an_expert_twice_in_a_token_counts_twice(self, rng):
        m, d, i, e, k = 3, 32, 16, 4, 3
        x, w1, w2, tw, _ = moe_inputs(rng, m, d, i, e, k, BF16)
        ids = jnp.asarray([[1, 1, 2], [0, 3, 0], [2, 2, 2]], jnp.int32)
        assert rel_err(self.fused(x, w1, w2, tw, ids), expected(x, w1, w2, tw, ids)) <= tolerance(BF16)

    def test_nan_stays_in_its_token(self, rng):
        """A NaN in one token's input (fused) or logits (routed) reaches only that token's output."""
        m, d, i, e, k = 4, 32, 16, 8, 2
        x, w1, w2, tw, ids = moe_inputs(rng, m, d, i, e, k, BF16)
        ids = jnp.asarray([[0, 1], [1, 2], [0, 2], [1, 0]], jnp.int32)  # token 1 shares experts with all
        x = x.at[1, 3].set(jnp.nan)
        out = np.asarray(self.fused(x, w1, w2, tw, ids), np.float32)
        assert np.isnan(out[1]).all()
        others = np.array([0, 2, 3])
        assert np.isfinite(out[others]).all()
        assert rel_err(out[others], expected(x[others], w1, w2, tw[others], ids[others])) <= tolerance(BF16)

        logits = jnp.asarray(rng.standard_normal((m, e)), F32).at[2, 5].set(jnp.nan)
        x = x.at[1, 3].set(1.0)
        y, weights, r_ids = self.routed(x, w1, w2, logits, k)
        y = np.asarray(y, np.float32)
        assert np.isnan(y[2]).all() and np.isnan(np.asarray(weights[2])).all()
        rest = np.array([0, 1, 3])
        assert np.isfinite(y[rest]).all()
        assert ((np.asarray(r_ids) >= 0) & (np.asarray(r_ids) < e)).all()

    def test_gradients_are_the_aligned_paths(self, rng):
        """Under jax.grad both ops run (and differentiate) the aligned path: the gradients
        equal those of decode=False bitwise, and the forward value is unchanged."""
        m, d, i, e, k = 3, 32, 16, 8, 2
        x, w1, w2, tw, ids = moe_inputs(rng, m, d, i, e, k, BF16)
        logits = jnp.asarray(rng.standard_normal((m, e)), F32)
        probe = jnp.asarray(rng.standard_normal((m, d)), F32)

        def fused_loss(x, w1, w2, tw, dec):
            return jnp.sum(moe_triton.fused_moe(x, w1, w2, tw, ids, decode=dec).astype(F32) * probe)

        def routed_loss(x, w1, w2, lg, dec):
            return jnp.sum(moe_triton.routed_moe(x, w1, w2, lg, k, decode=dec).astype(F32) * probe)

        for loss, args in ((fused_loss, (x, w1, w2, tw)), (routed_loss, (x, w1, w2, logits))):
            (v1, g1), (v2, g2) = (jax.jit(jax.value_and_grad(lambda *a, dec=dec: loss(*a, dec), argnums=(0, 1, 2, 3)))(
                *args) for dec in (True, False))
            assert float(v1) == float(v2)
            for a, b in zip(g1, g2):
                assert np.isfinite(np.asarray(a, np.float32)).all()
                np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
            assert any(np.abs(np.asarray(g, np.float32)).max() > 0 for g in g1)

    def test_layer_takes_the_decode_path(self, rng, monkeypatch, capsys):
        """moe_layer at M = 1 takes the path by the size rule (and says so), and matches the reference."""
        monkeypatch.delenv(decode.ENV, raising=False)
        monkeypatch.setattr(decode, "DECODE_MAX_TOKENS", 4)  # the rule on a card where the path wins
        monkeypatch.setenv("JAXMOE_LOG_CONFIG", "1")
        params = jaxmoe.init_moe_params(jax.random.key(3), hidden=64, intermediate=32, experts=8)
        x = jnp.asarray(rng.standard_normal((1, 64)), F32).astype(BF16)
        y = self.jit(lambda p, x: jaxmoe.moe_layer(p, x, top_k=2, **self.impl), params, x)
        assert "routed_moe M=1 k=2 E=8 D=64 I=32 bfloat16 path=decode (M=1 <= DECODE_MAX_TOKENS" in \
            capsys.readouterr().err
        ref = jaxmoe.moe_layer(jax.tree.map(lambda a: a.astype(F32), params), x.astype(F32), top_k=2,
                               implementation="reference")
        assert rel_err(y, ref) <= tolerance(BF16)


class TestDecodeTritonInterpreter(DecodeTests):
    pass


@pytest.mark.gpu
class TestDecodeTritonGPU(DecodeTests):
    gpu = True
    FUSED = {**FUSED,
             "qwen3-1": (1, 2048, 768, 128, 8, None), "qwen3-4": (4, 2048, 768, 128, 8, None),
             "mixtral-1": (1, 4096, 14336, 8, 2, None), "64-1024-512-64-6": (64, 1024, 512, 64, 6, None)}
    ROUTED = {**ROUTED,
              "qwen3-M=1": (1, 2048, 768, 128, 8, {}),
              "deepseek-v3-routing-M=3": (3, 1024, 256, 256, 8, {"scoring": "sigmoid", "num_expert_group": 8,
                                                           "topk_group": 4, "bias": True,
                                                           "routed_scaling_factor": 2.5})}

    @pytest.mark.xdist_group("big-memory")  # tens of GB each: one at a time on the card
    def test_expert_offsets_past_int32(self, rng):
        """w1[e] starts at e * 2I * D elements: past 2^31 for the last experts here."""
        m, d, i, e, k = 2, 8192, 2048, 66, 2
        assert (e - 1) * 2 * i * d > 2**31
        keys = jax.random.split(jax.random.key(5), 3)
        w1 = (jax.random.normal(keys[0], (e, 2 * i, d), F32) * d**-0.5).astype(BF16)  # made on the device
        w2 = (jax.random.normal(keys[1], (e, d, i), F32) * i**-0.5).astype(BF16)
        x = jax.random.normal(keys[2], (m, d), F32).astype(BF16)
        tw = jnp.asarray(rng.uniform(0.1, 1.0, (m, k)), F32)
        ids = jnp.asarray([[e - 1, 0], [e - 2, e - 1]], jnp.int32)
        out = self.fused(x, w1, w2, tw, ids)
        assert rel_err(out, fp32_reference(x, w1, w2, tw, ids)) <= tolerance(BF16)


# ----------------------------------------------------------------------------- choosing the path


def test_size_rule_and_overrides(monkeypatch):
    monkeypatch.delenv(decode.ENV, raising=False)
    # as shipped the rule never picks the path (the aligned one is faster on the H200)
    assert decode.DECODE_MAX_TOKENS == 0 and not decode.choose(1, BF16).decode
    limit = 4  # a card where the decode path wins up to 4 tokens
    monkeypatch.setattr(decode, "DECODE_MAX_TOKENS", limit)
    assert decode.choose(1, BF16).decode and decode.choose(limit, F16).decode
    assert not decode.choose(limit + 1, BF16).decode
    assert not decode.choose(1, F32).decode  # fp32 stays on the aligned path
    assert not decode.choose(1, BF16, routed_scale=None).decode  # a traced routed_scaling_factor
    assert not decode.choose(1, BF16, config=object()).decode  # an explicit (tuner's) config
    assert decode.choose(limit + 1, BF16, decode=True).decode
    assert not decode.choose(1, BF16, decode=False).decode
    monkeypatch.setenv(decode.ENV, "1")
    assert decode.choose(limit + 1, BF16).decode and not decode.choose(1, F32).decode
    assert not decode.choose(1, BF16, decode=False).decode  # the argument wins over the environment
    monkeypatch.setenv(decode.ENV, "0")
    assert not decode.choose(1, BF16).decode
    monkeypatch.setenv(decode.ENV, "maybe")
    with pytest.raises(ValueError, match="JAXMOE_DECODE"):
        decode.choose(1, BF16)


def test_forcing_the_decode_path_where_it_cannot_serve_raises(rng, monkeypatch):
    monkeypatch.delenv(decode.ENV, raising=False)
    with pytest.raises(ValueError, match="decode=True.*float32"):
        decode.choose(1, F32, decode=True)
    with pytest.raises(ValueError, match="DECODE_TOKEN_LIMIT"):
        decode.choose(decode.DECODE_TOKEN_LIMIT + 1, BF16, decode=True)
    with pytest.raises(TypeError, match="decode must be"):
        decode.choose(1, BF16, decode="yes")
    x, w1, w2, tw, ids = moe_inputs(rng, 2, 32, 16, 4, 2, F32)
    with pytest.raises(ValueError, match="float32"):
        moe_triton.fused_moe(x, w1, w2, tw, ids, decode=True)


def test_plan_spreads_weights_over_the_sms(monkeypatch):
    """At M = 1 the real shapes' launches have >= 256 programs each (>= 132 SMs streaming)."""
    monkeypatch.setenv(decode.ENV, "1")
    for e, k, d, i in ((128, 8, 2048, 768), (8, 2, 4096, 14336), (256, 8, 7168, 2048)):
        for spec in decode.plan_decode(1, k, e, d, i, BF16, routed=True):
            assert int(np.prod(spec.grid)) >= 256, (spec.name, spec.grid)
    routed = moe_triton.plan_routed_moe(1, 8, 128, 2048, 768, BF16, "sm90")
    assert [s.name for s in routed] == ["moe_decode_route_gate_up_kernel", "moe_decode_down_kernel"]


def test_decode_path_refuses_layer_features():
    """Biases, another layout or the clamped SwiGLU send a decode-sized call down the aligned
    path (the decode kernels have none of them); forcing the decode path names the feature."""
    from jaxmoe.ops.moe import decode as _decode

    assert _decode.features_in_use("silu", "out_in", None, None) == ()
    got = _decode.features_in_use(jaxmoe.ClampedSwiGLU(), "in_out_interleaved", jnp.zeros(1), None)
    assert len(got) == 3 and "layout='in_out_interleaved'" in got and "b1" in got
    assert not _decode.choose(1, jnp.bfloat16, features=("b2",)).decode
    with pytest.raises(ValueError, match="b2"):
        _decode.choose(1, jnp.bfloat16, decode=True, features=("b2",))
