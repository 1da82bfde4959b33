"""Routing and alignment in one launch (decode sizes), a launch of the kernels' own (the MoE
layer uses it, see test_layer.py), against the reference: the same weights, ids, sorted
rows, block experts and padded count. CPU: Triton's interpreter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe import backends, reference
from jaxmoe.backends import aot
from jaxmoe.ops.moe import triton as moe_triton
from op_base import bias as _bias
from op_base import logits as _logits

BF16, F32 = jnp.bfloat16, jnp.float32

CASES = {  # name: (M, E, k, routing options, with bias)
    "mixtral-decode": (1, 8, 2, {}, False),
    "two-row-blocks": (300, 8, 2, dict(scoring="sigmoid", renormalize=False, routed_scaling_factor=1.5), False),
    "qwen-like": (9, 128, 8, {}, False),
    "deepseek-v3": (16, 256, 8, dict(scoring="sigmoid", num_expert_group=8, topk_group=4,
                                     routed_scaling_factor=2.5), True),
    "deepseek-v2": (5, 160, 6, dict(scoring="softmax", renormalize=False, num_expert_group=8, topk_group=3), False),
    "odd": (3, 6, 6, {}, False),
    # explicit group rules, each where the default would pick the other
    "top2-sum-no-bias": (4, 32, 4, dict(scoring="sigmoid", num_expert_group=8, topk_group=2,
                                        group_scoring="top2_sum"), False),
    "max-with-bias": (4, 32, 4, dict(scoring="sigmoid", num_expert_group=8, topk_group=2,
                                     group_scoring="max"), True),
}


def _route_align(logits, k, bias, block_size, logit_bias=None, shared=0, **kw):
    m, e = logits.shape
    scale = kw.pop("routed_scaling_factor", 1.0)
    spec = moe_triton.plan_route_align(m, e, k, logits.dtype, block_size, **kw,
                                        bias_dtype=None if bias is None else bias.dtype,
                                        routed_scaling_factor=scale,
                                        logit_bias_dtype=None if logit_bias is None else logit_bias.dtype,
                                        shared_experts=shared)
    assert spec is not None and spec.grid == (1,)
    bias_arg = bias if bias is not None else jnp.zeros((1,), F32)
    lb_arg = logit_bias if logit_bias is not None else jnp.zeros((1,), F32)
    with backends.poisoned_outputs():
        outs = jax.jit(lambda x, b, lb: backends.launch(spec, x, b, lb))(logits, bias_arg, lb_arg)
    return jax.device_get(outs[:5])


def _check(logits, k, bias, block_size, logit_bias=None, shared=0, **kw):
    """Against the reference: routing of ``logits + logit_bias``, then ``shared`` slots of
    the experts ``E ..`` at weight 1, aligned over ``E + shared`` experts."""
    got_w, got_ids, got_sorted, got_experts, got_padded = _route_align(logits, k, bias, block_size, logit_bias,
                                                                       shared, **kw)
    biased = logits if logit_bias is None else logits.astype(F32) + logit_bias.astype(F32)
    want_w, want_ids = jax.device_get(reference.route(biased, k, correction_bias=bias, **kw))
    m, e = logits.shape
    if shared:
        want_w = np.concatenate([want_w, np.ones((m, shared), np.float32)], axis=1)
        want_ids = np.concatenate([want_ids, np.tile(np.arange(e, e + shared, dtype=want_ids.dtype), (m, 1))], axis=1)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got_w, want_w, rtol=1e-5, atol=1e-30, equal_nan=True)
    want_sorted, want_experts, want_padded = jax.device_get(
        reference.moe_align_block_size(jnp.asarray(want_ids), e + shared, block_size))
    assert int(got_padded[0]) == int(want_padded[0])
    np.testing.assert_array_equal(got_sorted, want_sorted)
    np.testing.assert_array_equal(got_experts, want_experts)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_route_align_matches_reference(rng, case, dtype):
    m, e, k, kw, with_bias = CASES[case]
    bias = _bias(rng, e) if with_bias else None
    _check(_logits(rng, m, e, dtype), k, bias, 16, **kw)


def test_route_align_block_sizes_ties_and_nan(rng):
    logits = _logits(rng, 6, 64, F32)
    _check(logits, 4, None, 64)
    ties = jnp.zeros((4, 32), F32).at[1, 7].set(1.0)  # rows of equal scores: lowest ids win
    _check(ties, 4, None, 16)
    nan = logits.at[2, :].set(jnp.nan).at[3, 5].set(jnp.nan)
    with np.errstate(invalid="ignore"):
        _check(nan, 4, None, 16, scoring="sigmoid")
    _check(_logits(rng, 7, 64, BF16), 4, _bias(rng, 64, BF16), 32, num_expert_group=4, topk_group=2,
           scoring="sigmoid")


@pytest.mark.parametrize("dtype,shared", [(F32, 3), (BF16, 1), (BF16, 0)])
def test_route_align_router_bias_and_shared_experts(rng, dtype, shared):
    """A router bias added to the logits in the kernel (it moves scores and weights, unlike the
    correction bias) and shared experts as the last slots of every token, aligned with the
    routed ones: DeepSeek-like grouped sigmoid routing and gpt-oss-like softmax."""
    _check(_logits(rng, 5, 64, dtype), 4, _bias(rng, 64), 16, logit_bias=(10 * _bias(rng, 64)).astype(dtype),
           shared=shared, scoring="sigmoid", num_expert_group=8, topk_group=4, routed_scaling_factor=2.5)
    _check(_logits(rng, 3, 32, dtype), 4, None, 16, logit_bias=(10 * _bias(rng, 32)).astype(dtype), shared=shared)
    _check(_logits(rng, 200, 8, dtype), 2, None, 16, shared=shared)  # several row blocks


def test_route_align_only_where_it_pays():
    # one program routes at most ROUTE_ALIGN_MAX_ROW_BLOCKS tiles and aligns at most ALIGN_CHUNK ids
    assert moe_triton.plan_route_align(1, 256, 8, F32, 16) is not None
    assert moe_triton.plan_route_align(16, 256, 8, F32, 16) is not None
    assert moe_triton.plan_route_align(64, 256, 8, F32, 16) is None  # 8 row blocks
    assert moe_triton.plan_route_align(513, 8, 2, F32, 16) is None  # 1026 ids
    assert moe_triton.plan_route_align(0, 8, 2, F32, 16) is None
    # the layer's decode case takes the one launch, its prefill case (E=64: three row blocks of 32) does not
    for m in (1, 80):
        fused = moe_triton.plan_route_align(m, 64, 6, F32, 16, scoring="sigmoid", num_expert_group=8, topk_group=4,
                                            bias_dtype=F32, routed_scaling_factor=2.5) is not None
        assert fused == (m == 1)


@pytest.mark.parametrize("target", ["sm_90", "gfx942", "gfx950"])
def test_route_align_compiles_aot(target):
    """Every kind of route+align launch the layer makes, for the presets at decode sizes."""
    from jaxmoe.models import PRESETS

    seen = {}
    for preset in PRESETS.values():
        for m in (1, 16):
            kw = preset.routing_kwargs(jax.random.key(0))
            bias = kw.pop("correction_bias", None)
            k = kw.pop("top_k")
            # the layer's extras: gpt-oss's router bias, DeepSeek-V3's stacked shared expert,
            # Qwen2-MoE's shared expert split into four routed-width ones
            extra = {"gpt-oss-120b": dict(logit_bias_dtype=BF16), "deepseek-v3": dict(shared_experts=1),
                     "qwen3-30b-a3b": dict(shared_experts=4)}.get(preset.name)
            for dtype in (F32, BF16):
                for more in ({}, extra) if extra and dtype == F32 else ({},):  # the layer's logits are fp32
                    spec = moe_triton.plan_route_align(m, preset.experts, k, dtype, 16, **kw,
                                                        bias_dtype=None if bias is None else F32, **more)
                    if spec is not None:
                        seen.setdefault((dtype, tuple(spec.constexprs[1:])), spec)
    assert len(seen) >= 8
    assert any(dict(s.constexprs)["SHARED"] == 4 for s in seen.values())
    assert any(dict(s.constexprs)["HAS_LOGIT_BIAS"] for s in seen.values())
    for spec in seen.values():
        assert aot.compile_aot(spec, target).asm, spec


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_gpu_route_align(rng, case, dtype):
    test_route_align_matches_reference(rng, case, dtype)


@pytest.mark.gpu
def test_gpu_route_align_ties_and_nan(rng):
    test_route_align_block_sizes_ties_and_nan(rng)


@pytest.mark.gpu
@pytest.mark.parametrize("shared", [0, 1, 3])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_gpu_route_align_router_bias_and_shared_experts(rng, shared, dtype):
    test_route_align_router_bias_and_shared_experts(rng, dtype, shared)


def test_interpreter_leaves_triton_language_as_it_was(rng):
    """Triton's interpreter patches the builtins of the language modules that a helper's
    globals name and never undoes it for helpers; the seam must, or a later real compile
    in the same process (the AOT tests) builds interpreter tensors."""
    if jax.default_backend() != "cpu":
        pytest.skip("the interpreter runs on CPU")
    import triton.language as tl

    namespaces = (tl, tl.standard, tl.core, tl.math, tl.core.tensor)
    before = [dict(vars(ns)) for ns in namespaces]
    _check(_logits(rng, 3, 8, F32), 2, None, 16)  # route+align: helpers from two kernel modules
    for ns, saved in zip(namespaces, before):
        changed = [name for name, value in saved.items() if vars(ns).get(name) is not value]
        assert not changed, (ns, changed[:5])
